"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (both with SSE
streaming), /v1/models, /health and Prometheus /metrics, over an AsyncEngine.

Errors follow the OpenAI shape {"error": {"message", "type", "param", "code"}}: 400 for a bad
request (malformed JSON, wrong types, unknown mode, a field past its limit in ServerLimits, a
prompt longer than the context), 401 without the API key, 404 for an unknown model, 413 for a
body past its limit, 500 for a request that failed inside the engine, 503 with Retry-After when too
many requests are waiting, and 503 when the server is shutting down or the engine has failed.
"""

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from bisect import bisect_left

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import chat
from .async_engine import AsyncEngine, Overloaded, Unavailable
from .limits import ServerLimits
from .outputs import RequestOutput
from .requests import MODEL_NAMES
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

# Request fields passed to SamplingParams under the same name, with the JSON types accepted.
_NUMBER, _INT, _BOOL = (int, float), (int,), (bool,)
_FIELDS = {
    "max_tokens": _INT, "temperature": _NUMBER, "top_p": _NUMBER, "top_k": _INT, "seed": _INT, "ignore_eos": _BOOL,
    "mode": (str,), "max_offload_tokens": _INT, "switch_ratio": _NUMBER, "switch_chunk": _INT,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: "str | None" = None, kind: str = "invalid_request_error",
                 code: "str | None" = None, headers: "dict | None" = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code, self.headers = status, message, param, kind, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Histogram:
    """A Prometheus histogram with fixed buckets (seconds)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.BUCKETS, value)] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.BUCKETS, self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total}", f"{self.name}_count {self.n}"]
        return lines


class Metrics:
    def __init__(self):
        self.ttft = Histogram("splitreason_time_to_first_token_seconds", "Time from request to first token.")
        self.itl = Histogram("splitreason_inter_token_latency_seconds", "Time between streamed token batches.")
        self.e2e = Histogram("splitreason_e2e_request_latency_seconds", "Time from request to last token.")
        self.rejected = 0

    def render(self, engine: AsyncEngine) -> str:
        snap = engine.snapshot
        stats = engine.engine.stats.summary()
        lines = []
        for name, kind, help_, value in [
            ("splitreason_requests_running", "gauge", "Requests running.", snap.running),
            ("splitreason_requests_waiting", "gauge", "Requests waiting.", snap.waiting),
            ("splitreason_kv_pages_free", "gauge", "KV pages free.", snap.free_pages),
            ("splitreason_kv_pages_total", "gauge", "KV pages in the shared pool.", engine.engine.pool.num_pages),
            ("splitreason_kv_pages_cached", "gauge", "KV pages nobody holds that keep reusable prefix KV "
             "(counted in kv_pages_free too: evicted when needed).", snap.cached_pages),
            ("splitreason_prefix_caching_enabled", "gauge", "1 when full KV pages are kept and shared across "
             "requests (prefix caching), else 0.", int(engine.engine.scheduler.prefix_caching)),
            ("splitreason_requests_finished_total", "counter", "Requests finished.", stats["requests"]),
            ("splitreason_requests_failed_total", "counter", "Requests that failed inside the engine "
             "(finish_reason error).", stats["errors"]),
            ("splitreason_requests_rejected_total", "counter", "Requests refused with 503.", self.rejected),
            ("splitreason_handoffs_total", "counter", "Small-to-big handoffs.", stats["handoffs"]),
            ("splitreason_offloaded_tokens_total", "counter", "Tokens written by the big model.", stats["big_tokens"]),
            ("splitreason_jit_compiles_total", "counter", "Triton kernel variants compiled (start-up included).",
             stats["jit_compiles_total"]),
            ("splitreason_jit_compiles_after_startup", "gauge", "Triton kernel variants compiled while serving.",
             stats["jit_compiles_after_startup"]),
            ("splitreason_big_held_steps_total", "counter", "Steps in which the policy held the big model back.",
             stats["held_steps"]),
            ("splitreason_big_rows_per_step", "gauge", "Mean rows per big-model step.",
             stats["mean_rows_per_big_step"] or 0),
        ]:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP splitreason_kv_pages_used KV pages held, per model.", "# TYPE splitreason_kv_pages_used gauge"]
        lines += [f'splitreason_kv_pages_used{{model="{m}"}} {n}' for m, n in zip(MODEL_NAMES, snap.pages_held)]
        lines += ["# HELP splitreason_generated_tokens_total Tokens written, per model.",
                  "# TYPE splitreason_generated_tokens_total counter",
                  f'splitreason_generated_tokens_total{{model="small"}} {stats["small_tokens"]}',
                  f'splitreason_generated_tokens_total{{model="big"}} {stats["big_tokens"]}']
        lines += ["# HELP splitreason_prefix_cache_hit_tokens_total Tokens whose KV came from the prefix cache, per model.",
                  "# TYPE splitreason_prefix_cache_hit_tokens_total counter"]
        lines += [f'splitreason_prefix_cache_hit_tokens_total{{model="{m}"}} {n}' for m, n in
                  zip(MODEL_NAMES, (stats["prefix_cache_hit_tokens_small"], stats["prefix_cache_hit_tokens_big"]))
                  if n is not None]
        lines += ["# HELP splitreason_model_steps_total Engine steps in which each model ran.",
                  "# TYPE splitreason_model_steps_total counter"]
        lines += [f'splitreason_model_steps_total{{model="{m}"}} {n}' for m, n in
                  zip(MODEL_NAMES, (stats["steps_small"], stats["steps_big"])) if n is not None]
        for q in ("p50", "p99"):
            value = stats[f"big_wait_{q}_s"]
            lines += [f"# HELP splitreason_big_wait_{q}_seconds Wait before a big segment's first big step, {q}.",
                      f"# TYPE splitreason_big_wait_{q}_seconds gauge", f"splitreason_big_wait_{q}_seconds {value or 0}"]
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"


