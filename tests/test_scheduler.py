"""Black-box tests of the C++ step scheduler and page allocator, driven with random token ids.

A Python mirror of every live request (each view's token stream, run state, and how many of its
tokens have KV) is checked against the scheduler's arrays and page accounting after every call, so
a wrong slot, a leaked page or a lost token shows up at the step that caused it. The driver plays
the engine's part: it appends sampled tokens, hands requests between models, rolls views back and
switches views between foreground, background and idle at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from properties import examples
from splitreason_engine import _C

VOCAB = 32
IDLE, FG, BG = _C.RUN_IDLE, _C.RUN_FOREGROUND, _C.RUN_BACKGROUND


@dataclass
class MirrorView:
    tokens: list[int] = field(default_factory=list)
    run: int = IDLE
    computed: int = 0  # tokens with KV after the last schedule()


@dataclass
class Tracked:
    """What the scheduler should hold for one live request, kept independently of it."""

    views: list[MirrorView]
    max_tokens: int
    generated: int = 0


@dataclass
class Seq:
    """One scheduled sequence as read back from a batch."""

    request_id: int
    start: int
    count: int
    sampled: bool


class Driver:
    """Runs a Scheduler step by step and checks every array and count against the mirror."""

    def __init__(self, num_pages: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 page_tokens: list[int], prefix_caching: bool = False) -> None:
        self.s = _C.Scheduler(num_pages, max_num_seqs, max_num_batched_tokens, max_model_len, page_tokens,
                              prefix_caching=prefix_caching)
        self.num_pages = num_pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.page_tokens = page_tokens
        self.live: dict[int, Tracked] = {}
        self.finished: set[int] = set()
        self.kv_losses = 0  # views whose KV went (preemption or a dropped idle view)

    @property
    def num_models(self) -> int:
        return len(self.page_tokens)

    def add(self, rid: int, model: int, prompt: list[int], max_tokens: int, others: dict[int, tuple] = {}) -> None:
        """A request whose foreground view is `model`; `others` maps a model to (tokens, run)."""
        views = [MirrorView() for _ in range(self.num_models)]
        views[model] = MirrorView(list(prompt), FG)
        for m, (tokens, run) in others.items():
            views[m] = MirrorView(list(tokens), run)
        self.s.add_request(rid, [v.tokens for v in views], [v.run for v in views])
        self.live[rid] = Tracked(views, max_tokens)
        self.check_pages()

    def finish(self, rid: int) -> None:
        assert self.s.finish(rid) == (rid in self.live)
        if self.live.pop(rid, None) is not None:
            self.finished.add(rid)
        assert not self.s.has_request(rid)
        self.check_pages()

    def append(self, rid: int, m: int, tokens: list[int]) -> None:
        self.s.append(rid, m, tokens)
        self.live[rid].views[m].tokens += tokens

    def truncate(self, rid: int, m: int, n: int) -> None:
        self.s.truncate(rid, m, n)
        v = self.live[rid].views[m]
        del v.tokens[n:]
        v.computed = min(v.computed, n)
        self.check_pages()

    def set_run(self, rid: int, m: int, run: int) -> None:
        self.s.set_run(rid, m, run)
        self.live[rid].views[m].run = run

    def schedule(self, held_models: int = 0) -> list[list[Seq]]:
        """One schedule() call, checked; returns each model's sequences in batch order."""
        lost_before = self.s.num_preemptions + self.s.num_view_drops
        self.s.schedule(held_models)
        counts = self.s.counts().reshape(self.num_models, _C.NUM_COUNT_FIELDS)
        batches = [self._check_batch(m, counts[m]) for m in range(self.num_models)]
        assert sum(len(b) for b in batches) <= self.max_num_seqs * self.num_models
        scheduled = {(seq.request_id, m) for m, batch in enumerate(batches) for seq in batch}
        for rid, r in self.live.items():
            for m, v in enumerate(r.views):
                if (rid, m) not in scheduled and v.computed > 0 and not self.s.request_pages(rid, m):
                    v.computed = 0  # its KV was dropped, or the whole request preempted
        lost = self.s.num_preemptions + self.s.num_view_drops - lost_before
        assert lost >= 0
        self.check_pages()
        return batches

    def _check_batch(self, m: int, counts: np.ndarray) -> list[Seq]:
        num_seqs, num_tokens, num_decodes, num_samples, max_pages = (int(c) for c in counts)
        assert 0 <= num_tokens <= self.max_num_batched_tokens
        assert 0 <= num_seqs <= self.max_num_seqs
        b = self.s.buffers(m)
        pt = self.page_tokens[m]
        qsl = b["query_start_loc"][: num_seqs + 1]
        assert qsl[0] == 0 and qsl[-1] == num_tokens
        lens = np.diff(qsl)
        assert (lens[:num_decodes] == 1).all() and (lens[num_decodes:] > 1).all()
        seq_lens = b["seq_lens"][:num_seqs]
        ids = b["seq_request_ids"][:num_seqs].tolist()
        assert len(set(ids)) == num_seqs
        assert max_pages == max((math.ceil(n / pt) for n in seq_lens), default=0)
        table = b["block_tables"].reshape(self.max_num_seqs, self.s.max_pages_per_seq(m))
        seqs, samples = [], []
        for j, rid in enumerate(ids):
            v = self.live[rid].views[m]
            assert v.run in (FG, BG), "an idle view was scheduled"
            lo, hi, seq_len = int(qsl[j]), int(qsl[j + 1]), int(seq_lens[j])
            start = seq_len - (hi - lo)
            # A view continues where it stopped, or restarts at 0 once its KV was dropped.
            assert start in (v.computed, 0)
            assert seq_len <= len(v.tokens)
            pos = b["positions"][lo:hi]
            np.testing.assert_array_equal(pos, np.arange(start, seq_len))
            np.testing.assert_array_equal(b["input_ids"][lo:hi], v.tokens[start:seq_len])
            used = math.ceil(seq_len / pt)
            assert table[j, :used].tolist() == self.s.request_pages(rid, m)
            assert (table[j, used:max_pages] == 0).all()
            np.testing.assert_array_equal(b["slot_mapping"][lo:hi], table[j, pos // pt] * pt + pos % pt)
            v.computed = seq_len
            sampled = v.run == FG and seq_len == len(v.tokens)
            if sampled:
                samples.append((hi - 1, rid))
            seqs.append(Seq(rid, start, hi - lo, sampled))
        assert num_samples == len(samples)
        assert b["logits_indices"][:num_samples].tolist() == [i for i, _ in samples]
        assert b["sample_request_ids"][:num_samples].tolist() == [rid for _, rid in samples]
        return seqs

    def sample_ids(self, m: int) -> list[int]:
        n = int(self.s.counts()[m * _C.NUM_COUNT_FIELDS + 3])
        return self.s.buffers(m)["sample_request_ids"][:n].tolist()

    def check_pages(self) -> None:
        """Page ownership recomputed from request_pages, besides the scheduler's own check."""
        self.s.check_invariants()
        held: list[int] = []
        for rid, r in self.live.items():
            for m, v in enumerate(r.views):
                pages = self.s.request_pages(rid, m)
                assert len(pages) == math.ceil(v.computed / self.page_tokens[m])
                assert self.s.request_tokens(rid, m) == v.tokens
                held += pages
        assert len(set(held)) == len(held), "a page is held twice"
        assert all(0 <= p < self.num_pages for p in held)
        assert len(held) + self.s.num_free_pages == self.num_pages
        assert sum(self.s.pages_held(m) for m in range(self.num_models)) == len(held)
        assert self.s.num_running + self.s.num_waiting == len(self.live)
        assert self.s.num_running <= self.max_num_seqs


@dataclass
class Arrival:
    step: int
    model: int
    prompt_len: int
    max_tokens: int
    abort_after: int | None  # steps after arrival
    abort_mid_step: bool  # between schedule() and the appends rather than before schedule()


@dataclass
class Workload:
    page_tokens: list[int]
    max_model_len: int
    num_pages: int
    max_num_seqs: int
    max_num_batched_tokens: int
    arrivals: list[Arrival]
    handoff_rate: float  # per request and step: hand the request to another model
    rollback_rate: float  # per request and step: truncate one of its views
    background_rate: float  # share of handoffs that leave the old view catching up in the background
    seed: int


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    """Small configs whose pools barely hold one full-length request, so preemption is common."""
    page_tokens = draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16]), min_size=1, max_size=2))
    max_model_len = draw(st.integers(3, 40))
    need = sum(math.ceil(max_model_len / pt) for pt in page_tokens)
    arrival = st.builds(
        Arrival,
        step=st.integers(0, 8),
        model=st.integers(0, len(page_tokens) - 1),
        prompt_len=st.integers(1, max_model_len - 2),
        max_tokens=st.integers(1, 24),
        abort_after=st.none() | st.integers(0, 12),
        abort_mid_step=st.booleans(),
    )
    return Workload(
        page_tokens=page_tokens,
        max_model_len=max_model_len,
        num_pages=need + draw(st.integers(0, 6)),
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 40)),
        arrivals=draw(st.lists(arrival, min_size=1, max_size=10)),
        handoff_rate=draw(st.sampled_from([0.0, 0.1, 0.4])),
        rollback_rate=draw(st.sampled_from([0.0, 0.1, 0.3])),
        background_rate=draw(st.sampled_from([0.0, 0.5, 1.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _protocol_moves(d: Driver, w: Workload, rng: np.random.Generator) -> None:
    """Handoffs (the other view catches up on a few tokens and takes over, two views in the
    foreground at once sometimes, the old one idle or in the background) and rollbacks."""
    for rid, r in list(d.live.items()):
        if d.num_models > 1 and rng.random() < w.handoff_rate:
            fg = [m for m, v in enumerate(r.views) if v.run == FG]
            new = 1 - fg[0]
            room = d.max_model_len - 1 - len(r.views[new].tokens)
            if room >= 1:
                d.append(rid, new, rng.integers(0, VOCAB, int(rng.integers(1, min(room, 6) + 1))).tolist())
                d.set_run(rid, new, FG)
                if len(fg) == 2 or rng.random() < 0.7:  # else both stay in the foreground (a shadow)
                    d.set_run(rid, fg[0], BG if rng.random() < w.background_rate else IDLE)
        if rng.random() < w.rollback_rate:
            m = int(rng.integers(0, d.num_models))
            v = r.views[m]
            if len(v.tokens) > 1:
                d.truncate(rid, m, int(rng.integers(1, len(v.tokens))))
        # Like the engine: a foreground view always has something to read next.
        for m, v in enumerate(r.views):
            if v.run == FG and v.computed == len(v.tokens) and v.tokens:
                d.truncate(rid, m, len(v.tokens) - 1)
                d.append(rid, m, [int(rng.integers(0, VOCAB))])


@settings(max_examples=examples(150), deadline=None)
@given(workloads())
def test_random_workloads_drain_without_leaks(w: Workload) -> None:
    rng = np.random.default_rng(w.seed)
    d = Driver(w.num_pages, w.max_num_seqs, w.max_num_batched_tokens, w.max_model_len, w.page_tokens)
    prompts = [rng.integers(0, VOCAB, a.prompt_len).tolist() for a in w.arrivals]
    aborts = {}
    for rid, a in enumerate(w.arrivals):
        if a.abort_after is not None:
            aborts.setdefault((a.step + a.abort_after, a.abort_mid_step), []).append(rid)
    last_arrival = max(a.step for a in w.arrivals)
    bound = last_arrival + len(w.arrivals) * 8 * w.max_model_len + 50
    for step in range(bound):
        for rid, a in enumerate(w.arrivals):
            if a.step == step:
                d.add(rid, a.model, prompts[rid], a.max_tokens)
        for rid in aborts.get((step, False), []):
            d.finish(rid)
        d.schedule()
        for rid in aborts.get((step, True), []):
            d.finish(rid)
        for m in range(d.num_models):
            for rid in d.sample_ids(m):
                r = d.live.get(rid)
                if r is None:
                    continue  # aborted between schedule() and the appends
                r.generated += 1
                if r.generated >= r.max_tokens or len(r.views[m].tokens) + 1 >= d.max_model_len:
                    d.finish(rid)
                else:
                    d.append(rid, m, [int(rng.integers(0, VOCAB))])
        _protocol_moves(d, w, rng)
        d.check_pages()
        if step >= last_arrival and not d.live:
            break
    else:
        pytest.fail(f"requests still live after {bound} steps: {sorted(d.live)}")
    assert d.finished == set(range(len(w.arrivals)))
    assert d.s.num_running == d.s.num_waiting == 0
    assert d.s.num_free_pages == w.num_pages
    assert all(d.s.pages_held(m) == 0 for m in range(d.num_models))


def test_chunked_prefill_splits_long_prompt_and_mixes_in_decodes() -> None:
    d = Driver(num_pages=64, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64, page_tokens=[4])
    d.add(0, 0, [1, 2, 3], max_tokens=10)
    assert [(q.request_id, q.start, q.count) for q in d.schedule()[0]] == [(0, 0, 3)]
    d.append(0, 0, [9])
    d.add(1, 0, list(range(100, 120)), max_tokens=10)
    expected = [[(0, 3, 1), (1, 0, 7)], [(0, 4, 1), (1, 7, 7)], [(0, 5, 1), (1, 14, 6)]]
    for step, plan in enumerate(expected):
        batch = d.schedule()[0]
        assert [(q.request_id, q.start, q.count) for q in batch] == plan
        counts = d.s.counts()[: _C.NUM_COUNT_FIELDS].tolist()
        last = step == len(expected) - 1
        assert counts[:4] == [2, 1 + plan[1][2], 1, 2 if last else 1]
        for rid in d.sample_ids(0):
            d.append(rid, 0, [9])
    assert d.s.request_tokens(1, 0) == list(range(100, 120)) + [9]


def test_full_pool_preempts_newest_running_and_recomputes_it_later() -> None:
    d = Driver(num_pages=3, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=6, page_tokens=[2])
    d.add(0, 0, [1, 2], max_tokens=4)
    d.add(1, 0, [3], max_tokens=4)
    d.add(2, 0, [5], max_tokens=4)
    assert len(d.schedule()[0]) == 3 and d.s.num_free_pages == 0
    for rid in d.sample_ids(0):
        d.append(rid, 0, [10 + rid])
    d.add(3, 0, [7], max_tokens=4)
    # Request 0 needs a second page: the newest running request (2) gives its page up.
    batch = d.schedule()[0]
    assert [(q.request_id, q.start) for q in batch] == [(0, 2), (1, 1)]
    assert d.s.num_preemptions == 1 and d.s.num_waiting == 2 and d.s.request_pages(2, 0) == []
    for rid in d.sample_ids(0):
        d.append(rid, 0, [20 + rid])
    d.finish(0)
    # Back ahead of the newer arrival (3), recomputed from position 0 over its prompt and the
    # token it sampled before preemption.
    batch = d.schedule()[0]
    assert [(q.request_id, q.start, q.count) for q in batch] == [(1, 2, 1), (2, 0, 2)]
    assert d.s.num_waiting == 1 and d.s.has_request(3)
    assert d.s.request_tokens(2, 0) == [5, 12]
    assert d.s.num_preemptions == 1


def test_page_pressure_drops_idle_views_before_preempting() -> None:
    """A big view left idle by a small segment gives its pages up first; then whole requests go."""
    d = Driver(num_pages=6, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=5, page_tokens=[2, 2])
    d.add(0, 1, [1, 2, 3, 4], max_tokens=9)  # a request in its big segment: 2 pages of model 1
    d.add(1, 0, [5, 6], max_tokens=9)  # 1 page
    d.add(2, 0, [1, 2, 3], max_tokens=9)  # 2 pages
    d.schedule()
    assert d.s.num_free_pages == 1
    d.set_run(0, 1, IDLE)  # back to the small model: the big view goes idle...
    d.append(0, 0, [7, 8, 9])  # ...and the small view catches up (2 pages)
    d.set_run(0, 0, FG)
    d.append(1, 0, [9])  # a third token: one more page
    d.append(2, 0, [9])
    batch = d.schedule()[0]
    assert {q.request_id for q in batch} == {0, 1, 2}
    assert d.s.num_view_drops == 1 and d.s.num_preemptions == 0
    assert d.s.request_pages(0, 1) == [] and d.s.request_tokens(0, 1) == [1, 2, 3, 4]
    # No idle view left: the next shortage preempts the newest request.
    d.set_run(0, 1, FG)  # a handoff: the big view is recomputed
    d.schedule()
    assert d.s.num_preemptions == 1 and d.s.num_waiting == 1 and d.s.request_pages(2, 0) == []


def test_background_views_use_spare_budget_never_sample_and_never_evict() -> None:
    d = Driver(num_pages=8, max_num_seqs=4, max_num_batched_tokens=4, max_model_len=8, page_tokens=[2, 2])
    d.add(0, 0, [1, 2, 3], max_tokens=9, others={1: ([4, 5, 6, 7, 1, 2], BG)})
    small, big = d.schedule()
    assert [(q.start, q.count, q.sampled) for q in small] == [(0, 3, True)]
    assert [(q.start, q.count, q.sampled) for q in big] == [(0, 4, False)]  # the full budget of model 1
    d.append(0, 0, [9])
    small, big = d.schedule()
    assert [(q.start, q.count, q.sampled) for q in big] == [(4, 2, False)]
    # A pool with no free page: the background view waits instead of evicting anyone.
    e = Driver(num_pages=4, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=4, page_tokens=[2, 2])
    e.add(0, 0, [1, 2, 3], max_tokens=9, others={1: ([4, 5, 6], BG)})
    e.add(1, 0, [1, 2, 3], max_tokens=9)
    small, big = e.schedule()
    assert len(small) == 2 and big == [] and e.s.num_view_drops == 0 and e.s.num_preemptions == 0


def test_a_held_model_runs_nothing_and_its_views_keep_their_pages_and_place() -> None:
    """schedule(held_models): the co-scheduling policy holds the big model for a step; its ready
    views (foreground or background) wait, keep their KV, and run when it is released."""
    d = Driver(num_pages=16, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=12, page_tokens=[2, 2])
    d.add(0, 0, [1, 2, 3], max_tokens=6, others={1: ([4, 5], FG)})
    d.add(1, 1, [6, 7, 8], max_tokens=6)  # a big-only request, waiting for admission
    d.add(2, 0, [1, 2], max_tokens=6, others={1: ([3, 4, 5], BG)})
    assert d.s.ready_rows(1) == 2 and sorted(d.s.ready_requests(1)) == [0, 1]
    assert d.s.ready_rows(0) == 2 and sorted(d.s.ready_requests(0)) == [0, 2]
    small, big = d.schedule(held_models=1 << 1)
    assert {q.request_id for q in small} == {0, 2} and big == []
    assert d.s.request_pages(0, 1) == [] and d.s.ready_rows(1) == 2
    assert d.s.num_waiting == 1  # the big-only request is not admitted while its model is held
    d.append(0, 0, [9])
    d.append(2, 0, [9])
    small, big = d.schedule()
    assert sorted((q.request_id, q.start, q.count) for q in big) == [(0, 0, 2), (1, 0, 3), (2, 0, 3)]
    assert d.s.ready_rows(1) == 0 and d.s.ready_requests(1) == []
    with pytest.raises(IndexError):
        d.s.ready_rows(2)


def test_one_model_can_use_the_whole_pool() -> None:
    """No static split: with only model-0 requests, model 0 holds every page (and then model 1)."""
    for model in (0, 1):
        d = Driver(num_pages=40, max_num_seqs=40, max_num_batched_tokens=512, max_model_len=16, page_tokens=[4, 2])
        for rid in range(40):
            d.add(rid, model, [1] * (4 if model == 0 else 2), max_tokens=8)
        d.schedule()
        assert d.s.pages_held(model) == 40 and d.s.pages_held(1 - model) == 0


def test_truncate_frees_pages_past_the_kept_tokens() -> None:
    d = Driver(num_pages=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=12, page_tokens=[3])
    d.add(0, 0, list(range(10)), max_tokens=5)
    d.schedule()
    assert len(d.s.request_pages(0, 0)) == 4
    d.truncate(0, 0, 4)  # keeps ceil(4 / 3) = 2 pages
    assert len(d.s.request_pages(0, 0)) == 2 and d.s.num_free_pages == 6
    d.append(0, 0, [7, 7])
    assert [(q.start, q.count) for q in d.schedule()[0]] == [(4, 2)]
    with pytest.raises(ValueError, match="truncate"):
        d.s.truncate(0, 0, 99)


def test_add_request_and_view_calls_reject_bad_input() -> None:
    s = _C.Scheduler(4, 2, 8, 8, [4, 4])
    s.add_request(0, [[1], []], [FG, IDLE])
    with pytest.raises(ValueError, match="already exists"):
        s.add_request(0, [[1], []], [FG, IDLE])
    for views, runs in [([[1]], [FG]), ([[1], []], [FG, 3]), ([[], []], [FG, FG]), ([[1], [2]], [IDLE, BG]),
                        ([[1] * 8, []], [FG, IDLE])]:
        with pytest.raises(ValueError):
            s.add_request(1, views, runs)
    with pytest.raises(IndexError):
        s.append(7, 0, [1])  # unknown request
    with pytest.raises(IndexError):
        s.append(0, 2, [1])  # unknown model
    with pytest.raises(ValueError, match="max_model_len"):
        s.append(0, 0, [1] * 8)
    with pytest.raises(ValueError):
        s.set_run(0, 0, 5)
    assert not s.finish(7)
    assert s.finish(0) and not s.finish(0)
    s.check_invariants()


def test_page_allocator_refcounts() -> None:
    a = _C.PageAllocator(4)
    assert a.allocate(5) is None and a.num_free == 4  # all or nothing
    pages = a.allocate(3)
    assert pages == [0, 1, 2] and a.num_free == 1
    assert all(a.refcount(p) == 1 for p in pages)
    assert a.allocate(0) == []
    a.retain(1)
    assert a.refcount(1) == 2
    a.release(1)
    assert a.refcount(1) == 1 and a.num_free == 1
    a.release(1)
    assert a.refcount(1) == 0 and a.num_free == 2
    with pytest.raises(RuntimeError, match="release of free page 1"):
        a.release(1)
    with pytest.raises(RuntimeError, match="retain of free page 3"):
        a.retain(3)
    assert a.allocate(2) is not None and a.num_free == 0
    with pytest.raises(IndexError):
        a.refcount(4)
    with pytest.raises(ValueError):
        _C.PageAllocator(0)


def test_constructor_rejects_a_pool_that_cannot_hold_one_full_request():
    with pytest.raises(ValueError, match="cannot hold one request of max_model_len 64"):
        _C.Scheduler(3, 4, 64, 64, [16])  # 64 tokens need 4 pages of 16
    assert _C.Scheduler(4, 4, 64, 64, [16]).num_models == 1
    with pytest.raises(ValueError, match=r"needs 8\)"):
        _C.Scheduler(7, 4, 64, 64, [16, 16])  # a view in each model: 4 + 4 pages
    assert _C.Scheduler(8, 4, 64, 64, [16, 16]).num_models == 2
