"""Triton paged attention over the shared KV pool: decode and extend, beside the PyTorch refs in
paged_attention.py (same arguments, same results).

Caches are strided [pages, page_tokens, Hkv, D] views of the arena (a page of the arena holds
every layer of a model, so the page stride is larger than page_tokens * Hkv * D). The kernels take
every stride and gather each token through the block table themselves: token t of sequence b is
slot t % page_tokens of page block_tables[b, t // page_tokens]. page_tokens may be any positive
integer, so the lookup is per token, not per page-aligned block.

Decode (one query token per sequence) is memory bound and has little parallelism per sequence,
so it is split-K ("flash decoding"), in ONE launch with the merge fused in:
  grid (B, Hkv, max_splits): one program per (sequence, KV head, split). How many splits a
  sequence really uses follows its length, computed in the kernel from seq_len (never on the host):
      n0 = clamp(cdiv(seq_len, min_split_tokens), 1, max_splits)
      split_tokens = max(1, cdiv(cdiv(seq_len, n0), BLOCK_N)) * BLOCK_N     (whole tiles per split)
      n = max(1, cdiv(seq_len, split_tokens))                                (every used split non-empty)
  Programs with split >= n exit at once. A used program walks its split's tokens in BLOCK_N tiles
  and computes all query heads of its KV head at once (the GQA group, padded to BLOCK_H >= 16 rows
  so QK^T and PV are `tl.dot`s), each K/V tile read once for the group, with an online softmax.
    - n == 1 (short contexts, and seq_len 0 = CUDA-graph padding rows, which give zeros): the one
      program normalises and writes `out` itself. No workspace, no counter.
    - n > 1: it writes its softmax-normalised partial [GROUP, BLOCK_D] and base-2 log-sum-exp
      [GROUP] (fp32) into a per-call workspace [B, Hkv, max_splits, GROUP, (BLOCK_D)], then bumps
      the (sequence, KV head)'s int32 counter (atomic_add, acq_rel, after a CTA barrier so every
      thread's stores are released). The program that sees n - 1 is the last: it merges the n
      partials by their LSE, in split order 0..n-1 whichever program it is (the result is
      deterministic), reading them at L2 (.cg), writes `out` and resets the counter to 0.
The counters live in a cached, zero-initialised per-device buffer (decode_counters) that every
call leaves all zero again, so the next call and every CUDA-graph replay start clean. A launch
that dies halfway leaves its counters set, so each forward pass also zeroes the buffer first
(reset_decode_counters, the op set's begin_forward: one memset, captured in the decode graphs). It is
allocated (or grown) on the first call that needs it, which must not be inside a CUDA-graph
capture: the engine's warm-up and DecodeGraphs.capture_all run every batch size eagerly before
capturing it, and the buffer starts at COUNTERS_MIN pairs (more than any graph bucket needs).
A buffer that is outgrown stays allocated: graphs captured earlier still point at it. One decode
attention runs at a time per device (the engine issues them in order on one stream); two running
concurrently on different streams would share counters.

The grid depends only on (B, Hkv, max_splits), never on seq_lens, and the wrapper never reads a
device value on the host, so decode can be captured in a CUDA graph and replayed with new lengths.
Launch parameters (decode_config): BLOCK_N, num_warps, num_stages, min_split_tokens and
max_splits, from the card's tuned entry for decode_key(...) (kernels/tuning.py), else the
heuristics below (max_splits: decode_splits, about PROGRAMS_PER_SM programs per SM, fewer as
B * Hkv grows); a call's `config` overrides both. DECODE_CANDIDATES is what the sweep tries.

Extend (a chunk of new tokens per sequence, already in the cache) is flash attention: grid
(B, Hq, cdiv(max_query_len, BLOCK_M)); each program holds BLOCK_M query rows of one head and
streams the visible KV blocks (cached prefix plus the causal part of the chunk) through an online
softmax. Query blocks past a sequence's chunk do no work.

Compiled variants: Triton compiles a kernel once per specialization key: the constexprs, the dtype
of each pointer, and, unless an argument is listed in `do_not_specialize`, whether an integer is 1
or a multiple of 16 and whether a pointer is 16-byte aligned. Every argument that changes from one
engine step to the next (the batch's block-table width, max_splits, min_split_tokens, the metadata
pointers, which are views at step-dependent offsets) is in `do_not_specialize`: they are scalar or
gathered loads, for which the specialization buys nothing. What is left depends only on the model,
its dtype and the device (and, for decode, the tuned BLOCK_N / num_warps / num_stages of the
batch's bucket, decode_batch_bucket: the same for every batch unless a card's file tunes buckets
differently, in which case the warm-up must run a batch of every bucket), plus one thing: q of
extend is q[num_decodes:] of the fused qkv, so its 16-byte alignment depends on num_decodes when a
token's qkv row is not a multiple of 16 bytes (never at head_dim 128). A warm-up with num_decodes
0 and 1 reaches both classes (splitreason_engine/warmup.py).

Arithmetic: tiles are loaded in the cache dtype, QK^T and PV are `tl.dot`s accumulating in fp32
(P is cast to the V dtype for the PV dot, as flash attention does), softmax state is fp32 and in
base 2 (the scale is pre-multiplied by log2(e), so exp is exp2). fp32 caches use IEEE fp32 dots
(no TF32), so fp32 results match the reference closely. Block offsets into the arena are int64.
"""

