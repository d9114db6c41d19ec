"""The OpenAI API's shapes: request bodies parsed into prompts and SamplingParams (every refusal an
ApiError naming the field), and outputs shaped into completion and chat responses and stream chunks.
No I/O here: server.py reads the bodies and sends what these functions build.
"""

import json

from fastapi.responses import JSONResponse

from .limits import ServerLimits
from .outputs import RequestOutput, StreamEvent
from .sampling import SamplingParams

# Request fields passed to SamplingParams under the same name, with the JSON types accepted.
_NUMBER, _INT, _BOOL = (int, float), (int,), (bool,)
_FIELDS = {
    "max_tokens": _INT, "temperature": _NUMBER, "top_p": _NUMBER, "top_k": _INT, "seed": _INT, "ignore_eos": _BOOL,
    "mode": (str,), "max_offload_tokens": _INT, "switch_ratio": _NUMBER, "switch_chunk": _INT, "speculate": _INT,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: "str | None" = None, kind: str = "invalid_request_error",
                 code: "str | None" = None, headers: "dict | None" = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code, self.headers = code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- requests ---------------------------------------------------------------------------------

def parse_body(raw: bytes, model_name: str) -> dict:
    """A request body: a JSON object, for this server's model, with a boolean `stream` if any."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "invalid_request_error", "model_not_found")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    return body


def completion_prompt(body: dict) -> "str | list[int]":
    """A completion's prompt: a string or token ids (a list of one string is that string)."""
    # Prompt log-probabilities (what loglikelihood evaluations ask for) are not computed:
    # refusing says so, where answering "logprobs": null would break the client later.
    for field in ("echo", "logprobs"):
        if body.get(field) not in (None, False, 0):
            raise ApiError(400, f"{field} is not supported: this server returns no log-probabilities", field)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and
                                        all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
        raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")
    return prompt


def sampling_params(body: dict, defaults: dict, limits: ServerLimits) -> SamplingParams:
    """`defaults`: the checkpoint's generation_config.json sampling fields, for what the request omits."""
    kwargs = dict(defaults)
    for key, types in _FIELDS.items():
        if key in body and body[key] is not None:
            value = body[key]
            if not isinstance(value, types) or (isinstance(value, bool) and types is not _BOOL):
                raise ApiError(400, f"{key} must be of type {'/'.join(t.__name__ for t in types)}", key)
            kwargs[key] = value
    if "n" in body and body["n"] not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    if isinstance(kwargs.get("max_tokens"), int) and kwargs["max_tokens"] > limits.max_completion_tokens:
        raise ApiError(400, f"max_tokens is {kwargs['max_tokens']}; this server allows at most "
                            f"{limits.max_completion_tokens}", "max_tokens")
    if body.get("stop") is not None:
        kwargs["stop"] = _stop(body["stop"], limits)
    if body.get("logit_bias") is not None:
        kwargs["logit_bias"] = _logit_bias(body["logit_bias"], limits)
    kwargs.setdefault("max_tokens", 16)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(" ", 1)[0]) from None


def _stop(stop, limits: ServerLimits) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if len(stop) > limits.max_stop_strings:
        raise ApiError(400, f"stop has {len(stop)} strings; this server takes at most {limits.max_stop_strings}",
                       "stop")
    if any(len(s) > limits.max_stop_length for s in stop):
        raise ApiError(400, f"a stop string is longer than {limits.max_stop_length} characters", "stop")
    return stop


def _logit_bias(bias, limits: ServerLimits) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias must map token ids to numbers", "logit_bias")
    if len(bias) > limits.max_logit_bias:
        raise ApiError(400, f"logit_bias has {len(bias)} entries; this server takes at most "
                            f"{limits.max_logit_bias}", "logit_bias")
    try:
        return {int(k): v for k, v in bias.items()}
    except (TypeError, ValueError):
        raise ApiError(400, "logit_bias keys must be token ids", "logit_bias") from None


# ---- responses --------------------------------------------------------------------------------

def error_body(out: RequestOutput) -> dict:
    """The OpenAI error object of a request that failed inside the engine."""
    return {"message": out.error, "type": "server_error", "param": None, "code": "request_failed"}


def usage(out: RequestOutput) -> dict:
    m = out.metrics
    result = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
              "total_tokens": len(out.prompt_token_ids) + len(out.token_ids)}
    if m is not None:
        # The prompt's model: the small one, unless the big one answers alone.
        result["prompt_tokens_details"] = {"cached_tokens": m.cached_tokens[1 if m.mode == "big" else 0]}
        result.update(small_tokens=m.small_tokens, big_tokens=m.big_tokens, offload_fraction=m.offload_fraction,
                      small_cached_tokens=m.cached_tokens[0], big_cached_tokens=m.cached_tokens[1],
                      handoffs=m.handoffs, mode=m.mode, latency_per_offloaded_token_s=m.latency_per_offloaded_token,
                      draft_tokens=m.draft_tokens, accepted_draft_tokens=m.accepted_draft_tokens,
                      acceptance_rate=m.acceptance_rate, big_steps_per_offloaded_token=m.big_steps_per_offloaded_token)
    return result


class CompletionShape:
    """/v1/completions responses: one text_completion, or its stream chunks."""

    def __init__(self, rid: str, created: int, model: str):
        self.head = {"id": rid, "object": "text_completion", "created": created, "model": model}

    def chunk(self, event: StreamEvent) -> dict:
        out = event.output
        choice = {"index": 0, "text": event.text, "logprobs": None,
                  "finish_reason": out.finish_reason if out else None, "stop_reason": out.stop_reason if out else None,
                  "token_models": event.token_models}  # extension: who wrote each new token (0 small, 1 big)
        return _with_usage({**self.head, "choices": [choice]}, out)

    def final(self, out: RequestOutput) -> dict:
        return {**self.head, "choices": [{"index": 0, "text": out.text, "logprobs": None,
                                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}],
                "usage": usage(out)}


class ChatShape:
    """/v1/chat/completions responses: one chat.completion, or its stream chunks (the first with the role)."""

    def __init__(self, rid: str, created: int, model: str):
        self.rid, self.created, self.model = rid, created, model
        self.sent_role = False

    def chunk(self, event: StreamEvent) -> dict:
        out = event.output
        delta = {"content": event.text}
        if not self.sent_role:
            delta["role"], self.sent_role = "assistant", True
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": out.finish_reason if out else None,
                  "token_models": event.token_models}
        body = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}
        return _with_usage(body, out)

    def final(self, out: RequestOutput) -> dict:
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": usage(out)}


def _with_usage(body: dict, out: "RequestOutput | None") -> dict:
    if out is not None:
        body["usage"] = usage(out)
    return body
