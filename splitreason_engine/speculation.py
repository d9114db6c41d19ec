"""Drafts inside big segments: the small model writes a few tokens ahead, the big model computes
every drafted position in one step and keeps the longest run it agrees with, plus one token of its
own.

Greedy rows accept a draft while it is the big model's argmax, so the tokens are those of plain
decoding. Sampled rows use the standard rejection rule (Leviathan et al., Chen et al.): accept a
draft d with probability min(1, p(d) / q(d)), else sample from the normalised max(0, p - q), where
p is the big model's and q the small model's filtered, temperature-scaled distribution; each big
token then has distribution p exactly. In split mode a draft is also the small model's decision
after the previous token, and drafting stops at a decision that ends the segment; a draft that is
kept therefore did not end it, so its q is the small distribution restricted to the tokens that
do not (draft_distribution), which keeps the decision and the big token independent, as without
drafting.

The big model draws its acceptance and residual noise from its own stream (sampling.noise_seed),
apart from the small model's draws, and the accept draw from an id no vocabulary reaches.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .kernels.sample import CLOSE, filtered_log_probs
from .kernels.verify import verify_rows_ref
from .sampling import MAX_SPECULATE, DetectTables, RowInputs, SamplingParams, to_device, with_logit_bias
from .step_costs import StepCosts


def _row_settings(params: list[SamplingParams], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
    top_k = torch.tensor([0 if p.greedy or p.top_k <= 0 else p.top_k for p in params], device=device)
    top_p = torch.tensor([1.0 if p.greedy else p.top_p for p in params], device=device)
    return greedy, temperature, top_k, top_p


def draft_distribution(logits: torch.Tensor, params: list[SamplingParams], real_vocab: int, det_states: list[int],
                       tables: DetectTables) -> torch.Tensor:
    """q [n, real_vocab]: each sampled draft row's distribution, restricted (and renormalised) to the
    tokens that neither close a tag nor leave the text in a close-tag prefix when the row's automaton
    state is >= 0 (split mode: a draft that is kept did not end the segment)."""
    x = with_logit_bias(logits, params)[:, :real_vocab].float()
    _, temperature, top_k, top_p = _row_settings(params, x.device)
    q = filtered_log_probs(x, temperature, top_k, top_p).exp()
    states = torch.tensor(det_states, device=x.device)
    rows = (states >= 0).nonzero().squeeze(1)
    if rows.numel():
        s = states[rows].long()
        flags = tables.flags[s][:, :real_vocab]
        closing = tables.closing[tables.next_state[s][:, :real_vocab].long()]
        keep = ((flags.long() & CLOSE) == 0) & ~closing
        kept = q[rows] * keep
        mass = kept.sum(dim=-1, keepdim=True)
        q[rows] = torch.where(mass > 0, kept / mass.clamp(min=1e-30), q[rows])
    return q


@dataclass(frozen=True)
class VerifyGroup:
    """One request's verify rows: the drafts after its last committed token, the small model's
    distribution of each (sampled rows only), and the output index of the first row's token."""

    params: SamplingParams
    drafts: list[int]
    draft_probs: "list[torch.Tensor] | None"
    first_index: int


@dataclass
class Verified:
    """A verify step's per-row results, on their way to the host."""

    tokens: torch.Tensor  # where the run stops: the residual (or argmax) at a draft row, a plain sample at the last
    accepted: torch.Tensor  # bool: the row's draft is accepted
    token_logprobs: torch.Tensor
    draft_logprobs: torch.Tensor
    finite: torch.Tensor

    def per_group(self, groups: list[VerifyGroup]) -> list[tuple[list[int], list[float], int, bool]]:
        """(committed tokens, their logprobs, drafts accepted, all logits finite) per group."""
        tokens, accepted, lp_t, lp_d, finite = (t.tolist() for t in (
            self.tokens, self.accepted, self.token_logprobs, self.draft_logprobs, self.finite))
        out, row = [], 0
        for g in groups:
            v = len(g.drafts)
            j = next((i for i in range(v) if not accepted[row + i]), v)
            out.append((g.drafts[:j] + [tokens[row + j]], lp_d[row: row + j] + [lp_t[row + j]], j,
                        all(finite[row: row + v + 1])))
            row += v + 1
        return out


