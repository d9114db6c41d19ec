"""Triton sample-and-detect: the GPU twin of `sample.sample_and_detect_ref`.

One program per row loops over the vocabulary in blocks, so nothing vocabulary-sized is written
and nothing needs a host sync (it runs right after a CUDA-graph replay). Pass 1 finds the max, the
softmax sum (for the logprob) and the argmax, and for sampled rows without filters runs the race
too, so greedy and plain-temperature rows read their logits once. Filtered rows instead search
their thresholds without sorting: over the order-preserving int32 image of the fp32 logits, the
largest key tau with W(tau) >= target, W(tau) being the weight of the logits whose key is >= tau
(weight 1 and target k for top-k; mass exp((x - max) / T) within the top-k set and target
top_p * its total for top-p), testing PIVOTS keys per pass over the row (at most 8 passes for 16);
then one more pass runs the race over the logits >= the threshold.
"""

import torch
import triton
import triton.language as tl

from . import sample

# Globals a jit function reads must be constexpr.
NEG_INF = tl.constexpr(float("-inf"))
INT32_MAX = tl.constexpr(2**31 - 1)
CLOSING = tl.constexpr(sample.CLOSING)
STOP = tl.constexpr(sample.STOP)
STATE_SHIFT = tl.constexpr(sample.STATE_SHIFT)
_PIVOTS = 16
# Stop ids are compared STOP_BLOCK at a time, however many a row has: the width of a step's stop
# ids changes from step to step and must not pick a new compiled variant.
STOP_BLOCK = 16


@triton.jit
def _key(x):
    """fp32 -> int32 in the same order (-0.0 just below +0.0)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _value(k):
    """The inverse of _key."""
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (wrapping products, logical shifts): sample.noise_uniform's mix32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _race_scores(x, offs, inv_t, key_lo, key_hi):
    """x / T + Gumbel noise from sample.noise_uniform's hash: the uniform is bit-exact; the logs are
    the device's, so a token can differ from the reference's only at a near-tie (no FMA contraction)."""
    h = _mix32(offs.to(tl.uint32) * 0x9E3779B9 + key_lo)
    h = _mix32(h ^ key_hi)
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
    return x * inv_t - tl.log(-tl.log(u))


@triton.jit
def _load(row, offs, valid, row_len):
    """Logits at `offs`, -inf where not `valid` (past the real vocabulary). The load itself is
    masked by the row's length, a multiple of 16 for real vocabularies, so it stays 16-byte wide."""
    return tl.where(valid, tl.load(row + offs, mask=offs < row_len, other=NEG_INF), NEG_INF)


@triton.jit
def _first_max(best, arg):
    """The smallest `arg` among the lanes holding the largest `best` (torch.argmax's tie rule)."""
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, arg, INT32_MAX), axis=0)


@triton.jit
def _mass(row, row_len, real_vocab, floor, m, inv_t, BLOCK: tl.constexpr):
    """Sum of exp((x - m) / T) over the logits x >= floor."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, real_vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < real_vocab
        x = _load(row, offs, valid, row_len)
        acc += tl.where(valid & (x >= floor), tl.exp((x - m) * inv_t), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _search(row, row_len, real_vocab, lo, hi, target, floor, m, inv_t, MASS: tl.constexpr, BLOCK: tl.constexpr,
            PIVOTS: tl.constexpr):
    """The largest key tau in [lo, hi] with W(tau) >= target, W(tau) summing the weights (1, or
    exp((x - m) / T) with MASS) of the logits x >= floor whose key is >= tau. The caller promises
    W(lo) >= target; each pass tests PIVOTS keys spread over (lo, hi]."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    step = (tl.arange(0, PIVOTS) + 1).to(tl.int64)
    while lo < hi:
        pivots = lo + ((hi - lo) * step + (PIVOTS - 1)) // PIVOTS
        pivots32 = pivots.to(tl.int32)
        acc = tl.zeros([BLOCK, PIVOTS], tl.float32)  # reduced once per pass, not per block
        for start in range(0, real_vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < real_vocab
            x = _load(row, offs, valid, row_len)
            keep = valid & (x >= floor)
            if MASS:
                w = tl.where(keep, tl.exp((x - m) * inv_t), 0.0)
            else:
                w = tl.where(keep, 1.0, 0.0)
            above = _key(x)[:, None] >= pivots32[None, :]
            acc += tl.where(above, w[:, None], 0.0)
        ok = tl.sum(acc, axis=0) >= target
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, pivots - 1), axis=0)
    return lo.to(tl.int32)


