"""The flows of requests whose big tokens are drafted by the small model (speculation.py has the
acceptance rule): split mode's big segments, random mode's big chunks, and `big` mode as
draft-model speculative decoding.

A cycle: the small model drafts up to k tokens, one per step, reading each; the big model then
computes its last committed token and the k drafts in one step (the view's sampled tail) and
keeps the drafts it accepts plus one token of its own; the drafts it rejects are truncated from
both views.

In split mode each draft after a big token is also the small model's decision after that token,
exactly the one the protocol samples (same noise index), so a cycle drafts one more token than it
verifies: the last is the decision after the last draft. A decision that closes the segment or
starts a close tag ends the drafting; if the big model accepts every draft before it, the segment
ends there (or the probe starts there) as it would without drafting. The first cycle of a segment
starts at the handoff, so its first draft follows the open tag and decides nothing.
"""

import math

from . import _C
from .kernels.sample import CLOSE, CLOSING, STATE_SHIFT, STOP
from .protocol import RandomFlow, SingleFlow, SplitFlow
from .requests import BIG, SMALL
from .speculation import DraftTuner, VerifyGroup


class _Drafts:
    """One cycle's drafts: (token, detection word, logprob, small-model distribution or None)."""

    def __init__(self):
        self.items: list[tuple] = []
        self.verified = 0  # how many of them the big step verifies

    def tokens(self, n: int) -> list[int]:
        return [d[0] for d in self.items[:n]]

    def group(self, params, first_index: int) -> VerifyGroup:
        probs = None if params.greedy else [d[3] for d in self.items[:self.verified]]
        return VerifyGroup(params, self.tokens(self.verified), probs, first_index)


def _confidence(logprob: "float | None") -> "float | None":
    """The small model's probability of its draft (its unfiltered logprob; None: not computed)."""
    return None if logprob is None else math.exp(logprob)


def _send_to_verify(flow, drafts: _Drafts, now: float) -> int:
    """Puts the drafts to verify into the big view, which samples its last committed token and
    each of them in its next step; returns the view's size before the drafts."""
    req = flow.req
    flow._ensure_pending(BIG)
    base = flow.sched.view_size(req.id, BIG)
    if flow.book.extend(req, BIG, drafts.tokens(drafts.verified), now):
        flow.sched.set_sample_tail(req.id, BIG, drafts.verified + 1)
        flow._set_run(SMALL, _C.RUN_IDLE)
        flow._set_run(BIG, _C.RUN_FOREGROUND)
    return base