def verify(logits: torch.Tensor, groups: list[VerifyGroup], real_vocab: int, generator: torch.Generator,
           model: int, op: Callable = verify_rows_ref) -> Verified:
    """Checks each group's drafts against the verifying model's `logits` [sum(drafts + 1), V] (a
    group's rows in order: after its last committed token, then after each draft) with `op`, the
    engine's ops.verify_rows (kernels/verify.py): one launch for every row of the step. Nothing
    vocabulary-sized leaves the device."""
    device = logits.device
    params = [g.params for g in groups for _ in range(len(g.drafts) + 1)]
    drafts = [d for g in groups for d in g.drafts + [-1]]
    indices = [g.first_index + i for g in groups for i in range(len(g.drafts) + 1)]
    rows = RowInputs.build(params, indices, generator, [-1] * len(params), [()] * len(params), device, model)
    q = _stacked_draft_probs(groups, real_vocab, device)
    return Verified(*op(with_logit_bias(logits, params), logits, to_device(np.array(drafts, dtype=np.int64), device),
                        q, rows.temperature, rows.top_k, rows.top_p, rows.keys, real_vocab))


def _stacked_draft_probs(groups: list[VerifyGroup], real_vocab: int, device) -> torch.Tensor:
    rows = []
    for g in groups:
        probs = g.draft_probs or []
        rows += [probs[i] if i < len(probs) else torch.zeros(real_vocab, device=device) for i in range(len(g.drafts))]
        rows.append(torch.zeros(real_vocab, device=device))
    return torch.stack(rows)


class DraftTuner:
    """How many tokens one request drafts per big step: fixed, or ("auto") chosen under the
    step-cost model. Auto decides per cycle whether to draft at all (the k in 0..MAX_SPECULATE
    that maximises expected big tokens per second, from the request's running acceptance rate, a
    geometric estimate that forgets exponentially), and per draft whether to draft on: while the
    chance that every draft so far is kept, estimated from the small model's own probability of
    each (scaled by how often its drafts were kept against that probability), still makes the
    next draft worth its small step."""

    PRIOR, DECAY = (1.0, 1.0), 0.9  # (accepted, rejected) pseudo-counts; weight of the past per verify

    def __init__(self, k: "int | str", costs: "StepCosts | None", max_drafts: int = MAX_SPECULATE,
                 decisions: bool = True):
        self.auto, self.decisions = k == "auto", decisions
        self.k = min(max_drafts if self.auto else int(k), max_drafts)
        self.costs = costs
        self.accepted, self.rejected = self.PRIOR
        self.kept, self.expected = 1.0, 1.0  # drafts kept, and the small model's probabilities summed over them
        self.alive = 1.0  # the estimated chance that every draft of this cycle so far is kept

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, accepted: int, rejected: bool, confidences: "list[float] | None" = None) -> None:
        """A verify step's outcome; `confidences`: the small model's probability of each draft
        verified (the drafts up to the first rejected one calibrate the per-draft estimate)."""
        if self.auto:
            self.accepted = self.DECAY * self.accepted + accepted
            self.rejected = self.DECAY * self.rejected + rejected
            if confidences:
                tested = confidences[: accepted + rejected]
                self.kept = self.DECAY * self.kept + accepted
                self.expected = self.DECAY * self.expected + sum(tested)

    def next_k(self, big_rows: int = 1) -> int:
        """Drafts for the next big step at most (the caller caps it by what the request has left).
        `big_rows`: how many requests a plain big step would serve at once. The flows pass every
        live request: the co-scheduling policy gathers big-model work, so under load plain big
        steps carry many rows, and a drafting request's verify shares fewer of them."""
        self.alive = 1.0
        if not self.auto:
            return self.k
        big_rows = max(big_rows, 1)
        a = min(self.acceptance, 0.999)
        best = max(range(self.k + 1), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / self._token_cost(k, big_rows))
        return self.k if best else 0

    def keep_drafting(self, confidence: "float | None", big_rows: int = 1) -> bool:
        """After a draft the small model gave probability `confidence`: whether to draft another
        before the big step (fixed k: always, up to k). Another draft costs a small step and a
        verified position; it saves, if every draft up to it is kept, a token of the plain protocol."""
        if not self.auto or confidence is None:
            return True
        self.alive *= min(1.0, confidence * self.kept / self.expected)
        small, big = self._costs()
        saving = self._token_cost(0, max(big_rows, 1))
        return self.alive * self.acceptance * saving >= small(1, 1) + big(1, 2) - big(1, 1)

    def _costs(self):
        if self.costs is None:
            return (lambda rows, tokens: 0.1 * rows), (lambda rows, tokens: 1.0 + 0.01 * (tokens - 1))
        return self.costs.models[0], self.costs.models[1]

    def _token_cost(self, k: int, big_rows: int) -> float:
        """Seconds one cycle costs this request. Without drafts (k = 0) the request rides the big
        steps that every request in a big segment shares (the plain protocol keeps them in step), so
        it pays its share of one; with drafts it pays a small step per draft (plus the decision after
        the last one, in split mode) and a big step over k + 1 positions of its own, as drafting
        requests verify at different steps."""
        small, big = self._costs()
        if k == 0:
            return small(1, 1) + big(big_rows, big_rows) / big_rows
        return (k + self.decisions) * small(1, 1) + big(1, k + 1)
