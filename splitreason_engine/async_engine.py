"""The engine loop on its own thread, with requests submitted and streamed from asyncio.

Only the loop thread touches the Engine: callers hand it commands (add, abort) through a queue,
and it hands each request's stream events back to the caller's event loop. A stream that is
closed early (a client that disconnected) aborts its request, so its pages go back to the pool
at the next loop iteration. Past `max_waiting` queued requests new ones are refused with
`Overloaded`, so a server can answer 503 instead of queueing without bound.

A request that fails inside the engine ends its stream with finish_reason "error"; if the engine
itself breaks, every stream ends with `Unavailable`, and so does every later request, at once. A
graceful shutdown calls drain() (refuse new requests), waits for `active` to reach 0, and calls
fail_all() on what is left.

The engine is built on the loop thread too, from a factory: PyTorch's OpenMP pool belongs to the
thread that first runs a parallel op, and a second pool on another thread makes libgomp throttle
both (measured: a third fewer tokens/s on 2 cores when the engine was built on the main thread
and stepped on another).
"""

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from .engine import Engine
from .intake import Prompt
from .outputs import StreamEvent
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many requests are waiting; the caller should retry later."""


class Unavailable(Exception):
    """The engine takes no more requests: it is shutting down, or it failed (the message says why)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: object = None  # the engine's request, once added

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class SampleGroup:
    """The n samples of one prompt: the first starts at once; the others wait until it has
    computed the prompt, then copy it instead of computing it (Engine.add_request's sample_of)."""

    first: object = None  # the first sample's engine request, once added


@dataclass(frozen=True)
class Snapshot:
    """Engine state published by the loop thread after every step (read by /metrics)."""

    running: int = 0
    waiting: int = 0
    pages_held: tuple = ()
    free_pages: int = 0
    cached_pages: int = 0


