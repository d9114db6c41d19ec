"""The Triton paged attention kernels (kernels/paged_attention_triton.py) against the PyTorch refs.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
tiny; fp32 and fp16 only (the interpreter's bf16 arithmetic is wrong). The `gpu` tests use bf16 at
real model shapes. Caches are layer views of a multi-layer arena laid out like KVPool's (strided
pages), pages are a random permutation of a pool larger than needed, and every output starts as
NaN so that an element the kernel fails to write fails the test. Inputs are fresh each run; the
seed is in every failure message.

Decode is one launch whose splits are merged by the last program to finish (a counter per
(sequence, KV head) in a cached scratch buffer, which every call leaves zeroed). On the CPU its
heuristic uses short splits (32 tokens, up to CPU_SPLITS), so the default-config tests already
merge; explicit `config`s give one split, several, and every candidate of the sweep.
"""

import json

import pytest
import torch

from program_order import ORDERS, grid_order
from properties import test_seed
from splitreason_engine.kernels import paged_decode_attention_ref, paged_extend_attention_ref
from splitreason_engine.kernels import paged_attention_triton as pa
from splitreason_engine.kernels import tuning
from splitreason_engine.kernels.paged_attention_triton import (CPU_SPLITS, DECODE_CANDIDATES, decode_config,
                                                               decode_counters, decode_key, decode_splits,
                                                               paged_decode_attention, paged_extend_attention)

pytestmark = pytest.mark.interpreter  # the CPU tests; the gpu-marked ones run on CUDA

CPU = torch.device("cpu")
# (query heads, kv heads, head dim, page tokens): GQA ratios 1, 5, 6, 8; pages of 16, 7, 13, 5.
SHAPES = [(4, 4, 32, 16), (10, 2, 20, 7), (6, 1, 16, 13), (16, 2, 64, 5)]
SHAPE_IDS = [f"hq{s[0]}-hkv{s[1]}-d{s[2]}-p{s[3]}" for s in SHAPES]
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def paged_kv(lengths: list[int], page_tokens: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator,
             device: torch.device = CPU, layers: int = 2, layer: int = 1):
    """(k_cache, v_cache, block_tables) for sequences of `lengths`: layer `layer` of an arena shaped
    like KVPool's ([pages, page_elems + slack], each page [layers, 2, page_tokens, hkv, d]).

    Each sequence gets its own pages from a random permutation of a pool with spare pages; the
    block-table padding points at random pages. Everything is random, so a token the kernel reads
    by mistake (or misses) changes the result.
    """
    pages_per_seq = [-(-n // page_tokens) for n in lengths]
    num_pages = sum(pages_per_seq) + 5
    used = layers * 2 * page_tokens * hkv * d
    arena = torch.randn(num_pages, used + 11, generator=gen).to(device=device, dtype=dtype)
    view = arena[:, :used].view(num_pages, layers, 2, page_tokens, hkv, d)
    k_cache, v_cache = view[:, layer, 0], view[:, layer, 1]
    assert k_cache.stride(0) == used + 11 and not k_cache.is_contiguous()
    width = max(pages_per_seq) + 2
    block_tables = torch.randint(0, num_pages, (len(lengths), width), generator=gen, dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    cursor = 0
    for i, n in enumerate(pages_per_seq):
        block_tables[i, :n] = perm[cursor:cursor + n]
        cursor += n
    return k_cache, v_cache, block_tables.to(device)


def decode_lengths(page_tokens: int, batch: int, gen: torch.Generator) -> list[int]:
    """Lengths on and just past page boundaries, 0 (a CUDA-graph padding row) and random ones."""
    p = page_tokens
    if batch == 1:
        return [int(torch.randint(3 * p, 100, (1,), generator=gen))]
    base = [0, 1, p, p + 1, 2 * p, 2 * p + 1, p - 1, min(6 * p, 96)]
    out = base[:batch] + [int(torch.randint(1, 100, (1,), generator=gen)) for _ in range(batch - len(base))]
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def make_q(tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator,
           device: torch.device = CPU) -> torch.Tensor:
    """q [tokens, hq, d] as the model makes it: the query-head part of a fused q/k tensor (strided)."""
    qk = torch.randn(tokens, hq + hkv, d, generator=gen).to(device=device, dtype=dtype)
    return qk[:, :hq]


def nan_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, msg: str) -> None:
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"{msg}: {m}")


def decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """The ref in fp32 on the upcast inputs; rows of length 0 are zeros."""
    ref = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens, scale)
    return torch.where((seq_lens > 0)[:, None, None], ref, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,batch", [(SHAPES[0], 9), (SHAPES[1], 1), (SHAPES[2], 8), (SHAPES[3], 3)],
                         ids=[f"{i}-b{b}" for i, b in zip(SHAPE_IDS, [9, 1, 8, 3])])
