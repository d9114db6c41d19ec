"""Triton sample-and-detect: the GPU twin of `sample.sample_and_detect_ref`.

Each row's vocabulary is split over many programs (grid rows x chunks, `chunk` ids each), so one
row uses many SMs. Cross-program results go through small scratch buffers and the "last program
finishes" pattern: every program writes its partial, then bumps a per-row counter; the one that
sees the count reach chunks - 1 merges the row's partials, in chunk order (sums in a fixed order:
deterministic), and resets the counter to 0 for the next launch (CUDA-graph replays work). No
host sync, nothing specialized on per-step values.

The one kernel runs in phases, each a launch of the same compiled variant (`phase` is a runtime
argument):

- phase 0, statistics: per chunk the max, the softmax sum relative to the chunk max, the argmax,
  the smallest key, the non-finite flag and, for sampled rows without filters, the Gumbel race.
  The merge finishes greedy and plain-temperature rows (token, word, logprob): with
  `filters=False` (no row uses top-k / top-p) this is the only launch.
- phases 1..S, threshold search (rows with top-k / top-p): over the order-preserving int32 image
  of the fp32 logits, the largest key tau with W(tau) >= target, W(tau) the weight of the logits
  whose key is >= tau (weight 1 and target k for top-k; mass exp((x - max) / T) and target
  top_p * the mass of the top-k set for top-p). Each pass tests PIVOTS keys spread over the row's
  interval (lo, hi]: the chunks accumulate their weights at the pivots, the merge sums them and
  narrows the interval. Top-k converges in at most P passes (P = passes(PIVOTS)), then top-p
  starts from its threshold; S = 2P launches cover both. Converged rows' programs return at once.
- phase S + 1, race: per chunk the Gumbel race over the logits >= the threshold; the merge picks
  the best (ties to the lowest id, as torch.argmax) and finishes the row.

The thresholds are exact (integer keys, integer counts); the top-p masses are sums in another
order than the reference's, so the crossing can differ where the cumulative mass is within fp32
rounding of the target (see sample.py).
"""

import torch
import triton
import triton.language as tl

from . import sample, tuning

# Globals a jit function reads must be constexpr.
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
INT32_MAX = tl.constexpr(2**31 - 1)
CLOSING = tl.constexpr(sample.CLOSING)
STOP = tl.constexpr(sample.STOP)
NONFINITE = tl.constexpr(sample.NONFINITE)
STATE_SHIFT = tl.constexpr(sample.STATE_SHIFT)
# Stop ids are compared STOP_BLOCK at a time, however many a row has: the width of a step's stop
# ids changes from step to step and must not pick a new compiled variant.
STOP_BLOCK = 16
MERGE_BLOCK = 32  # chunks' partials read per step of a merge

# Row modes (row_i[:, 0]).
M_DONE = tl.constexpr(0)  # greedy or plain: finished in phase 0
M_TOPK = tl.constexpr(1)  # searching the top-k threshold
M_TOPP_START = tl.constexpr(2)  # searching top-p; its target comes with the next pass's total
M_TOPP = tl.constexpr(3)  # searching top-p
M_RACE = tl.constexpr(4)  # threshold found: the race is next
ROW_F, ROW_I = 4, 4  # row state widths: (max, softmax sum, target, -), (mode, lo, hi, non-finite)

# Launch candidates for the sweep (bench/tune_kernels.py): block (ids per step, power of 2 >= 64),
# chunk (ids per program, a multiple of block), num_warps, pivots (keys tested per search pass,
# power of 2 >= 4; fewer passes with more pivots, more work per pass).
SAMPLE_CANDIDATES = [
    {"block": block, "chunk": chunk, "num_warps": warps, "pivots": pivots}
    for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8))
    for chunk in (2048, 4096, 8192, 16384) if chunk >= block
    for pivots in (16, 32)
]


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
    """fp32 logits at `offs`, -inf where not `valid`. The load itself is masked by the row's length,
    a multiple of 16 for real vocabularies, so it stays 16-byte wide."""
    x = tl.load(row + offs, mask=offs < row_len, other=NEG_INF).to(tl.float32)
    return tl.where(valid, x, NEG_INF)