def _params(body: dict, defaults: dict, limits: ServerLimits) -> SamplingParams:
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
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings", "stop")
        if len(stop) > limits.max_stop_strings:
            raise ApiError(400, f"stop has {len(stop)} strings; this server takes at most {limits.max_stop_strings}",
                           "stop")
        if any(len(s) > limits.max_stop_length for s in stop):
            raise ApiError(400, f"a stop string is longer than {limits.max_stop_length} characters", "stop")
        kwargs["stop"] = stop
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise ApiError(400, "logit_bias must map token ids to numbers", "logit_bias")
        if len(bias) > limits.max_logit_bias:
            raise ApiError(400, f"logit_bias has {len(bias)} entries; this server takes at most "
                                f"{limits.max_logit_bias}", "logit_bias")
        try:
            kwargs["logit_bias"] = {int(k): v for k, v in bias.items()}
        except (TypeError, ValueError):
            raise ApiError(400, "logit_bias keys must be token ids", "logit_bias") from None
    kwargs.setdefault("max_tokens", 16)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(" ", 1)[0]) from None


def _error_body(out: RequestOutput) -> dict:
    """The OpenAI error object of a request that failed inside the engine."""
    return {"message": out.error, "type": "server_error", "param": None, "code": "request_failed"}


def _usage(out: RequestOutput) -> dict:
    m = out.metrics
    usage = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
             "total_tokens": len(out.prompt_token_ids) + len(out.token_ids)}
    if m is not None:
        # The prompt's model: the small one, unless the big one answers alone.
        usage["prompt_tokens_details"] = {"cached_tokens": m.cached_tokens[1 if m.mode == "big" else 0]}
        usage.update(small_tokens=m.small_tokens, big_tokens=m.big_tokens, offload_fraction=m.offload_fraction,
                     small_cached_tokens=m.cached_tokens[0], big_cached_tokens=m.cached_tokens[1],
                     handoffs=m.handoffs, mode=m.mode, latency_per_offloaded_token_s=m.latency_per_offloaded_token)
    return usage