def test_decode_matches_ref(shape, batch, dtype):
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = shape
    lengths = decode_lengths(p, batch, gen)
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, dtype, gen)
    q = make_q(batch, hq, hkv, d, dtype, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = d ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out=nan_like(q))
    assert out.dtype == dtype and out.shape == q.shape
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    assert_close(out, ref, TOL[dtype], f"seed {seed}, lengths {lengths}")
    assert (out[seq_lens == 0] == 0).all(), f"seed {seed}: rows of length 0 must be zeros"


def test_decode_split_counts_agree():
    """One split, a few, and more than any sequence can use (empty splits) give the same result."""
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = 8, 2, 32, 6
    lengths = [100, 33, 64, 0, 5]
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, torch.float32, gen)
    q = make_q(len(lengths), hq, hkv, d, torch.float32, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.2)
    outs = {}
    for splits in (1, 3, 9):
        outs[splits] = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.2, max_splits=splits,
                                              out=nan_like(q), config={"block_n": 16, "min_split_tokens": 8})
        assert_close(outs[splits], ref, TOL[torch.float32], f"seed {seed}, max_splits {splits}")
    for splits in (3, 9):
        assert_close(outs[splits], outs[1], 1e-5, f"seed {seed}, max_splits {splits} vs 1")
    assert (decode_counters(1, CPU) == 0).all()