@triton.jit
def _first_max(best, arg):
    """The smallest `arg` among the lanes holding the largest `best` (torch.argmax's tie rule)."""
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, arg, INT32_MAX), axis=0)


@triton.jit
def _race_update(score, offs, best, arg):
    """Each lane keeps its best race score so far and the id that scored it."""
    win = score > best
    return tl.where(win, score, best), tl.where(win, offs, arg)


@triton.jit
def _last(count_ptr, num_chunks):
    """True in the last program of the row to get here (after every other chunk's partial is
    written); that program also resets the counter for the next launch."""
    tl.debug_barrier()  # every thread's partial stores before the release below
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel") == num_chunks - 1
    if done:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")
    return done


@triton.jit
def _merge_max(pf, pi, num_chunks, PW: tl.constexpr, CB: tl.constexpr):
    """Row max, its first argmax, the smallest key and the non-finite flag from phase 0's partials."""
    m = NEG_INF
    arg = INT32_MAX
    kmin = INT32_MAX
    bad = 0
    for c0 in range(0, num_chunks, CB):
        cs = c0 + tl.arange(0, CB)
        ok = cs < num_chunks
        mc = tl.load(pf + cs * PW, mask=ok, other=NEG_INF, cache_modifier=".cg")
        ac = tl.load(pi + cs * 4, mask=ok, other=INT32_MAX, cache_modifier=".cg")
        top = tl.max(mc, axis=0)
        a = tl.min(tl.where(mc == top, ac, INT32_MAX), axis=0)
        arg = tl.where((top > m) | (arg == INT32_MAX), a, arg)  # earlier chunks win ties
        m = tl.maximum(m, top)
        kmin = tl.minimum(kmin, tl.min(tl.load(pi + cs * 4 + 1, mask=ok, other=INT32_MAX, cache_modifier=".cg"), axis=0))
        bad = bad | tl.max(tl.load(pi + cs * 4 + 2, mask=ok, other=0, cache_modifier=".cg"), axis=0)
    return m, arg, kmin, bad


@triton.jit
def _merge_sum(pf, num_chunks, m, PW: tl.constexpr, CB: tl.constexpr):
    """The softmax sum relative to the row max m from the chunks' sums relative to their own max."""
    shift = tl.where(m == NEG_INF, 0.0, m)
    s = 0.0
    for c0 in range(0, num_chunks, CB):
        cs = c0 + tl.arange(0, CB)
        ok = cs < num_chunks
        mc = tl.load(pf + cs * PW, mask=ok, other=NEG_INF, cache_modifier=".cg")
        sc = tl.load(pf + cs * PW + 1, mask=ok, other=0.0, cache_modifier=".cg")
        s += tl.sum(tl.where(ok, sc * tl.exp(mc - shift), 0.0), axis=0)
    return s


@triton.jit
def _merge_race(pf, pi, num_chunks, PW: tl.constexpr, CB: tl.constexpr, SLOT: tl.constexpr):
    """The race winner over the chunks' winners (score at pf[SLOT], id at pi[3]): lowest id on ties."""
    best = NEG_INF
    tok = INT32_MAX
    for c0 in range(0, num_chunks, CB):
        cs = c0 + tl.arange(0, CB)
        ok = cs < num_chunks
        sc = tl.load(pf + cs * PW + SLOT, mask=ok, other=NEG_INF, cache_modifier=".cg")
        ic = tl.load(pi + cs * 4 + 3, mask=ok, other=INT32_MAX, cache_modifier=".cg")
        top = tl.max(sc, axis=0)
        t = tl.min(tl.where(ok & (sc == top), ic, INT32_MAX), axis=0)
        tok = tl.where((top > best) | (tok == INT32_MAX), t, tok)
        best = tl.maximum(best, top)
    return tok


