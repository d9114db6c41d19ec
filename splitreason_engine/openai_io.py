"""The OpenAI API's shapes: request bodies parsed into prompts and SamplingParams (every refusal an
ApiError naming the field), and outputs shaped into completion and chat responses and stream chunks.
No I/O here: server.py reads the bodies and sends what these functions build.
"""

import dataclasses
import json
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from .limits import ServerLimits
from .openai_logprobs import TokenText, chat_logprobs, completion_logprobs
from .outputs import RequestMetrics, RequestOutput, StreamEvent
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


@dataclass(frozen=True)
class Asked:
    """What one API request fans out to: each prompt `n` times (choice index = prompt * n + sample),
    each sample with its own seed derived from `seed`; `logprobs`: how many alternatives per token
    (None: no log-probabilities); `echo`: the prompt, and with logprobs its scores, lead each choice."""

    params: SamplingParams
    n: int = 1
    logprobs: "int | None" = None
    echo: bool = False

    def per_sample(self) -> list[SamplingParams]:
        """The n samples' params: seeds seed, seed + 1, ... (unseeded ones draw their own noise)."""
        if self.n == 1 or self.params.seed is None:
            return [self.params] * self.n
        return [dataclasses.replace(self.params, seed=self.params.seed + j) for j in range(self.n)]


def completion_prompts(body: dict, limits: ServerLimits) -> "list[str | list[int]]":
    """A completion's prompts: a string, token ids, or a list of either (one choice set per prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        return [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or _token_ids(p) for p in prompt):
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")
    if len(prompt) > limits.max_prompts:
        raise ApiError(400, f"prompt has {len(prompt)} prompts; this server takes at most {limits.max_prompts}",
                       "prompt")
    return prompt


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _bounded_int(body: dict, key: str, least: int, most: int, flag: str) -> "int | None":
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
        raise ApiError(400, f"{key} must be an integer in [{least}, {most}] (this server's {flag}), got {value!r}",
                       key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key} must be a boolean", key)
    return bool(value)


def asked_for(body: dict, defaults: dict, limits: ServerLimits, chat: bool) -> Asked:
    """The request's samples and log-probabilities; `defaults`: the checkpoint's
    generation_config.json sampling fields, for what the request omits."""
    n = _bounded_int(body, "n", 1, limits.max_n, "--max-n") or 1
    echo = False
    if chat:
        top = _bounded_int(body, "top_logprobs", 0, limits.max_logprobs, "--max-logprobs")
        logprobs = (top or 0) if _flag(body, "logprobs") else None
        if top is not None and logprobs is None:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    else:
        logprobs = _bounded_int(body, "logprobs", 0, limits.max_logprobs, "--max-logprobs")
        echo = _flag(body, "echo")
    extra = {}
    if logprobs is not None:
        extra.update(logprobs=True, top_logprobs=logprobs)
    if echo and (logprobs is not None or body.get("max_tokens") == 0):
        extra["prompt_logprobs"] = logprobs or 0  # max_tokens 0 scores the prompt and generates nothing
    return Asked(sampling_params(body, defaults, limits, extra), n, logprobs, echo)


def sampling_params(body: dict, defaults: dict, limits: ServerLimits, extra: "dict | None" = None) -> SamplingParams:
    """`defaults`: the checkpoint's generation_config.json sampling fields, for what the request
    omits; `extra`: fields set from the request's other options (log-probabilities)."""
    kwargs = dict(defaults)
    for key, types in _FIELDS.items():
        if key in body and body[key] is not None:
            value = body[key]
            if not isinstance(value, types) or (isinstance(value, bool) and types is not _BOOL):
                raise ApiError(400, f"{key} must be of type {'/'.join(t.__name__ for t in types)}", key)
            kwargs[key] = value
    if isinstance(kwargs.get("max_tokens"), int) and kwargs["max_tokens"] > limits.max_completion_tokens:
        raise ApiError(400, f"max_tokens is {kwargs['max_tokens']}; this server allows at most "
                            f"{limits.max_completion_tokens}", "max_tokens")
    if body.get("stop") is not None:
        kwargs["stop"] = _stop(body["stop"], limits)
    if body.get("logit_bias") is not None:
        kwargs["logit_bias"] = _logit_bias(body["logit_bias"], limits)
    kwargs.setdefault("max_tokens", 16)
    kwargs.update(extra or {})
    if kwargs["max_tokens"] == 0 and "prompt_logprobs" not in kwargs:
        raise ApiError(400, "max_tokens 0 is only allowed with echo (score the prompt)", "max_tokens")
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


def pooled(metrics: list[RequestMetrics]) -> RequestMetrics:
    """One request's figures summed over its choices (ratios then come out pooled)."""
    total = RequestMetrics(0.0, mode=metrics[0].mode)
    for m in metrics:
        for name in ("small_tokens", "big_tokens", "handoffs", "big_steps", "draft_tokens", "accepted_draft_tokens",
                     "catch_up_time", "big_time"):
            setattr(total, name, getattr(total, name) + getattr(m, name))
        total.cached_tokens = [a + b for a, b in zip(total.cached_tokens, m.cached_tokens)]
    return total


