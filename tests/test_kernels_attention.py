"""The Triton paged attention kernels (kernels/paged_attention_triton.py) against the PyTorch refs.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
tiny; fp32 and fp16 only (the interpreter's bf16 arithmetic is wrong). The `gpu` tests use bf16 at
real model shapes. Caches are layer views of a multi-layer arena laid out like KVPool's (strided
pages), pages are a random permutation of a pool larger than needed, and every output starts as
NaN so that an element the kernel fails to write fails the test. Inputs are fresh each run; the
seed is in every failure message.
"""

import os

import pytest
import torch

from splitreason_engine.kernels import paged_decode_attention_ref, paged_extend_attention_ref
from splitreason_engine.kernels.paged_attention_triton import (CPU_SPLITS, decode_splits, paged_decode_attention,
                                                               paged_extend_attention)

pytestmark = pytest.mark.interpreter  # the CPU tests; the gpu-marked ones run on CUDA

CPU = torch.device("cpu")
# (query heads, kv heads, head dim, page tokens): GQA ratios 1, 5, 6, 8; pages of 16, 7, 13, 5.
SHAPES = [(4, 4, 32, 16), (10, 2, 20, 7), (6, 1, 16, 13), (16, 2, 64, 5)]
SHAPE_IDS = [f"hq{s[0]}-hkv{s[1]}-d{s[2]}-p{s[3]}" for s in SHAPES]
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


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
    seed = new_seed()
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
    seed = new_seed()
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
                                              out=nan_like(q))
        assert_close(outs[splits], ref, TOL[torch.float32], f"seed {seed}, max_splits {splits}")
    for splits in (3, 9):
        assert_close(outs[splits], outs[1], 1e-5, f"seed {seed}, max_splits {splits} vs 1")


def test_decode_all_padding_rows_are_zero():
    """A CUDA-graph batch padded with seq_len-0 rows (block tables of page 0) writes zeros there."""
    gen = torch.Generator().manual_seed(new_seed())
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
    seed = new_seed()
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
    seed = new_seed()
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
    seed = new_seed()
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
    seed = new_seed()
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
