"""The live requests, what happens to their outputs (commit a token, extend a view, finish), and
the Flow interface each request's protocol implements (the flows themselves: protocol.py).

The engine loop and the protocol flows both change requests; they do it through a RequestBook,
so the flows need neither the Engine nor its private methods.
"""

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from . import _C
from .outputs import RequestMetrics, RequestOutput
from .sampling import SamplingParams
from .stats import EngineStats
from .step_costs import StepCosts
from .tags import TagDetector, Tags
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .trace import Trace

logger = logging.getLogger(__name__)

SMALL, BIG = 0, 1  # model indices, everywhere in the engine
MODEL_NAMES = ("small", "big")


@dataclass
class Request:
    id: int
    index: int
    prompt: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    stop_ids: frozenset
    flow: "Flow | None" = None
    tokens: list[int] = field(default_factory=list)
    token_models: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # logprobs.TokenLogprob when top_logprobs asks
    # SamplingParams.prompt_logprobs: the model whose prefill scores the prompt, and per prompt
    # position its token's logprob (logprobs.TokenLogprob; None at 0 and until scored).
    prompt_model: "int | None" = None
    prompt_logprobs: "list | None" = None
    text: str = ""  # streamed text so far (only kept when streaming or matching stop strings)
    detokenizer: "IncrementalDetokenizer | None" = None
    finish_reason: "str | None" = None
    error: "str | None" = None  # why it failed (finish_reason "error")
    stopped_by_string: bool = False
    stop_reason: "str | int | None" = None  # the stop string matched, or the stop token id sampled
    output: "RequestOutput | None" = None  # filled in when the request finishes
    sent_tokens: int = 0  # how much a stream has already yielded
    sent_text: int = 0
    big_wanted_since: "float | None" = None  # a handoff is waiting for the big model's first run
    # Per model: a sampled token already at the end of that view (an overlapped step planned it
    # ahead); the flow's next extend of the view takes it, and the engine drops it if none does.
    ahead: list = field(default_factory=lambda: [None, None])

    @property
    def holdback(self) -> int:
        """Trailing characters that could still start a stop string."""
        return max((len(s) for s in self.params.stop), default=1) - 1