import functools

import torch
import triton
import triton.language as tl

from . import tuning

# Query-head rows per decode program: a GQA group (1..8 heads) padded up to a tl.dot-able M.
MIN_BLOCK_H = 16
# Upper bound on decode splits per (sequence, KV head) in the heuristic, and the count used off CUDA.
MAX_SPLITS = 128
CPU_SPLITS = 4
# decode_splits aims for this many decode programs per SM.
PROGRAMS_PER_SM = 2
# Decode batch buckets of the tuning key (decode_batch_bucket): powers of 2, the last one open-ended.
DECODE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# The decode counter buffer's initial size, in (sequence, KV head) pairs: every CUDA-graph bucket
# (up to 256 sequences) of a model with up to 16 KV heads, so it never grows during a capture.
COUNTERS_MIN = 4096
# fp32 elements per merge tile ([MERGE_S splits, MERGE_H heads, BLOCK_D]) per warp.
MERGE_ELEMS_PER_WARP = 1024

# Launch candidates for the sweep (bench/tune_kernels.py). block_n: tokens per K/V tile (power of
# 2, >= 16); num_warps, num_stages: Triton's launch options; min_split_tokens: the fewest tokens a
# split gets (contexts up to that length run in one program with no merge). A config may also set
# max_splits (the grid's splits per (sequence, KV head), any value >= 1; default decode_splits).
DECODE_CANDIDATES = [
    {"block_n": block_n, "num_warps": warps, "num_stages": stages, "min_split_tokens": tokens}
    for block_n in (32, 64, 128)
    for warps in (4, 8)
    for stages in (2, 3)
    for tokens in (64, 128, 256, 512) if tokens >= block_n
]
_DECODE_PARAMS = ("block_n", "num_warps", "num_stages", "min_split_tokens", "max_splits")

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
    """The heuristic max_splits for a decode batch (a tuned or given config may override it):
    enough (sequence, KV head, split) programs to fill the GPU (PROGRAMS_PER_SM per SM) even at
    batch 1 with 2 KV heads, capped at MAX_SPLITS.

    Depends only on its arguments (and the device's SM count), so a CUDA graph captured per batch
    size bakes in one value; the kernel still uses fewer splits for short sequences.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_SPLITS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return splits_for(batch, num_kv_heads, _sm_count(index))


def decode_batch_bucket(batch: int) -> int:
    """The batch's bucket in DECODE_BATCH_BUCKETS: the smallest >= batch, else the last."""
    return next((b for b in DECODE_BATCH_BUCKETS if b >= batch), DECODE_BATCH_BUCKETS[-1])


