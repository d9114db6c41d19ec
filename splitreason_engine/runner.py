"""Runs one model's planned batch: scheduler arrays -> tensors -> forward -> logits of sample rows.

On CUDA, steps that only decode run from CUDA graphs (decode_graphs.py), one per batch-size
bucket; every other step (prefill, catch-up, mixed) runs eagerly. An eager step's int32 inputs
reach the GPU in one asynchronous copy: they are packed, back to back, into a pinned host staging
buffer (block-table rows compacted to the step's width) and the tensors the model reads are views
of one device buffer. On the CPU the tensors are zero-copy views of the scheduler's buffers.
"""

import numpy as np
import torch

from .decode_graphs import DecodeGraphs
from .models import AttentionBatch, CausalLM

# The step's arrays in the order they are packed (each region starts on a 16-byte boundary).
_PACKED = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "logits_indices", "block_tables")
_ALIGN = 4  # int32 elements: 16 bytes


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def stages(device: torch.device) -> bool:
    """Whether eager steps on `device` go through the staging buffer (CUDA) or read the scheduler's
    buffers in place (CPU). Tests patch it to run the CUDA layout on the CPU."""
    return device.type == "cuda"


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 buffers: dict[str, np.ndarray], block_table_stride: int, device: torch.device,
                 graphs: "DecodeGraphs | None" = None):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buffers, self.stride = buffers, block_table_stride
        self.graphs = graphs
        self.staged = stages(device)
        if self.staged:
            capacity = sum(_round_up(len(buffers[name])) for name in _PACKED)
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

    def _stage(self, num_seqs: int, num_tokens: int, num_samples: int, width: int) -> dict[str, torch.Tensor]:
        """The step's arrays as views of the device staging buffer, after one asynchronous copy."""
        b, turn = self.buffers, self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy two steps ago has read this host buffer
        host = self._host_np[turn]
        sizes = {"input_ids": num_tokens, "positions": num_tokens, "slot_mapping": num_tokens,
                 "query_start_loc": num_seqs + 1, "seq_lens": num_seqs, "logits_indices": num_samples,
                 "block_tables": num_seqs * width}
        offsets, used = {}, 0
        for name in _PACKED:
            offsets[name], n = used, sizes[name]
            if name == "block_tables":
                host[used: used + n].reshape(num_seqs, width)[:] = (
                    b[name][: num_seqs * self.stride].reshape(num_seqs, self.stride)[:, :width])
            else:
                host[used: used + n] = b[name][:n]
            used += _round_up(n)
        self._staging[:used].copy_(self._host[turn][:used], non_blocking=True)
        if self._copied[turn] is not None:
            self._copied[turn].record()
        views = {name: self._staging[offsets[name]: offsets[name] + sizes[name]] for name in _PACKED}
        views["block_tables"] = views["block_tables"].view(num_seqs, width)
        return views

    def execute(self, num_seqs: int, num_tokens: int, num_decodes: int, num_samples: int,
                width: int) -> torch.Tensor:
        """fp32 logits [num_samples, vocab] of the rows the scheduler marked for sampling."""
        b = self.buffers
        if (self.graphs is not None and num_decodes == num_seqs == num_tokens == num_samples
                and num_seqs <= self.graphs.max_batch):
            return self.graphs.run(b, num_seqs, width)
        chunk_lens = np.diff(b["query_start_loc"][num_decodes: num_seqs + 1])
        max_query_len = int(chunk_lens.max(initial=1))  # on the host: extend's grid, no device read
        gather = 0 < num_samples < num_tokens  # sampled rows are a subset of the tokens
        if self.staged:
            t = self._stage(num_seqs, num_tokens, num_samples if gather else 0, width)
        else:
            block_tables = torch.from_numpy(
                b["block_tables"][: num_seqs * self.stride].reshape(num_seqs, self.stride)[:, :width])
            t = {name: self._tensor(name, n) for name, n in (
                ("input_ids", num_tokens), ("positions", num_tokens), ("slot_mapping", num_tokens),
                ("query_start_loc", num_seqs + 1), ("seq_lens", num_seqs))}
            t["block_tables"] = block_tables.to(self.device, non_blocking=True)
            if gather:
                t["logits_indices"] = self._tensor("logits_indices", num_samples)
        batch = AttentionBatch(
            positions=t["positions"],
            slot_mapping=t["slot_mapping"],
            query_start_loc=t["query_start_loc"],
            seq_lens=t["seq_lens"],
            block_tables=t["block_tables"],
            num_decodes=num_decodes,
            max_query_len=max_query_len,
        )
        hidden = self.model(t["input_ids"], batch, self.kv_caches)
        if num_samples == 0:
            return hidden.new_empty(0, 0, dtype=torch.float32)
        rows = hidden[t["logits_indices"]] if gather else hidden
        return self.model.compute_logits(rows)
