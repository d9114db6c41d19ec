"""A step in flight: what the engine launched on the device and has not applied yet.

With overlapped steps (Engine(overlap=True)) the engine launches step N+1 before step N's tokens
reach the host: step N's sampled ids stay on the device, where the next step's inputs are patched
from them (a Feed), and their copies to the host land in pinned buffers that the engine reads one
step late. Without overlap the same objects carry a step from its launch to its application.
"""

from dataclasses import dataclass, field

import torch

from .logprobs import HostCopy, PromptScores
from .requests import Request


@dataclass
class Results:
    """One model's sampled rows: the device tensors the next step may read, and their host copies."""

    tokens: torch.Tensor  # int32 [n] on the device
    words: torch.Tensor  # int32 [n] detection words, on the device
    host: torch.Tensor  # int32 [2, n]: tokens, words; pinned on CUDA
    logprobs: "torch.Tensor | None"  # fp32 [n] on the host, or None
    ready: "torch.cuda.Event | None"  # recorded after the copies (None on the CPU: they are done)
    top: "HostCopy | None" = None  # each row's top logprobs (values, ids), when a row asked for them

    @classmethod
    def copy_back(cls, tokens: torch.Tensor, words: torch.Tensor, logprobs: "torch.Tensor | None",
                  top: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> "Results":
        cuda = tokens.device.type == "cuda"
        host = torch.empty(2, tokens.shape[0], dtype=torch.int32, pin_memory=cuda)
        host.copy_(torch.stack([tokens, words]), non_blocking=True)
        logprobs_host = None
        if logprobs is not None:
            logprobs_host = torch.empty(logprobs.shape, dtype=torch.float32, pin_memory=cuda)
            logprobs_host.copy_(logprobs, non_blocking=True)
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        return cls(tokens, words, host, logprobs_host, ready, HostCopy.start(*top) if top is not None else None)

    def wait(self) -> tuple[list[int], list[int], list]:
        """(tokens, words, logprobs) as Python lists, once the copies have landed."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens, words = self.host.tolist()
        logprobs = self.logprobs.tolist() if self.logprobs is not None else [None] * len(tokens)
        return tokens, words, logprobs


@dataclass
class Batch:
    """One model's part of a launched step: the requests of its sampled rows, in row order."""

    model: int
    reqs: list[Request]
    results: Results
    # Rows launched ahead with a placeholder input (a Feed): each row's view size at planning.
    # After the previous step is applied, such a row is kept only if its view still ends there.
    planned_sizes: dict[int, int] = field(default_factory=dict)  # row -> view size
    valid: "list[bool] | None" = None  # per row, once checked (None: every row)
    draft_probs: dict = field(default_factory=dict)  # row -> the small model's q of a sampled draft
    # Requests whose rows verified drafts (speculation.py), their groups, the results, and the
    # rows' top logprobs (a HostCopy of values, ids) when a request asked for them.
    verified: "tuple[list[Request], list, object, HostCopy | None] | None" = None
    prompt_scores: "PromptScores | None" = None  # prompt tokens this step scored


@dataclass
class Step:
    """Everything one engine step launched."""

    ran: int = 0  # sequences run, over both models
    batches: list[Batch] = field(default_factory=list)
    failures: list[tuple[Request, str]] = field(default_factory=list)  # requests whose batch failed
    # (model, request id) of the views this step's plan ended with a placeholder: launched ahead,
    # it runs on the tokens the step before it sampled, which the host sets once it has them.
    placeholders: set = field(default_factory=set)


@dataclass(frozen=True)
class Feed:
    """The inputs of a step launched ahead that come from the previous step's samples, on the device:
    input_ids[positions] = source tokens[rows]; and, for rows that detect tags, their automaton
    states from the source's detection words."""

    positions: torch.Tensor  # int64: token indices in the step's input_ids
    rows: torch.Tensor  # int64: rows of the previous step's samples, of the same model
    source: Results
    sample_rows: torch.Tensor  # int64: this step's sampled rows whose state comes from the source
    state_rows: torch.Tensor  # int64: ... and which source row each reads

    def patch_inputs(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.positions, self.source.tokens.index_select(0, self.rows))