@triton.jit
def _finish(r, tok, real_vocab, row, m, s, bad, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr,
            stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr, STOPS: tl.constexpr):
    """Writes row r's token, detection word and logprob. A token out of range (only a non-finite row's
    merges can leave none) is clamped to 0, so nothing reads out of bounds."""
    tok = tl.where((tok >= 0) & (tok < real_vocab), tok, 0)
    state = tl.load(det_ptr + r)
    detect = state >= 0
    state = tl.maximum(state, 0).to(tl.int64)
    nxt = tl.load(next_ptr + state * next_stride + tok, mask=detect, other=0)
    flags = tl.load(flags_ptr + state * flags_stride + tok, mask=detect, other=0).to(tl.int32)
    closes = tl.load(closing_ptr + nxt, mask=detect, other=0).to(tl.int32) != 0
    word = tl.where(detect, (nxt << STATE_SHIFT) | flags | tl.where(closes, CLOSING, 0), 0)
    stop_row = stop_ptr + r.to(tl.int64) * stop_stride
    hits = 0
    for s0 in range(0, num_stops, STOPS):
        stop_cols = s0 + tl.arange(0, STOPS)
        stops = tl.load(stop_row + stop_cols, mask=stop_cols < num_stops, other=-1)
        hits += tl.sum((stops == tok).to(tl.int32), axis=0)
    word = word | tl.where(hits > 0, STOP, 0) | tl.where(bad != 0, NONFINITE, 0)
    tl.store(tok_ptr + r, tok)
    tl.store(word_ptr + r, word)
    tl.store(lp_ptr + r, tl.load(row + tok).to(tl.float32) - m - tl.log(s))


# Arguments that change from step to step, never specialized on: the per-row inputs are views at
# offsets that depend on the row count (one packed buffer), the stop-id width varies, the vocabulary
# sizes, chunking, phase and table strides are only read in scalar arithmetic. row_stride and
# row_len (the logits' padded vocabulary) stay specialized: they keep the row loads 16 bytes wide.
_STEP_ARGS = ["temp_ptr", "top_k_ptr", "top_p_ptr", "keys_ptr", "real_vocab", "det_ptr", "next_stride",
              "flags_stride", "stop_ptr", "stop_stride", "num_stops", "phase", "chunk", "num_chunks"]


