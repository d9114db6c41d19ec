"""Triton paged attention over the shared KV pool: decode and extend, beside the PyTorch refs in
paged_attention.py (same arguments, same results).

Caches are strided [pages, page_tokens, Hkv, D] views of the arena (a page of the arena holds
every layer of a model, so the page stride is larger than page_tokens * Hkv * D). The kernels take
every stride and gather each token through the block table themselves: token t of sequence b is
slot t % page_tokens of page block_tables[b, t // page_tokens]. page_tokens may be any positive
integer, so the lookup is per token, not per page-aligned block.

Decode (one query token per sequence) is memory bound and has little parallelism per sequence,
so it is split-K ("flash decoding"), in two launches:
  1. grid (B, Hkv, max_splits): one program per (sequence, KV head, split) walks its split's tokens
     in BLOCK_N blocks and computes all query heads of that KV head at once (the GQA group, padded
     to BLOCK_H >= 16 rows so QK^T and PV are `tl.dot`s), each K/V tile read once for the group.
     Online softmax within the split; it writes the split's softmax-normalised partial output
     [B, Hq, max_splits, BLOCK_D] and its log-sum-exp [B, Hq, max_splits] (both fp32, LSE in base 2).
  2. grid (B, Hq): merges the splits of one head by their LSE into `out` (the dtype of q).
The grid depends only on (B, Hkv, max_splits), never on seq_lens, and the wrappers never read a
device value on the host, so decode can be captured in a CUDA graph and replayed with new lengths.
The workspace is laid out [B, Hq, max_splits, BLOCK_D] and addressed inside the kernels from
max_splits and BLOCK_D, so its offsets are known multiples of BLOCK_D (vector stores and loads)
without passing its strides.
How many splits a sequence really uses is chosen in the kernel from its seq_len:
    n = max(1, min(max_splits, cdiv(seq_len, BLOCK_N)))
    split_tokens = cdiv(cdiv(seq_len, n), BLOCK_N) * BLOCK_N       (whole blocks per split)
so a split is at least one BLOCK_N tile. Programs whose split starts at or past seq_len loop zero
times and write LSE = -inf (and a zero partial); the reduce skips them, so a seq_len of 0
(CUDA-graph padding rows) gives an output row of zeros. decode_splits sizes max_splits for about
PROGRAMS_PER_SM programs per SM and shrinks it as B * Hkv grows (until one split each).

Extend (a chunk of new tokens per sequence, already in the cache) is flash attention: grid
(B, Hq, cdiv(max_query_len, BLOCK_M)); each program holds BLOCK_M query rows of one head and
streams the visible KV blocks (cached prefix plus the causal part of the chunk) through an online
softmax. Query blocks past a sequence's chunk do no work.

Compiled variants: Triton compiles a kernel once per specialization key: the constexprs, the dtype
of each pointer, and, unless an argument is listed in `do_not_specialize`, whether an integer is 1
or a multiple of 16 and whether a pointer is 16-byte aligned. Every argument that changes from one
engine step to the next (the batch's block-table width, max_splits, the metadata pointers, which
are views at step-dependent offsets) is in `do_not_specialize`: they are scalar or gathered
loads, for which the specialization buys nothing. What is left depends only on the model, its
dtype and the device, plus one thing: q of extend is q[num_decodes:] of the fused qkv, so its
16-byte alignment depends on num_decodes when a token's qkv row is not a multiple of 16 bytes
(never at head_dim 128). A warm-up with num_decodes 0 and 1 reaches both classes
(splitreason_engine/warmup.py).

Arithmetic: tiles are loaded in the cache dtype, QK^T and PV are `tl.dot`s accumulating in fp32
(P is cast to the V dtype for the PV dot, as flash attention does), softmax state is fp32 and in
base 2 (the scale is pre-multiplied by log2(e), so exp is exp2). fp32 caches use IEEE fp32 dots
(no TF32), so fp32 results match the reference closely. Block offsets into the arena are int64.
"""

import functools

import torch
import triton
import triton.language as tl

