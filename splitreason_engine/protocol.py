"""The SplitReason protocol: the prompt template, and one flow object per request that decides
what each model's view reads next.

Views: the small view is the templated prompt (with the hint sentence) plus everything generated,
tags included. The big view is the prompt without the hint, then, segment by segment, the small
model's text with every tag removed and re-tokenized, and the big model's own tokens as written.

Split mode, per request:
- SMALL phase: the small model writes. When a token completes `<bigmodel>` the big view catches up
  on the segment's text (only what it has not seen) and the big model takes over (BIG phase).
- BIG phase: each big token is appended to both views; in the next step the small model reads it
  (a shadow decode, batched with everything else) and samples its own next token, the *decision*.
  A decision that completes a close tag ends the segment; one that may start a close tag (a text
  tag spans tokens) starts a PROBE: the small model writes on alone until the close tag completes
  (segment ends) or cannot (its probe tokens are rolled back and the big model goes on). A big
  token sampled in the same step as a closing decision was generated ahead and is dropped.
- `max_offload_tokens` big tokens end a segment with a forced close tag.
Random mode: chunks of `switch_chunk` tokens, each written by the big model with probability
1 / (switch_ratio + 1); the other view catches up on the raw tokens at a switch.

Catch-up is `lazy` (at the handoff) or `eager` (the idle view is fed as text appears and computed
in the background with spare budget, so a handoff has little left to prefill).
"""

import random
from dataclasses import dataclass

from . import _C
from .kernels.sample import CLOSING, STATE_SHIFT, STOP
from .requests import BIG, SMALL, Flow
from .tags import CLOSE, OPEN

CATCH_UP_POLICIES = ("lazy", "eager")
EAGER_SYNC_EVERY = 8  # new tokens between background catch-up syncs of the idle view


@dataclass(frozen=True)
class PromptTemplate:
    """The split-mode prompt. `{hint}` is present only in the small model's copy. The question's
    own leading and trailing whitespace is dropped (a newline from a pipe, a terminal's spaces):
    the template sets the layout around it, as the models were trained."""

    template: str = "<｜begin▁of▁sentence｜><｜User｜>{question}\n{hint}{terminating}<｜Assistant｜>\n<think>\n"
    hint: str = "You always use <bigmodel>...</bigmodel> to mark parts of the reasoning process that are important.\n"
    terminating: str = "\n Put your final answer within \\boxed{}."

    def __post_init__(self):
        if "{question}" not in self.template:
            raise ValueError("prompt template needs a {question} field")

    def small(self, question: str) -> str:
        return self.template.format(question=question.strip(), hint=self.hint, terminating=self.terminating)

    def big(self, question: str) -> str:
        return self.template.format(question=question.strip(), hint="", terminating=self.terminating)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SingleFlow(Flow):
    """`small` or `big` mode: one model, the prompt as given."""

    def __init__(self, ctx, req, model: int):
        super().__init__(ctx, req)
        self.model = model
        self.timer = "big" if model == BIG else "small"

    def initial_views(self):
        views = [[] for _ in range(self.ctx.num_models)]
        runs = [_C.RUN_IDLE] * self.ctx.num_models
        views[self.model], runs[self.model] = list(self.req.prompt), _C.RUN_FOREGROUND
        return views, runs

    def on_token(self, model, token, word, logprob, now, probs=None):
        if self.book.commit(self.req, token, model, logprob, now, stop=bool(word & STOP)):
            self.book.extend(self.req, model, [token], now)

    def samples_on(self, model):
        return True


