"""Prefix caching in the C++ allocator and scheduler, against an oracle of what each KV slot holds.

The driver keeps its own copy of the KV arena: every scheduled token writes, into its slot, the
identity of the token prefix it ends (K and V at position p depend on tokens 0..p). After each
step's writes, every scheduled sequence must find its own prefix in every slot its block table
points to: a page shared by two requests, or taken from the cache, holds exactly the tokens the
reader has. A page written while someone else reads it, a stale cached page after a rollback, or a
page evicted while held all show up as a wrong slot at the step that caused them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from properties import examples
from splitreason_engine import _C
from test_scheduler import FG, VOCAB, Arrival, Driver, MirrorView, Tracked, Workload, _protocol_moves, workloads


class CacheDriver(Driver):
    """Runs a prefix-caching Scheduler and checks what its batches would read (the base class's
    checks assume no page is shared, so the calls that run them are replaced)."""

    def __init__(self, num_pages: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 page_tokens: list[int]) -> None:
        super().__init__(num_pages, max_num_seqs, max_num_batched_tokens, max_model_len, page_tokens,
                         prefix_caching=True)
        self.prefixes: dict[tuple, int] = {}  # token prefix -> identity
        self.copies = 0  # partial pages copied (copy_from)
        # slots[m][page * page_tokens + offset]: the prefix identity written there (-1: never written)
        self.slots = [np.full(num_pages * pt, -1, dtype=np.int64) for pt in page_tokens]

    def identity(self, tokens: list[int], end: int) -> int:
        return self.prefixes.setdefault(tuple(tokens[:end]), len(self.prefixes))

    def add(self, rid: int, model: int, prompt: list[int], max_tokens: int, copy_from: int = -1) -> None:
        views = [MirrorView() for _ in range(self.num_models)]
        views[model] = MirrorView(list(prompt), FG)
        self.s.add_request(rid, [v.tokens for v in views], [v.run for v in views], copy_from=copy_from)
        self.live[rid] = Tracked(views, max_tokens)

    def finish(self, rid: int, cache: bool = True) -> None:
        assert self.s.finish(rid, cache) == (rid in self.live)
        if self.live.pop(rid, None) is not None:
            self.finished.add(rid)
        self.s.check_invariants()

    def truncate(self, rid: int, m: int, n: int) -> None:
        self.s.truncate(rid, m, n)
        v = self.live[rid].views[m]
        del v.tokens[n:]
        v.computed = self.s.view_computed(rid, m)
        assert v.computed <= n
        self.s.check_invariants()

    def schedule(self) -> None:
        """One step: plan it, make its page copies, write every new token's KV into the arena, then
        check every read."""
        self.s.schedule(0)
        copies = self.s.take_page_copies()
        for m, src, dst in zip(copies[::3], copies[1::3], copies[2::3]):
            pt = self.page_tokens[m]
            self.slots[m][dst * pt: (dst + 1) * pt] = self.slots[m][src * pt: (src + 1) * pt]
        self.copies += len(copies) // 3
        counts = self.s.counts().reshape(self.num_models, _C.NUM_COUNT_FIELDS)
        for m in range(self.num_models):
            num_seqs = int(counts[m][0])
            b, pt = self.s.buffers(m), self.page_tokens[m]
            qsl, seq_lens = b["query_start_loc"][: num_seqs + 1], b["seq_lens"][:num_seqs]
            ids = b["seq_request_ids"][:num_seqs].tolist()
            table = b["block_tables"].reshape(self.max_num_seqs, self.s.max_pages_per_seq(m))
            for j, rid in enumerate(ids):  # the layer's KV store, for the whole batch first ...
                tokens = self.live[rid].views[m].tokens
                for i in range(int(qsl[j]), int(qsl[j + 1])):
                    self.slots[m][b["slot_mapping"][i]] = self.identity(tokens, int(b["positions"][i]) + 1)
            for j, rid in enumerate(ids):  # ... then attention reads every position of every sequence
                tokens, seq_len = self.live[rid].views[m].tokens, int(seq_lens[j])
                pos = np.arange(seq_len)
                read = self.slots[m][table[j, pos // pt] * pt + pos % pt]
                want = [self.identity(tokens, p + 1) for p in range(seq_len)]
                assert read.tolist() == want, f"request {rid} reads KV of other tokens in model {m}"
                assert math.ceil(seq_len / pt) == len(self.s.request_pages(rid, m))
        for rid, r in self.live.items():
            for m, v in enumerate(r.views):
                v.computed = self.s.view_computed(rid, m)
        self.s.check_invariants()



def shared_prompts(rng: np.random.Generator, count: int, max_len: int) -> list[list[int]]:
    """Prompts that mostly start with one of two stems, so that full pages repeat across requests."""
    stems = [rng.integers(0, VOCAB, max_len).tolist() for _ in range(2)]
    prompts = []
    for _ in range(count):
        n = int(rng.integers(1, max_len + 1))
        stem = stems[int(rng.integers(0, 2))]
        shared = int(rng.integers(0, n + 1)) if rng.random() < 0.8 else 0
        prompts.append(stem[:shared] + rng.integers(0, VOCAB, n - shared).tolist())
    return prompts


# Found by hypothesis: request 5 fails and takes its pages out of the cache while requests 1 and 3
# still share its page of tokens 2-3; request 1 then rolls back into that page. Sharing used to be
# inferred from publication, so request 1 wrote into the page request 3 reads (docs/prefix-caching.md).
SHARED_PAGE_OF_A_FAILED_REQUEST = Workload(
    page_tokens=[2], max_model_len=38, num_pages=19, max_num_seqs=4, max_num_batched_tokens=10,
    arrivals=[Arrival(step, 0, 1, max_tokens, abort_after, False) for step, max_tokens, abort_after in
              [(3, 1, None), (6, 1, None), (7, 1, None), (5, 3, None), (5, 1, None), (3, 2, 5)]],
    handoff_rate=0, rollback_rate=0.1, background_rate=0, seed=886940)


# Found by the fuzz: request 5, preempted, is admitted again and computes its partial page into a
# page it allocates in that step and publishes at once (same-step sharing); request 1 takes it from
# the cache, and request 7, a sample of request 1 admitted in the same step, copied it before that
# step had written it. Pages allocated in the current step are no copy source now.
COPY_OF_A_PAGE_WRITTEN_IN_THE_SAME_STEP = Workload(
    page_tokens=[2], max_model_len=34, num_pages=18, max_num_seqs=3, max_num_batched_tokens=16,
    arrivals=[Arrival(step, 0, 1, max_tokens, None, False) for step, max_tokens in
              [(1, 1), (3, 2), (2, 3), (1, 1), (1, 1), (2, 2), (0, 1), (3, 1)]],
    handoff_rate=0.0, rollback_rate=0.0, background_rate=0.0, seed=1)


@settings(max_examples=examples(150), deadline=None)
@given(workloads(), st.booleans())
@example(SHARED_PAGE_OF_A_FAILED_REQUEST, True)
@example(COPY_OF_A_PAGE_WRITTEN_IN_THE_SAME_STEP, False)
def test_random_workloads_read_only_their_own_kv(w: Workload, fail_some: bool) -> None:
    rng = np.random.default_rng(w.seed)
    copy_rng = np.random.default_rng(w.seed + 1)  # its own draws: the workloads found before stay as they were
    d = CacheDriver(w.num_pages, w.max_num_seqs, w.max_num_batched_tokens, w.max_model_len, w.page_tokens)
    prompts = shared_prompts(rng, len(w.arrivals), w.max_model_len - 2)
    aborts: dict[int, list[int]] = {}
    for rid, a in enumerate(w.arrivals):
        if a.abort_after is not None:
            aborts.setdefault(a.step + a.abort_after, []).append(rid)
    last_arrival = max(a.step for a in w.arrivals)
    bound = last_arrival + len(w.arrivals) * 8 * w.max_model_len + 50
    for step in range(bound):
        for rid, a in enumerate(w.arrivals):
            if a.step == step:
                # Some arrivals are another sample of a live request: its tokens so far, copied.
                sources = [s for s, r in sorted(d.live.items()) if r.views[a.model].tokens]
                if sources and copy_rng.random() < 0.3:
                    source = sources[int(copy_rng.integers(0, len(sources)))]
                    prompts[rid] = list(d.live[source].views[a.model].tokens)
                    d.add(rid, a.model, prompts[rid], a.max_tokens, copy_from=source)
                else:
                    d.add(rid, a.model, prompts[rid], a.max_tokens)
        d.schedule()
        for rid in aborts.get(step, []):  # a failed request keeps its last step's pages out of the cache
            d.finish(rid, cache=not fail_some)
        for m in range(d.num_models):
            for rid in d.sample_ids(m):
                r = d.live.get(rid)
                if r is None:
                    continue
                r.generated += 1
                if r.generated >= r.max_tokens or len(r.views[m].tokens) + 1 >= d.max_model_len:
                    d.finish(rid)
                else:  # few distinct tokens, so generated text repeats too
                    d.append(rid, m, [int(rng.integers(0, 3))])
        _protocol_moves(d, w, rng)
        if step >= last_arrival and not d.live:
            break
    else:
        pytest.fail(f"requests still live after {bound} steps: {sorted(d.live)}")
    assert d.finished == set(range(len(w.arrivals)))
    assert d.s.num_free_pages == w.num_pages  # cached pages count as free: nothing is held
    assert all(d.s.pages_held(m) == 0 for m in range(d.num_models))


def run_alone(d: CacheDriver, rid: int, prompt: list[int], new_tokens: int) -> int:
    """Runs one request to the end; returns the position its first scheduled token started at."""
    d.add(rid, 0, prompt, new_tokens)
    d.s.schedule(0)
    b = d.s.buffers(0)
    first = int(b["positions"][0])
    d.s.finish(rid)  # skip the driver's checks: this helper looks at the plan only
    d.live.pop(rid)
    return first


def test_a_repeated_prompt_starts_after_its_cached_full_pages() -> None:
    d = CacheDriver(num_pages=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_tokens=[4])
    prompt = list(range(1, 19))  # 18 tokens: 4 full pages and 2 more
    assert run_alone(d, 0, prompt, 1) == 0
    assert run_alone(d, 1, prompt, 1) == 16  # 4 pages from the cache, the rest computed
    assert run_alone(d, 2, prompt[:16], 1) == 12  # a whole-page prompt still computes its last token
    assert run_alone(d, 3, prompt[:5] + [0] * 13, 1) == 4  # only the pages before the first difference
    assert run_alone(d, 4, [7] + prompt[1:], 1) == 0  # a chain: page 2 of another prefix is another page
    d.s.check_invariants()


def test_a_disabled_cache_shares_nothing() -> None:
    s = _C.Scheduler(64, 4, 64, 64, [4])
    assert not s.prefix_caching
    prompt = list(range(1, 19))
    for rid in range(2):
        s.add_request(rid, [prompt], [FG])
        s.schedule(0)
        assert int(s.buffers(0)["positions"][0]) == 0
        assert s.finish(rid)
    assert s.num_cached_pages == 0


def test_requests_admitted_in_one_step_share_the_pages_the_first_one_computes() -> None:
    d = CacheDriver(num_pages=32, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, page_tokens=[4])
    prompt = list(range(1, 15))  # 14 tokens: 3 full pages and 2 more
    for rid in range(3):
        d.add(rid, 0, prompt if rid < 2 else prompt[:9], 4)
    d.schedule()  # the driver checks that every request reads its own tokens after the batch's writes
    owner = d.s.request_pages(0, 0)
    assert d.s.request_pages(1, 0)[:3] == owner[:3] and d.s.view_stats(1, 0)[2] == 12
    assert d.s.request_pages(2, 0)[:2] == owner[:2] and d.s.view_stats(2, 0)[2] == 8
    b = d.s.buffers(0)  # request 2 computes its last token only: a decode row, first in the batch
    assert b["positions"][:17].tolist() == [8] + list(range(14)) + [12, 13]
    for rid in range(3):
        d.finish(rid)
    assert d.s.num_free_pages == 32


def test_a_request_that_reads_no_cache_computes_every_token_and_still_publishes() -> None:
    """reads_cache=False (prompt log-probabilities need every position's logits): neither cached
    pages nor pages of a request in the same step replace its own, and its pages serve others."""
    s = _C.Scheduler(64, 4, 64, 64, [4], prefix_caching=True)
    prompt = list(range(1, 15))
    s.add_request(0, [prompt], [FG])
    s.add_request(1, [prompt], [FG], reads_cache=False)  # the same step as request 0
    s.schedule(0)
    assert s.view_stats(1, 0)[2] == 0 and s.view_stats(0, 0)[2] == 0
    assert int(s.counts()[1]) == 2 * len(prompt)
    for rid in range(2):
        assert s.finish(rid)
    s.add_request(2, [prompt], [FG], reads_cache=False)  # the cache holds its pages now
    s.schedule(0)
    assert s.view_stats(2, 0)[2] == 0 and int(s.buffers(0)["positions"][0]) == 0
    s.finish(2)
    s.add_request(3, [prompt], [FG])
    s.schedule(0)
    assert s.view_stats(3, 0)[2] == 12  # a reading request takes them
    s.check_invariants()


def test_another_sample_copies_the_partial_page_and_computes_only_its_tail() -> None:
    """copy_from: the full pages come from the cache, the partial last page is copied into a page
    of the sample's own (the driver checks every slot it reads), and only the last token runs."""
    d = CacheDriver(num_pages=32, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, page_tokens=[4])
    prompt = list(range(1, 15))  # 14 tokens: 3 full pages and 2 more
    d.add(0, 0, prompt, 4)
    d.schedule()
    d.append(0, 0, [7])
    d.add(1, 0, prompt, 4, copy_from=0)
    d.schedule()
    assert d.copies == 1 and d.s.view_stats(1, 0)[2] == 13  # 12 cached, 1 copied
    assert d.s.request_pages(1, 0)[:3] == d.s.request_pages(0, 0)[:3]
    assert d.s.request_pages(1, 0)[3] != d.s.request_pages(0, 0)[3]
    for step in range(3):  # both write their own tokens into their own 4th page
        for rid in d.sample_ids(0):
            d.append(rid, 0, [rid + 20])
        d.schedule()
    for rid in (0, 1):
        d.finish(rid)
    assert d.s.num_free_pages == 32


def test_a_sampled_tail_is_computed_whole_not_shared_or_cached() -> None:
    """A view that samples its last 3 tokens (drafts to verify) takes cached and same-batch pages only
    before them: found by the fuzz, where sharing left 2 of the 3 to compute."""
    d = CacheDriver(num_pages=32, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, page_tokens=[4])
    prompt = list(range(1, 15))  # 14 tokens: 3 full pages and 2 more
    d.add(0, 0, prompt, 4)
    d.add(1, 0, prompt, 4)
    d.s.set_sample_tail(1, 0, 3)
    d.schedule()
    assert d.s.view_stats(1, 0)[2] == 8  # 2 pages shared; the third holds tail tokens
    b, counts = d.s.buffers(0), d.s.counts()
    rows = b["sample_request_ids"][:counts[3]].tolist()
    assert rows.count(1) == 3 and rows.count(0) == 1
    assert b["positions"][b["logits_indices"][:counts[3]]].tolist() == [13, 11, 12, 13]
    d.finish(0)
    d.truncate(1, 0, 11)  # drafts rejected; then three new tokens to verify, with the cache full
    d.append(1, 0, [7, 8, 9])
    d.schedule()
    rows = d.s.buffers(0)["sample_request_ids"][:d.s.counts()[3]].tolist()
    assert rows == [1, 1, 1]
    d.finish(1)
    assert d.s.num_free_pages == 32


def test_a_sampled_tail_is_not_shared_from_a_request_of_the_same_batch() -> None:
    """Two running requests read the same 10 new tokens in one step; the second samples its last 3.
    It takes the first one's full pages at fill time only before its tail (the fuzz's case: five
    copies of one greedy split request recomputing their big views together after preemption)."""
    d = CacheDriver(num_pages=32, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, page_tokens=[4])
    for rid in range(2):
        d.add(rid, 0, [1, 2, 3, 4], 12)
    d.schedule()
    for rid in range(2):
        d.append(rid, 0, list(range(5, 15)))  # 14 tokens, 4 computed: nothing cached yet for the rest
    d.s.set_sample_tail(1, 0, 3)
    d.schedule()
    b, counts = d.s.buffers(0), d.s.counts()
    rows = b["sample_request_ids"][:counts[3]].tolist()
    assert rows == [0, 1, 1, 1]
    assert d.s.request_pages(1, 0)[1] == d.s.request_pages(0, 0)[1]  # tokens 4-7: shared
    assert d.s.request_pages(1, 0)[2] != d.s.request_pages(0, 0)[2]  # 8-11 hold tail tokens: its own
    for rid in range(2):
        d.finish(rid)
    assert d.s.num_free_pages == 32


def decode_step(d: CacheDriver) -> None:
    """Schedules, then appends a token to every sampled request."""
    d.schedule()
    for rid in d.sample_ids(0):
        d.append(rid, 0, [1])


def test_a_preempted_request_finds_its_own_pages_again() -> None:
    d = CacheDriver(num_pages=7, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=16, page_tokens=[4])
    d.add(0, 0, list(range(1, 9)), 8)
    d.add(1, 0, list(range(11, 19)), 8)
    while d.s.num_preemptions == 0:  # both grow until the pool is short: the newest goes
        decode_step(d)
    assert d.s.num_waiting == 1 and 1 in d.live and d.s.view_stats(1, 0)[2] == 0
    computed = len(d.live[1].views[0].tokens) - 1
    d.finish(0)
    d.schedule()  # request 1 comes back and starts after its own full pages
    assert d.s.view_stats(1, 0)[2] == computed // 4 * 4 > 0
    assert int(d.s.buffers(0)["positions"][0]) == computed // 4 * 4
    d.finish(1)
    assert d.s.num_free_pages == 7 and d.s.num_cached_pages > 0


def test_rollback_into_a_shared_page_recomputes_it_in_a_page_of_its_own() -> None:
    d = CacheDriver(num_pages=32, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, page_tokens=[4])
    d.add(0, 0, list(range(1, 11)), 8)
    d.schedule()
    d.append(0, 0, [5])
    d.add(1, 0, list(range(1, 11)), 8)
    d.schedule()  # request 1 takes pages 0 and 1 of request 0 from the cache (its last 2 tokens stay to compute)
    shared = d.s.request_pages(1, 0)[:2]
    assert d.s.request_pages(0, 0)[:2] == shared and d.s.view_stats(1, 0)[2] == 8
    d.truncate(1, 0, 6)  # into the shared page 1: request 1 gives it up and recomputes tokens 4, 5
    assert d.s.view_computed(1, 0) == 4 and d.s.request_pages(1, 0) == shared[:1]
    d.append(1, 0, [9, 9, 9])
    d.schedule()
    assert d.s.request_pages(1, 0)[1] != shared[1]
    # Request 0 now holds page 1 alone: it keeps it, out of the cache (check_invariants fails if a
    # view would write into a cached page), and rewrites it.
    d.truncate(0, 0, 6)
    assert d.s.request_pages(0, 0)[:2] == shared
    d.append(0, 0, [3, 3])
    d.schedule()  # the slot check: both read their own tokens
    for rid in (0, 1):
        d.finish(rid)
    assert d.s.num_free_pages == 32


def test_a_page_shared_after_its_publisher_failed_is_still_shared_for_rollback() -> None:
    """A failed request takes its pages out of the cache, but others may still hold them: a
    rollback into such a page must leave it to the others, as it does a cached one."""
    d = CacheDriver(num_pages=32, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, page_tokens=[4])
    for rid in (0, 1, 2):
        d.add(rid, 0, list(range(1, 11)), 8)
    d.schedule()  # requests 1 and 2 share the two full pages request 0 computes in this step
    shared = d.s.request_pages(0, 0)[:2]
    assert d.s.request_pages(1, 0)[:2] == d.s.request_pages(2, 0)[:2] == shared
    d.finish(0, cache=False)  # request 0 fails: its pages leave the cache, requests 1 and 2 keep them
    d.truncate(1, 0, 6)  # into shared page 1, now unpublished but still held by request 2
    assert d.s.view_computed(1, 0) == 4 and d.s.request_pages(1, 0) == shared[:1]
    d.append(1, 0, [9, 9, 9])
    d.schedule()  # the slot check: request 2 still reads tokens 5..8 in page 1
    assert d.s.request_pages(1, 0)[1] != shared[1]
    for rid in (1, 2):
        d.finish(rid)
    assert d.s.num_free_pages == 32


def test_allocator_evicts_least_recently_released_cached_pages_and_never_held_ones() -> None:
    a = _C.PageAllocator(4)
    pages = a.allocate(4)
    for page, key in zip(pages, (10, 11, 12, 13)):
        assert a.publish(page, key)
    assert not a.publish(pages[0], 99)  # already published
    assert a.allocate(0) == []
    assert a.lookup(10) == pages[0] and a.refcount(pages[0]) == 2
    for page in (pages[2], pages[1], pages[3]):
        a.release(page)
    a.release(pages[0])  # page 0 still held once
    assert a.num_free == 3 and a.num_cached == 3
    assert a.allocate(1) == [pages[2]]  # released longest ago
    assert a.lookup(12) == -1 and a.lookup(11) == pages[1]  # evicted; a hit takes it off the list
    assert a.num_cached == 1 and a.allocate(2) is None  # page 0 and page 1 are held
    a.check_invariants()
    a.unpublish(pages[1])
    a.release(pages[1])  # not cached any more: straight to the free list
    assert a.num_cached == 1 and a.num_free == 2
    with pytest.raises(RuntimeError, match="free page"):
        a.publish(pages[1], 50)
    assert a.publish(pages[2], 11)  # the key is free again
    a.check_invariants()
