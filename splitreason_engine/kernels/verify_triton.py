"""Triton speculative-decoding verification: the GPU twin of `verify.verify_rows_ref`, one launch per
verify step.

One program per row walks the row's vocabulary in blocks, a few times over: a verify step has at
most a few hundred rows (drafts + 1 per request), so a row needs no cross-program merge, no scratch
buffer and no counter, and nothing vocabulary-sized is allocated.

- statistics: the biased logits' max, first argmax and smallest key; the raw logits' max and
  softmax sum (the logprobs) and the non-finite flag. A greedy row is then decided.
- threshold (rows with top-k / top-p): the search of sample_triton over the order-preserving int32
  keys of the logits, run to the end inside the program: each pass weighs PIVOTS keys spread over
  the interval (lo, hi] and keeps the part where the threshold lies (top-k by counts, then top-p by
  the masses exp((x - max) / T) of the top-k set, as sample._thresholds defines them).
- mass: the softmax sum of the kept logits / T, so p(i) is known per id; then p(d), q(d) and the
  acceptance draw.
- race: the Gumbel race over log max(0, p - q) for a row with a draft (again over log p where that
  is empty), over log p for a row without one; the uniforms are sample.noise_uniform's, bit for bit.

The logs and exps are the device's (no FMA contraction), so a token or an acceptance can differ
from the reference's only at a near-tie (see verify.py).
"""

import torch
import triton
import triton.language as tl

from .sample_triton import _first_max, _key, _load, _mix32, _pivot_weights, _race_scores, _race_update, _value
from .verify import ACCEPT_ID as _ACCEPT_ID

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
INT32_MAX = tl.constexpr(2**31 - 1)
ACCEPT_ID = tl.constexpr(_ACCEPT_ID)
# What a race weighs: log p (a row without a draft), log max(0, p - q) (a draft row), log p again
# (a draft row whose max(0, p - q) is empty, as the reference computes it: log(exp(log p))).
PLAIN, RESIDUAL, FALLBACK = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _uniform(ids, key_lo, key_hi):
    """sample.noise_at's uniform of (key, ids) for uint32 ids (the hash of _race_scores)."""
    h = _mix32(ids * 0x9E3779B9 + key_lo)
    h = _mix32(h ^ key_hi)
    return ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23


@triton.jit
def _statistics(row, raw, separate, row_len, real_vocab, BLOCK: tl.constexpr):
    """(max, first argmax, smallest key) of the biased logits; (max, softmax sum relative to it,
    non-finite flag) of the raw ones, which are read only when `separate` (else they are `row`)."""
    lanes = tl.arange(0, BLOCK)
    raw_len = row_len * separate  # 0: nothing read (a multiple of 16 like row_len: the loads stay wide)
    m_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    arg_lane = lanes
    kmin_lane = tl.full([BLOCK], INT32_MAX, tl.int32)
    rm_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    rs_lane = tl.zeros([BLOCK], tl.float32)
    bad_lane = tl.zeros([BLOCK], tl.int32)
    for start in range(0, real_vocab, BLOCK):
        offs = start + lanes
        valid = offs < real_vocab
        x = _load(row, offs, valid, row_len)
        xr = tl.load(raw + offs, mask=offs < raw_len, other=NEG_INF).to(tl.float32)
        xr = tl.where(valid & (offs < raw_len), xr, x)
        bad_lane = bad_lane | (valid & ((xr != xr) | (tl.abs(xr) == POS_INF))).to(tl.int32)
        m_lane, arg_lane = _race_update(x, offs, m_lane, arg_lane)
        kmin_lane = tl.minimum(kmin_lane, tl.where(valid, _key(x), INT32_MAX))
        new_m = tl.maximum(rm_lane, xr)
        shift = tl.where(new_m == NEG_INF, 0.0, new_m)
        rs_lane = rs_lane * tl.exp(rm_lane - shift) + tl.exp(xr - shift)
        rm_lane = new_m
    rm = tl.max(rm_lane, axis=0)
    rs = tl.sum(rs_lane * tl.exp(rm_lane - tl.where(rm == NEG_INF, 0.0, rm)), axis=0)
    return (tl.max(m_lane, axis=0), _first_max(m_lane, arg_lane), tl.min(kmin_lane, axis=0), rm, rs,
            tl.max(bad_lane, axis=0))