# Decode: tokens per K/V tile; also the granularity (and minimum size) of a split.
DECODE_BLOCK_N = 32
# Query-head rows per decode program: a GQA group (1..8 heads) padded up to a tl.dot-able M.
MIN_BLOCK_H = 16
# Upper bound on decode splits per (sequence, KV head), and the count used off CUDA.
MAX_SPLITS = 128
CPU_SPLITS = 4
# decode_splits aims for this many decode programs per SM.
PROGRAMS_PER_SM = 2
# Splits merged per step of the reduce kernel.
REDUCE_BLOCK_S = 16

_LOG2E = 1.4426950408889634


def _block_d(head_dim: int) -> int:
    """Head dim tile: a power of two (tl.arange) of at least 16 (tl.dot's K on GPU); masked to D."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs would default to TF32 dots on GPU (10-bit mantissa); keep them exact."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _warps(dtype: torch.dtype) -> int:
    """fp32 tiles (IEEE dots on CUDA cores) spill registers at 4 warps on sm_90; 16-bit ones do not."""
    return 8 if dtype == torch.float32 else 4


def _new_out(q: torch.Tensor) -> torch.Tensor:
    """A contiguous output for q: its strides (and their specialization) do not depend on the step,
    as empty_like's would (it keeps a strided view's strides when the view has one row)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits_for(batch: int, num_kv_heads: int, sm_count: int) -> int:
    """decode_splits on a GPU of `sm_count` SMs (any value in [1, MAX_SPLITS]: max_splits is not
    specialized on, so every value runs the same compiled kernel)."""
    wanted = PROGRAMS_PER_SM * sm_count
    return max(1, min(MAX_SPLITS, triton.cdiv(wanted, max(1, batch * num_kv_heads))))