def used_splits(seq_len: int, cfg: dict) -> int:
    """The kernel's split count for a sequence (the module doc's formula)."""
    n0 = max(1, min(cfg["max_splits"], -(-seq_len // cfg["min_split_tokens"])))
    split_tokens = max(1, -(-(-(-seq_len // n0)) // cfg["block_n"])) * cfg["block_n"]
    return max(1, -(-seq_len // split_tokens))


# (query heads, kv heads, head dim, page tokens, config): GQA 1, 3, 8 and 5; head dims 20, 40, 24,
# 48; pages 7, 11, 5, 3; 16- or 32-token tiles, splits of >= 16 to 48 tokens, up to 3 to 8 of them.
SPLIT_CASES = [
    (2, 2, 20, 7, {"block_n": 16, "min_split_tokens": 16, "max_splits": 8}),
    (6, 2, 40, 11, {"block_n": 16, "min_split_tokens": 40, "max_splits": 5}),
    (8, 1, 24, 5, {"block_n": 32, "min_split_tokens": 16, "max_splits": 3}),
    (10, 2, 48, 3, {"block_n": 16, "min_split_tokens": 48, "max_splits": 4}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"hq{c[0]}-hkv{c[1]}-d{c[2]}-p{c[3]}" for c in SPLIT_CASES])
def test_decode_splits_follow_the_context(case, dtype):
    """A batch of mixed lengths (padding rows of 0, one split, several, the most the grid has)
    under a config of short splits: every row matches the ref and the counters are left at 0."""
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p, cfg = case
    tile = cfg["block_n"]
    longest = cfg["max_splits"] * -(-cfg["min_split_tokens"] // tile) * tile  # just reaches max_splits
    lengths = [0, 1, cfg["min_split_tokens"], cfg["min_split_tokens"] + 1, 2 * p + 1, 0,
               int(torch.randint(50, 140, (1,), generator=gen)), longest, longest + 7]
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]
    counts = {used_splits(n, cfg) for n in lengths}
    assert 1 in counts and cfg["max_splits"] in counts and len(counts) >= 3, counts
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, dtype, gen)
    q = make_q(len(lengths), hq, hkv, d, dtype, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = d ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out=nan_like(q), config=cfg)
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    assert_close(out, ref, TOL[dtype], f"seed {seed}, lengths {lengths}")
    assert (out[seq_lens == 0] == 0).all(), f"seed {seed}: rows of length 0 must be zeros"
    assert (decode_counters(1, CPU) == 0).all(), f"seed {seed}: counters left set"


@pytest.mark.parametrize("order", ORDERS[1:])
@pytest.mark.parametrize("case", SPLIT_CASES[:2], ids=[f"hq{c[0]}-hkv{c[1]}-p{c[3]}" for c in SPLIT_CASES[:2]])
def test_decode_merge_is_independent_of_program_order(case, order):
    """The programs of one launch in reversed and shuffled order (tests/program_order.py): another
    split program is the last to arrive and merges, with the same bits as in grid order, and every
    counter is back at 0."""
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p, cfg = case
    longest = cfg["max_splits"] * -(-cfg["min_split_tokens"] // cfg["block_n"]) * cfg["block_n"]
    lengths = [longest + 7, 0, cfg["min_split_tokens"] + 1, 1, longest]
    assert used_splits(longest, cfg) == cfg["max_splits"] > 1
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, torch.float32, gen)
    q = make_q(len(lengths), hq, hkv, d, torch.float32, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    forward = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.3, out=nan_like(q), config=cfg)
    with grid_order(order, seed):
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.3, out=nan_like(q), config=cfg)
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.3)
    assert_close(out, ref, TOL[torch.float32], f"seed {seed}, {order}")
    assert torch.equal(out, forward), f"seed {seed}: {order} order changed the bits"
    assert (decode_counters(1, CPU) == 0).all(), f"seed {seed}: counters left set"


def test_decode_counters_reset_between_calls():
    """Two calls in a row with other lengths (as CUDA-graph replays do) both merge correctly: the
    last program of each (sequence, KV head) puts its counter back to 0. The same inputs give the
    same bits again (the merge's order is fixed)."""
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = 6, 2, 20, 7
    cfg = {"block_n": 16, "min_split_tokens": 16, "max_splits": 6}
    width_lengths = [90, 90, 90, 90]
    k_cache, v_cache, block_tables = paged_kv(width_lengths, p, hkv, d, torch.float32, gen)
    q = make_q(4, hq, hkv, d, torch.float32, gen)
    counters = decode_counters(4 * hkv, CPU)
    assert (counters == 0).all()
    firsts = []
    for lengths in ([90, 33, 0, 17], [5, 90, 61, 0], [90, 33, 0, 17]):
        seq_lens = torch.tensor(lengths, dtype=torch.int32)
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.3, out=nan_like(q), config=cfg)
        ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.3)
        assert_close(out, ref, TOL[torch.float32], f"seed {seed}, lengths {lengths}")
        assert decode_counters(4 * hkv, CPU) is counters and (counters == 0).all(), f"seed {seed}, lengths {lengths}"
        firsts.append(out)
    assert torch.equal(firsts[0], firsts[2]), f"seed {seed}: the same call gave other bits"


def test_counters_left_set_by_a_dead_launch_are_reset_before_the_next_forward():
    """A launch that died before its merger ran leaves counters set, and the next call would then
    merge too early (wrong rows). The op set's begin_forward, run at the start of every forward
    pass (captured in the decode graphs too), zeroes them first."""
    from splitreason_engine.kernels.ops import triton_ops

    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = 6, 2, 20, 7
    cfg = {"block_n": 16, "min_split_tokens": 16, "max_splits": 6}
    lengths = [90, 33, 61]
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, torch.float32, gen)
    q = make_q(3, hq, hkv, d, torch.float32, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.3)
    counters = decode_counters(3 * hkv, CPU)
    counters[: 3 * hkv] = 2  # what a launch cut short leaves behind
    poisoned = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.3, out=nan_like(q), config=cfg)
    assert not torch.allclose(poisoned, ref, atol=1e-3), f"seed {seed}: stale counters went unnoticed"
    counters[: 3 * hkv] = 2
    triton_ops().begin_forward(CPU)
    assert (counters == 0).all()
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.3, out=nan_like(q), config=cfg)
    assert_close(out, ref, TOL[torch.float32], f"seed {seed}")
    counters.zero_()


def test_decode_counters_grow_and_keep_the_old_buffer():
    buf = decode_counters(1, CPU)
    assert buf.dtype == torch.int32 and buf.numel() >= pa.COUNTERS_MIN
    assert decode_counters(buf.numel(), CPU) is buf
    grown = decode_counters(buf.numel() + 1, CPU)
    assert grown.numel() > buf.numel() and (grown == 0).all()
    assert any(old is buf for old in pa._OUTGROWN)  # graphs captured before still point at it
    assert decode_counters(1, CPU) is grown


def test_decode_every_candidate_matches_ref():
    """Every DECODE_CANDIDATES config (num_warps and num_stages are launch options the interpreter
    ignores, so each distinct (block_n, min_split_tokens) runs once), with several splits."""
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = 3, 1, 24, 9
    lengths = [0, 520, 130]
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, torch.float32, gen)
    q = make_q(len(lengths), hq, hkv, d, torch.float32, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.3)
    distinct = {(c["block_n"], c["min_split_tokens"]): c for c in DECODE_CANDIDATES}
    assert len(DECODE_CANDIDATES) >= 2 * len(distinct)
    for cfg in distinct.values():
        assert used_splits(520, {**cfg, "max_splits": CPU_SPLITS}) > 1
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.3, out=nan_like(q), config=cfg)
        assert_close(out, ref, TOL[torch.float32], f"seed {seed}, config {cfg}")
    assert (decode_counters(1, CPU) == 0).all()


