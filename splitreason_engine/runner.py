"""Runs one model's planned batch: scheduler arrays -> tensors -> forward -> logits of sample rows.

On CUDA, steps that only decode run from CUDA graphs (decode_graphs.py), one per batch-size
bucket; every other step (prefill, catch-up, mixed) runs eagerly. An eager step's int32 inputs
reach the GPU in one asynchronous copy: they are packed, back to back, into a pinned host staging
buffer (block-table rows compacted to the step's width) and the tensors the model reads are views
of one device buffer. On the CPU the tensors are zero-copy views of the scheduler's buffers.

With tensor parallelism rank 0's runner always stages, and its packed host buffer, led by a
header of the step's counts, is the step message: one broadcast sends it to the other ranks,
whose tp_worker.serve_worker() builds the same views from it and runs the same forward pass.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .decode_graphs import DecodeGraphs
from .inflight import Feed
from .models import AttentionBatch, CausalLM
from .parallel import TPGroup
from .sampling import to_device

# The step's arrays in the order they are packed (each region starts on a 16-byte boundary).
_PACKED = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "logits_indices", "block_tables")
_ALIGN = 4  # int32 elements: 16 bytes
# The message header: op, model, num_seqs, num_tokens, num_decodes, num_samples, width, max_query_len.
HEADER = 8
STOP, STEP = 0, 1  # a message of zeros is STOP (executor.shutdown)


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def message_capacity(buffers: dict[str, np.ndarray]) -> int:
    """int32 elements of a packed step of the largest size `buffers` can hold, header included."""
    return HEADER + sum(_round_up(len(buffers[name])) for name in _PACKED)


def packed_layout(num_seqs: int, num_tokens: int, num_gathered: int, width: int) -> dict[str, tuple[int, int]]:
    """(offset, size) of each packed array, after the header."""
    sizes = {"input_ids": num_tokens, "positions": num_tokens, "slot_mapping": num_tokens,
             "query_start_loc": num_seqs + 1, "seq_lens": num_seqs, "logits_indices": num_gathered,
             "block_tables": num_seqs * width}
    layout, used = {}, HEADER
    for name in _PACKED:
        layout[name] = (used, sizes[name])
        used += _round_up(sizes[name])
    return layout


def packed_views(staging: torch.Tensor, layout: dict[str, tuple[int, int]], num_seqs: int,
           width: int) -> dict[str, torch.Tensor]:
    views = {name: staging[offset: offset + size] for name, (offset, size) in layout.items()}
    views["block_tables"] = views["block_tables"].view(num_seqs, width)
    return views


def run_forward(model: CausalLM, kv_caches, t: dict[str, torch.Tensor], num_decodes: int, max_query_len: int,
         num_samples: int, gather: bool) -> torch.Tensor:
    """The forward pass over a step's tensors, then the logits of its sampled rows."""
    batch = AttentionBatch(
        positions=t["positions"],
        slot_mapping=t["slot_mapping"],
        query_start_loc=t["query_start_loc"],
        seq_lens=t["seq_lens"],
        block_tables=t["block_tables"],
        num_decodes=num_decodes,
        max_query_len=max_query_len,
    )
    hidden = model(t["input_ids"], batch, kv_caches)
    if num_samples == 0:
        return hidden.new_empty(0, 0, dtype=torch.float32)
    rows = hidden[t["logits_indices"]] if gather else hidden
    return model.compute_logits(rows)


@dataclass(frozen=True)
class StepLink:
    """How rank 0's runner of one model sends its steps to the other ranks."""

    group: TPGroup
    model: int
    capacity: int  # message int32 elements: one size for every model's runner and every rank


