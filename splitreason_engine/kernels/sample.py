"""Sampling fused with tag detection: the PyTorch reference (the CPU path and the kernel's oracle).

One op picks each row's next token and steps the row's tag automaton on it, so after a decode
step only token ids, packed detection words and logprobs come back to the host.

Noise is counter based: a uniform per (row key, vocab id) from a 32-bit integer hash, so the
Triton kernel reproduces the uniforms bit for bit without sharing RNG state, and a row's draw
depends only on its key. Sampling is a Gumbel-max race over the filtered, temperature-scaled
distribution; the logs and exps are each device's own, so the kernel and the reference can pick
different tokens only where two race scores are within rounding of each other.

Filtering keeps every token whose logit is >= a per-row threshold: the k-th largest logit for
top-k, then for top-p the logit of the token whose cumulative (descending, renormalised top-k)
mass first reaches top_p. The reference finds both by sorting, the kernel by searching the value
range; with the set defined by a value threshold, ties at the threshold are all kept by both. The
top-p crossing token can still differ where the cumulative mass is within fp32 rounding of top_p
(the sums run in different orders).

NONFINITE (16) in the detection word flags a row whose real vocabulary (ids < real_vocab) holds a
NaN, +inf or -inf logit, as torch.isfinite would: no legitimate input puts -inf there (logit_bias
is validated to [-100, 100]; the model's logits are finite), so such a row's token is meaningless
and its request should fail. The token is still some id < real_vocab, and the other bits are
computed as for any row. Padding ids (>= real_vocab) are not checked.
"""

import torch

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (scaled logits would overflow)

# Detection word: (next_state << STATE_SHIFT) | flags. OPEN / CLOSE are tags.OPEN / tags.CLOSE;
# NONFINITE: the row's logits (ids < real_vocab) hold a NaN or an inf (see the module doc).
OPEN, CLOSE, CLOSING, STOP, NONFINITE = 1, 2, 4, 8, 16
STATE_SHIFT = 8

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B  # lowbias32 (Chris Wellons' hash prospector)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), in int64 without overflowing (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def noise_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """u [n, vocab] fp32 in (0, 1) for keys [n] int64 (63-bit), token ids 0..vocab-1:

        lo, hi = key & 0xFFFFFFFF, key >> 32
        h = mix32((id * 0x9E3779B9 + lo) mod 2**32);  h = mix32(h ^ hi)
        u = ((h >> 9) + 0.5) * 2**-23

    with mix32 = lowbias32. 23 bits so that u is exact in fp32 and never 0 or 1.
    """
    return noise_at(keys[:, None], torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :])


def noise_at(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The uniform of noise_uniform for (key, id) pairs (broadcast), any id in [0, 2**32)."""
    keys, ids = keys.to(torch.int64), ids.to(torch.int64)
    lo, hi = keys & _MASK32, keys >> 32
    h = _mix32((_mul32(ids, _GOLDEN32) + lo) & _MASK32)
    h = _mix32(h ^ hi)
    return ((h >> 9).to(torch.float32) + 0.5) * 2.0 ** -23


def _thresholds(x: torch.Tensor, inv_t: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest logit kept by top-k then top-p (-inf where neither applies)."""
    n, vocab = x.shape
    floor = torch.full((n,), float("-inf"), device=x.device)
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1
    if not bool((use_k | use_p).any()):
        return floor
    values = x.sort(dim=-1, descending=True).values
    kth = values.gather(1, (top_k.long().clamp(1, vocab) - 1)[:, None]).squeeze(1)
    floor = torch.where(use_k, kth, floor)
    # top-p: the first token (descending) whose inclusive cumulative mass within the top-k set
    # reaches top_p of that set's mass; the mass uses the kernel's formula exp((x - max) * (1 / T)).
    w = torch.where(values >= floor[:, None], torch.exp((values - values[:, :1]) * inv_t[:, None]), 0.0)
    cum = w.cumsum(dim=-1)
    target = top_p * cum[:, -1]
    crossing = (cum < target[:, None]).sum(dim=-1).clamp(max=vocab - 1)
    floor_p = torch.maximum(floor, values.gather(1, crossing[:, None]).squeeze(1))
    return torch.where(use_p, floor_p, floor)


def filtered_log_probs(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """log of the distribution a sampled row draws from: fp32 logits `x` [n, V] filtered by top-k
    then top-p as below, then softmax(x / T) over what is kept (-inf elsewhere)."""
    inv_t = 1 / temperature.float()
    floor = _thresholds(x, inv_t, top_k, top_p.float())
    return torch.log_softmax(torch.where(x >= floor[:, None], x * inv_t[:, None], float("-inf")), dim=-1)


def sample_and_detect_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, keys: torch.Tensor, real_vocab: int, det_states: torch.Tensor,
                          next_state: torch.Tensor, tag_flags: torch.Tensor, closing: torch.Tensor,
                          stop_ids: torch.Tensor, filters: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples one token per row of fp32 `logits` [n, V] and steps its tag automaton.
    (`filters` False promises that no row uses top-k or top-p: the kernel then skips its searches;
    here it changes nothing.)

    Per row: temperature (< GREEDY_BELOW: argmax), top_k (<= 0: off), top_p (1: off), keys (the
    63-bit noise key); det_states (automaton state before the token, -1: no detection); stop_ids
    [n, K] (-1 padded). next_state [S, V'] / tag_flags [S, V'] / closing [S] are TagDetector's
    tables. Ids >= real_vocab are never chosen and left out of the logprob normalisation.

    Returns (tokens int32, words int32 = (next_state << 8) | OPEN | CLOSE | CLOSING | STOP | NONFINITE,
    logprobs fp32 = log_softmax(logits)[token]); rows with det_state -1 get no tag bits and
    next_state 0; STOP and NONFINITE are set whatever the det_state.
    """
    x = logits[:, :real_vocab].float()
    greedy = temperature < GREEDY_BELOW
    inv_t = 1 / torch.where(greedy, 1.0, temperature.float())  # x * (1 / T): what the kernel computes
    tokens = x.argmax(dim=-1)
    rows = (~greedy).nonzero().squeeze(1)
    if rows.numel():  # only the sampled rows pay for the noise and the sort
        xs, inv_ts = x[rows], inv_t[rows]
        floor = _thresholds(xs, inv_ts, top_k[rows], top_p[rows].float())
        gumbel = -torch.log(-torch.log(noise_uniform(keys[rows], real_vocab)))
        score = torch.where(xs >= floor[:, None], xs * inv_ts[:, None] + gumbel, float("-inf"))
        tokens[rows] = score.argmax(dim=-1)
    logprobs = torch.log_softmax(x, dim=-1).gather(1, tokens[:, None]).squeeze(1)

    detect = det_states >= 0
    state = det_states.long().clamp(min=0)
    token = torch.where(detect, tokens, 0)
    nxt = next_state[state, token].long()
    flags = tag_flags[state, token].long() | (closing[nxt].long() != 0) * CLOSING
    words = torch.where(detect, (nxt << STATE_SHIFT) | flags, 0)
    words |= (stop_ids == tokens[:, None]).any(dim=-1).long() * STOP
    words |= (~torch.isfinite(x).all(dim=-1)).long() * NONFINITE
    return tokens.to(torch.int32), words.to(torch.int32), logprobs
