"""A timeline of the engine for researchers: a Chrome / Perfetto trace (Trace Event Format JSON).

Why: the metrics say how much time each phase took in sum; a timeline shows which steps each model
ran and with how many rows, where the co-scheduling policy held the big model back, and where one
request's time went around each handoff. The file opens in ui.perfetto.dev (or chrome://tracing)
as it is; docs/tracing.md reads one.

What it holds:
- process "engine": one track per model with a slice per step it ran (args: rows, tokens,
  big_held), an instant "big model held" on the big model's track in each step the policy held it
  back, and the counter "output tokens" (small, big: cumulative over the engine's requests);
- process "requests": one track per request ("request N") with its phases as slices ("small
  segment", "catch-up", "big segment", args: the tokens each model wrote in it) and an instant
  "handoff" at each handoff.

Timestamps are the engine's clock (seconds: wall time, or the simulated clock) in microseconds.
Memory is bounded: the events live in a ring of `max_events`, the newest kept (the file says how
many were dropped). Every event is whole on its own (complete "X" slices, instants, counters), so
dropping the oldest never leaves a slice open.
"""

import json
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

from .outputs import RequestMetrics

logger = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS = 200_000  # about 70 MB of Python objects at most (measured)
ENGINE_PID, REQUESTS_PID = 1, 2
MODEL_TRACKS = ("small model", "big model")  # track (tid) 0 and 1 of the engine process
STEP_NAMES = ("small step", "big step")
BIG = 1  # the big model's index (requests.BIG; this module imports nothing of the engine)
PHASES = {"small": "small segment", "catch_up": "catch-up", "big": "big segment"}  # Flow timers -> slice names
TOKENS_COUNTER = "output tokens"


class HasMetrics(Protocol):
    metrics: RequestMetrics


@dataclass
class _Marks:
    """What the trace has already accounted for one request: the tokens in the counters, and the
    figures when its current phase began (a phase's slice shows the difference)."""

    counted: tuple[int, int] = (0, 0)  # (small, big) output tokens
    phase_start: tuple[int, int, int] = (0, 0, 0)  # (small, big, big-view catch-up) tokens