def test_decode_key_and_config(tmp_path, monkeypatch):
    """The key buckets the batch; a config overrides the card's tuned entry, which overrides the
    heuristic; unknown or invalid parameters are refused."""
    key = decode_key(3, 12, 2, 128, 16, torch.bfloat16)
    assert key == "batch=4,hq=12,hkv=2,d=128,page=16,dtype=bfloat16"
    assert decode_key(4, 12, 2, 128, 16, torch.bfloat16) == key
    assert decode_key(1000, 40, 8, 128, 16, torch.float16).startswith("batch=64,hq=40,hkv=8,")
    assert set(decode_config(3, 12, 2, 128, 16, torch.float32, CPU)) == set(DECODE_CANDIDATES[0]) | {"max_splits"}
    assert decode_config(3, 12, 2, 128, 16, torch.float32, CPU)["max_splits"] == CPU_SPLITS
    tuned = {"block_n": 16, "min_split_tokens": 12, "max_splits": 7}
    path = tmp_path / "card.json"
    path.write_text(json.dumps({"card": "test", "kernels": {"decode_attention": {
        decode_key(2, 4, 2, 12, 5, torch.float32): tuned}}}))
    monkeypatch.setenv(tuning.CONFIG_ENV, str(path))
    assert decode_config(2, 4, 2, 12, 5, torch.float32, CPU) | tuned == decode_config(2, 4, 2, 12, 5, torch.float32, CPU)
    assert decode_config(2, 4, 2, 12, 5, torch.float32, CPU, {"max_splits": 2})["max_splits"] == 2
    assert decode_config(2, 4, 2, 12, 5, torch.float16, CPU)["max_splits"] == CPU_SPLITS  # another key
    # The kernel runs the tuned entry: 50 tokens make 4 splits of 16 (7 allowed).
    gen = torch.Generator().manual_seed(test_seed())
    lengths = [50, 0]
    k_cache, v_cache, block_tables = paged_kv(lengths, 5, 2, 12, torch.float32, gen)
    q = make_q(2, 4, 2, 12, torch.float32, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    assert used_splits(50, tuned) == 4
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.3, out=nan_like(q))
    assert_close(out, decode_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.3), TOL[torch.float32], "tuned")
    for bad in ({"block_n": 24}, {"min_split_tokens": 0}, {"max_splits": 0}, {"block_m": 16}):
        with pytest.raises(ValueError):
            decode_config(2, 4, 2, 12, 5, torch.float32, CPU, bad)