class SplitFlow(Flow):
    SMALL_PHASE, BIG_PHASE, PROBE = "small", "big", "probe"

    def __init__(self, ctx, req, small_ids: list[int], big_ids: list[int]):
        super().__init__(ctx, req)
        self.small_ids, self.big_ids = small_ids, big_ids
        self.detector, self.tags = ctx.detector, ctx.tags
        self.phase = self.SMALL_PHASE
        self.det = 0  # automaton state after the small view's generated text
        self.seg_start = 0  # output index where the current small segment began
        self.big_base = len(big_ids)  # big view length before the current segment's text
        self.big_seg: list[int] = []  # the current segment's tokens already in the big view
        self.held = None  # a big token waiting for the small model's decision on the previous one
        self.outstanding = False  # a big token was appended and its decision has not come back
        self.probe: list[tuple[int, object]] = []
        self.probe_det, self.probe_len = 0, 0
        self.seg_big = 0  # big tokens in the current segment
        self.tag_time = 0.0

    def initial_views(self):
        return [self.small_ids, self.big_ids], [_C.RUN_FOREGROUND, self._idle_run()]

    def next_index(self):
        return len(self.req.tokens) + len(self.probe)

    def detect_state(self, model):
        # Only the small model's tokens can write tags; its row's state is `det` in every phase.
        return self.det if model == SMALL else -1

    def samples_on(self, model):
        return model == SMALL and self.phase == self.SMALL_PHASE

    def on_token(self, model, token, word, logprob, now, probs=None):
        if model == SMALL:
            if self.phase == self.SMALL_PHASE:
                self._small_writes(token, word, logprob, now)
            elif self.phase == self.BIG_PHASE:
                self._decide(token, word, logprob, now)
            else:
                self._probe(token, word, logprob, now)
        elif self.phase == self.PROBE:
            self.held = (token, word, logprob)
        elif self.phase == self.SMALL_PHASE:
            self.req.metrics.rolled_back_tokens += 1  # sampled in the step whose decision closed the segment
        elif self.outstanding:
            self.held = (token, word, logprob)
            self._set_run(BIG, _C.RUN_IDLE)
        else:
            self._big_writes(token, word, logprob, now)

    # ---- small segment ----------------------------------------------------------------------

    def _small_writes(self, token, word, logprob, now):
        b, req = self.book, self.req
        if not b.commit(req, token, SMALL, logprob, now, stop=bool(word & STOP)) or not b.extend(req, SMALL, [token], now):
            return
        self.det = word >> STATE_SHIFT
        if word & OPEN:
            self._handoff(now)
        elif self.ctx.catch_up == "eager" and (len(req.tokens) - self.seg_start) % EAGER_SYNC_EVERY == 0:
            self._sync_big(final=False, now=now)

    def _sync_big(self, final: bool, now: float) -> bool:
        """Brings the big view's copy of the current segment up to date: its text with the tags
        removed, re-tokenized; tokens that no longer match are rolled back. Before the handoff
        (eager mode) the text that may still become a tag or a character is held back."""
        b, req = self.book, self.req
        text = self.ctx.tokenizer.decode(req.tokens[self.seg_start:])
        if not final:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self.tags.partial_suffix(text)]
        ids = self.ctx.tokenizer.encode(self.tags.strip(text), add_special_tokens=False)
        common = _common_prefix(self.big_seg, ids)
        if common < len(self.big_seg):
            self.sched.truncate(req.id, BIG, self.big_base + common)
            req.metrics.rolled_back_tokens += len(self.big_seg) - common
        self.big_seg = ids
        req.metrics.catch_up_tokens[BIG] += len(ids) - common
        return b.extend(req, BIG, ids[common:], now)

    def _handoff(self, now):
        self.req.metrics.handoffs += 1
        self.tag_time = now
        self._time("catch_up", now)
        if not self._sync_big(final=True, now=now):
            return
        self.req.big_wanted_since = now
        self.seg_big, self.outstanding, self.held = 0, False, None
        self._start_segment(now)

    def _start_segment(self, now: float) -> None:
        """The big view has the segment's text: the big model writes its first token."""
        self._ensure_pending(BIG)
        self._set_run(SMALL, _C.RUN_IDLE)
        self._set_run(BIG, _C.RUN_FOREGROUND)
        self.phase = self.BIG_PHASE

    # ---- big segment ------------------------------------------------------------------------

    def _big_writes(self, token, word, logprob, now):
        b, req = self.book, self.req
        if self.seg_big == 0:
            req.metrics.handoff_latencies.append(now - self.tag_time)
            self._time("big", now)
        if not (b.commit(req, token, BIG, logprob, now, stop=bool(word & STOP)) and b.extend(req, BIG, [token], now)
                and b.extend(req, SMALL, [token], now)):
            return
        req.metrics.catch_up_tokens[SMALL] += 1
        self.det = self.detector.step(self.det, token)[0]
        self.seg_big += 1
        self._set_run(SMALL, _C.RUN_FOREGROUND)
        self._set_run(BIG, _C.RUN_FOREGROUND)
        self.outstanding = True
        if self.seg_big >= req.params.max_offload_tokens:
            close = self.ctx.tokenizer.encode(self.tags.close[0], add_special_tokens=False)
            self._end_segment([(t, None) for t in close], in_small_view=False, now=now)

    def _decide(self, token, word, logprob, now):
        """The small model's next token after reading the newest big token."""
        self.outstanding = False
        state = word >> STATE_SHIFT
        if word & CLOSE:
            self._end_segment([(token, logprob)], in_small_view=False, now=now)
        elif word & CLOSING:
            self.phase, self.probe = self.PROBE, [(token, logprob)]
            self.probe_det, self.probe_len = self.det, self.sched.view_size(self.req.id, SMALL)
            self.det = state
            self._set_run(BIG, _C.RUN_IDLE)
            self.book.extend(self.req, SMALL, [token], now)
        elif self.held is not None:
            held, self.held = self.held, None
            self._big_writes(*held, now)

    def _probe(self, token, word, logprob, now):
        state = word >> STATE_SHIFT
        if word & CLOSE:
            self.probe.append((token, logprob))
            if self.book.extend(self.req, SMALL, [token], now):
                self.det = self.probe_det
                self._end_segment(self.probe, in_small_view=True, now=now)
        elif word & CLOSING and len(self.probe) < self.detector.max_close_bytes:
            self.probe.append((token, logprob))
            self.det = state
            self.book.extend(self.req, SMALL, [token], now)
        else:  # not a close tag after all: roll the probe back, the big model goes on
            self.sched.truncate(self.req.id, SMALL, self.probe_len)
            self.req.metrics.rolled_back_tokens += len(self.probe) + 1
            self.det, self.probe, self.phase = self.probe_det, [], self.BIG_PHASE
            self._set_run(BIG, _C.RUN_FOREGROUND)
            if self.held is not None:
                held, self.held = self.held, None
                self._big_writes(*held, now)
            else:  # a drafting flow probed before sampling the big token after the decision: now
                self._ensure_pending(BIG)
                self._set_run(SMALL, _C.RUN_IDLE)

    def _end_segment(self, tokens, in_small_view: bool, now: float) -> None:
        """The close tag (as the small model wrote it, or forced) ends the big segment."""
        b, req = self.book, self.req
        self._time("small", now)
        if self.held is not None:
            req.metrics.rolled_back_tokens += 1
        self.phase, self.outstanding, self.held, self.probe = self.SMALL_PHASE, False, None, []
        self.seg_start = len(req.tokens)
        for token, logprob in tokens:
            state = self.detector.step(self.det, token)[0]
            if not b.commit(req, token, SMALL, logprob, now):
                return
            if not in_small_view and not b.extend(req, SMALL, [token], now):
                return
            self.det = state
        self._set_run(SMALL, _C.RUN_FOREGROUND)
        self._set_run(BIG, self._idle_run())
        self.big_base, self.big_seg = self.sched.view_size(req.id, BIG), []