class Trace:
    """Collects the engine's events and writes them as one JSON file (`path`, or write's own)."""

    def __init__(self, path: "str | Path | None" = None, max_events: int = DEFAULT_MAX_EVENTS):
        self.path = None if path is None else Path(path)
        self.max_events = max_events
        self._events: deque = deque(maxlen=max_events)  # (ph, name, cat, pid, tid, ts_s, dur_s, args)
        self._recorded = 0  # events ever added, dropped ones included
        self._lock = threading.Lock()  # the engine's thread adds while another may write
        self._write_lock = threading.Lock()
        self._big_held = False
        self._marks: dict[int, _Marks] = {}  # live requests by id
        self._totals = [0, 0]  # output tokens per model, over every request seen
        self._shown = (0, 0)  # the counter's last value in the trace

    # ---- hooks: the step loop ---------------------------------------------------------------

    def plan(self, now: float, big_held: bool, live: Mapping[int, HasMetrics]) -> None:
        """A step is planned: whether the policy held the big model back in it, and the tokens the
        live requests have written so far (the counter moves once per step)."""
        self._big_held = big_held
        if big_held:
            self._add("i", "big model held", "step", ENGINE_PID, BIG, now, None, {})
        for rid, req in live.items():
            self._count(rid, req.metrics)
        if len(self._marks) > len(live):  # requests that failed (finish is not called for them)
            self._marks = {rid: marks for rid, marks in self._marks.items() if rid in live}
        self._show_tokens(now)

    def model_step(self, model: int, start: float, end: float, rows: int, tokens: int) -> None:
        """One model's part of a step, as the step loop timed it."""
        args = {"rows": rows, "tokens": tokens, "big_held": self._big_held}
        self._add("X", STEP_NAMES[model], "step", ENGINE_PID, model, start, end - start, args)

    # ---- hooks: the request flows -----------------------------------------------------------

    def phase(self, request_id: int, phase: str, start: float, end: float, next_phase: str,
              metrics: RequestMetrics) -> None:
        """A request's flow switches from `phase` (since `start`) to `next_phase` at `end`; a switch
        into catch-up is a handoff (where metrics.handoffs counts one)."""
        marks = self._marks.setdefault(request_id, _Marks())
        now = (metrics.small_tokens, metrics.big_tokens, metrics.catch_up_tokens[BIG])
        small, big, catch_up = (a - b for a, b in zip(now, marks.phase_start))
        marks.phase_start = now
        if end > start or small or big or catch_up:
            args = {"mode": metrics.mode, "small_tokens": small, "big_tokens": big, "catch_up_tokens": catch_up}
            self._add("X", PHASES[phase], "phase", REQUESTS_PID, request_id, start, end - start, args)
        if next_phase == "catch_up" and phase != "catch_up":
            self._add("i", "handoff", "handoff", REQUESTS_PID, request_id, end, None, {"handoff": metrics.handoffs})

    def finished(self, request_id: int, now: float, metrics: RequestMetrics) -> None:
        """A request ended (its last phase is already closed): its final tokens join the counter."""
        self._count(request_id, metrics)
        self._marks.pop(request_id, None)
        self._show_tokens(now)

    # ---- the file ---------------------------------------------------------------------------

    def write(self, path: "str | Path | None" = None) -> Path:
        """Writes everything kept so far to `path` (default: the trace's own) and returns where;
        recording goes on. The file is replaced whole, so a reader never sees half of one."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("this trace has no path: pass one to write()")
        with self._lock:
            events, dropped = list(self._events), self._recorded - len(self._events)
        doc = {"traceEvents": _metadata(events) + [_event_json(e) for e in events], "displayTimeUnit": "ms",
               "otherData": {"source": "splitreason-engine", "events_dropped": dropped,
                             "max_events": self.max_events}}
        with self._write_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            with open(partial, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(partial, path)
        if dropped:
            logger.warning("trace %s: kept the newest %d events, dropped %d older ones (raise trace_max_events)",
                           path, len(events), dropped)
        logger.info("trace: %d events written to %s", len(events), path)
        return path

    def flush(self) -> None:
        """write(), logging a failure instead of raising: at close and at exit nobody could catch it."""
        try:
            self.write()
        except (OSError, ValueError) as e:
            logger.error("could not write the trace: %s", e)

    # ---- helpers ----------------------------------------------------------------------------

    def _add(self, ph: str, name: str, cat: str, pid: int, tid: int, ts: float, dur: "float | None",
             args: dict) -> None:
        with self._lock:
            self._events.append((ph, name, cat, pid, tid, ts, dur, args))
            self._recorded += 1

    def _count(self, request_id: int, metrics: RequestMetrics) -> None:
        marks = self._marks.setdefault(request_id, _Marks())
        small, big = metrics.small_tokens, metrics.big_tokens
        self._totals[0] += small - marks.counted[0]
        self._totals[1] += big - marks.counted[1]
        marks.counted = (small, big)

    def _show_tokens(self, now: float) -> None:
        totals = tuple(self._totals)
        if totals != self._shown:
            self._shown = totals
            self._add("C", TOKENS_COUNTER, "tokens", ENGINE_PID, 0, now, None, {"small": totals[0], "big": totals[1]})


def _event_json(event: tuple) -> dict:
    ph, name, cat, pid, tid, ts, dur, args = event
    out = {"ph": ph, "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": round(ts * 1e6, 3), "args": args}
    if dur is not None:
        out["dur"] = round(dur * 1e6, 3)
    if ph == "i":
        out["s"] = "t"  # an instant on its track
    return out


def _metadata(events: list[tuple]) -> list[dict]:
    """Names for the processes and tracks: the models', and each request's that has events."""
    def meta(kind: str, pid: int, tid: int, args: dict) -> dict:
        return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": args}

    out = []
    for pid, name in ((ENGINE_PID, "engine"), (REQUESTS_PID, "requests")):
        out += [meta("process_name", pid, 0, {"name": name}), meta("process_sort_index", pid, 0, {"sort_index": pid})]
    tracks = [(ENGINE_PID, tid, name) for tid, name in enumerate(MODEL_TRACKS)]
    tracks += [(REQUESTS_PID, rid, f"request {rid}") for rid in sorted({e[4] for e in events if e[3] == REQUESTS_PID})]
    for pid, tid, name in tracks:
        out += [meta("thread_name", pid, tid, {"name": name}), meta("thread_sort_index", pid, tid, {"sort_index": tid})]
    return out