class DraftingSplitFlow(SplitFlow):
    """Split mode with big segments drafted by the small model."""

    DRAFT, VERIFY = "draft", "verify"

    def __init__(self, ctx, req, small_ids: list[int], big_ids: list[int], tuner: DraftTuner):
        super().__init__(ctx, req, small_ids, big_ids)
        self.tuner = tuner
        self.drafts = _Drafts()
        self.first = False  # this cycle starts the segment: its first draft decides nothing
        self.limit = 0  # drafts this cycle may verify
        self.draft_det = 0  # automaton state after the drafts so far
        self.small_base = self.big_draft_base = 0  # view sizes before the drafts
        self.last_decision = None  # a plain step's decision, until its big token comes

    @property
    def drafting(self):
        return self.phase == self.DRAFT

    def next_index(self):
        if self.phase == self.DRAFT:
            return len(self.req.tokens) + len(self.drafts.items)
        return super().next_index()

    def detect_state(self, model):
        if model == SMALL and self.phase == self.DRAFT:
            return self.draft_det
        return super().detect_state(model)

    def verify_group(self, model):
        if model == BIG and self.phase == self.VERIFY:
            return self.drafts.group(self.req.params, len(self.req.tokens))
        return None

    def draft_probs_state(self, model):
        if model != SMALL or self.phase != self.DRAFT or self.req.params.greedy:
            return None
        return self.draft_det if self.drafts.items or not self.first else -1

    def on_token(self, model, token, word, logprob, now, probs=None):
        if model == SMALL and self.phase == self.DRAFT:
            self._draft(token, word, logprob, probs, now)
        else:
            super().on_token(model, token, word, logprob, now)

    def _start_segment(self, now):
        self._start_drafting(first=True, now=now)

    def _decide(self, token, word, logprob, now):
        self.last_decision = token  # the plain protocol's decision is a draft too: auto learns from it
        super()._decide(token, word, logprob, now)

    def _big_writes(self, token, word, logprob, now):
        """A big token of a plain step (auto chose no drafts), or one held after a probe that did
        not close: committed; then the next cycle."""
        if self.last_decision is not None:
            self.tuner.observe(int(token == self.last_decision), token != self.last_decision)
            self.last_decision = None
        if self._commit_big(token, logprob, in_views=False, now=now):
            self._start_drafting(first=False, now=now)

    # ---- the cycle --------------------------------------------------------------------------

    def _start_drafting(self, first: bool, now: float) -> None:
        req, s = self.req, self.sched
        self.drafts, self.first, self.draft_det = _Drafts(), first, self.det
        self.small_base = s.view_size(req.id, SMALL)
        room = self.ctx.book.max_model_len - max(self.small_base, s.view_size(req.id, BIG)) - 2
        self.limit = max(0, min(self.tuner.next_k(len(self.book.live)), req.params.max_offload_tokens
                                - self.seg_big - 1, req.params.max_tokens - len(req.tokens) - 1, room))
        if first and self.limit == 0:  # nothing to draft: the first big token comes from a plain step
            self._start_verify(now)
            return
        if self.limit == 0:  # the plain protocol: both models step together, the decision beside the big token
            self.phase, self.outstanding = self.BIG_PHASE, True
            self._set_run(SMALL, _C.RUN_FOREGROUND)
            self._set_run(BIG, _C.RUN_FOREGROUND)
            return
        self.phase = self.DRAFT
        self._ensure_pending(SMALL)  # a step launched ahead may have computed the tag token, unsampled
        # The big view waits: the verify step computes what it has not read with the drafts, in one
        # weight-bound step (reading it in the background would cost a big step of its own).
        self._set_run(BIG, _C.RUN_IDLE)
        self._set_run(SMALL, _C.RUN_FOREGROUND)

    def _draft(self, token, word, logprob, probs, now):
        decides = self.drafts.items or not self.first
        self.drafts.items.append((token, word, logprob, probs))
        if decides and word & (CLOSE | CLOSING) and len(self.drafts.items) == 1:
            # The decision after the last committed big token ends the segment or starts a close
            # tag, with nothing to verify: no big step now. The plain protocol samples the big
            # token after it in the same step and drops it once the tag closes; here the big model
            # samples it only if a probe turns out not to be a close tag.
            if word & CLOSE:
                self._end_segment([(token, logprob)], in_small_view=False, now=now)
            else:
                self._start_probe(self.drafts.items[0], None, now)
        elif (decides and word & (CLOSE | CLOSING)) or len(self.drafts.items) == self.limit + 1:
            self._start_verify(now)
        elif self.book.extend(self.req, SMALL, [token], now):
            self.draft_det = word >> STATE_SHIFT
            if not self.tuner.keep_drafting(_confidence(logprob), len(self.book.live)):
                self.limit = len(self.drafts.items)  # the decision after this draft ends the cycle

    def _start_verify(self, now: float) -> None:
        self.drafts.verified = max(0, len(self.drafts.items) - 1)  # the last one is a decision
        self.big_draft_base = _send_to_verify(self, self.drafts, now)
        self.phase = self.VERIFY

    def on_verified(self, tokens: list[int], logprobs: list, accepted: int, now: float) -> None:
        req, s, v = self.req, self.sched, self.drafts.verified
        s.set_sample_tail(req.id, BIG, 1)
        req.metrics.draft_tokens += v
        req.metrics.accepted_draft_tokens += accepted
        if accepted < v:
            s.truncate(req.id, SMALL, self.small_base + accepted)
            s.truncate(req.id, BIG, self.big_draft_base + accepted)
            req.metrics.rolled_back_tokens += v - accepted
        for token, logprob in zip(tokens[:accepted], logprobs):
            if not self._commit_big(token, logprob, in_views=True, now=now):
                return
        token, logprob = tokens[-1], logprobs[-1]
        last = self.drafts.items[-1] if self.drafts.items else None
        decision = last if accepted == v and last is not None and (v > 0 or not self.first) else None
        self.tuner.observe(accepted + (decision is not None and decision[0] == token),
                           accepted < v or (decision is not None and decision[0] != token),
                           [_confidence(d[2]) for d in self.drafts.items[:v]])
        if decision is not None and decision[1] & CLOSE:
            self.held = (token, 0, logprob)  # sampled after the close: dropped
            self._end_segment([(decision[0], decision[2])], in_small_view=False, now=now)
        elif decision is not None and decision[1] & CLOSING:
            self._start_probe(decision, (token, STOP if token in req.stop_ids else 0, logprob), now)
        elif self._commit_big(token, logprob, in_views=False, now=now):
            self._start_drafting(first=False, now=now)

    def _start_probe(self, decision: tuple, held: "tuple | None", now: float) -> None:
        """The decision after the last accepted draft may start a close tag: the small model writes
        on alone, as in the protocol, holding the big token sampled after it (None: not sampled;
        the big model samples it if the probe fails)."""
        token, word, logprob, _ = decision
        self.phase, self.probe, self.held = self.PROBE, [(token, logprob)], held
        self.probe_det, self.probe_len = self.det, self.sched.view_size(self.req.id, SMALL)
        self.det = word >> STATE_SHIFT
        self._set_run(BIG, _C.RUN_IDLE)
        self._set_run(SMALL, _C.RUN_FOREGROUND)
        self.book.extend(self.req, SMALL, [token], now)

    def _commit_big(self, token: int, logprob, in_views: bool, now: float) -> bool:
        """One big token into the output (and both views, unless a draft put it there); False once
        the request or the segment has ended."""
        b, req = self.book, self.req
        if self.seg_big == 0:
            req.metrics.handoff_latencies.append(now - self.tag_time)
            self._time("big", now)
        if not b.commit(req, token, BIG, logprob, now):
            return False
        if not in_views and not (b.extend(req, BIG, [token], now) and b.extend(req, SMALL, [token], now)):
            return False
        req.metrics.catch_up_tokens[SMALL] += 1
        self.det = self.detector.step(self.det, token)[0]
        self.seg_big += 1
        if self.seg_big >= req.params.max_offload_tokens:
            close = self.ctx.tokenizer.encode(self.tags.close[0], add_special_tokens=False)
            self._end_segment([(t, None) for t in close], in_small_view=False, now=now)
            return False
        return True