@triton.jit
def _race_update(score, offs, best, arg):
    """Each lane keeps its best race score so far and the id that scored it."""
    win = score > best
    return tl.where(win, score, best), tl.where(win, offs, arg)


@triton.jit
def _race(row, row_len, real_vocab, floor, inv_t, key_lo, key_hi, BLOCK: tl.constexpr):
    """The winner of the Gumbel race over the logits >= floor."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], NEG_INF, tl.float32)
    arg = lanes
    for start in range(0, real_vocab, BLOCK):
        offs = start + lanes
        valid = offs < real_vocab
        x = _load(row, offs, valid, row_len)
        score = tl.where(valid & (x >= floor), _race_scores(x, offs, inv_t, key_lo, key_hi), NEG_INF)
        best, arg = _race_update(score, offs, best, arg)
    return _first_max(best, arg)


# Arguments that change from step to step, never specialized on: the per-row inputs are views at
# offsets that depend on the row count (one packed buffer), the stop-id width varies, and the
# vocabulary sizes and table strides are only read in scalar arithmetic. row_stride and row_len
# (the logits' padded vocabulary) stay specialized: they keep the row loads 16 bytes wide.
_STEP_ARGS = ["temp_ptr", "top_k_ptr", "top_p_ptr", "keys_ptr", "real_vocab", "det_ptr", "next_stride",
              "flags_stride", "stop_ptr", "stop_stride", "num_stops"]


@triton.jit(do_not_specialize=_STEP_ARGS)
def _sample_detect_kernel(logits_ptr, row_stride, row_len, temp_ptr, top_k_ptr, top_p_ptr, keys_ptr, real_vocab,
                          det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr,
                          stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
                          GREEDY: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
                          PIVOTS: tl.constexpr, STOPS: tl.constexpr):
    pid = tl.program_id(0)
    row = logits_ptr + pid.to(tl.int64) * row_stride
    t = tl.load(temp_ptr + pid)
    k = tl.load(top_k_ptr + pid)
    p = tl.load(top_p_ptr + pid)
    key = tl.load(keys_ptr + pid)
    key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
    key_hi = (key >> 32).to(tl.uint32)
    sampled = t >= GREEDY
    use_k = sampled & (k > 0) & (k < real_vocab)
    use_p = sampled & (p < 1.0)
    plain = sampled & ((k <= 0) | (k >= real_vocab)) & (p >= 1.0)
    inv_t = tl.div_rn(1.0, tl.maximum(t, GREEDY))  # correctly rounded, as torch's 1 / T

    # Pass 1: per-lane running max (online softmax sum), argmax, smallest key, plain rows' race.
    lanes = tl.arange(0, BLOCK)
    m_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    s_lane = tl.zeros([BLOCK], tl.float32)
    arg_lane = lanes
    kmin_lane = tl.full([BLOCK], INT32_MAX, tl.int32)
    race_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    race_arg = lanes
    for start in range(0, real_vocab, BLOCK):
        offs = start + lanes
        valid = offs < real_vocab
        x = _load(row, offs, valid, row_len)
        arg_lane = tl.where(x > m_lane, offs, arg_lane)
        new_m = tl.maximum(m_lane, x)
        shift = tl.where(new_m == NEG_INF, 0.0, new_m)
        s_lane = s_lane * tl.exp(m_lane - shift) + tl.exp(x - shift)
        m_lane = new_m
        kmin_lane = tl.minimum(kmin_lane, tl.where(valid, _key(x), INT32_MAX))
        if plain:
            race_lane, race_arg = _race_update(_race_scores(x, offs, inv_t, key_lo, key_hi), offs, race_lane, race_arg)
    m = tl.max(m_lane, axis=0)
    total = tl.sum(s_lane * tl.exp(m_lane - tl.where(m == NEG_INF, 0.0, m)), axis=0)
    tok = _first_max(m_lane, arg_lane)
    if plain:
        tok = _first_max(race_lane, race_arg)
    if use_k | use_p:
        floor_key = tl.min(kmin_lane, axis=0)
        if use_k:
            floor_key = _search(row, row_len, real_vocab, floor_key, _key(m), k.to(tl.float32), _value(floor_key), m, inv_t,
                                False, SEARCH_BLOCK, PIVOTS)
        if use_p:
            floor = _value(floor_key)
            target = p * _mass(row, row_len, real_vocab, floor, m, inv_t, BLOCK)
            floor_key = _search(row, row_len, real_vocab, floor_key, _key(m), target, floor, m, inv_t, True, SEARCH_BLOCK, PIVOTS)
        tok = _race(row, row_len, real_vocab, _value(floor_key), inv_t, key_lo, key_hi, BLOCK)

    state = tl.load(det_ptr + pid)
    detect = state >= 0
    state = tl.maximum(state, 0).to(tl.int64)
    nxt = tl.load(next_ptr + state * next_stride + tok, mask=detect, other=0)
    flags = tl.load(flags_ptr + state * flags_stride + tok, mask=detect, other=0).to(tl.int32)
    closes = tl.load(closing_ptr + nxt, mask=detect, other=0).to(tl.int32) != 0
    word = tl.where(detect, (nxt << STATE_SHIFT) | flags | tl.where(closes, CLOSING, 0), 0)
    stop_row = stop_ptr + pid.to(tl.int64) * stop_stride
    hits = 0
    for s0 in range(0, num_stops, STOPS):
        stop_cols = s0 + tl.arange(0, STOPS)
        stops = tl.load(stop_row + stop_cols, mask=stop_cols < num_stops, other=-1)
        hits += tl.sum((stops == tok).to(tl.int32), axis=0)
    word = word | tl.where(hits > 0, STOP, 0)
    tl.store(tok_ptr + pid, tok)
    tl.store(word_ptr + pid, word)
    tl.store(lp_ptr + pid, tl.load(row + tok) - m - tl.log(total))


def sample_and_detect(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      keys: torch.Tensor, real_vocab: int, det_states: torch.Tensor, next_state: torch.Tensor,
                      tag_flags: torch.Tensor, closing: torch.Tensor, stop_ids: torch.Tensor,
                      out: "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None" = None,
                      block: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_and_detect_ref`, fused (see there for the arguments and results); written into
    `out` = (tokens int32, words int32, logprobs fp32) when given. Dtypes as the engine's
    sampling.RowInputs gives them: temperature / top_p fp32, top_k / det_states / stop_ids /
    next_state int32, keys int64; logits fp32 with contiguous rows. `block` (a power of 2 >= 64)
    is the pass length; the threshold search uses block // 4 lanes x PIVOTS keys."""
    n = logits.shape[0]
    if out is None:
        out = (torch.empty(n, dtype=torch.int32, device=logits.device),
               torch.empty(n, dtype=torch.int32, device=logits.device),
               torch.empty(n, dtype=torch.float32, device=logits.device))
    if logits.stride(1) != 1:
        raise ValueError("sample_and_detect needs logits rows contiguous in memory")
    if n:
        num_stops = stop_ids.shape[1]
        stops = stop_ids if num_stops else det_states  # never read when there are no stop ids
        _sample_detect_kernel[(n,)](
            logits, logits.stride(0), logits.shape[1], temperature, top_k, top_p, keys, real_vocab,
            det_states, next_state, next_state.stride(0), tag_flags, tag_flags.stride(0), closing,
            stops, stops.stride(0), num_stops, *out,
            GREEDY=sample.GREEDY_BELOW, BLOCK=block, SEARCH_BLOCK=block // 4, PIVOTS=_PIVOTS,
            STOPS=STOP_BLOCK, num_warps=min(max(block // 256, 4), 16),
            enable_fp_fusion=False)  # an FMA would round the race scores differently from torch
    return out