def decode_key(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_tokens: int,
               dtype: torch.dtype) -> str:
    """The tuning key of a decode call (`batch` is bucketed here, so a bucket or any batch size
    in it gives the same key): 'batch=1,hq=12,hkv=2,d=128,page=16,dtype=bfloat16'."""
    return (f"batch={decode_batch_bucket(batch)},hq={num_q_heads},hkv={num_kv_heads},d={head_dim},"
            f"page={page_tokens},dtype={str(dtype).removeprefix('torch.')}")


def _decode_heuristic(batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device) -> dict:
    max_splits = decode_splits(batch, num_kv_heads, device)
    if device.type != "cuda":  # the interpreter: short splits, so small contexts merge several
        return {"block_n": 32, "num_warps": 4, "num_stages": 1, "min_split_tokens": 32, "max_splits": max_splits}
    # 64-token tiles for 16-bit caches up to D=128 (32 for fp32 or wider heads: registers). Decode
    # is latency bound at batch 1: short splits (128 tokens, 2 tiles) keep each program's chain of
    # dependent loads short; long contexts reach max_splits and get longer splits anyway.
    wide = dtype.itemsize <= 2 and _block_d(head_dim) <= 128
    return {"block_n": 64 if wide else 32, "num_warps": _warps(dtype), "num_stages": 3, "min_split_tokens": 128,
            "max_splits": max_splits}


def decode_config(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_tokens: int,
                  dtype: torch.dtype, device: "torch.device | str", config: "dict | None" = None) -> dict:
    """block_n / num_warps / num_stages / min_split_tokens / max_splits of a decode call: `config`
    (any subset) over the card's tuned entry for decode_key(...) over the heuristic."""
    device = torch.device(device)
    params = _decode_heuristic(batch, num_kv_heads, head_dim, dtype, device)
    key = decode_key(batch, num_q_heads, num_kv_heads, head_dim, page_tokens, dtype)
    for source in (tuning.tuned("decode_attention", key, device), config):
        unknown = set(source or {}) - set(_DECODE_PARAMS)
        if unknown:
            raise ValueError(f"decode attention config: unknown parameters {sorted(unknown)} (known: {_DECODE_PARAMS})")
        params.update(source or {})
    params = {k: int(v) for k, v in params.items()}
    block_n = params["block_n"]
    if block_n < 16 or block_n & (block_n - 1) or min(params.values()) < 1:
        raise ValueError(f"decode attention config: block_n must be a power of 2 >= 16, the rest >= 1: {params}")
    return params


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # kept alive: CUDA graphs captured before a growth point at them


def reset_decode_counters(device: "torch.device | str") -> None:
    """Zeroes the device's decode counters, if it has any yet: called before every forward pass,
    so a counter left set by a launch that never finished cannot poison the calls after it."""
    buf = _COUNTERS.get(_counter_device(device))
    if buf is not None:
        buf.zero_()


def _counter_device(device: "torch.device | str") -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def decode_counters(pairs: int, device: "torch.device | str") -> torch.Tensor:
    """The device's decode counter buffer (int32, all zero between calls), at least `pairs`
    (= batch * Hkv) long: allocated at the first call on the device, grown (to twice the need)
    when a call needs more. Neither may happen during a CUDA-graph capture (the zeroing would be
    captured, and the graph would hold a buffer the next growth replaces): run the batch size
    eagerly first, as the engine's warm-up and graph capture do."""
    device = _counter_device(device)
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= pairs:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"decode attention needs {pairs} counters on {device} during a CUDA-graph capture, "
                           f"but has {0 if buf is None else buf.numel()}: run this batch size eagerly before capturing")
    if buf is not None:
        _OUTGROWN.append(buf)
    buf = torch.zeros(max(COUNTERS_MIN, 2 * pairs), dtype=torch.int32, device=device)
    _COUNTERS[device] = buf
    return buf


# Per-step arguments (see "Compiled variants" above): never specialized on.
_STEP_ARGS = ["block_tables_ptr", "seq_lens_ptr", "stride_btb"]