def usage(outs: list[RequestOutput], n: int) -> dict:
    """Token counts of one API request: each prompt once (as the API counts it), every choice's
    completion; the extension fields pool the choices, and `prompt_tokens_computed` says how many
    prompt tokens the model computed over every choice (the rest came from the prefix cache: the
    samples of one prompt share its pages)."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n])
    completion_tokens = sum(len(o.token_ids) for o in outs)
    result = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "total_tokens": prompt_tokens + completion_tokens}
    metrics = [o.metrics for o in outs if o.metrics is not None]
    if metrics:
        m = pooled(metrics)
        prompt_model = 1 if m.mode == "big" else 0  # the prompt's model: the small one, unless the big one answers alone
        result["prompt_tokens_details"] = {"cached_tokens": m.cached_tokens[prompt_model]}
        result.update(small_tokens=m.small_tokens, big_tokens=m.big_tokens, offload_fraction=m.offload_fraction,
                      small_cached_tokens=m.cached_tokens[0], big_cached_tokens=m.cached_tokens[1],
                      prompt_tokens_computed=sum(x.num_prompt_tokens - min(x.cached_tokens[prompt_model],
                                                                           x.num_prompt_tokens) for x in metrics),
                      handoffs=m.handoffs, mode=m.mode, latency_per_offloaded_token_s=m.latency_per_offloaded_token,
                      draft_tokens=m.draft_tokens, accepted_draft_tokens=m.accepted_draft_tokens,
                      acceptance_rate=m.acceptance_rate, big_steps_per_offloaded_token=m.big_steps_per_offloaded_token)
    return result


class CompletionShape:
    """/v1/completions responses: one text_completion, or its stream chunks (one choice each)."""

    def __init__(self, rid: str, created: int, model: str, asked: Asked, names: TokenText, echo_texts: list[str]):
        """`echo_texts`: per choice, its prompt's text (shown before its completion with echo)."""
        self.head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        self.asked, self.names, self.echo_texts = asked, names, echo_texts
        self.offsets = [0] * len(echo_texts)  # text offset reached by each choice's stream
        self.started = [False] * len(echo_texts)

    def chunk(self, index: int, event: StreamEvent) -> dict:
        out = event.output
        first, self.started[index] = not self.started[index], True
        echo = self.asked.echo and first
        prompt = _prompt_part(event, out) if echo else None
        logprobs = None
        if self.asked.logprobs is not None:
            logprobs, self.offsets[index] = completion_logprobs(
                self.names, *_joined(prompt, event.token_ids, event.logprobs, event.top_logprobs, event.token_models),
                self.offsets[index])
        choice = {"index": index, "text": (self.echo_texts[index] if echo else "") + event.text,
                  "logprobs": logprobs, "finish_reason": out.finish_reason if out else None,
                  "stop_reason": out.stop_reason if out else None,
                  "token_models": event.token_models}  # extension: who wrote each new token (0 small, 1 big)
        return {**self.head, "choices": [choice]}

    def final(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for index, out in enumerate(outs):
            prompt = _prompt_part(None, out) if self.asked.echo else None
            logprobs = None
            if self.asked.logprobs is not None:
                logprobs, _ = completion_logprobs(self.names, *_joined(
                    prompt, out.token_ids, out.logprobs, out.top_logprobs, out.token_models), 0)
            choices.append({"index": index, "text": (self.echo_texts[index] if self.asked.echo else "") + out.text,
                            "logprobs": logprobs, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason})
        return {**self.head, "choices": choices, "usage": usage(outs, self.asked.n)}


def _prompt_part(event: "StreamEvent | None", out: "RequestOutput | None") -> "tuple | None":
    """(ids, logprobs, tops) of an echoed prompt, when it was scored (from the first event of a
    stream, or the output)."""
    source = event if event is not None and event.prompt_logprobs is not None else out
    if source is None or source.prompt_logprobs is None:
        return None
    return source.prompt_token_ids, source.prompt_logprobs, source.prompt_top_logprobs


def _joined(prompt: "tuple | None", ids: list[int], logprobs, tops, models: list) -> tuple:
    """A choice's tokens after its echoed prompt's, as the logprob shapes take them."""
    logprobs = logprobs if logprobs is not None else [None] * len(ids)
    tops = tops if tops is not None else [[] for _ in ids]  # logprobs 0: no alternatives
    if prompt is None:
        return ids, logprobs, tops, models
    p_ids, p_logprobs, p_tops = prompt
    return (list(p_ids) + list(ids), list(p_logprobs) + list(logprobs), list(p_tops) + list(tops),
            [None] * len(p_ids) + list(models))


class ChatShape:
    """/v1/chat/completions responses: one chat.completion, or its stream chunks (one choice each,
    each choice's first with the role)."""

    def __init__(self, rid: str, created: int, model: str, asked: Asked, names: TokenText, num_choices: int):
        self.rid, self.created, self.model = rid, created, model
        self.asked, self.names = asked, names
        self.sent_role = [False] * num_choices

    def _logprobs(self, ids, logprobs, tops, models) -> "dict | None":
        if self.asked.logprobs is None:
            return None
        return chat_logprobs(self.names, *_joined(None, ids, logprobs, tops, models))

    def chunk(self, index: int, event: StreamEvent) -> dict:
        out = event.output
        delta = {"content": event.text}
        if not self.sent_role[index]:
            delta["role"], self.sent_role[index] = "assistant", True
        choice = {"index": index, "delta": delta,
                  "logprobs": self._logprobs(event.token_ids, event.logprobs, event.top_logprobs, event.token_models),
                  "finish_reason": out.finish_reason if out else None, "token_models": event.token_models}
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def final(self, outs: list[RequestOutput]) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": out.text},
                    "logprobs": self._logprobs(out.token_ids, out.logprobs, out.top_logprobs, out.token_models),
                    "finish_reason": out.finish_reason} for i, out in enumerate(outs)]
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(outs, self.asked.n)}