class AsyncEngine:
    """`build` makes the Engine (on the loop thread); construction errors are raised here."""

    def __init__(self, build: Callable[[], Engine], max_waiting: int = 256):
        if not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be a positive integer, got {max_waiting!r}")
        self.max_waiting = max_waiting
        self._commands: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._streams: list[_Stream] = []  # loop thread only
        self._deferred: list[tuple] = []  # loop thread only: samples waiting for their group's first
        self._lock = threading.Lock()
        self._queued = 0  # submitted and not yet running
        self.active = 0  # streams not yet finished, queued ones included
        self.failure: "BaseException | None" = None
        self.draining = False  # set by drain(): new requests are refused
        self._stop = False
        self._closed = False  # loop thread only: set by fail_all
        built: "queue.SimpleQueue[BaseException | Engine]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="splitreason-engine", daemon=True)
        self._thread.start()
        result = built.get()
        if isinstance(result, BaseException):
            raise result
        self.engine: Engine = result
        self.snapshot = Snapshot(pages_held=tuple(0 for _ in result.models), free_pages=result.pool.num_pages)

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    async def stream(self, prompt: Prompt, params: SamplingParams,
                     group: "SampleGroup | None" = None) -> AsyncIterator[StreamEvent]:
        """Events of one request as the engine produces them; the last one carries the output
        (finish_reason "error" and a message if the engine refused the request or it failed).
        `group`: the same SampleGroup for each of n samples of one prompt (their prompt is computed once)."""
        with self._lock:
            if self.failure is not None:
                raise Unavailable(f"the engine failed: {self.failure}")
            if self.draining:
                raise Unavailable("the server is shutting down")
            if self._queued + self.snapshot.waiting >= self.max_waiting:
                raise Overloaded(f"{self.max_waiting} requests are already waiting")
            self._queued += 1
            self.active += 1
        stream = _Stream(asyncio.get_running_loop())
        self._commands.put(("add", stream, prompt, params, group))
        finished = False
        try:
            while True:
                item = await stream.events.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.output is not None
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self.active -= 1
            if not finished:
                self._commands.put(("abort", stream))

    def drain(self) -> None:
        """Refuses new requests from now on; the ones accepted go on (a graceful shutdown)."""
        with self._lock:
            self.draining = True

    def fail_all(self, message: str) -> None:
        """Ends every request still running or queued with finish_reason "error" and `message`;
        each stream gets that as its last event."""
        self._commands.put(("fail_all", message))

    def shutdown(self) -> None:
        """Stops the loop thread, then the engine's tensor-parallel workers (if any), while the
        interpreter is still whole: at exit, multiprocessing would terminate them first."""
        self._stop = True
        self._commands.put(("wake",))
        self._thread.join(timeout=30)
        self.engine.close()

    # ---- the loop thread --------------------------------------------------------------------

    def _run(self, build: Callable[[], Engine], built: queue.SimpleQueue) -> None:
        try:
            self.engine = build()
        except BaseException as e:
            built.put(e)
            return
        built.put(self.engine)
        try:
            while not self._stop:
                self._apply_commands(block=not self._streams and not self._deferred)
                self._start_deferred()
                if self._streams:
                    self.engine.step()
                    self._publish()
                self._snapshot()
        except BaseException as e:  # the engine is broken: fail every stream, say so in /health
            logger.exception("engine loop failed")
            with self._lock:
                self.failure = e
            for stream in self._streams + [item[0] for item in self._deferred]:
                stream.push(Unavailable(f"the engine failed: {e}"))
            self._refuse_commands()

    def _refuse_commands(self) -> None:
        """After a failure: answers what is still queued (or arrives in a race with the failure)
        with the failure, so that no caller waits for an engine that will not step again."""
        while not self._stop:
            kind, *args = self._commands.get()
            if kind == "add":
                args[0].push(Unavailable(f"the engine failed: {self.failure}"))

    def _apply_commands(self, block: bool) -> None:
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            kind, *args = command
            if kind == "add":
                self._add(*args)
            elif kind == "abort":
                stream = args[0]
                if stream in self._streams:
                    self.engine.abort(stream.request.id)
                    self._streams.remove(stream)
                self._deferred = [item for item in self._deferred if item[0] is not stream]
            elif kind == "fail_all":
                self._closed = True  # an add that raced the drain is refused too
                for stream in self._streams:
                    self.engine.abort(stream.request.id, error=args[0])
                for item in self._deferred:
                    item[0].push(Unavailable("the server is shutting down"))
                self._deferred = []
                self._publish()

    def _add(self, stream: _Stream, prompt: Prompt, params: SamplingParams, group: "SampleGroup | None") -> None:
        with self._lock:
            self._queued -= 1
        if self._closed:
            stream.push(Unavailable("the server is shutting down"))
            return
        if group is not None and group.first is not None and not _prompt_computed(group.first):
            self._deferred.append((stream, prompt, params, group))
            return
        self._start(stream, prompt, params, group)

    def _start_deferred(self) -> None:
        """Starts the samples whose group's first sample has computed the prompt (or ended)."""
        ready = [item for item in self._deferred if _prompt_computed(item[3].first)]
        self._deferred = [item for item in self._deferred if not _prompt_computed(item[3].first)]
        for item in ready:
            self._start(*item)

    def _start(self, stream: _Stream, prompt: Prompt, params: SamplingParams, group: "SampleGroup | None") -> None:
        first = group.first if group is not None else None
        sample_of = first.id if first is not None and first.finish_reason is None else None
        try:
            outputs, reqs = self.engine._submit([prompt], [params], stream=True, sample_of=sample_of)
        except Exception as e:  # ValueError / TypeError: a bad request; anything else fails it alone
            if not isinstance(e, (ValueError, TypeError)):
                logger.exception("adding a request failed")
            stream.push(e)
            return
        if outputs[0].error:
            stream.push(StreamEvent(0, [], "", outputs[0]))
            return
        stream.request = reqs[0]
        if group is not None and group.first is None:
            group.first = reqs[0]
        self._streams.append(stream)

    def _publish(self) -> None:
        still = []
        for stream in self._streams:
            try:
                event = self.engine._event(stream.request)
            except Exception as e:  # this request's output cannot be made: it fails, the others go on
                event = self._failed_event(stream.request, f"{type(e).__name__} while making its output: {e}")
            if event is not None:
                stream.push(event)
            if stream.request.finish_reason is None:
                still.append(stream)
        self._streams = still

    def _failed_event(self, req, message: str) -> StreamEvent:
        logger.warning("request %d failed: %s", req.id, message)
        self.engine.abort(req.id, error=message)
        out = req.output
        out.token_ids, out.token_models, out.finish_reason, out.error = req.tokens, req.token_models, "error", message
        return StreamEvent(req.index, [], "", out)

    def _snapshot(self) -> None:
        s = self.engine.scheduler
        self.snapshot = Snapshot(s.num_running, s.num_waiting, tuple(s.pages_held(m) for m in range(s.num_models)),
                                 s.num_free_pages, s.num_cached_pages)


def _prompt_computed(req) -> bool:
    """Whether a request has computed its prompt (it has a token) or ended."""
    return bool(req.tokens) or req.finish_reason is not None