def test_decode_all_padding_rows_are_zero():
    """A CUDA-graph batch padded with seq_len-0 rows (block tables of page 0) writes zeros there."""
    gen = torch.Generator().manual_seed(test_seed())
    k_cache, v_cache, _ = paged_kv([20], 8, 2, 16, torch.float32, gen)
    q = make_q(3, 4, 2, 16, torch.float32, gen)
    out = paged_decode_attention(q, k_cache, v_cache, torch.zeros(3, 4, dtype=torch.int32),
                                 torch.zeros(3, dtype=torch.int32), 0.25, out=nan_like(q))
    assert (out == 0).all()


def test_decode_splits_on_cpu():
    assert decode_splits(1, 2, "cpu") == CPU_SPLITS
    assert decode_splits(64, 8, torch.device("cpu")) == CPU_SPLITS


def extend_batch(p: int, batch: int) -> list[tuple[int, int]]:
    """(cached prefix, new chunk) pairs: whole prompts (prefix 0), single tokens after a prefix,
    chunks of several tokens starting or ending on a page boundary, mixed in one batch."""
    if batch == 1:
        return [(2 * p, p + 1)]
    pairs = [(0, 1), (0, 2 * p + 3), (p, 1), (p + 1, p - 1), (5, 3), (2 * p - 1, 2), (3 * p, p), (7, 1), (0, p)]
    return pairs[:batch]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,batch", [(SHAPES[0], 9), (SHAPES[1], 1), (SHAPES[2], 8), (SHAPES[3], 5)],
                         ids=[f"{i}-b{b}" for i, b in zip(SHAPE_IDS, [9, 1, 8, 5])])
def test_extend_matches_ref(shape, batch, dtype):
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = shape
    pairs = extend_batch(p, batch)
    perm = torch.randperm(len(pairs), generator=gen).tolist()
    pairs = [pairs[i] for i in perm]
    lengths = [a + b for a, b in pairs]
    chunks = [b for _, b in pairs]
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, dtype, gen)
    q = make_q(sum(chunks), hq, hkv, d, dtype, gen)
    query_start_loc = torch.tensor([0] + chunks, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = d ** -0.5
    # The model writes extend rows into a slice of a buffer shared with the decode rows.
    buf = torch.full((q.shape[0] + 2, hq, d), float("nan"), dtype=dtype)
    max_query_len = max(chunks) if dtype == torch.float32 else None
    out = paged_extend_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                 max_query_len=max_query_len, out=buf[2:])
    assert out.data_ptr() == buf[2:].data_ptr() and buf[:2].isnan().all()
    ref = paged_extend_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, query_start_loc,
                                     seq_lens, scale)
    assert_close(out, ref, TOL[dtype], f"seed {seed}, (prefix, chunk) {pairs}")


# ---- CUDA: bf16 at real shapes -------------------------------------------------------------------