class _DraftsWithoutDecisions:
    """What big mode and random mode's big chunks share: a plain big step, or drafts that decide
    nothing (no tag ends the text there) followed by a verify step."""

    PLAIN, DRAFT, VERIFY = "plain", "draft", "verify"

    @property
    def drafting(self):
        return self.phase == self.DRAFT

    def next_index(self):
        return len(self.req.tokens) + (len(self.drafts.items) if self.phase == self.DRAFT else 0)

    def verify_group(self, model):
        if model == BIG and self.phase == self.VERIFY:
            return self.drafts.group(self.req.params, len(self.req.tokens))
        return None

    def draft_probs_state(self, model):
        return -1 if model == SMALL and self.phase == self.DRAFT and not self.req.params.greedy else None


class DraftingBigFlow(_DraftsWithoutDecisions, SingleFlow):
    """`big` mode with the small model drafting: draft-model speculative decoding. The small view
    reads the prompt in the background while the big model writes the first token."""

    def __init__(self, ctx, req, tuner: DraftTuner):
        super().__init__(ctx, req, BIG)
        self.tuner = tuner
        self.phase = self.PLAIN
        self.drafts = _Drafts()
        self.limit = 0
        self.synced = 0  # output tokens in the small view
        self.small_base = self.big_draft_base = 0

    def initial_views(self):
        return [list(self.req.prompt), list(self.req.prompt)], [_C.RUN_BACKGROUND, _C.RUN_FOREGROUND]

    def samples_on(self, model):
        return False

    def on_token(self, model, token, word, logprob, now, probs=None):
        b, req = self.book, self.req
        if model == BIG:
            if b.commit(req, token, BIG, logprob, now, stop=bool(word & STOP)) and b.extend(req, BIG, [token], now):
                self._start_drafting(now)
            return
        self.drafts.items.append((token, word, logprob, probs))
        if len(self.drafts.items) == self.limit or not self.tuner.keep_drafting(_confidence(logprob),
                                                                                 len(self.book.live)):
            self._start_verify(now)
        else:
            b.extend(req, SMALL, [token], now)

    def _start_drafting(self, now: float) -> None:
        req, s = self.req, self.sched
        self.drafts = _Drafts()
        k = self.tuner.next_k(len(self.book.live))
        if k == 0 and self.tuner.auto and len(self.book.live) == 1 and len(req.tokens) % 16 == 0:
            k = 1  # alone, with drafting off: one draft now and then shows whether it pays again
        room = self.ctx.book.max_model_len - max(s.view_size(req.id, SMALL), s.view_size(req.id, BIG)) - 2
        self.limit = max(0, min(k, req.params.max_tokens - len(req.tokens) - 1, room))
        if self.limit == 0:
            self.phase = self.PLAIN
            self._set_run(SMALL, _C.RUN_BACKGROUND)
            self._set_run(BIG, _C.RUN_FOREGROUND)
            return
        missing = req.tokens[self.synced:]
        if not self.book.extend(req, SMALL, missing, now):
            return
        self.synced = len(req.tokens)
        self._ensure_pending(SMALL)
        self.small_base = s.view_size(req.id, SMALL)
        self.phase = self.DRAFT
        self._set_run(BIG, _C.RUN_IDLE)
        self._set_run(SMALL, _C.RUN_FOREGROUND)

    def _start_verify(self, now: float) -> None:
        self.drafts.verified = len(self.drafts.items)
        self.big_draft_base = _send_to_verify(self, self.drafts, now)
        self.phase = self.VERIFY

    def on_verified(self, tokens: list[int], logprobs: list, accepted: int, now: float) -> None:
        req, s, b, v = self.req, self.sched, self.book, self.drafts.verified
        s.set_sample_tail(req.id, BIG, 1)
        req.metrics.draft_tokens += v
        req.metrics.accepted_draft_tokens += accepted
        self.tuner.observe(accepted, accepted < v, [_confidence(d[2]) for d in self.drafts.items[:v]])
        in_small = min(accepted, v - 1)  # the small view read every draft but the last
        s.truncate(req.id, SMALL, self.small_base + in_small)
        self.synced = len(req.tokens) + in_small
        if accepted < v:
            s.truncate(req.id, BIG, self.big_draft_base + accepted)
            req.metrics.rolled_back_tokens += v - accepted
        for token, logprob in zip(tokens, logprobs):
            if not b.commit(req, token, BIG, logprob, now):
                return
        if b.extend(req, BIG, tokens[-1:], now):
            self._start_drafting(now)