class RequestBook:
    """Every unfinished request by id, and the ways a request's state moves on."""

    def __init__(self, scheduler, tokenizer: "Tokenizer | None", max_model_len: int, num_models: int,
                 stats: EngineStats):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.max_model_len, self.num_models, self.stats = max_model_len, num_models, stats
        self.live: dict[int, Request] = {}
        self.scoring: set[int] = set()  # requests that score their prompt (SamplingParams.prompt_logprobs)

    def commit(self, req: Request, token: int, model: int, logprob, now: float, stop: "bool | None" = None) -> bool:
        """Adds one token to the request's output; False once the request has finished. `stop`: the
        sampler's verdict on whether the token is one of the request's stop ids (None: look it up).
        With max_tokens 0 (prompt scoring only) the token is not kept."""
        if req.params.max_tokens == 0:
            self.end(req, "length", now)
            return False
        req.tokens.append(token)
        req.token_models.append(model)
        if model == BIG:
            req.metrics.big_tokens += 1
        else:
            req.metrics.small_tokens += 1
        if req.params.logprobs:
            req.logprobs.append(logprob)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        reason = None
        if (token in req.stop_ids) if stop is None else stop:
            reason, req.stop_reason = "stop", token
        elif len(req.tokens) >= req.params.max_tokens:
            reason = "length"
        if req.detokenizer is not None:
            delta = req.detokenizer.step(req.tokens)
            req.text += delta
            hit = _find_stop(req, len(delta)) if req.params.stop else None
            if hit is not None:
                cut, req.stop_reason = hit
                req.text, req.stopped_by_string, reason = req.text[:cut], True, "stop"
        if reason is not None:
            self.end(req, reason, now)
        return reason is None

    def extend(self, req: Request, model: int, tokens: list[int], now: float) -> bool:
        """Appends tokens to one of the request's views; a view that reaches max_model_len ends
        the request ("length"). False once the request has finished. A token the view holds
        ahead (req.ahead) counts as appended when it is the first of `tokens`, else it is dropped."""
        if not tokens:
            return True
        ahead, req.ahead[model] = req.ahead[model], None
        size = self.scheduler.view_size(req.id, model) - (ahead is not None)
        if size + len(tokens) >= self.max_model_len:
            self.end(req, "length", now)
            return False
        if ahead is not None:
            if tokens[0] == ahead:
                tokens = tokens[1:]
            else:
                self.scheduler.truncate(req.id, model, size)
        if tokens:
            self.scheduler.append(req.id, model, tokens)
        return True

    def drop_ahead(self, req: Request, model: int) -> None:
        """Takes a token planned ahead out of the view when the flow did not keep it."""
        if req.ahead[model] is not None:
            req.ahead[model] = None
            if req.finish_reason is None:
                self.scheduler.truncate(req.id, model, self.scheduler.view_size(req.id, model) - 1)

    def end(self, req: Request, reason: str, now: float) -> None:
        """Finishes a request: pages back to the pool first (so nothing leaks, whatever follows),
        then final text and metrics."""
        self._release(req)
        req.flow.finish(now)
        if req.detokenizer is not None and not req.stopped_by_string:
            req.text = self.tokenizer.decode(req.tokens)  # flush text held back mid-character
        req.finish_reason = reason
        self._close(req, now)

    def fail(self, req: Request, message: str, now: float) -> None:
        """Ends a request that broke (its logits, its text, its flow) with finish_reason "error" and
        `message`, whatever state it was left in; its streamed text stays as sent. Other requests
        are untouched."""
        logger.warning("request %d failed: %s", req.id, message)
        counted = req.finish_reason is not None  # it had finished when the failure surfaced
        if req.id in self.live:
            self._release(req, cache=False)  # the KV of its last step may be what broke
        req.finish_reason, req.error = "error", message
        if counted:
            self.stats.errors += 1
        else:
            self._close(req, now)

    def _release(self, req: Request, cache: bool = True) -> None:
        """Frees the request's pages; with `cache`, the full ones stay in the prefix cache."""
        m = req.metrics
        for model in range(self.num_models):
            m.peak_pages[model], m.tokens_processed[model], m.cached_tokens[model] = self.scheduler.view_stats(
                req.id, model)
        self.scheduler.finish(req.id, cache)
        del self.live[req.id]
        self.scoring.discard(req.id)

    def _close(self, req: Request, now: float) -> None:
        m = req.metrics
        m.finished_time = now
        m.num_generated_tokens = len(req.tokens)
        self.stats.add(m, failed=req.error is not None)

    def mark_big_started(self, request_ids, now: float) -> None:
        """The big model runs for these requests now: a handoff waiting for it has waited its last."""
        for rid in request_ids:
            req = self.live.get(rid)
            if req is not None and req.big_wanted_since is not None:
                req.metrics.big_waits.append(now - req.big_wanted_since)
                req.big_wanted_since = None


def _find_stop(req: Request, delta_len: int) -> "tuple[int, str] | None":
    """(where it starts, which) of the earliest stop string that ends in the new text, if any."""
    start = max(0, len(req.text) - delta_len - req.holdback)
    hits = [(i, s) for s, i in ((s, req.text.find(s, start)) for s in req.params.stop) if i >= 0]
    return min(hits) if hits else None


@dataclass(frozen=True)
class FlowContext:
    """What every flow of one engine shares: the request book and the protocol's settings."""

    book: RequestBook
    tokenizer: "Tokenizer | None"
    tags: Tags
    detector: "TagDetector | None"
    catch_up: str
    num_models: int
    speculate: "int | str" = 0  # the engine's default drafting: "auto" or the most drafts per big step
    costs: "StepCosts | None" = None  # step costs, for "auto"
    max_drafts: int = 8  # drafts one big step may verify (its sampled tail must fit the token budget)
    trace: "Trace | None" = None  # the engine's timeline, if it keeps one: each phase and handoff