@triton.jit
def _threshold(row, row_len, real_vocab, lo, hi, target, top_p, m, inv_t, MASS: tl.constexpr,
               SEARCH_BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
    """The largest key tau in [lo, hi] with W(tau) >= target, W(tau) the weight of the logits whose
    key is >= tau: 1 each (top-k, target k) or with MASS exp((x - m) * inv_t) (top-p; a negative
    target becomes top_p * W(lo) at the first pass). W(lo) >= target on entry."""
    while lo < hi:
        lo64 = lo.to(tl.int64)
        step = (tl.arange(0, PIVOTS) + 1).to(tl.int64)
        pivots = (lo64 + ((hi.to(tl.int64) - lo64) * step + (PIVOTS - 1)) // PIVOTS).to(tl.int32)
        weights, total = _pivot_weights(row, row_len, 0, real_vocab, lo, pivots, m, inv_t, MASS, SEARCH_BLOCK, PIVOTS)
        target = tl.where(target < 0, top_p * total, target)
        ok = weights >= target
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, pivots - 1), axis=0)
    return lo


@triton.jit
def _kept_mass(row, row_len, real_vocab, floor, mz, inv_t, BLOCK: tl.constexpr):
    """sum(exp(x / T - mz)) over the logits >= floor: the softmax sum of the filtered row."""
    lanes = tl.arange(0, BLOCK)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, real_vocab, BLOCK):
        offs = start + lanes
        x = _load(row, offs, offs < real_vocab, row_len)
        s += tl.where(x >= floor, tl.exp(x * inv_t - mz), 0.0)
    return tl.sum(s, axis=0)


@triton.jit
def _race(row, q_row, row_len, real_vocab, floor, mz, log_s, inv_t, key_lo, key_hi, mode, BLOCK: tl.constexpr):
    """The Gumbel race's winner (lowest id on ties) over the `mode` weights (PLAIN / RESIDUAL /
    FALLBACK), and whether any id has p > q (RESIDUAL: else the race is run again as FALLBACK)."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], NEG_INF, tl.float32)
    arg = lanes
    positive = tl.zeros([BLOCK], tl.int32)
    q_len = tl.where(mode == RESIDUAL, real_vocab, 0)  # q is read only by a residual race
    for start in range(0, real_vocab, BLOCK):
        offs = start + lanes
        valid = offs < real_vocab
        x = _load(row, offs, valid, row_len)
        keep = valid & (x >= floor)
        logp = x * inv_t - mz - log_s
        q = tl.load(q_row + offs, mask=offs < q_len, other=0.0)
        r = tl.maximum(tl.where(keep, tl.exp(logp), 0.0) - q, 0.0)
        live = keep & ((mode == PLAIN) | (r > 0))
        base = tl.where(mode == PLAIN, logp, tl.log(tl.where(r > 0, r, 1.0)))
        score = tl.where(live, _race_scores(base, offs, 1.0, key_lo, key_hi), NEG_INF)
        best, arg = _race_update(score, offs, best, arg)
        positive = positive | (valid & (r > 0)).to(tl.int32)
    return _first_max(best, arg), tl.max(positive, axis=0)


# Arguments that change from step to step, never specialized on: the per-row settings are views at
# offsets that depend on the row count (sampling.RowInputs' one buffer), `separate` is 0 or 1, q's
# width and the vocabulary are only read in scalar arithmetic. The logits' row stride and length
# stay specialized: they keep the row loads 16 bytes wide.
_STEP_ARGS = ["separate", "q_stride", "drafts_ptr", "temp_ptr", "top_k_ptr", "top_p_ptr", "keys_ptr", "real_vocab"]


@triton.jit(do_not_specialize=_STEP_ARGS)
def _verify_kernel(logits_ptr, row_stride, raw_ptr, raw_stride, separate, row_len, q_ptr, q_stride, drafts_ptr,
                   temp_ptr, top_k_ptr, top_p_ptr, keys_ptr, real_vocab,
                   tok_ptr, accepted_ptr, tok_lp_ptr, draft_lp_ptr, finite_ptr,
                   BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
    r = tl.program_id(0)
    row = logits_ptr + r.to(tl.int64) * row_stride
    raw = raw_ptr + r.to(tl.int64) * raw_stride
    q_row = q_ptr + r.to(tl.int64) * q_stride
    d = tl.load(drafts_ptr + r)
    has_draft = d >= 0
    dc = tl.maximum(d, 0)
    t = tl.load(temp_ptr + r)
    m, tok, kmin, rm, rs, bad = _statistics(row, raw, separate, row_len, real_vocab, BLOCK)
    accepted = has_draft & (tok == d)
    if t != 0.0:
        k = tl.load(top_k_ptr + r)
        top_p = tl.load(top_p_ptr + r)
        key = tl.load(keys_ptr + r)
        key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
        key_hi = (key >> 32).to(tl.uint32)
        inv_t = tl.div_rn(1.0, t)  # correctly rounded, as torch's 1 / T
        use_k = (k > 0) & (k < real_vocab)
        use_p = top_p < 1.0
        lo = kmin
        if use_k:
            lo = _threshold(row, row_len, real_vocab, lo, _key(m), k.to(tl.float32), top_p, m, inv_t, False,
                            SEARCH_BLOCK, PIVOTS)
        if use_p:
            lo = _threshold(row, row_len, real_vocab, lo, _key(m), tl.full([], -1.0, tl.float32), top_p, m, inv_t,
                            True, SEARCH_BLOCK, PIVOTS)
        floor = tl.where(use_k | use_p, _value(lo), NEG_INF)
        mz = m * inv_t
        log_s = tl.log(_kept_mass(row, row_len, real_vocab, floor, mz, inv_t, BLOCK))
        xd = tl.load(row + dc).to(tl.float32)
        pd = tl.where(xd >= floor, tl.exp(xd * inv_t - mz - log_s), 0.0)
        qd = tl.load(q_row + dc, mask=has_draft, other=0.0)
        u = _uniform(tl.full([], ACCEPT_ID, tl.uint32), key_lo, key_hi)
        accepted = has_draft & (u * qd < pd)
        tok, positive = _race(row, q_row, row_len, real_vocab, floor, mz, log_s, inv_t, key_lo, key_hi,
                              tl.where(has_draft, RESIDUAL, PLAIN), BLOCK)
        if has_draft & (positive == 0):
            tok, positive = _race(row, q_row, row_len, real_vocab, floor, mz, log_s, inv_t, key_lo, key_hi,
                                  FALLBACK, BLOCK)
    tok = tl.where((tok >= 0) & (tok < real_vocab), tok, 0)  # only a non-finite row can leave none
    tl.store(tok_ptr + r, tok)
    tl.store(accepted_ptr + r, accepted)
    tl.store(tok_lp_ptr + r, tl.load(raw + tok).to(tl.float32) - rm - tl.log(rs))
    tl.store(draft_lp_ptr + r, tl.load(raw + dc).to(tl.float32) - rm - tl.log(rs))
    tl.store(finite_ptr + r, bad == 0)


def _heuristic(device: torch.device) -> dict:
    if device.type != "cuda":  # the interpreter: short blocks over small vocabularies
        return {"block": 256, "search_block": 64, "pivots": 16, "num_warps": 4}
    return {"block": 1024, "search_block": 256, "pivots": 16, "num_warps": 8}


def launch_config(device: "torch.device | str", config: "dict | None" = None) -> dict:
    """block / search_block / pivots (powers of 2: >= 64, >= 16, >= 4) / num_warps: `config` over
    the device's heuristic."""
    params = {**_heuristic(torch.device(device)), **(config or {})}
    block, search_block, pivots = int(params["block"]), int(params["search_block"]), int(params["pivots"])
    if any(v < low or v & (v - 1) for v, low in ((block, 64), (search_block, 16), (pivots, 4))):
        raise ValueError(f"verify config: block, search_block and pivots must be powers of 2 "
                         f"(>= 64, >= 16, >= 4), got {params}")
    return params


