"""Black-box tests of the C++ step scheduler and page allocator, driven with random token ids.

A Python mirror of every live request (its token stream and how many of its tokens have KV) is
checked against the scheduler's arrays and page accounting after every call, so a wrong slot, a
leaked page or a lost token shows up at the step that caused it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitreason_engine import _C

VOCAB = 32


@dataclass
class Tracked:
    """What the scheduler should hold for one live request, kept independently of it."""

    model: int
    tokens: list[int]
    max_tokens: int
    stop_ids: list[int]
    generated: int = 0
    computed: int = 0  # tokens with KV after the last schedule()


@dataclass
class Seq:
    """One scheduled sequence as read back from a batch."""

    request_id: int
    start: int
    count: int


class Driver:
    """Runs a Scheduler step by step and checks every array and count against the mirror."""

    def __init__(self, num_pages: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 page_tokens: list[int]) -> None:
        self.s = _C.Scheduler(num_pages, max_num_seqs, max_num_batched_tokens, max_model_len, page_tokens)
        self.num_pages = num_pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.page_tokens = page_tokens
        self.live: dict[int, Tracked] = {}
        self.finished: dict[int, int] = {}  # id -> finish reason
        self.preemptions_seen = 0

    @property
    def num_models(self) -> int:
        return len(self.page_tokens)

    def add(self, rid: int, model: int, prompt: list[int], max_tokens: int, stop_ids: Sequence[int] = ()) -> None:
        self.s.add_request(rid, model, prompt, max_tokens, list(stop_ids))
        self.live[rid] = Tracked(model, list(prompt), max_tokens, list(stop_ids))
        self.check_pages()

    def abort(self, rid: int) -> None:
        assert self.s.finish(rid) == (rid in self.live)
        self.live.pop(rid, None)
        assert not self.s.has_request(rid)
        self.check_pages()

    def schedule(self) -> list[list[Seq]]:
        """One schedule() call, checked; returns each model's sequences in batch order."""
        before, seen_before = self.s.num_preemptions, self.preemptions_seen
        self.s.schedule()
        counts = self.s.counts().reshape(self.num_models, _C.NUM_COUNT_FIELDS)
        batches = [self._check_batch(m, counts[m]) for m in range(self.num_models)]
        assert sum(len(b) for b in batches) <= self.max_num_seqs
        scheduled = {seq.request_id for batch in batches for seq in batch}
        for rid, r in self.live.items():
            if rid not in scheduled and r.computed > 0 and not self.s.request_pages(rid, r.model):
                self.preemptions_seen += 1  # preempted and left waiting
                r.computed = 0
        assert self.s.num_preemptions - before == self.preemptions_seen - seen_before
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
            r = self.live[rid]
            assert r.model == m
            lo, hi, seq_len = int(qsl[j]), int(qsl[j + 1]), int(seq_lens[j])
            start = seq_len - (hi - lo)
            # A running request continues where it stopped; a preempted one restarts at 0.
            assert start in (r.computed, 0)
            if start != r.computed:
                self.preemptions_seen += 1
            assert seq_len <= len(r.tokens)
            pos = b["positions"][lo:hi]
            np.testing.assert_array_equal(pos, np.arange(start, seq_len))
            np.testing.assert_array_equal(b["input_ids"][lo:hi], r.tokens[start:seq_len])
            used = math.ceil(seq_len / pt)
            assert table[j, :used].tolist() == self.s.request_pages(rid, m)
            assert (table[j, used:max_pages] == 0).all()
            np.testing.assert_array_equal(b["slot_mapping"][lo:hi], table[j, pos // pt] * pt + pos % pt)
            r.computed = seq_len
            if seq_len == len(r.tokens):
                samples.append((hi - 1, rid))
            seqs.append(Seq(rid, start, hi - lo))
        assert num_samples == len(samples)
        assert b["logits_indices"][:num_samples].tolist() == [i for i, _ in samples]
        assert b["sample_request_ids"][:num_samples].tolist() == [rid for _, rid in samples]
        return seqs

    def sample_ids(self, m: int) -> list[int]:
        n = int(self.s.counts()[m * _C.NUM_COUNT_FIELDS + 3])
        return self.s.buffers(m)["sample_request_ids"][:n].tolist()

    def update(self, m: int, sampled: list[int]) -> dict[int, int]:
        """One update() call, checked; returns the finished ids and reasons."""
        rows = self.sample_ids(m)
        num_finished = self.s.update(m, np.asarray(sampled, dtype=np.int32))
        ids = self.s.finished_ids()[:num_finished].tolist()
        finished = dict(zip(ids, self.s.finished_reasons()[:num_finished].tolist()))
        assert len(finished) == num_finished
        expected = {}
        for rid, token in zip(rows, sampled):
            r = self.live.get(rid)
            if r is None:
                continue  # aborted between schedule() and update()
            r.tokens.append(token)
            r.generated += 1
            if token in r.stop_ids:
                expected[rid] = _C.FINISH_STOP
            elif r.generated >= r.max_tokens or len(r.tokens) >= self.max_model_len:
                expected[rid] = _C.FINISH_LENGTH
        assert finished == expected
        for rid in finished:
            del self.live[rid]
            assert not self.s.has_request(rid)
        self.finished.update(finished)
        for rid, r in self.live.items():
            assert self.s.request_tokens(rid, r.model) == r.tokens
        self.check_pages()
        return finished

    def check_pages(self) -> None:
        """Page ownership recomputed from request_pages, besides the scheduler's own check."""
        self.s.check_invariants()
        held: list[int] = []
        for rid, r in self.live.items():
            for m in range(self.num_models):
                pages = self.s.request_pages(rid, m)
                expected = math.ceil(r.computed / self.page_tokens[m]) if m == r.model else 0
                assert len(pages) == expected
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
    stop_ids: list[int]
    abort_after: int | None  # steps after arrival
    abort_mid_step: bool  # between schedule() and update() rather than before schedule()


@dataclass
class Workload:
    page_tokens: list[int]
    max_model_len: int
    num_pages: int
    max_num_seqs: int
    max_num_batched_tokens: int
    arrivals: list[Arrival]
    seed: int


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    """Small configs whose pools barely hold one full-length request, so preemption is common."""
    page_tokens = draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16]), min_size=1, max_size=2))
    max_model_len = draw(st.integers(2, 40))
    need = max(math.ceil(max_model_len / pt) for pt in page_tokens)
    arrival = st.builds(
        Arrival,
        step=st.integers(0, 8),
        model=st.integers(0, len(page_tokens) - 1),
        prompt_len=st.integers(1, max_model_len - 1),
        max_tokens=st.integers(1, 24),
        stop_ids=st.lists(st.integers(0, VOCAB - 1), max_size=2),
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
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=150, deadline=None)
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
    # The oldest running request is never preempted and advances every step, so this bounds the drain.
    bound = last_arrival + len(w.arrivals) * w.max_model_len + 2
    for step in range(bound):
        for rid, a in enumerate(w.arrivals):
            if a.step == step:
                d.add(rid, a.model, prompts[rid], a.max_tokens, a.stop_ids)
        for rid in aborts.get((step, False), []):
            d.abort(rid)
        d.schedule()
        for rid in aborts.get((step, True), []):
            d.abort(rid)
        for m in range(d.num_models):
            d.update(m, rng.integers(0, VOCAB, len(d.sample_ids(m))).tolist())
        if step >= last_arrival and not d.live:
            break
    else:
        pytest.fail(f"requests still live after {bound} steps: {sorted(d.live)}")
    aborted = {rid for rids in aborts.values() for rid in rids} - set(d.finished)
    assert set(d.finished) | aborted == set(range(len(w.arrivals)))
    assert d.s.num_running == d.s.num_waiting == 0
    assert d.s.num_free_pages == w.num_pages
    assert all(d.s.pages_held(m) == 0 for m in range(d.num_models))
    assert d.s.num_preemptions == d.preemptions_seen


