"""Log-probabilities beyond the chosen token's: the top alternatives of sampled rows, and a
prompt's tokens scored in its prefill. Both come from logits the step computes anyway, on the
device; only [rows, N] values and ids travel to the host, never a vocabulary-sized row.

Values are those of the model's unmodified distribution (before temperature, filters and
logit_bias), as for the chosen token's logprob, so a score does not depend on how it was sampled.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .sampling import to_device

TopList = list  # [(token id, logprob)], most likely first


class TokenLogprob(float):
    """A chosen token's log-probability that also carries the `top` alternatives of the model that
    wrote it. It is a float wherever one is read (drafting's confidence, a sum of scores), so it
    travels with its token through every flow (held, probed, verified) unchanged to the commit."""

    __slots__ = ("top",)

    def __new__(cls, value: float, top: TopList):
        obj = super().__new__(cls, value)
        obj.top = top
        return obj


def top_logprobs(logits: torch.Tensor, real_vocab: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32 [rows, n], ids int64 [rows, n]), most likely first, of log_softmax over the
    real vocabulary (padding ids are never among them); n is cut to the vocabulary."""
    logprobs = torch.log_softmax(logits[:, :real_vocab].float(), dim=-1)
    return logprobs.topk(min(n, real_vocab), dim=-1)


@dataclass
class HostCopy:
    """Tensors on their way to the host (pinned, asynchronous on CUDA); `lists()` waits for them."""

    tensors: tuple
    ready: "torch.cuda.Event | None"

    @classmethod
    def start(cls, *tensors: torch.Tensor) -> "HostCopy":
        cuda = tensors[0].device.type == "cuda"
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda).copy_(t, non_blocking=True)
                     for t in tensors)
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        return cls(host, ready)

    def lists(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return [t.tolist() for t in self.tensors]


def with_top(values: list, ids: list, n: int) -> TopList:
    return list(zip(ids[:n], values[:n]))


@dataclass
class PromptRows:
    """The rows of one model's step whose logits score prompt tokens: row i (a token row of the
    step) predicts `targets[i]`, the prompt token at `positions[i]` of request `requests[i]`."""

    rows: np.ndarray  # int64 token rows of the step
    targets: np.ndarray  # int64 prompt token ids
    requests: list  # the Request of each row
    positions: list[int]  # where in the prompt each target sits (>= 1)

    @classmethod
    def of_step(cls, requests: dict, scoring: set, model: int, buffers: dict, num_seqs: int) -> "PromptRows | None":
        """The rows of the planned step whose next token is a prompt token of a request in
        `scoring` (request ids that want prompt logprobs from `model`), or None."""
        ids = buffers["seq_request_ids"][:num_seqs].tolist()
        starts, positions = buffers["query_start_loc"], buffers["positions"]
        rows, targets, reqs, where = [], [], [], []
        for j, rid in enumerate(ids):
            req = requests[rid] if rid in scoring else None
            if req is None or req.prompt_model != model:
                continue
            start, end = int(starts[j]), int(starts[j + 1])
            predicted = positions[start:end].astype(np.int64) + 1  # each row's logits predict the next token
            keep = predicted < len(req.prompt)
            rows.append(np.arange(start, end)[keep])
            targets.append(np.asarray(req.prompt, dtype=np.int64)[predicted[keep]])
            reqs += [req] * int(keep.sum())
            where += predicted[keep].tolist()
        if not reqs:
            return None
        return cls(np.concatenate(rows), np.concatenate(targets), reqs, where)

    def score(self, logits: torch.Tensor, real_vocab: int) -> "PromptScores":
        """Each row's target logprob and the top alternatives its request asks for, launched."""
        logprobs = torch.log_softmax(logits[:, :real_vocab].float(), dim=-1)
        targets = to_device(self.targets, logits.device)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
        n = max(r.params.prompt_logprobs for r in self.requests)
        tensors = [chosen]
        if n > 0:
            tensors += list(logprobs.topk(min(n, real_vocab), dim=-1))
        return PromptScores(self, HostCopy.start(*tensors))


@dataclass
class PromptScores:
    rows: PromptRows
    copy: HostCopy

    def apply(self) -> list[int]:
        """Writes each scored prompt token into its request's prompt_logprobs (a recomputation
        after a preemption writes the same values again), and returns the ids of the requests
        whose last prompt token this step scored: they have nothing left to score."""
        lists = self.copy.lists()
        chosen = lists[0]
        done = []
        for i, (req, pos) in enumerate(zip(self.rows.requests, self.rows.positions)):
            n = req.params.prompt_logprobs
            top = with_top(lists[1][i], lists[2][i], n) if n else []
            req.prompt_logprobs[pos] = TokenLogprob(chosen[i], top)
            if pos == len(req.prompt) - 1:
                done.append(req.id)
        return done