def verify_rows(logits: torch.Tensor, raw_logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
                temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
                real_vocab: int, config: "dict | None" = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`verify_rows_ref`, in one launch (see there for the arguments and results). Dtypes as
    speculation.verify gives them: drafts / keys int64, temperature / top_p / q fp32, top_k int32;
    logits and raw_logits fp32, fp16 or bf16 of one shape with contiguous rows (one tensor when no
    row has a logit bias: it is then read once). `config`: launch_config's overrides."""
    n, device = logits.shape[0], logits.device
    out = (torch.empty(n, dtype=torch.int32, device=device), torch.empty(n, dtype=torch.bool, device=device),
           torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device),
           torch.empty(n, dtype=torch.bool, device=device))
    if raw_logits.shape != logits.shape or any(t.stride(-1) != 1 for t in (logits, raw_logits, q)):
        raise ValueError("verify_rows needs logits and raw_logits of one shape and rows contiguous in memory")
    if n == 0:
        return out
    separate = not (raw_logits.data_ptr() == logits.data_ptr() and raw_logits.stride() == logits.stride()
                    and raw_logits.dtype == logits.dtype)
    params = launch_config(device, config)
    _verify_kernel[(n,)](logits, logits.stride(0), raw_logits, raw_logits.stride(0), int(separate), logits.shape[1],
                         q, q.stride(0), drafts, temperature, top_k, top_p, keys, real_vocab, *out,
                         BLOCK=params["block"], SEARCH_BLOCK=params["search_block"], PIVOTS=params["pivots"],
                         num_warps=params["num_warps"],
                         enable_fp_fusion=False)  # an FMA would round the race scores differently from torch
    return out