def stages(device: torch.device) -> bool:
    """Whether eager steps on `device` go through the staging buffer (CUDA) or read the scheduler's
    buffers in place (CPU). Tests patch it to run the CUDA layout on the CPU."""
    return device.type == "cuda"


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 buffers: dict[str, np.ndarray], block_table_stride: int, device: torch.device,
                 graphs: "DecodeGraphs | None" = None, link: "StepLink | None" = None):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buffers, self.stride = buffers, block_table_stride
        self.graphs, self.link = graphs, link
        self.staged = stages(device) or link is not None
        if self.staged:
            capacity = link.capacity if link is not None else message_capacity(buffers)
            pinned = device.type == "cuda"
            # Two host buffers, used in turn: a step rewrites one only after the copy that last read
            # it has run (its event), which is long done by then, as the steps in between sync.
            self._host = [torch.empty(capacity, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
            self._host_np = [h.numpy() for h in self._host]
            self._copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
            self._turn = 0
            self._staging = torch.empty(capacity, dtype=torch.int32, device=device)

    def _tensor(self, name: str, n: int) -> torch.Tensor:
        # On the CPU this is a zero-copy view of the scheduler's buffer, valid until its next step.
        return torch.from_numpy(self.buffers[name][:n]).to(self.device, non_blocking=True)

    def _stage(self, header: list[int], num_gathered: int) -> dict[str, torch.Tensor]:
        """The step's arrays as views of the device staging buffer, after one asynchronous copy
        (with tensor parallelism, after the packed buffer went to the other ranks)."""
        b, turn = self.buffers, self._turn
        _, _, num_seqs, num_tokens, _, _, width, _ = header
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy two steps ago has read this host buffer
        host = self._host_np[turn]
        host[:HEADER] = header
        layout = packed_layout(num_seqs, num_tokens, num_gathered, width)
        for name, (offset, n) in layout.items():
            if name == "block_tables":
                host[offset: offset + n].reshape(num_seqs, width)[:] = (
                    b[name][: num_seqs * self.stride].reshape(num_seqs, self.stride)[:, :width])
            else:
                host[offset: offset + n] = b[name][:n]
        used = sum(layout["block_tables"])  # the last region: where the packed step ends
        if self.link is not None:
            self.link.group.broadcast(self._host[turn])
        self._staging[:used].copy_(self._host[turn][:used], non_blocking=True)
        if self._copied[turn] is not None:
            self._copied[turn].record()
        return packed_views(self._staging, layout, num_seqs, width)

    def execute(self, num_seqs: int, num_tokens: int, num_decodes: int, num_samples: int,
                width: int, feed: "Feed | None" = None, extra_rows: "np.ndarray | None" = None) -> torch.Tensor:
        """fp32 logits [num_samples, vocab] of the rows the scheduler marked for sampling; `feed`
        patches input ids that the previous step sampled and the host has not seen (placeholders in
        the scheduler's buffers); `extra_rows`: more token rows whose logits follow the sampled
        rows' (prompt tokens to score). With tensor parallelism any failure is a TPFailure: the
        ranks are out of step."""
        if self.link is None:
            return self._execute(num_seqs, num_tokens, num_decodes, num_samples, width, feed, extra_rows)
        try:
            return self._execute(num_seqs, num_tokens, num_decodes, num_samples, width, feed, extra_rows)
        except Exception as e:
            raise self.link.group.failure(e) from e

    def _execute(self, num_seqs: int, num_tokens: int, num_decodes: int, num_samples: int,
                 width: int, feed: "Feed | None", extra_rows: "np.ndarray | None") -> torch.Tensor:
        b = self.buffers
        if (self.graphs is not None and extra_rows is None and num_decodes == num_seqs == num_tokens == num_samples
                and num_seqs <= self.graphs.max_batch):
            return self.graphs.run(b, num_seqs, width, feed)
        num_gathered, order = num_samples, None
        if extra_rows is not None:
            # The gathered rows in step order (every rank reads them from the step message, and
            # all of a step's rows in order need no gather); the logits are put back after.
            rows = np.concatenate([b["logits_indices"][:num_samples], extra_rows])
            order = np.argsort(rows, kind="stable")
            num_gathered = len(rows)
            b["logits_indices"][:num_gathered] = rows[order]
        chunk_lens = np.diff(b["query_start_loc"][num_decodes: num_seqs + 1])
        max_query_len = int(chunk_lens.max(initial=1))  # on the host: extend's grid, no device read
        gather = 0 < num_gathered < num_tokens  # gathered rows are a subset of the tokens
        if self.staged:
            model = self.link.model if self.link is not None else 0
            header = [STEP, model, num_seqs, num_tokens, num_decodes, num_gathered, width, max_query_len]
            t = self._stage(header, num_gathered if gather else 0)
        else:
            block_tables = torch.from_numpy(
                b["block_tables"][: num_seqs * self.stride].reshape(num_seqs, self.stride)[:, :width])
            t = {name: self._tensor(name, n) for name, n in (
                ("input_ids", num_tokens), ("positions", num_tokens), ("slot_mapping", num_tokens),
                ("query_start_loc", num_seqs + 1), ("seq_lens", num_seqs))}
            t["block_tables"] = block_tables.to(self.device, non_blocking=True)
            if gather:
                t["logits_indices"] = self._tensor("logits_indices", num_gathered)
        if feed is not None:
            feed.patch_inputs(t["input_ids"])
        logits = run_forward(self.model, self.kv_caches, t, num_decodes, max_query_len, num_gathered, gather)
        if order is None:
            return logits
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return logits.index_select(0, to_device(inverse, logits.device))