class RandomFlow(Flow):
    """The random-switch baseline: each chunk's writer is drawn from the request's seed."""

    def __init__(self, ctx, req, small_ids: list[int], big_ids: list[int], seed: int):
        super().__init__(ctx, req)
        self.small_ids, self.big_ids = small_ids, big_ids
        self.rng = random.Random(seed)
        self.big_probability = 1.0 / (req.params.switch_ratio + 1.0)
        self.writer = self._draw()
        self.synced = [0, 0]  # output tokens already appended to each view
        self.awaiting_first_big = False
        self.switch_time = 0.0
        self.timer = "big" if self.writer == BIG else "small"

    def _draw(self) -> int:
        return BIG if self.rng.random() < self.big_probability else SMALL

    def samples_on(self, model):
        return model == self.writer

    def initial_views(self):
        runs = [self._idle_run(), self._idle_run()]
        runs[self.writer] = _C.RUN_FOREGROUND
        return [self.small_ids, self.big_ids], runs

    def on_token(self, model, token, word, logprob, now, probs=None):
        self._write(model, token, logprob, now, stop=bool(word & STOP))

    def _write(self, model: int, token: int, logprob, now: float, stop: "bool | None" = None,
               in_view: bool = False) -> bool:
        """One token of the writer into the output (and its view, unless `in_view`: a kept draft is
        there already); the other view catches up (eager), and a chunk's end draws the next
        writer. False once the request has ended or the writer changed."""
        b, req = self.book, self.req
        if self.awaiting_first_big:
            self.awaiting_first_big = False
            req.metrics.handoff_latencies.append(now - self.switch_time)
            self._time("big", now)
        if not b.commit(req, token, model, logprob, now, stop=stop) or (
                not in_view and not b.extend(req, model, [token], now)):
            return False
        self.synced[model] = len(req.tokens)
        other = 1 - model
        missing = req.tokens[self.synced[other]:]
        if self.ctx.catch_up == "eager" and len(missing) >= EAGER_SYNC_EVERY:
            if not b.extend(req, other, missing, now):
                return False
            self.synced[other] = len(req.tokens)
            req.metrics.catch_up_tokens[other] += len(missing)
        if len(req.tokens) % req.params.switch_chunk == 0:
            writer = self._draw()
            if writer != model:
                self._switch(writer, now)
                return False
        return True

    def _switch(self, writer: int, now: float) -> None:
        b, req = self.book, self.req
        missing = req.tokens[self.synced[writer]:]
        if not b.extend(req, writer, missing, now):
            return
        req.metrics.catch_up_tokens[writer] += len(missing)
        self.synced[writer] = len(req.tokens)
        self._ensure_pending(writer)
        self._set_run(writer, _C.RUN_FOREGROUND)
        self._set_run(1 - writer, self._idle_run())
        self.writer = writer
        if writer == BIG:
            req.metrics.handoffs += 1
            req.big_wanted_since = now
            self.awaiting_first_big, self.switch_time = True, now
            self._time("catch_up", now)
        else:
            self._time("small", now)