class Flow(ABC):
    """What one request's views read next, driven by the tokens sampled for it."""

    def __init__(self, ctx: FlowContext, req: Request):
        self.ctx, self.req = ctx, req
        self.book, self.sched = ctx.book, ctx.book.scheduler
        self.timer, self.since = "small", req.metrics.arrival_time

    @abstractmethod
    def initial_views(self) -> tuple[list[list[int]], list[int]]:
        """Each model's first token stream and run state, for the scheduler's add_request."""

    @abstractmethod
    def on_token(self, model: int, token: int, word: int, logprob, now: float, probs=None) -> None:
        """Applies one token sampled for this request by `model`; `word` is the sampler's
        detection word for it (STOP, and the tag automaton's step from detect_state(model));
        `probs`: the distribution it was drawn from, when draft_probs_state asked for it."""

    def verify_group(self, model: int):
        """The drafts `model` verifies in this step (speculation.VerifyGroup), or None: the
        request's sampled rows are then its one next token."""
        return None

    def draft_probs_state(self, model: int) -> "int | None":
        """None, or the automaton state that `model`'s next token, a sampled draft, is conditioned
        not to close a tag from (-1: unconditioned): its distribution then comes with the token."""
        return None

    @property
    def drafting(self) -> bool:
        """Whether the small model is drafting for a big step to verify (the co-scheduling policy
        lines the verify steps up)."""
        return False

    def on_verified(self, tokens: list[int], logprobs: list, accepted: int, now: float) -> None:
        """Applies a verify step: the accepted drafts and the verifying model's own next token."""
        raise NotImplementedError(f"{type(self).__name__} verifies no drafts")

    def detect_state(self, model: int) -> int:
        """The tag automaton state the sampler steps on `model`'s next token (-1: none wanted)."""
        return -1

    def next_index(self) -> int:
        """The sampling-noise index of the next token sampled for this request."""
        return len(self.req.tokens)

    def samples_on(self, model: int) -> bool:
        """Whether the token `model` samples now goes to the end of its view, and that view then
        samples the next one, unless the token itself ends the request or changes the phase (a
        tag in split mode, a switch in random mode): the engine may then launch the next step
        before the token reaches the host, and drops that step's row if the token did change things."""
        return False

    def finish(self, now: float) -> None:
        self._time(self.timer, now)
        if self.ctx.trace is not None:
            self.ctx.trace.finished(self.req.id, now, self.req.metrics)

    # ---- helpers ----------------------------------------------------------------------------

    def _time(self, timer: str, now: float) -> None:
        """Charges the time since the last switch to the current phase, then switches."""
        m = self.req.metrics
        setattr(m, f"{self.timer}_time", getattr(m, f"{self.timer}_time") + now - self.since)
        if self.ctx.trace is not None:  # a switch into catch_up is a handoff
            self.ctx.trace.phase(self.req.id, self.timer, self.since, now, timer, m)
        self.timer, self.since = timer, now

    def _idle_run(self) -> int:
        return _C.RUN_BACKGROUND if self.ctx.catch_up == "eager" else _C.RUN_IDLE

    def _set_run(self, model: int, run: int) -> None:
        self.sched.set_run(self.req.id, model, run)

    def _ensure_pending(self, model: int) -> None:
        """A view about to sample needs an uncomputed token: recompute its last one if fully caught up."""
        rid = self.req.id
        size = self.sched.view_size(rid, model)
        if self.sched.view_computed(rid, model) == size:
            last = self.sched.request_tokens(rid, model)[-1]
            self.sched.truncate(rid, model, size - 1)
            self.sched.append(rid, model, [last])
