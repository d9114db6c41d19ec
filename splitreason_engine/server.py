"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (both with SSE
streaming), /v1/models, /health and Prometheus /metrics, over an AsyncEngine.

Errors follow the OpenAI shape {"error": {"message", "type", "param", "code"}}: 400 for a bad
request (malformed JSON, wrong types, unknown mode, a field past its limit in ServerLimits, a
prompt longer than the context), 401 without the API key, 404 for an unknown model, 413 for a
body past its limit, 500 for a request that failed inside the engine, 503 with Retry-After when too
many requests are waiting, and 503 when the server is shutting down or the engine has failed.

Parsing requests and shaping responses: openai_io.py; the metrics: server_metrics.py. Here: the
routes, by endpoint family (the OpenAI API under /v1, operations at /health and /metrics), and
the I/O between them and the engine.
"""

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import chat
from .async_engine import AsyncEngine, Overloaded, SampleGroup, Unavailable
from .limits import ServerLimits
from .openai_io import (ApiError, Asked, ChatShape, CompletionShape, asked_for, completion_prompts,
                        error_body, parse_body, usage)
from .openai_logprobs import TokenText
from .sampling import SamplingParams
from .server_metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class Service:
    """What every route needs: the engine, the server's settings and its metrics."""

    engine: AsyncEngine
    model_name: str
    template: "chat.ChatTemplate | None"
    sampling_defaults: dict
    api_key: "str | None"
    limits: ServerLimits
    metrics: Metrics
    names: TokenText  # token ids' text, for log-probabilities


def build_app(engine: AsyncEngine, model_name: str, chat_template: "str | None" = None,
              sampling_defaults: "dict | None" = None, api_key: "str | None" = None,
              limits: "ServerLimits | None" = None) -> FastAPI:
    """`api_key`: when set, every /v1 route needs `Authorization: Bearer <api_key>` (401 otherwise);
    /health and /metrics stay open. `limits`: what one request may ask for (ServerLimits)."""
    limits = (limits or ServerLimits()).resolved(engine.engine.max_model_len)
    template = chat.ChatTemplate(chat_template, limits.chat_template_timeout_s) if chat_template else None
    service = Service(engine, model_name, template, sampling_defaults or {}, api_key, limits, Metrics(),
                      TokenText(engine.engine.tokenizer))
    app = FastAPI(title="splitreason-engine")
    app.state.engine, app.state.metrics = engine, service.metrics
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(openai_routes(service))
    app.include_router(operations_routes(service))
    return app


async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
    return e.response()


async def _internal_error(_request: Request, e: Exception) -> JSONResponse:
    logger.exception("request failed")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error").response()


# ---- the OpenAI API (/v1) -----------------------------------------------------------------------

def openai_routes(service: Service) -> APIRouter:
    async def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), service.api_key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_request_error", "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/completions")
    async def completions(request: Request):
        body = await read_body(service, request)
        prompts = completion_prompts(body, service.limits)
        asked = asked_for(body, service.sampling_defaults, service.limits, chat=False)
        prompts = [await prompt_for(service, asked, prompt) for prompt in prompts]
        echo_texts = [echo_text(service, prompt) if asked.echo else "" for prompt in prompts for _ in range(asked.n)]
        shape = CompletionShape(f"cmpl-{uuid.uuid4().hex}", int(time.time()), service.model_name, asked, service.names,
                                echo_texts)
        return await respond(service, prompts, asked, body.get("stream", False), shape)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(service, request)
        try:
            messages = chat.check_messages(body.get("messages"), service.limits.max_messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body["max_tokens"] = body["max_completion_tokens"]
        asked = asked_for(body, service.sampling_defaults, service.limits, chat=True)
        shape = ChatShape(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), service.model_name, asked, service.names,
                          asked.n)
        return await respond(service, [await prompt_for(service, asked, None, messages)], asked,
                             body.get("stream", False), shape)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "splitreason-engine"}]}

    return v1


async def read_body(service: Service, request: Request) -> dict:
    """The request's JSON object, read up to the body limit (413 past it)."""
    limit = service.limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit}", "body",
                       code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", "body", code="request_too_large")
    return parse_body(bytes(raw), service.model_name)


async def prompt_for(service: Service, asked: Asked, text_or_ids, chat_messages=None):
    """The prompt the engine gets, after the prompt-token limit: a chat's question in split and
    random modes, its rendered template in the others. Echo needs the prompt as given, so it is
    refused in split and random modes, which put it into their template."""
    mode = asked.params.mode or ("split" if len(service.engine.engine.models) > 1 else "small")
    if asked.echo and mode in ("split", "random"):
        raise ApiError(400, f"echo is not available in mode {mode!r}: it puts the prompt into its template; use mode "
                            "'small' or 'big'", "echo")
    if chat_messages is None:
        prompt, param = text_or_ids, "prompt"
    elif mode in ("split", "random"):
        prompt, param = chat.question(chat_messages), "messages"
    else:
        param = "messages"
        try:
            prompt = await asyncio.to_thread(chat.render, chat_messages, service.template)
        except chat.TemplateError as e:
            raise ApiError(400, str(e), "messages") from None
    await check_prompt_tokens(service, prompt, param)
    return prompt


