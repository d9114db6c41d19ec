"""The step loop: plan a step per model, launch it, bring its tokens back and hand them to the
requests' flows; with overlap, launch the next step before this one's tokens reach the host.

Each step the C++ scheduler plans a batch per model and fills flat arrays; the runners execute
them; the sampler picks tokens; each request's flow (protocol.py) decides what its views read
next and tells the scheduler (append, truncate, foreground / background / idle). The co-scheduling
policy says whether the big model sits a step out. Faults stay with their requests (step()).
"""

import logging

import numpy as np
import torch

from . import _C
from .inflight import Batch, Feed, Results, Step
from .kernels.sample import NONFINITE
from .kv_pool import KVPool
from .logprobs import HostCopy, PromptRows, TokenLogprob, top_logprobs, with_top
from .parallel import TPFailure
from .requests import BIG, MODEL_NAMES, Request, RequestBook
from .runner import ModelRunner
from .sampling import DetectTables, sample_and_detect, to_device
from .speculation import draft_distribution, verify
from .stats import EngineStats
from .trace import Trace

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # failed forward passes of one model in a row before the engine gives up


class EngineBroken(RuntimeError):
    """The engine cannot serve any more (steps keep failing); the message says why."""


class StepLoop:
    """Runs the engine's steps over the live requests of `book`."""

    def __init__(self, scheduler, runners: list[ModelRunner], book: RequestBook, stats: EngineStats, clock, policy,
                 sample_op, verify_op, detect_tables: DetectTables, real_vocab: list[int], seed: int, device: torch.device,
                 max_model_len: int, overlap: bool, pool: KVPool, trace: "Trace | None" = None):
        self.scheduler, self.runners, self.book, self.stats, self.clock = scheduler, runners, book, stats, clock
        self.pool = pool  # the scheduler's page copies (n samples of one prompt) run on it
        self.trace = trace  # the engine's timeline, if it keeps one (trace.py)
        self.policy, self.sample_op, self.verify_op = policy, sample_op, verify_op
        self.detect_tables, self.real_vocab = detect_tables, real_vocab
        self.device, self.max_model_len, self.overlap = device, max_model_len, overlap
        self.requests = book.live
        self.counts = scheduler.counts().reshape(len(runners), _C.NUM_COUNT_FIELDS)
        self.generator = torch.Generator().manual_seed(seed)  # noise keys are drawn on the host
        self.ahead: "Step | None" = None  # a step launched before the last one's tokens were applied
        self.broken: "EngineBroken | None" = None  # set once the engine has given up
        self.failed_runs = [0] * len(runners)  # failed forward passes in a row, per model

    @torch.inference_mode()
    def step(self) -> int:
        """One engine step over every queued request, whoever submitted it; returns how many
        sequences ran (0: nothing to do). Results accumulate on the requests themselves.

        With overlap, the next step is launched before this one's tokens reach the host, whenever
        every sampled row lets it (see _launch_ahead); the tokens are the same as without.

        Faults stay with the requests they belong to: a row with non-finite logits, or a flow or
        detokenizer that raises, fails its request only; a forward pass or sampler that raises
        fails the requests of that model's batch. Either way they end with finish_reason "error"
        and their pages go back to the pool, and the other requests go on. After
        MAX_FAILED_STEPS failed forward passes of one model in a row the engine gives up: EngineBroken."""
        if self.broken is not None:
            raise self.broken
        current, self.ahead = self.ahead, None
        if current is None:
            self._plan(self.clock.now())
            current = self._launch()
        ahead = self._launch_ahead(current) if self.overlap else None
        self._apply(current, ahead)
        if ahead is not None and ahead.ran:
            self.ahead = ahead
        if self.broken is not None:
            raise self.broken
        return current.ran

    def _launch(self, feeds: "dict | None" = None, sources: "dict | None" = None) -> Step:
        """Runs the planned step's models up to their sampled tokens, without waiting for them.
        `feeds` {(model, request id): (source row, view size)}: views that end in a placeholder for
        the token that row of `sources[model]` (the previous step's results) sampled."""
        step = Step(placeholders=set(feeds or ()))
        for m, runner in enumerate(self.runners):
            num_seqs, num_tokens, num_decodes, num_samples, width = self.counts[m].tolist()
            step.ran += num_seqs
            if num_seqs == 0:
                continue
            self.stats.count_step(m, num_seqs)
            if m == BIG:
                self.book.mark_big_started(runner.buffers["seq_request_ids"][:num_seqs].tolist(), self.clock.now())
            began = self.clock.now()
            try:
                batch = self._run_model(m, runner, num_seqs, num_tokens, num_decodes, num_samples, width, feeds,
                                        sources)
                if batch is not None:
                    step.batches.append(batch)
                self.failed_runs[m] = 0
            except Exception as e:  # the whole batch: its requests fail, the engine goes on
                step.failures += self._batch_failure(m, runner.buffers["seq_request_ids"][:num_seqs].tolist(), e)
            self.clock.charge(m, num_seqs, num_tokens)
            self.stats.model_time[m] += self.clock.now() - began
            if self.trace is not None:
                self.trace.model_step(m, began, self.clock.now(), num_seqs, num_tokens)
        return step

    def _run_model(self, m: int, runner: ModelRunner, num_seqs: int, num_tokens: int, num_decodes: int,
                   num_samples: int, width: int, feeds: "dict | None", sources: "dict | None") -> "Batch | None":
        """One model's forward pass and sampling, launched: the results stay on their way to the host."""
        b = runner.buffers
        reqs, plain_rows, verifying, groups, verify_rows = self._sample_rows(m, b["sample_request_ids"][:num_samples])
        fed = {row: feeds[(m, r.id)] for row, r in enumerate(reqs) if (m, r.id) in feeds} if feeds else {}
        feed = self._feed(m, b, num_seqs, reqs, fed, sources[m]) if fed else None
        prompt_rows = (PromptRows.of_step(self.requests, self.book.scoring, m, b, num_seqs)
                       if self.book.scoring else None)
        logits = runner.execute(num_seqs, num_tokens, num_decodes, num_samples, width, feed,
                                prompt_rows.rows if prompt_rows is not None else None)
        scores = None
        if prompt_rows is not None:
            scores = prompt_rows.score(logits[num_samples:], self.real_vocab[m])
            logits = logits[:num_samples]
        if num_samples == 0:
            return Batch(m, [], None, prompt_scores=scores) if scores is not None else None
        verified = None
        if groups:
            index = to_device(np.array(verify_rows, dtype=np.int64), logits.device)
            verify_logits = logits.index_select(0, index)
            n = max(g.params.top_logprobs for g in groups)
            top = HostCopy.start(*top_logprobs(verify_logits, self.real_vocab[m], n)) if n else None
            verified = (verifying, groups, verify(verify_logits, groups, self.real_vocab[m], self.generator, m,
                                                  self.verify_op), top)
            logits = logits.index_select(0, to_device(np.array(plain_rows, dtype=np.int64), logits.device))
        if not reqs:
            return Batch(m, [], None, verified=verified, prompt_scores=scores)
        # A row fed from the previous step samples the token after the one the host has not seen.
        indices = [r.flow.next_index() + (row in fed) for row, r in enumerate(reqs)]
        state_feed = (feed.sample_rows, feed.source.words, feed.state_rows) if feed is not None else None
        tokens, words, logprobs = sample_and_detect(
            logits, [r.params for r in reqs], indices, self.generator, self.real_vocab[m], self.sample_op,
            [r.flow.detect_state(m) for r in reqs], self.detect_tables, [r.stop_ids for r in reqs], state_feed, m,
            with_logprobs=any(r.flow.drafting for r in reqs))
        n = max(r.params.top_logprobs for r in reqs)
        results = Results.copy_back(tokens, words, logprobs,
                                    top_logprobs(logits, self.real_vocab[m], n) if n else None)
        return Batch(m, reqs, results, {row: size for row, (_, size) in fed.items()},
                     draft_probs=self._draft_probs(m, logits, reqs), verified=verified, prompt_scores=scores)

    def _sample_rows(self, m: int, request_ids: np.ndarray) -> tuple[list[Request], list[int], list[Request], list,
                                                                      list[int]]:
        """Splits a step's sampled rows: one per request that samples its next token (requests, rows),
        and the rows of requests whose flow verifies drafts (requests, groups, rows)."""
        reqs, plain_rows, verifying, groups, verify_rows = [], [], [], [], []
        ids = request_ids.tolist()
        row = 0
        while row < len(ids):
            req = self.requests[ids[row]]
            end = row + 1
            while end < len(ids) and ids[end] == ids[row]:
                end += 1
            group = req.flow.verify_group(m)
            if group is None:
                assert end == row + 1, f"request {req.id} sampled {end - row} rows with no drafts to verify"
                reqs.append(req)
                plain_rows.append(row)
            else:
                assert end - row == len(group.drafts) + 1, (
                    f"request {req.id} verifies {len(group.drafts)} drafts on {end - row} rows")
                verifying.append(req)
                groups.append(group)
                verify_rows += range(row, end)
            row = end
        return reqs, plain_rows, verifying, groups, verify_rows

    def _draft_probs(self, m: int, logits: torch.Tensor, reqs: list[Request]) -> dict:
        """row -> the small model's distribution of a sampled draft (speculation.draft_distribution)."""
        states = {row: r.flow.draft_probs_state(m) for row, r in enumerate(reqs)}
        rows = [row for row, state in states.items() if state is not None]
        if not rows:
            return {}
        q = draft_distribution(logits[rows], [reqs[row].params for row in rows], self.real_vocab[m],
                               [states[row] for row in rows], self.detect_tables)
        return dict(zip(rows, q))

    def _feed(self, m: int, buffers: dict, num_seqs: int, reqs: list[Request], fed: dict, source: Results) -> Feed:
        """Where the placeholders of this model's planned step are, and which rows of the previous
        step's samples replace them. A fed view computes exactly its placeholder: a decode row."""
        seq_of = {rid: j for j, rid in enumerate(buffers["seq_request_ids"][:num_seqs].tolist())}
        starts = buffers["query_start_loc"]
        positions = [int(starts[seq_of[reqs[row].id]]) for row in fed]
        assert all(buffers["input_ids"][p] == _C.PLACEHOLDER for p in positions), "a placeholder was not planned"
        detecting = [row for row in fed if reqs[row].flow.detect_state(m) >= 0]
        device = self.device
        return Feed(to_device(np.array(positions, dtype=np.int64), device),
                    to_device(np.array([source for source, _ in fed.values()], dtype=np.int64), device),
                    source,
                    to_device(np.array(detecting, dtype=np.int64), device),
                    to_device(np.array([fed[row][0] for row in detecting], dtype=np.int64), device))

    def _launch_ahead(self, current: Step) -> "Step | None":
        """Launches the next step before `current`'s tokens reach the host, if nothing the host will
        decide can change its inputs: every sampled row of `current` either ends its request
        whatever the token (its view gets nothing more), or feeds its view's next step (a
        placeholder the device fills in). None (nothing launched) when a row needs the host first."""
        if any(batch.verified is not None for batch in current.batches):
            return None  # a verify step's outcome decides what both views read next
        fed = []
        for batch in current.batches:
            for row, req in enumerate(batch.reqs):
                if req.finish_reason is not None or (batch.valid is not None and not batch.valid[row]):
                    continue
                m = batch.model
                size = self.scheduler.view_size(req.id, m)
                if len(req.tokens) + 1 >= req.params.max_tokens or size + 1 >= self.max_model_len:
                    continue  # its request ends with this token
                if not req.flow.samples_on(m):
                    return None
                fed.append((batch, row, req, size + 1))
        if not fed:
            return None
        for batch, row, req, _ in fed:
            self.scheduler.append_placeholder(req.id, batch.model)
        self._plan(self.clock.now())
        ahead = self._launch({(batch.model, req.id): (row, size) for batch, row, req, size in fed},
                             {batch.model: batch.results for batch in current.batches})
        self.stats.steps_ahead += 1
        return ahead

    def _apply(self, step: Step, ahead: "Step | None") -> None:
        """Brings a launched step's tokens to the host and hands them to the flows. Views that the
        step launched `ahead` planned with a placeholder get their token first; after the flows,
        the rows of `ahead` whose view no longer continues from that token are dropped."""
        now = self.clock.now()
        # Failures end their requests once every model has run: a request in both batches stays
        # live for the second one, whose token for it is then dropped.
        for req, message in step.failures:
            if req.finish_reason is None:
                self.book.fail(req, message, now)
        rows = []
        for batch in step.batches:
            m, began = batch.model, self.clock.now()
            if batch.prompt_scores is not None:  # before the tokens: a request may end with its first
                self.book.scoring.difference_update(batch.prompt_scores.apply())
            tokens, words, logprobs = batch.results.wait() if batch.results is not None else ([], [], [])
            if batch.results is not None and batch.results.top is not None:
                logprobs = [_with_top(lp, req, *top) for lp, req, *top in zip(logprobs, batch.reqs,
                                                                              *batch.results.top.lists())]
            verified = self._verified(batch, now)
            self.stats.model_time[m] += self.clock.now() - began
            rows += verified
            for row, (req, token, word, logprob) in enumerate(zip(batch.reqs, tokens, words, logprobs)):
                if batch.valid is not None and not batch.valid[row]:
                    self.stats.rows_dropped += 1
                    continue
                if ahead is not None and (m, req.id) in ahead.placeholders and req.finish_reason is None:
                    self.scheduler.set_last_token(req.id, m, token)
                    req.ahead[m] = token
                if m == BIG:
                    req.metrics.big_steps += 1
                if not word & NONFINITE:
                    rows.append((m, req, token, word, logprob, batch.draft_probs.get(row)))
                elif req.finish_reason is None:
                    self.book.fail(req, f"the {MODEL_NAMES[m]} model's logits for this request are not finite "
                                        f"(NaN or inf) after {len(req.tokens)} tokens", now)
                    req.ahead[m] = None
        now = self.clock.now()
        # The small model's rows first: in a big segment they decide whether the big token
        # sampled in the same step is still wanted.
        for m, req, token, word, logprob, probs in rows:
            if req.finish_reason is None:
                try:
                    if word is None:  # a verify group: `token` holds its tokens, `logprob` theirs and the count accepted
                        req.flow.on_verified(token, *logprob, now)
                    else:
                        req.flow.on_token(m, token, word, logprob, now, probs)
                except Exception as e:
                    self.book.fail(req, f"{type(e).__name__} while applying a {MODEL_NAMES[m]}-model token: {e}", now)
            self.book.drop_ahead(req, m)
        if ahead is not None:
            for batch in ahead.batches:
                batch.valid = [self._continues(batch.model, req, batch.planned_sizes.get(row))
                               for row, req in enumerate(batch.reqs)]

    def _verified(self, batch: Batch, now: float) -> list[tuple]:
        """A batch's verify groups as rows for _apply (word None marks them); a group whose logits
        are not finite fails its request."""
        if batch.verified is None:
            return []
        reqs, groups, verified, top = batch.verified
        top_values, top_ids = top.lists() if top is not None else (None, None)
        rows, first = [], 0
        for req, group, (tokens, logprobs, accepted, finite) in zip(reqs, groups, verified.per_group(groups)):
            if top is not None:
                logprobs = [_with_top(lp, req, top_values[first + i], top_ids[first + i])
                            for i, lp in enumerate(logprobs)]
            first += len(group.drafts) + 1
            req.metrics.big_steps += 1
            if not finite:
                if req.finish_reason is None:
                    self.book.fail(req, f"the {MODEL_NAMES[batch.model]} model's logits for this request are not "
                                        f"finite (NaN or inf) after {len(req.tokens)} tokens", now)
                continue
            rows.append((batch.model, req, tokens, None, (logprobs, accepted), None))
        return rows

    def _continues(self, m: int, req: Request, planned_size: "int | None") -> bool:
        """Whether a row of a step launched ahead still samples what this request needs next: the
        request is live and, for a fed row, its view ends exactly at the fed token, computed, and
        still samples."""
        if req.finish_reason is not None:
            return False
        if planned_size is None:
            return True
        s = self.scheduler
        return (s.view_size(req.id, m) == planned_size == s.view_computed(req.id, m)
                and s.view_run(req.id, m) == _C.RUN_FOREGROUND and req.flow.samples_on(m))

    def _batch_failure(self, m: int, request_ids: list[int], error: Exception) -> list[tuple]:
        """A forward pass or its sampling raised: every request in that batch fails. An out-of-memory
        error also hands the allocator's cached blocks back to the device; MAX_FAILED_STEPS in a
        row break the engine."""
        fault = f"{type(error).__name__}: {error}"
        logger.error("the %s model's step failed for %d requests: %s", MODEL_NAMES[m], len(request_ids), fault)
        self.failed_runs[m] += 1
        if self.failed_runs[m] >= MAX_FAILED_STEPS:
            self.broken = EngineBroken(f"the {MODEL_NAMES[m]} model failed {MAX_FAILED_STEPS} times in a row; "
                                       f"last: {fault}")
        if isinstance(error, TPFailure):  # the ranks are out of step: no later step can run
            self.broken = EngineBroken(str(error))
        if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [(self.requests[rid], f"the {MODEL_NAMES[m]} model's step failed: {fault}") for rid in request_ids]

    def _plan(self, now: float) -> None:
        """The scheduler plans the step; the co-scheduling policy says whether the big model sits
        it out. A held big model runs after all when nothing else could."""
        hold = len(self.runners) > 1 and self.policy.hold_big(
            self.scheduler, now, {rid for rid, req in self.requests.items() if req.flow.drafting})
        self.scheduler.schedule(1 << BIG if hold else 0)
        if hold and not self.counts[:, 0].any():
            hold = False
            self.scheduler.schedule(0)
        if hold:
            self.stats.held_steps += 1
        copies = self.scheduler.take_page_copies()
        if copies:
            self.pool.copy_pages(copies[1::3], copies[2::3])
        if self.trace is not None:
            self.trace.plan(now, hold, self.requests)
        self.policy.observe(len(self.runners) > 1 and self.counts[BIG, 0] > 0)


def _with_top(logprob, req: Request, values: list, ids: list):
    """The row's logprob with its top alternatives attached, if its request asked for them."""
    n = req.params.top_logprobs
    return TokenLogprob(logprob, with_top(values, ids, n)) if n and logprob is not None else logprob
