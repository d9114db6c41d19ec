"""Runs one model's planned batch: scheduler arrays -> tensors -> forward -> logits of sample rows.

On CUDA, steps that only decode run from CUDA graphs (decode_graphs.py), one per batch-size
bucket; every other step (prefill, catch-up, mixed) runs eagerly.
"""

import numpy as np
import torch

from .decode_graphs import DecodeGraphs
from .models.qwen2 import AttentionBatch, Qwen2ForCausalLM


class ModelRunner:
    def __init__(self, model: Qwen2ForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 buffers: dict[str, np.ndarray], block_table_stride: int, device: torch.device,
                 graphs: "DecodeGraphs | None" = None):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buffers, self.stride = buffers, block_table_stride
        self.graphs = graphs

    def _tensor(self, name: str, n: int) -> torch.Tensor:
        # On the CPU this is a zero-copy view of the scheduler's buffer, valid until its next step.
        return torch.from_numpy(self.buffers[name][:n]).to(self.device, non_blocking=True)

    def execute(self, num_seqs: int, num_tokens: int, num_decodes: int, num_samples: int,
                width: int) -> torch.Tensor:
        """fp32 logits [num_samples, vocab] of the rows the scheduler marked for sampling."""
        b = self.buffers
        if (self.graphs is not None and num_decodes == num_seqs == num_tokens == num_samples
                and num_seqs <= self.graphs.max_batch):
            return self.graphs.run(b, num_seqs, width)
        block_tables = torch.from_numpy(b["block_tables"][: num_seqs * self.stride].reshape(num_seqs, self.stride)[:, :width])
        chunk_lens = np.diff(b["query_start_loc"][num_decodes: num_seqs + 1])
        batch = AttentionBatch(
            positions=self._tensor("positions", num_tokens),
            slot_mapping=self._tensor("slot_mapping", num_tokens),
            query_start_loc=self._tensor("query_start_loc", num_seqs + 1),
            seq_lens=self._tensor("seq_lens", num_seqs),
            block_tables=block_tables.to(self.device, non_blocking=True),
            num_decodes=num_decodes,
            max_query_len=int(chunk_lens.max(initial=1)),
        )
        hidden = self.model(self._tensor("input_ids", num_tokens), batch, self.kv_caches)
        if num_samples == 0:
            return hidden.new_empty(0, 0, dtype=torch.float32)
        rows = hidden if num_samples == num_tokens else hidden[self._tensor("logits_indices", num_samples)]
        return self.model.compute_logits(rows)