GPU_SHAPES = [(12, 2, 128, 16), (40, 8, 128, 16), (12, 2, 128, 27)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}-p{s[3]}")
def test_decode_cuda_bf16(shape, batch):
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = shape
    dev = torch.device("cuda")
    lengths = [4096] if batch == 1 else [int(x) for x in torch.randint(1, 4500, (batch,), generator=gen)]
    if batch > 1:
        lengths[0], lengths[1] = 0, 4096
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, torch.bfloat16, gen, device=dev)
    q = make_q(batch, hq, hkv, d, torch.bfloat16, gen, device=dev)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5)
    for splits in (None, 1):
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5, max_splits=splits,
                                     out=nan_like(q))
        assert not out.isnan().any(), f"seed {seed}"
        err = relative_error(out, ref)
        assert err <= 1e-2, f"seed {seed}, max_splits {splits}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}-p{s[3]}")
def test_extend_cuda_bf16(shape):
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = shape
    dev = torch.device("cuda")
    pairs = [(3000, 512), (0, 1500), (4000, 1), (100, 17), (p * 64, p * 8)]
    lengths = [a + b for a, b in pairs]
    chunks = [b for _, b in pairs]
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, torch.bfloat16, gen, device=dev)
    q = make_q(sum(chunks), hq, hkv, d, torch.bfloat16, gen, device=dev)
    query_start_loc = torch.tensor([0] + chunks, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    out = paged_extend_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, d ** -0.5,
                                 out=nan_like(q))
    ref = paged_extend_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, query_start_loc,
                                     seq_lens, d ** -0.5)
    assert not out.isnan().any(), f"seed {seed}"
    err = relative_error(out, ref)
    assert err <= 1e-2, f"seed {seed}: relative error {err:.2e}"


@pytest.mark.gpu
def test_decode_cuda_graph_replays_with_new_lengths():
    """Captured once, replayed with other seq_lens (padding rows of 0 included): the grid and the
    split count do not depend on the lengths, and nothing syncs with the host."""
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p, batch = 12, 2, 128, 16, 8
    dev = torch.device("cuda")
    k_cache, v_cache, block_tables = paged_kv([3000] * batch, p, hkv, d, torch.bfloat16, gen, device=dev)
    q = make_q(batch, hq, hkv, d, torch.bfloat16, gen, device=dev).contiguous()
    seq_lens = torch.full((batch,), 3000, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    assert decode_splits(batch, hkv, dev) == decode_splits(batch, hkv, dev)

    def step():
        paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lengths in ([3000, 1, 0, 17, 2999, 64, 0, 1000], [5, 3000, 33, 0, 0, 0, 1, 2048]):
        seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(q))
        out.fill_(float("nan"))
        graph.replay()
        ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5)
        err = relative_error(out, ref)
        assert err <= 1e-2, f"seed {seed}, lengths {lengths}: relative error {err:.2e}"
        assert (out[seq_lens == 0] == 0).all(), f"seed {seed}"
    assert (decode_counters(1, dev) == 0).all(), f"seed {seed}: replays left counters set"


@pytest.mark.gpu
def test_decode_cuda_every_candidate():
    """Every sweep candidate compiles and matches the ref at the 1.5B shape (one split, several,
    a padding row), and leaves the counters at 0."""
    seed = test_seed()
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, p = 12, 2, 128, 16
    dev = torch.device("cuda")
    lengths = [0, 100, 700, 4096]
    k_cache, v_cache, block_tables = paged_kv(lengths, p, hkv, d, torch.bfloat16, gen, device=dev)
    q = make_q(len(lengths), hq, hkv, d, torch.bfloat16, gen, device=dev)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    ref = decode_ref(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5)
    for cfg in DECODE_CANDIDATES + [{"max_splits": 1}, {"max_splits": 200, "min_split_tokens": 16}]:
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5, out=nan_like(q),
                                     config=cfg)
        assert not out.isnan().any() and (out[0] == 0).all(), f"seed {seed}, config {cfg}"
        err = relative_error(out, ref)
        assert err <= 1e-2, f"seed {seed}, config {cfg}: relative error {err:.2e}"
    assert (decode_counters(1, dev) == 0).all(), f"seed {seed}"
