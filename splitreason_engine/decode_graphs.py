"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches a few hundred small kernels; at batch 1 on a GPU their launch overhead, not
the reads from memory, would set the pace. A graph captures the whole forward and the logits once
per bucket over static input buffers. Each step copies the scheduler's arrays into those buffers,
pads the batch to its bucket and replays. Padding rows have seq_len 0 and slot -1: they attend to
nothing and store nothing, and their logits are never read.

With capture=False the same static, padded buffers run eagerly: that is how the CPU tests check the
padding and bucketing the graphs rely on.
"""

import logging

import numpy as np
import torch

from .models.qwen2 import AttentionBatch, Qwen2ForCausalLM

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256  # larger decode batches are bound by the weights' reads anyway: they run eagerly
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def buckets_for(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: every bucket below max_batch, and max_batch."""
    return [b for b in _BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model: Qwen2ForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_batch: int, block_table_width: int, device: torch.device, capture: bool = True):
        self.model, self.kv_caches, self.capture = model, kv_caches, capture
        self.max_batch = min(max_batch, MAX_GRAPH_BATCH)
        self.buckets = buckets_for(self.max_batch)
        self.width = block_table_width
        n = self.max_batch

        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.int32, device=device)

        self.inputs = {name: zeros(n) for name in ("input_ids", "positions", "slot_mapping", "seq_lens")}
        self.block_tables = zeros(n, block_table_width)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _forward(self, bucket: int) -> torch.Tensor:
        batch = AttentionBatch(
            positions=self.inputs["positions"][:bucket],
            slot_mapping=self.inputs["slot_mapping"][:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.inputs["seq_lens"][:bucket],
            block_tables=self.block_tables[:bucket],
            num_decodes=bucket,
        )
        return self.model.compute_logits(self.model(self.inputs["input_ids"][:bucket], batch, self.kv_caches))

    def _capture(self, bucket: int) -> torch.cuda.CUDAGraph:
        self._forward(bucket)  # warm-up outside the capture: compiles kernels, sets up cuBLAS
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[bucket] = self._forward(bucket)
        if self.pool is None:
            self.pool = graph.pool()  # later buckets share the memory of the first
        self.graphs[bucket] = graph
        logger.info("captured a decode CUDA graph for batch %d", bucket)
        return graph

    def run(self, buffers: dict[str, np.ndarray], num_seqs: int, width: int) -> torch.Tensor:
        """fp32 logits [num_seqs, vocab] of a decode-only step planned into `buffers`."""
        bucket = next(b for b in self.buckets if b >= num_seqs)
        for name, static in self.inputs.items():
            static[:num_seqs].copy_(torch.from_numpy(buffers[name][:num_seqs]), non_blocking=True)
        tables = buffers["block_tables"][: num_seqs * self.width].reshape(num_seqs, self.width)[:, :width]
        self.block_tables[:num_seqs, :width].copy_(torch.from_numpy(tables), non_blocking=True)
        if bucket > num_seqs:
            self.inputs["slot_mapping"][num_seqs:bucket].fill_(-1)
            self.inputs["seq_lens"][num_seqs:bucket].fill_(0)
        if not self.capture:
            return self._forward(bucket)[:num_seqs]
        graph = self.graphs.get(bucket) or self._capture(bucket)
        graph.replay()
        return self.logits[bucket][:num_seqs]