@triton.jit
def _statistics_phase(row, row_len, start0, end, lanes, pf_row, pi_row, pf, pi, rf, ri, count_ptr, r, num_chunks, real_vocab, k, p, inv_t, key_lo, key_hi, use_k, use_p, plain, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
        BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, PIVOTS: tl.constexpr, PW: tl.constexpr, CB: tl.constexpr, STOPS: tl.constexpr):
    """Phase 0: each chunk's max, softmax sum, argmax, smallest key, non-finite flag (and the race of plain rows); the last chunk merges them, finishes greedy and plain rows and starts the others' searches."""
    m_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    s_lane = tl.zeros([BLOCK], tl.float32)
    arg_lane = start0 + lanes
    kmin_lane = tl.full([BLOCK], INT32_MAX, tl.int32)
    bad_lane = tl.zeros([BLOCK], tl.int32)
    race_lane = tl.full([BLOCK], NEG_INF, tl.float32)
    race_arg = start0 + lanes
    for start in range(start0, end, BLOCK):
        offs = start + lanes
        valid = offs < end
        x = _load(row, offs, valid, row_len)
        bad_lane = bad_lane | (valid & ((x != x) | (tl.abs(x) == POS_INF))).to(tl.int32)
        arg_lane = tl.where(x > m_lane, offs, arg_lane)
        new_m = tl.maximum(m_lane, x)
        shift = tl.where(new_m == NEG_INF, 0.0, new_m)
        s_lane = s_lane * tl.exp(m_lane - shift) + tl.exp(x - shift)
        m_lane = new_m
        kmin_lane = tl.minimum(kmin_lane, tl.where(valid, _key(x), INT32_MAX))
        if plain:
            score = tl.where(valid, _race_scores(x, offs, inv_t, key_lo, key_hi), NEG_INF)
            race_lane, race_arg = _race_update(score, offs, race_lane, race_arg)
    mc = tl.max(m_lane, axis=0)
    tl.store(pf, mc)
    tl.store(pf + 1, tl.sum(s_lane * tl.exp(m_lane - tl.where(mc == NEG_INF, 0.0, mc)), axis=0))
    tl.store(pi, _first_max(m_lane, arg_lane))
    tl.store(pi + 1, tl.min(kmin_lane, axis=0))
    tl.store(pi + 2, tl.max(bad_lane, axis=0))
    if plain:
        tl.store(pf + 2, tl.max(race_lane, axis=0))
        tl.store(pi + 3, _first_max(race_lane, race_arg))
    if _last(count_ptr + r, num_chunks):
        m, arg, kmin, bad = _merge_max(pf_row, pi_row, num_chunks, PW, CB)
        s = _merge_sum(pf_row, num_chunks, m, PW, CB)
        if use_k | use_p:
            tl.store(rf, m)
            tl.store(rf + 1, s)
            tl.store(rf + 2, k.to(tl.float32))
            tl.store(ri, tl.where(use_k, M_TOPK, M_TOPP_START))
            tl.store(ri + 1, kmin)
            tl.store(ri + 2, _key(m))
            tl.store(ri + 3, bad)
        else:
            tok = arg
            if plain:
                tok = _merge_race(pf_row, pi_row, num_chunks, PW, CB, 2)
            tl.store(ri, M_DONE)
            _finish(r, tok, real_vocab, row, m, s, bad, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride,
                    closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr, STOPS)


@triton.jit
def _pivot_weights(row, row_len, start0, end, lo, pivots, m, inv_t, mass, SEARCH_BLOCK: tl.constexpr,
                   PIVOTS: tl.constexpr):
    """Over ids [start0, end) whose key is >= lo: the weight at or above each pivot key, and in all;
    a weight is 1 (top-k) or, with `mass`, exp((x - m) * inv_t) (top-p). Reduced once per call."""
    lanes = tl.arange(0, SEARCH_BLOCK)
    acc = tl.zeros([SEARCH_BLOCK, PIVOTS], tl.float32)
    tot = tl.zeros([SEARCH_BLOCK], tl.float32)
    for start in range(start0, end, SEARCH_BLOCK):
        offs = start + lanes
        valid = offs < end
        x = _load(row, offs, valid, row_len)
        kx = _key(x)
        keep = valid & (kx >= lo)
        if mass:
            w = tl.where(keep, tl.exp((x - m) * inv_t), 0.0)
        else:
            w = tl.where(keep, 1.0, 0.0)
        acc += tl.where(kx[:, None] >= pivots[None, :], w[:, None], 0.0)
        tot += w
    return tl.sum(acc, axis=0), tl.sum(tot, axis=0)