@triton.jit(do_not_specialize=_STEP_ARGS + ["max_splits", "min_split_tokens"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, counters_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btw,
    stride_ob, stride_oh, stride_od,
    scale_log2, page_tokens, max_splits, min_split_tokens,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, MERGE_H: tl.constexpr, MERGE_S: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (sequence, KV head, split): attention of the KV head's query heads over the split's
    tokens; the only split writes `out`, several are merged by the last to finish (module doc)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    pair = b.to(tl.int64) * tl.num_programs(1) + kv_head  # the (sequence, KV head)

    # Splits used by this sequence, chosen here so the grid stays static.
    seq_len = tl.load(seq_lens_ptr + b)
    n0 = tl.maximum(tl.minimum(max_splits, tl.cdiv(seq_len, min_split_tokens)), 1)
    split_tokens = tl.maximum(tl.cdiv(tl.cdiv(seq_len, n0), BLOCK_N), 1) * BLOCK_N
    num_splits = tl.maximum(tl.cdiv(seq_len, split_tokens), 1)

    if split < num_splits:
        start = split * split_tokens
        end = tl.minimum(start + split_tokens, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < GROUP
        heads = kv_head * GROUP + offs_h
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        hd_mask = h_mask[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=hd_mask, other=0.0)

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
            v_rows = page * stride_vp + slot * stride_vt + kv_head * stride_vh
            # Both tiles are requested before either is used: one memory round trip per tile.
            k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(t_mask[None, :], s, float("-inf"))
            # Every tile has a valid token, so m_new is finite for every row (padded rows score 0).
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        live = l_i > 0.0  # false only for seq_len 0 (one split, zero tokens): a zero row
        out = acc / tl.where(live, l_i, 1.0)[:, None]
        if num_splits == 1:
            tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                     out.to(out_ptr.dtype.element_ty), mask=hd_mask)
        else:
            # Workspace rows [B, Hkv, max_splits, GROUP] of BLOCK_D floats; every used split has tokens.
            rows = (pair * max_splits + split) * GROUP + offs_h
            tl.store(part_out_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], out, mask=hd_mask)
            tl.store(part_lse_ptr + rows, m_i + tl.log2(tl.where(live, l_i, 1.0)), mask=h_mask)
            tl.debug_barrier()  # every thread's partial stores before the release below
            done = tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel") == num_splits - 1
            if done:
                _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, b, kv_head, pair, max_splits, num_splits,
                              stride_ob, stride_oh, stride_od, GROUP, HEAD_DIM, BLOCK_D, MERGE_H, MERGE_S)
                tl.atomic_xchg(counters_ptr + pair, 0, sem="relaxed")  # clean for the next call


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, b, kv_head, pair, max_splits, num_splits,
                  stride_ob, stride_oh, stride_od,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_H: tl.constexpr,
                  MERGE_S: tl.constexpr):
    """out[b, the KV head's query heads] = the LSE-weighted mean of the num_splits partials, read
    in split order in [MERGE_S, MERGE_H, BLOCK_D] tiles: first the max LSE of each head, then the
    weighted sums (no loop-carried dependency between the tiles' loads). Loads are .cg: the
    partials were written by other programs (released to L2 before their counter increment)."""
    offs_s = tl.arange(0, MERGE_S)
    offs_h = tl.arange(0, MERGE_H)
    h_mask = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    first = pair * max_splits  # the pair's first workspace split

    m = tl.full([MERGE_H], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, MERGE_S):
        rows = (first + s0 + offs_s)[:, None] * GROUP + offs_h[None, :]
        sh_mask = (s0 + offs_s < num_splits)[:, None] & h_mask[None, :]
        lse = tl.load(part_lse_ptr + rows, mask=sh_mask, other=float("-inf"), cache_modifier=".cg")
        m = tl.maximum(m, tl.max(lse, 0))
    m = tl.where(m > float("-inf"), m, 0.0)  # padded heads: no -inf - -inf

    total = tl.zeros([MERGE_H], dtype=tl.float32)
    acc = tl.zeros([MERGE_H, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, MERGE_S):
        rows = (first + s0 + offs_s)[:, None] * GROUP + offs_h[None, :]
        sh_mask = (s0 + offs_s < num_splits)[:, None] & h_mask[None, :]
        lse = tl.load(part_lse_ptr + rows, mask=sh_mask, other=float("-inf"), cache_modifier=".cg")
        parts = tl.load(part_out_ptr + rows[:, :, None] * BLOCK_D + offs_d[None, None, :],
                        mask=sh_mask[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
        w = tl.exp2(lse - m[None, :])  # 0 for masked entries
        total += tl.sum(w, 0)
        acc += tl.sum(parts * w[:, :, None], 0)
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    heads = kv_head * GROUP + offs_h
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])


def _merge_splits_tile(group: int, block_d: int, num_warps: int) -> tuple[int, int]:
    """(MERGE_H, MERGE_S): the group's heads (a power of 2) by as many splits as fit in
    MERGE_ELEMS_PER_WARP fp32 elements per warp. Depends on the model and the launch only."""
    merge_h = triton.next_power_of_2(group)
    budget = MERGE_ELEMS_PER_WARP * num_warps // (merge_h * block_d)
    return merge_h, max(1, triton.next_power_of_2(budget + 1) // 2)  # the largest power of 2 <= budget


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], block_tables [B, W] int32, seq_lens [B] int32 (context including the new
    token; 0 gives a zero row) -> out [B, Hq, D] in q's dtype.

    One launch, no host syncs and a grid fixed by (B, Hkv, max_splits): safe to capture in a CUDA
    graph (once this batch size has run eagerly on the device: decode_counters). `config`
    (DECODE_CANDIDATES' parameters, any subset) overrides the card's tuned entry and the
    heuristics (decode_config); `max_splits` overrides both.
    """
    batch, num_heads, head_dim = q.shape
    _, page_tokens, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = _new_out(q)
    if batch == 0:
        return out
    params = decode_config(batch, num_heads, num_kv_heads, head_dim, page_tokens, k_cache.dtype, q.device, config)
    if max_splits is not None:
        params["max_splits"] = max(1, int(max_splits))
    splits, num_warps = params["max_splits"], params["num_warps"]
    group = num_heads // num_kv_heads
    block_d = _block_d(head_dim)
    merge_h, merge_s = _merge_splits_tile(group, block_d, num_warps)
    # The workspace is only written for sequences that use several splits; never initialised.
    rows = batch * num_heads * splits
    part_out = torch.empty(rows * block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(rows, dtype=torch.float32, device=q.device)
    counters = decode_counters(batch * num_kv_heads, q.device)
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, counters,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        scale * _LOG2E, page_tokens, splits, params["min_split_tokens"],
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(MIN_BLOCK_H, triton.next_power_of_2(group)),
        BLOCK_N=params["block_n"], BLOCK_D=block_d, MERGE_H=merge_h, MERGE_S=merge_s,
        DOT_PRECISION=_dot_precision(k_cache.dtype), num_warps=num_warps, num_stages=params["num_stages"],
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


def extend_launch(dtype: torch.dtype, block_d: int, device_type: str, major: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of extend on a device of compute capability `major`.x: 64x64
    tiles on GPU, 32x32 past D=128 or for fp32 (IEEE dots need about 4x the shared memory); small
    tiles in the CPU interpreter, which simulates every tile. Before Hopper the 64x128 fp32
    accumulator of D=128 lives in mma.sync registers: 4 warps need more than 255 a thread and
    spill on sm_80, so 8 warps share it there (bench/compile_check.py checks every card's choice).
    One value per model (dtype, head dim) and device: never chosen from a step's shape."""
    if device_type != "cuda":
        return 16, 16, _warps(dtype)
    if block_d <= 128 and dtype.itemsize <= 2:
        return 64, 64, 8 if major < 9 and block_d == 128 else _warps(dtype)
    return 32, 32, _warps(dtype)


@functools.lru_cache(maxsize=None)
def _major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0


def _extend_launch(q: torch.Tensor, block_d: int) -> tuple[int, int, int]:
    return extend_launch(q.dtype, block_d, q.device.type, _major(q.device))


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
    block_m, block_n, num_warps = _extend_launch(q, block_d)
    _extend_kernel[(batch, num_heads, triton.cdiv(max_query_len, block_m))](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        scale * _LOG2E, page_tokens,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_PRECISION=_dot_precision(k_cache.dtype), num_warps=num_warps,
    )
    return out