class DraftingRandomFlow(_DraftsWithoutDecisions, RandomFlow):
    """Random mode with its big chunks drafted by the small model: before each cycle the small view
    catches up on the chunk's text; drafts never cross the chunk's end, so each chunk's writer is
    drawn after the same tokens as without drafting."""

    def __init__(self, ctx, req, small_ids: list[int], big_ids: list[int], seed: int, tuner: DraftTuner):
        super().__init__(ctx, req, small_ids, big_ids, seed)
        self.tuner = tuner
        self.phase = self.PLAIN
        self.drafts = _Drafts()
        self.limit = 0
        self.small_base = self.big_draft_base = 0

    def samples_on(self, model):
        return self.phase == self.PLAIN and super().samples_on(model)

    def on_token(self, model, token, word, logprob, now, probs=None):
        if self.phase == self.PLAIN:
            if self._write(model, token, logprob, now, stop=bool(word & STOP)) and model == BIG:
                self._start_drafting(now)
            return
        self.drafts.items.append((token, word, logprob, probs))
        if len(self.drafts.items) == self.limit or not self.tuner.keep_drafting(_confidence(logprob),
                                                                                 len(self.book.live)):
            self.drafts.verified = len(self.drafts.items)
            self.big_draft_base = _send_to_verify(self, self.drafts, now)
            self.phase = self.VERIFY
        else:
            self.book.extend(self.req, SMALL, [token], now)

    def _start_drafting(self, now: float) -> None:
        req, s = self.req, self.sched
        self.drafts = _Drafts()
        chunk_left = req.params.switch_chunk - len(req.tokens) % req.params.switch_chunk
        room = self.ctx.book.max_model_len - max(s.view_size(req.id, SMALL), s.view_size(req.id, BIG)) - 2
        self.limit = max(0, min(self.tuner.next_k(len(self.book.live)), chunk_left - 1,
                                req.params.max_tokens - len(req.tokens) - 1, room))
        if self.limit == 0:  # a plain big step
            self.phase = self.PLAIN
            return
        missing = req.tokens[self.synced[SMALL]:]
        if not self.book.extend(req, SMALL, missing, now):
            return
        req.metrics.catch_up_tokens[SMALL] += len(missing)
        self.synced[SMALL] = len(req.tokens)
        self._ensure_pending(SMALL)
        self.small_base = s.view_size(req.id, SMALL)
        self.phase = self.DRAFT
        self._set_run(BIG, _C.RUN_IDLE)
        self._set_run(SMALL, _C.RUN_FOREGROUND)

    def on_verified(self, tokens: list[int], logprobs: list, accepted: int, now: float) -> None:
        req, s, v = self.req, self.sched, self.drafts.verified
        s.set_sample_tail(req.id, BIG, 1)
        self._set_run(SMALL, self._idle_run())
        self.phase = self.PLAIN
        req.metrics.draft_tokens += v
        req.metrics.accepted_draft_tokens += accepted
        self.tuner.observe(accepted, accepted < v, [_confidence(d[2]) for d in self.drafts.items[:v]])
        in_small = min(accepted, v - 1)  # the small view read every draft but the last
        s.truncate(req.id, SMALL, self.small_base + in_small)
        self.synced[SMALL] = len(req.tokens) + in_small
        if accepted < v:
            s.truncate(req.id, BIG, self.big_draft_base + accepted)
            req.metrics.rolled_back_tokens += v - accepted
        for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
            if not self._write(BIG, token, logprob, now, in_view=i < accepted):
                return
        self._start_drafting(now)
