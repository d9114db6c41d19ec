"""Speculative-decoding verification per row: the PyTorch reference (the CPU path and the kernel's
oracle). speculation.verify builds the flat per-row inputs; this decides each row.

Greedy rows (temperature 0) accept a draft while it is the argmax, which keeps the tokens of plain
decoding. Sampled rows follow the standard rejection rule: with p the big model's filtered,
temperature-scaled distribution (sample.filtered_log_probs over the logit-biased logits) and q the
small model's for the row's draft d, accept d if u_accept * q(d) < p(d), else draw from the
normalised max(0, p - q) (from p where that is empty); a row without a draft (the last of each
group) draws from p. Each committed token then has distribution p exactly.

The draws use sample.py's counter-based noise: the races are Gumbel-max races with the uniform of
(row key, token id), and u_accept is the uniform of (row key, ACCEPT_ID), an id no vocabulary
reaches, so it is independent of the race. The Triton kernel reproduces every uniform bit for bit;
its logs and exps are its own, so a token (or an acceptance) can differ from this reference only
where two race scores (or u_accept * q(d) and p(d)) are within rounding of each other.

Logprobs are those of the raw (unbiased, unfiltered) log_softmax over ids < real_vocab, as the
sampler reports them; `finite` is False for a row whose raw logits (ids < real_vocab) hold a NaN or
an inf (its other results are meaningless, and its request should fail).
"""

import torch

from .sample import filtered_log_probs, noise_at, noise_uniform

ACCEPT_ID = 2**32 - 1  # the noise id of a draft's acceptance draw


def verify_rows_ref(logits: torch.Tensor, raw_logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
                    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
                    real_vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decides R verify rows. `logits` [R, V] are the logit-biased logits the decisions use,
    `raw_logits` [R, V] the unbiased ones of the logprobs and the finite flag (they may be one
    tensor); drafts [R] int64 (-1: no draft); q [R, >= real_vocab] fp32, the small model's
    distribution of each sampled draft row (zeros elsewhere); temperature fp32 (0: greedy), top_k
    int32 (<= 0: off), top_p fp32 (1: off), keys int64 (the rows' noise keys). Ids >= real_vocab are
    never chosen.

    Returns (tokens int32: the argmax of a greedy row, the residual draw of a sampled draft row, the
    plain draw of a row without a draft; accepted bool; token_logprobs fp32; draft_logprobs fp32 (of
    id 0 where there is no draft); finite bool)."""
    x_raw = raw_logits[:, :real_vocab].float()
    x = logits[:, :real_vocab].float()
    has_draft = drafts >= 0
    tokens = x.argmax(dim=-1)
    accepted = has_draft & (tokens == drafts)
    sampled = (temperature != 0).nonzero().squeeze(1)
    if sampled.numel():
        row_keys = keys[sampled]
        logp = filtered_log_probs(x[sampled], temperature[sampled], top_k[sampled], top_p[sampled])
        p = logp.exp()
        qs = q[sampled, :real_vocab].float()
        ds = drafts[sampled].clamp(min=0)[:, None]
        pd, qd = p.gather(1, ds).squeeze(1), qs.gather(1, ds).squeeze(1)
        u_accept = noise_at(row_keys, torch.tensor(ACCEPT_ID))
        accepted[sampled] = has_draft[sampled] & (u_accept * qd < pd)
        gumbel = -torch.log(-torch.log(noise_uniform(row_keys, real_vocab)))
        residual = (p - qs).clamp(min=0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
        resampled = (residual.log() + gumbel).argmax(dim=-1)
        plain = (logp + gumbel).argmax(dim=-1)
        tokens[sampled] = torch.where(has_draft[sampled], resampled, plain)
    logp_raw = torch.log_softmax(x_raw, dim=-1)
    return (tokens.to(torch.int32), accepted, logp_raw.gather(1, tokens[:, None]).squeeze(1),
            logp_raw.gather(1, drafts.clamp(min=0)[:, None]).squeeze(1), torch.isfinite(x_raw).all(dim=-1))