def build_app(engine: AsyncEngine, model_name: str, chat_template: "str | None" = None,
              sampling_defaults: "dict | None" = None, api_key: "str | None" = None,
              limits: "ServerLimits | None" = None) -> FastAPI:
    """`api_key`: when set, every /v1 route needs `Authorization: Bearer <api_key>` (401 otherwise);
    /health and /metrics stay open. `limits`: what one request may ask for (ServerLimits)."""
    sampling_defaults = sampling_defaults or {}
    limits = (limits or ServerLimits()).resolved(engine.engine.max_model_len)
    template = chat.ChatTemplate(chat_template, limits.chat_template_timeout_s) if chat_template else None
    tokenizer = engine.engine.tokenizer
    app = FastAPI(title="splitreason-engine")
    metrics = Metrics()
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, e: Exception):
        logger.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error").response()

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_request_error", "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; this server takes at most "
                                f"{limits.max_body_bytes}", "body", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes", "body",
                               code="request_too_large")
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

    async def check_prompt_tokens(prompt, param: str) -> None:
        """A prompt past max_prompt_tokens is refused here; a text is only tokenized when its
        UTF-8 length does not already bound its token count (a token is at least one byte)."""
        if isinstance(prompt, list):
            count = len(prompt)
        elif tokenizer is None or len(prompt.encode()) <= limits.max_prompt_tokens:
            return
        else:
            count = len(await asyncio.to_thread(tokenizer.encode, prompt))
        if count > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {count} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens}", param, code="context_length_exceeded")

    async def run(prompt, params: SamplingParams, stream: bool, chunk, final):
        """Starts the request; answers 400 if the engine refuses it, else JSON or SSE."""
        start = time.perf_counter()
        try:
            events = engine.stream(prompt, params)
            first = await events.__anext__()
        except Overloaded as e:
            metrics.rejected += 1
            raise ApiError(503, f"server overloaded: {e}; retry later", None, "server_error", "overloaded",
                           {"Retry-After": "1"}) from None
        except Unavailable as e:
            raise ApiError(503, str(e), None, "server_error", "unavailable") from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        if first.output is not None and first.output.error and first.output.metrics is None:  # refused
            raise ApiError(400, first.output.error, "prompt" if "prompt" in first.output.error else None)

        def observe(event, last):
            now = time.perf_counter()
            if last is None:
                metrics.ttft.observe(now - start)
            else:
                metrics.itl.observe(now - last)
            if event.output is not None:
                metrics.e2e.observe(now - start)
            return now

        if not stream:
            event, last = first, observe(first, None)
            try:
                async for event in events:
                    last = observe(event, last)
            except Unavailable as e:
                raise ApiError(503, str(e), None, "server_error", "unavailable") from None
            if event.output.finish_reason == "error":
                return JSONResponse({"error": _error_body(event.output)}, status_code=500)
            return JSONResponse(final(event.output))

        async def sse():
            event, last = first, None
            try:
                while True:
                    last = observe(event, last)
                    body = chunk(event)
                    if event.output is not None and event.output.finish_reason == "error":
                        body["error"] = _error_body(event.output)
                    yield f"data: {json.dumps(body)}\n\n"
                    if event.output is not None:
                        break
                    event = await events.__anext__()
            except Unavailable as e:  # the engine failed under this stream
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': 'unavailable'}})}\n\n"
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def prompt_for(params: SamplingParams, text_or_ids, chat_messages=None):
        """The prompt the engine gets, after the prompt-token limit."""
        mode = params.mode or ("split" if len(engine.engine.models) > 1 else "small")
        if chat_messages is None:
            prompt, param = text_or_ids, "prompt"
        elif mode in ("split", "random"):
            prompt, param = chat.question(chat_messages), "messages"
        else:
            param = "messages"
            try:
                prompt = await asyncio.to_thread(chat.render, chat_messages, template)
            except chat.TemplateError as e:
                raise ApiError(400, str(e), "messages") from None
        await check_prompt_tokens(prompt, param)
        return prompt

    @v1.post("/completions")
    async def completions(request: Request):
        body = await read_body(request)
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
        params = _params(body, sampling_defaults, limits)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(event):
            out = event.output
            choice = {"index": 0, "text": event.text, "logprobs": None,
                      "finish_reason": out.finish_reason if out else None, "stop_reason": out.stop_reason if out else None,
                      "token_models": event.token_models}  # extension: who wrote each new token (0 small, 1 big)
            body = {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": [choice]}
            if out is not None:
                body["usage"] = _usage(out)
            return body

        def final(out):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason,
                                 "stop_reason": out.stop_reason}],
                    "usage": _usage(out)}

        return await run(await prompt_for(params, prompt), params, body.get("stream", False), chunk, final)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        try:
            messages = chat.check_messages(body.get("messages"), limits.max_messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body["max_tokens"] = body["max_completion_tokens"]
        params = _params(body, sampling_defaults, limits)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sent_role = []

        def chunk(event):
            out = event.output
            delta = {"content": event.text}
            if not sent_role:
                delta["role"] = "assistant"
                sent_role.append(True)
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": out.finish_reason if out else None,
                      "token_models": event.token_models}
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [choice]}
            if out is not None:
                body["usage"] = _usage(out)
            return body

        def final(out):
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                 "logprobs": None, "finish_reason": out.finish_reason}],
                    "usage": _usage(out)}

        return await run(await prompt_for(params, None, messages), params, body.get("stream", False), chunk, final)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "splitreason-engine"}]}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "failed", "error": str(engine.failure)}, status_code=503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    return app


class GracefulServer(uvicorn.Server):
    """uvicorn, with SIGTERM / SIGINT draining instead of stopping: new requests get 503, those
    accepted have `shutdown_timeout` seconds to finish, the rest end with an error event, and then
    the server exits normally (status 0). A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        if self.engine.draining:
            self.should_exit = self.force_exit = True
            return
        logger.warning("signal %d: draining %d requests (at most %.0f s)", sig, self.engine.active,
                       self.shutdown_timeout)
        self.engine.drain()
        threading.Thread(target=self._drain, name="splitreason-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine.active:
            logger.warning("ending %d unfinished requests", self.engine.active)
            self.engine.fail_all(f"the server shut down before this request finished "
                                 f"(--shutdown-timeout {self.shutdown_timeout:g} s)")
            deadline = time.monotonic() + 5  # their final events reach the clients
            while self.engine.active and time.monotonic() < deadline:
                time.sleep(0.05)
        self.should_exit = True