@triton.jit
def _search_phase(row, row_len, start0, end, lanes, pf_row, pi_row, pf, pi, rf, ri, count_ptr, r, num_chunks, real_vocab, k, p, inv_t, key_lo, key_hi, use_k, use_p, plain, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
        BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, PIVOTS: tl.constexpr, PW: tl.constexpr, CB: tl.constexpr, STOPS: tl.constexpr):
    """Phase 1, once per search pass: each chunk's kept weight at every pivot; the last chunk narrows the row's threshold interval."""
    mode = tl.load(ri)
    lo = tl.load(ri + 1)
    hi = tl.load(ri + 2)
    if (mode != M_DONE) & (mode != M_RACE) & (lo < hi):
        m = tl.load(rf)
        mass = mode != M_TOPK
        lo64 = lo.to(tl.int64)
        step = (tl.arange(0, PIVOTS) + 1).to(tl.int64)
        pivots = (lo64 + ((hi.to(tl.int64) - lo64) * step + (PIVOTS - 1)) // PIVOTS).to(tl.int32)
        weights, total = _pivot_weights(row, row_len, start0, end, lo, pivots, m, inv_t, mass, SEARCH_BLOCK, PIVOTS)
        tl.store(pf + tl.arange(0, PIVOTS), weights)
        tl.store(pf + PIVOTS, total)
        if _last(count_ptr + r, num_chunks):
            weights = tl.zeros([PIVOTS], tl.float32)
            total = 0.0
            for c0 in range(0, num_chunks, CB):
                cs = c0 + tl.arange(0, CB)
                ok = cs < num_chunks
                part = tl.load(pf_row + cs[:, None] * PW + tl.arange(0, PIVOTS)[None, :], mask=ok[:, None],
                               other=0.0, cache_modifier=".cg")
                weights += tl.sum(part, axis=0)
                total += tl.sum(tl.load(pf_row + cs * PW + PIVOTS, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
            target = tl.load(rf + 2)
            if mode == M_TOPP_START:  # top_p of the mass of the logits >= lo (the top-k set)
                target = p * total
                mode = mode * 0 + M_TOPP
            ok = weights >= target
            lo = tl.max(tl.where(ok, pivots, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots - 1), axis=0)
            if lo >= hi:
                if (mode == M_TOPK) & use_p:
                    mode = mode * 0 + M_TOPP_START
                    hi = _key(tl.load(rf))
                if lo >= hi:
                    mode = mode * 0 + M_RACE
            tl.store(rf + 2, target)
            tl.store(ri, mode)
            tl.store(ri + 1, lo)
            tl.store(ri + 2, hi)


@triton.jit
def _race_phase(row, row_len, start0, end, lanes, pf_row, pi_row, pf, pi, rf, ri, count_ptr, r, num_chunks, real_vocab, k, p, inv_t, key_lo, key_hi, use_k, use_p, plain, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
        BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, PIVOTS: tl.constexpr, PW: tl.constexpr, CB: tl.constexpr, STOPS: tl.constexpr):
    """Phase 2: the Gumbel race over each chunk's logits at or above the row's threshold; the last chunk merges it and finishes the row."""
    mode = tl.load(ri)
    if mode != M_DONE:
        floor = _value(tl.load(ri + 1))
        best = tl.full([BLOCK], NEG_INF, tl.float32)
        arg = start0 + lanes
        for start in range(start0, end, BLOCK):
            offs = start + lanes
            valid = offs < end
            x = _load(row, offs, valid, row_len)
            score = tl.where(valid & (x >= floor), _race_scores(x, offs, inv_t, key_lo, key_hi), NEG_INF)
            best, arg = _race_update(score, offs, best, arg)
        tl.store(pf + 2, tl.max(best, axis=0))
        tl.store(pi + 3, _first_max(best, arg))
        if _last(count_ptr + r, num_chunks):
            tok = _merge_race(pf_row, pi_row, num_chunks, PW, CB, 2)
            _finish(r, tok, real_vocab, row, tl.load(rf), tl.load(rf + 1), tl.load(ri + 3), det_ptr, next_ptr, next_stride,
                    flags_ptr, flags_stride, closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr,
                    lp_ptr, STOPS)


@triton.jit(do_not_specialize=_STEP_ARGS)
def _sample_detect_kernel(logits_ptr, row_stride, row_len, temp_ptr, top_k_ptr, top_p_ptr, keys_ptr, real_vocab,
                          det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr,
                          stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
                          part_f, part_i, row_f, row_i, count_ptr, phase, chunk, num_chunks,
                          GREEDY: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
                          PIVOTS: tl.constexpr, PW: tl.constexpr, CB: tl.constexpr, STOPS: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1)
    row = logits_ptr + r.to(tl.int64) * row_stride
    start0 = c * chunk
    end = tl.minimum(start0 + chunk, real_vocab)
    pf_row = part_f + r.to(tl.int64) * num_chunks * PW
    pi_row = part_i + r.to(tl.int64) * num_chunks * 4
    pf = pf_row + c * PW
    pi = pi_row + c * 4
    rf = row_f + r * 4
    ri = row_i + r * 4
    t = tl.load(temp_ptr + r)
    k = tl.load(top_k_ptr + r)
    p = tl.load(top_p_ptr + r)
    key = tl.load(keys_ptr + r)
    key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
    key_hi = (key >> 32).to(tl.uint32)
    sampled = t >= GREEDY
    use_k = sampled & (k > 0) & (k < real_vocab)
    use_p = sampled & (p < 1.0)
    plain = sampled & ((k <= 0) | (k >= real_vocab)) & (p >= 1.0)
    inv_t = tl.div_rn(1.0, tl.maximum(t, GREEDY))  # correctly rounded, as torch's 1 / T
    lanes = tl.arange(0, BLOCK)

    if phase == 0:
        _statistics_phase(row, row_len, start0, end, lanes, pf_row, pi_row, pf, pi, rf, ri, count_ptr, r, num_chunks, real_vocab, k, p, inv_t, key_lo, key_hi, use_k, use_p, plain, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
                          BLOCK, SEARCH_BLOCK, PIVOTS, PW, CB, STOPS)
    elif phase == 1:
        _search_phase(row, row_len, start0, end, lanes, pf_row, pi_row, pf, pi, rf, ri, count_ptr, r, num_chunks, real_vocab, k, p, inv_t, key_lo, key_hi, use_k, use_p, plain, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
                      BLOCK, SEARCH_BLOCK, PIVOTS, PW, CB, STOPS)
    else:
        _race_phase(row, row_len, start0, end, lanes, pf_row, pi_row, pf, pi, rf, ri, count_ptr, r, num_chunks, real_vocab, k, p, inv_t, key_lo, key_hi, use_k, use_p, plain, det_ptr, next_ptr, next_stride, flags_ptr, flags_stride, closing_ptr, stop_ptr, stop_stride, num_stops, tok_ptr, word_ptr, lp_ptr,
                    BLOCK, SEARCH_BLOCK, PIVOTS, PW, CB, STOPS)


def search_passes(pivots: int) -> int:
    """Passes that narrow any interval of int32 keys to one key with `pivots` pivots per pass."""
    width, passes = 2**32 - 1, 0
    while width > 0:  # the widest interval a pass can leave: between two neighbouring pivots
        width = -(-width // pivots) - 1
        passes += 1
    return passes


def sample_key(vocab: int, rows: int) -> str:
    """The tuning key of a call: the logits' vocabulary (padded row length) and the row count
    bucket (powers of 2 up to 256): 'vocab=151936,rows=32'."""
    bucket = 1
    while bucket < min(rows, 256):
        bucket *= 2
    return f"vocab={vocab},rows={bucket}"


def _heuristic(vocab: int, rows: int, device: torch.device) -> dict:
    if device.type != "cuda":  # the interpreter: few, short programs
        return {"block": 256, "chunk": 1024, "num_warps": 4, "pivots": 16}
    # About 2-4 programs per SM: long chunks for many rows, short ones for a single row. 8 warps:
    # at 4 a 1024-id block takes 128 registers a thread and spills on sm_90a (bench/compile_check.py).
    chunk = 2048 if rows <= 2 else 4096 if rows <= 8 else 8192
    return {"block": 1024, "chunk": max(chunk, 1024), "num_warps": 8, "pivots": 16}


def launch_config(vocab: int, rows: int, device: "torch.device | str", config: "dict | None" = None) -> dict:
    """block / chunk / num_warps / pivots: `config` over the card's tuned entry over the heuristic."""
    device = torch.device(device)
    params = dict(_heuristic(vocab, rows, device))
    params.update(tuning.tuned("sample", sample_key(vocab, rows), device) or {})
    params.update(config or {})
    block, chunk, pivots = int(params["block"]), int(params["chunk"]), int(params["pivots"])
    if block < 64 or block & (block - 1) or pivots < 4 or pivots & (pivots - 1):
        raise ValueError(f"sample config: block and pivots must be powers of 2 (>= 64, >= 4), got {params}")
    params["chunk"] = max(block, -(-chunk // block) * block)
    return params


def sample_and_detect(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      keys: torch.Tensor, real_vocab: int, det_states: torch.Tensor, next_state: torch.Tensor,
                      tag_flags: torch.Tensor, closing: torch.Tensor, stop_ids: torch.Tensor,
                      out: "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None" = None,
                      block: "int | None" = None, config: "dict | None" = None,
                      filters: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_and_detect_ref`, fused (see there for the arguments and results); written into
    `out` = (tokens int32, words int32, logprobs fp32) when given. Dtypes as the engine's
    sampling.RowInputs gives them: temperature / top_p fp32, top_k / det_states / stop_ids /
    next_state int32, keys int64; logits fp32 or fp16 with contiguous rows.

    `config` ({"block", "chunk", "num_warps", "pivots"}, any subset) overrides the card's tuned
    entry for sample_key(logits' vocabulary, rows) and the heuristic; `block` is config["block"].
    `filters=False` promises that no sampled row uses top-k or top-p (the host knows it from the
    requests' parameters): then only the statistics launch runs. Default: every phase is launched
    and rows without filters leave the later ones at once."""
    n = logits.shape[0]
    device = logits.device
    if out is None:
        out = (torch.empty(n, dtype=torch.int32, device=device), torch.empty(n, dtype=torch.int32, device=device),
               torch.empty(n, dtype=torch.float32, device=device))
    if logits.stride(1) != 1:
        raise ValueError("sample_and_detect needs logits rows contiguous in memory")
    if n == 0:
        return out
    params = launch_config(logits.shape[1], n, device, {**(config or {}), **({"block": block} if block else {})})
    blk, chunk, pivots = params["block"], params["chunk"], params["pivots"]
    num_chunks = -(-real_vocab // chunk)
    pw = pivots + 2
    part_f = torch.empty(n * num_chunks * pw, dtype=torch.float32, device=device)
    part_i = torch.empty(n * num_chunks * 4, dtype=torch.int32, device=device)
    row_f = torch.empty(n * ROW_F, dtype=torch.float32, device=device)
    row_i = torch.empty(n * ROW_I, dtype=torch.int32, device=device)
    counts = torch.zeros(n, dtype=torch.int32, device=device)  # each merge resets its row's to 0
    num_stops = stop_ids.shape[1]
    stops = stop_ids if num_stops else det_states  # never read when there are no stop ids
    phases = [0] + ([1] * search_passes(pivots) * 2 + [2] if filters else [])
    for phase in phases:
        _sample_detect_kernel[(n, num_chunks)](
            logits, logits.stride(0), logits.shape[1], temperature, top_k, top_p, keys, real_vocab,
            det_states, next_state, next_state.stride(0), tag_flags, tag_flags.stride(0), closing,
            stops, stops.stride(0), num_stops, *out, part_f, part_i, row_f, row_i, counts, phase, chunk, num_chunks,
            GREEDY=sample.GREEDY_BELOW, BLOCK=blk, SEARCH_BLOCK=max(blk // 4, 16), PIVOTS=pivots, PW=pw,
            CB=MERGE_BLOCK, STOPS=STOP_BLOCK, num_warps=params["num_warps"],
            enable_fp_fusion=False)  # an FMA would round the race scores differently from torch
    return out