def decode_splits(batch: int, num_kv_heads: int, device: torch.device | str) -> int:
    """max_splits for a decode batch: enough (sequence, KV head, split) programs to fill the GPU
    (PROGRAMS_PER_SM per SM) even at batch 1 with 2 KV heads, capped at MAX_SPLITS.

    Depends only on its arguments (and the device's SM count), so a CUDA graph captured per batch
    size bakes in one value; the kernel still uses fewer splits for short sequences.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_SPLITS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return splits_for(batch, num_kv_heads, _sm_count(index))


# Per-step arguments (see "Compiled variants" above): never specialized on.
_STEP_ARGS = ["block_tables_ptr", "seq_lens_ptr", "stride_btb"]


@triton.jit(do_not_specialize=_STEP_ARGS + ["max_splits"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btw,
    scale_log2, page_tokens, max_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (sequence, KV head, split): partial attention of the KV head's query heads over the
    split's tokens, and its base-2 log-sum-exp (-inf for a split with no tokens), into the
    [B, Hq, max_splits, BLOCK_D] / [B, Hq, max_splits] workspaces."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    # Splits actually used for this sequence, chosen here so the grid stays static.
    seq_len = tl.load(seq_lens_ptr + b)
    num_splits = tl.maximum(tl.minimum(max_splits, tl.cdiv(seq_len, BLOCK_N)), 1)
    split_tokens = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_btb
    for tok in range(start, end, BLOCK_N):
        offs_t = tok + tl.arange(0, BLOCK_N)
        t_mask = offs_t < end
        page = tl.load(table + (offs_t // page_tokens) * stride_btw, mask=t_mask, other=0).to(tl.int64)
        slot = offs_t % page_tokens
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k_rows = page * stride_kp + slot * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(t_mask[None, :], s, float("-inf"))
        # Every block has a valid token, so m_new is finite for every row (padded rows score 0).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = page * stride_vp + slot * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    live = l_i > 0.0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("-inf"))
    part = (b.to(tl.int64) * num_heads + heads) * max_splits + split  # [BLOCK_H] workspace rows
    tl.store(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(part_lse_ptr + part, lse, mask=h_mask)


@triton.jit(do_not_specialize=["max_splits"])
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_od,
    max_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (sequence, query head): the LSE-weighted merge of its splits, BLOCK_S splits at a time
    (a running max keeps it exact for any max_splits). Empty splits (LSE -inf) are masked out and
    never read, so the workspace needs no initialisation; no live split at all gives zeros."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row = (b.to(tl.int64) * tl.num_programs(1) + head) * max_splits  # the head's first workspace row
    lse_row = part_lse_ptr + row
    part_row = part_out_ptr + row * BLOCK_D

    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, max_splits, BLOCK_S):
        splits = s0 + offs_s
        lse = tl.load(lse_row + splits, mask=splits < max_splits, other=float("-inf"))
        live = lse > float("-inf")
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # no -inf - -inf
        alpha = tl.exp2(m - m_safe)
        w = tl.where(live, tl.exp2(lse - m_safe), 0.0)
        parts = tl.load(part_row + splits[:, None] * BLOCK_D + offs_d[None, :],
                        mask=live[:, None] & d_mask[None, :], other=0.0)
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(parts * w[:, None], 0)
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], block_tables [B, W] int32, seq_lens [B] int32 (context including the new
    token; 0 gives a zero row) -> out [B, Hq, D] in q's dtype.

    No host syncs and a grid fixed by (B, Hkv, max_splits): safe to capture in a CUDA graph.
    max_splits None uses decode_splits(B, Hkv, device).
    """
    batch, num_heads, head_dim = q.shape
    _, page_tokens, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = _new_out(q)
    if batch == 0:
        return out
    if max_splits is None:
        max_splits = decode_splits(batch, num_kv_heads, q.device)
    group = num_heads // num_kv_heads
    block_d = _block_d(head_dim)
    part_out = torch.empty(batch, num_heads, max_splits, block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, max_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, max_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        scale * _LOG2E, page_tokens, max_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(MIN_BLOCK_H, triton.next_power_of_2(group)),
        BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(k_cache.dtype),
        num_warps=_warps(k_cache.dtype),
    )
    _decode_reduce_kernel[(batch, num_heads)](
        part_out, part_lse, out, *out.stride(), max_splits,
        HEAD_DIM=head_dim, BLOCK_S=REDUCE_BLOCK_S, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


@triton.jit(do_not_specialize=_STEP_ARGS + ["query_start_loc_ptr"])
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    stride_qn, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btw,
    stride_on, stride_oh, stride_od,
    scale_log2, page_tokens,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """BLOCK_M new tokens of one sequence and query head: causal attention to the cached prefix
    and the chunk, streamed through the block table in BLOCK_N-token tiles."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    pos = prefix + offs_m  # each query token's position in its sequence
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qn + head * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # Keys visible to this block's last query row; nothing at all for blocks past the chunk.
    kv_end = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)
    kv_end = tl.where(m_block * BLOCK_M < q_len, kv_end, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_btb
    for tok in range(0, kv_end, BLOCK_N):
        offs_t = tok + tl.arange(0, BLOCK_N)
        t_mask = offs_t < kv_end
        page = tl.load(table + (offs_t // page_tokens) * stride_btw, mask=t_mask, other=0).to(tl.int64)
        slot = offs_t % page_tokens
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k_rows = page * stride_kp + slot * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        # Token 0 is visible to every row, so the first tile makes every row's max finite.
        visible = t_mask[None, :] & (offs_t[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = page * stride_vp + slot * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_on + head * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def extend_blocks(dtype: torch.dtype, block_d: int, device_type: str) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64x64 tiles on GPU, 32x32 past D=128 or for fp32 (IEEE dots need about
    4x the shared memory); small tiles in the CPU interpreter, which simulates every tile. One
    value per model (dtype, head dim) and device: never chosen from a step's shape."""
    if device_type != "cuda":
        return 16, 16
    return (64, 64) if block_d <= 128 and dtype.itemsize <= 2 else (32, 32)


def _extend_blocks(q: torch.Tensor, block_d: int) -> tuple[int, int]:
    return extend_blocks(q.dtype, block_d, q.device.type)


def paged_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [N, Hq, D]: each sequence's new tokens back to back (query_start_loc [B + 1] int32), their
    K/V already in the cache; the last new token of sequence i is at position seq_lens[i] - 1.
    Returns out [N, Hq, D]. max_query_len None reads it from query_start_loc (a host sync)."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_tokens, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    if out is None:
        out = _new_out(q)
    if batch == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len <= 0:
        return out
    block_d = _block_d(head_dim)
    block_m, block_n = _extend_blocks(q, block_d)
    _extend_kernel[(batch, num_heads, triton.cdiv(max_query_len, block_m))](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        scale * _LOG2E, page_tokens,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_PRECISION=_dot_precision(k_cache.dtype),
        num_warps=_warps(k_cache.dtype),
    )
    return out