def test_chunked_prefill_splits_long_prompt_and_mixes_in_decodes() -> None:
    d = Driver(num_pages=64, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64, page_tokens=[4])
    d.add(0, 0, [1, 2, 3], max_tokens=10)
    assert [(q.request_id, q.start, q.count) for q in d.schedule()[0]] == [(0, 0, 3)]
    d.update(0, [9])
    d.add(1, 0, list(range(100, 120)), max_tokens=10)
    expected = [[(0, 3, 1), (1, 0, 7)], [(0, 4, 1), (1, 7, 7)], [(0, 5, 1), (1, 14, 6)]]
    for step, plan in enumerate(expected):
        batch = d.schedule()[0]
        assert [(q.request_id, q.start, q.count) for q in batch] == plan
        counts = d.s.counts()[: _C.NUM_COUNT_FIELDS].tolist()
        last = step == len(expected) - 1
        assert counts[:4] == [2, 1 + plan[1][2], 1, 2 if last else 1]
        d.update(0, [9, 9] if last else [9])
    assert d.s.request_tokens(1, 0) == list(range(100, 120)) + [9]


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "stop_ids", "sampled", "reason"),
    [
        (3, 3, [], [5, 6, 7], _C.FINISH_LENGTH),
        (3, 10, [7], [5, 6, 7], _C.FINISH_STOP),
        (3, 1, [7], [7], _C.FINISH_STOP),  # a stop token on the last allowed one is still a stop
        (14, 10, [], [5, 6], _C.FINISH_LENGTH),  # max_model_len reached first
    ],
)
def test_finish_reasons(prompt_len: int, max_tokens: int, stop_ids: list[int], sampled: list[int],
                        reason: int) -> None:
    d = Driver(num_pages=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=16, page_tokens=[4])
    d.add(0, 0, list(range(prompt_len)), max_tokens, stop_ids)
    for k, token in enumerate(sampled):
        d.schedule()
        assert d.update(0, [token]) == ({0: reason} if k == len(sampled) - 1 else {})
    assert d.s.num_free_pages == 8 and not d.s.has_request(0)