def echo_text(service: Service, prompt) -> str:
    """The text an echoed prompt shows: itself, or its token ids decoded."""
    tokenizer = service.engine.engine.tokenizer
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(prompt) if tokenizer is not None else ""


async def check_prompt_tokens(service: Service, prompt, param: str) -> None:
    """A prompt past max_prompt_tokens is refused here; a text is only tokenized when its UTF-8
    length does not already bound its token count (a token is at least one byte)."""
    tokenizer, most = service.engine.engine.tokenizer, service.limits.max_prompt_tokens
    if isinstance(prompt, list):
        count = len(prompt)
    elif tokenizer is None or len(prompt.encode()) <= most:
        return
    else:
        count = len(await asyncio.to_thread(tokenizer.encode, prompt))
    if count > most:
        raise ApiError(400, f"the prompt is {count} tokens; this server takes at most {most}", param,
                       code="context_length_exceeded")


async def respond(service: Service, prompts: list, asked: Asked, stream: bool, shape):
    """Starts every choice's request, each prompt n times (400 if the engine refuses one, 503 if it
    cannot take them all; either way none is left running), then answers with JSON or server-sent
    events shaped by `shape` (openai_io's CompletionShape / ChatShape)."""
    start = time.perf_counter()
    groups = [SampleGroup() for _ in prompts]  # each prompt's samples compute it once
    streams = [service.engine.stream(prompt, params, group) for prompt, group in zip(prompts, groups)
               for params in asked.per_sample()]
    firsts = await asyncio.gather(*(events.__anext__() for events in streams), return_exceptions=True)
    try:
        for first in firsts:
            _raise_refusal(service, first)
    except ApiError:
        await asyncio.gather(*(events.aclose() for events in streams))
        raise
    clocks = [_LatencyClock(service.metrics, start) for _ in streams]
    if stream:
        return StreamingResponse(_sse(streams, firsts, shape, clocks, asked.n), media_type="text/event-stream")
    try:
        finals = await asyncio.gather(*(_last(events, first, clock) for events, first, clock in
                                        zip(streams, firsts, clocks)))
    except Unavailable as e:
        raise ApiError(503, str(e), None, "server_error", "unavailable") from None
    failed = next((out for out in finals if out.finish_reason == "error"), None)
    if failed is not None:
        return JSONResponse({"error": error_body(failed)}, status_code=500)
    return JSONResponse(shape.final(finals))


def _raise_refusal(service: Service, first) -> None:
    """The ApiError for a request the engine did not take (its first event, or what it raised)."""
    if isinstance(first, Overloaded):
        service.metrics.rejected += 1
        raise ApiError(503, f"server overloaded: {first}; retry later", None, "server_error", "overloaded",
                       {"Retry-After": "1"})
    if isinstance(first, Unavailable):
        raise ApiError(503, str(first), None, "server_error", "unavailable")
    if isinstance(first, (ValueError, TypeError)):
        raise ApiError(400, str(first))
    if isinstance(first, BaseException):
        raise first
    if first.output is not None and first.output.error and first.output.metrics is None:  # refused
        raise ApiError(400, first.output.error, "prompt" if "prompt" in first.output.error else None)


async def _last(events, first, clock: "_LatencyClock"):
    """A request's output, after its events."""
    event = first
    clock.observe(event)
    async for event in events:
        clock.observe(event)
    return event.output


class _LatencyClock:
    """Observes a request's time to first token, inter-token and end-to-end latencies."""

    def __init__(self, metrics: Metrics, start: float):
        self.metrics, self.start, self.last = metrics, start, None

    def observe(self, event) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        if event.output is not None:
            self.metrics.e2e.observe(now - self.start)
        self.last = now


async def _sse(streams, firsts, shape, clocks: list[_LatencyClock], n: int):
    """Every choice's events as they come, one chunk each; usage rides on the chunk that finishes
    the last choice."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int):
        try:
            event = firsts[index]
            while True:
                await merged.put((index, event))
                if event.output is not None:
                    return
                event = await streams[index].__anext__()
        except Unavailable as e:  # the engine failed under this stream
            await merged.put((index, e))

    pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    outs: list = [None] * len(streams)
    try:
        while any(out is None for out in outs):
            index, event = await merged.get()
            if isinstance(event, Unavailable):
                error = {"message": str(event), "type": "server_error", "param": None, "code": "unavailable"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            clocks[index].observe(event)
            body = shape.chunk(index, event)
            if event.output is not None:
                outs[index] = event.output
                if event.output.finish_reason == "error":
                    body["error"] = error_body(event.output)
                if all(out is not None for out in outs):
                    body["usage"] = usage(outs, n)
            yield f"data: {json.dumps(body)}\n\n"
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.gather(*(events.aclose() for events in streams), return_exceptions=True)
    yield "data: [DONE]\n\n"


# ---- operations (/health, /metrics) -------------------------------------------------------------

def operations_routes(service: Service) -> APIRouter:
    ops = APIRouter()
    engine = service.engine

    @ops.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "failed", "error": str(engine.failure)}, status_code=503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @ops.get("/metrics")
    async def prometheus():
        return PlainTextResponse(service.metrics.render(engine), media_type="text/plain; version=0.0.4")

    return ops


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