def test_full_pool_preempts_newest_running_and_recomputes_it_later() -> None:
    d = Driver(num_pages=3, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=6, page_tokens=[2])
    d.add(0, 0, [1, 2], max_tokens=4)
    d.add(1, 0, [3], max_tokens=4)
    d.add(2, 0, [5], max_tokens=4)
    assert len(d.schedule()[0]) == 3 and d.s.num_free_pages == 0
    d.update(0, [10 + rid for rid in d.sample_ids(0)])
    d.add(3, 0, [7], max_tokens=4)
    # Request 0 needs a second page: the newest running request (2) gives its page up.
    batch = d.schedule()[0]
    assert [(q.request_id, q.start) for q in batch] == [(0, 2), (1, 1)]
    assert d.s.num_preemptions == 1 and d.s.num_waiting == 2 and d.s.request_pages(2, 0) == []
    d.update(0, [20 + rid for rid in d.sample_ids(0)])
    d.abort(0)
    # Back ahead of the newer arrival (3), recomputed from position 0 over its prompt and the
    # token it sampled before preemption.
    batch = d.schedule()[0]
    assert [(q.request_id, q.start, q.count) for q in batch] == [(1, 2, 1), (2, 0, 2)]
    assert d.s.num_waiting == 1 and d.s.has_request(3)
    assert d.s.request_tokens(2, 0) == [5, 12]
    assert d.s.num_preemptions == 1


def test_update_and_add_request_reject_bad_input() -> None:
    s = _C.Scheduler(4, 2, 8, 8, [4, 5])
    s.add_request(0, 0, [1], 2, [])
    with pytest.raises(ValueError):
        s.add_request(0, 0, [1], 2, [])  # duplicate id
    for model, prompt, max_tokens in [(2, [1], 2), (-1, [1], 2), (0, [], 2), (0, [1] * 8, 2), (0, [1], 0)]:
        with pytest.raises(ValueError):
            s.add_request(1, model, prompt, max_tokens, [])
    s.schedule()
    with pytest.raises(ValueError):
        s.update(0, np.zeros(2, dtype=np.int32))  # one sample row, two tokens
    for model in (2, -1):
        with pytest.raises(ValueError):
            s.update(model, np.zeros(0, dtype=np.int32))
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
    with pytest.raises(ValueError, match="cannot hold max_model_len"):
        _C.Scheduler(3, 4, 64, 64, [16])  # 64 tokens need 4 pages of 16
    assert _C.Scheduler(4, 4, 64, 64, [16]).num_models == 1
