"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches a few hundred small kernels; at batch 1 on a GPU their launch overhead, not
the reads from memory, would set the pace. A graph captures the whole forward and the logits once
per bucket over static buffers; each step copies the scheduler's arrays into them (one
asynchronous copy from pinned memory), pads the batch to its bucket and replays. Padding rows have
seq_len 0 and slot -1: they attend to nothing and store nothing, and their logits are never read.

Every bucket is captured at start-up, largest first, so the buckets share one memory pool, a
capture never stalls a live step, and running out of memory shows at start-up. With
capture=False the same static, padded buffers run eagerly: that is how the CPU tests check the
padding and bucketing the graphs rely on.
"""

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .inflight import Feed
from .models import AttentionBatch, CausalLM

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256  # larger decode batches are bound by the weights' reads anyway: they run eagerly
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
_INPUTS = ("input_ids", "positions", "slot_mapping", "seq_lens")


def buckets_for(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: every bucket below max_batch, and max_batch."""
    return [b for b in _BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_batch: int, block_table_width: int, device: torch.device, capture: bool = True):
        self.model, self.kv_caches, self.capture = model, kv_caches, capture
        self.max_batch = n = min(max_batch, MAX_GRAPH_BATCH)
        self.buckets = buckets_for(n)
        self.width = block_table_width
        # One staging buffer: the four per-token inputs at fixed offsets (the graphs read them
        # there), then this step's block-table rows, compacted to the step's width.
        self.staging = torch.zeros(len(_INPUTS) * n + n * block_table_width, dtype=torch.int32, device=device)
        self.inputs = {name: self.staging[i * n: (i + 1) * n] for i, name in enumerate(_INPUTS)}
        # Two pinned host buffers, used in turn: with overlapped steps the next step fills one while
        # the copy from the other may still be queued; a buffer is rewritten only after its last
        # copy has run (its event).
        pinned = device.type == "cuda"
        self.host = [torch.zeros(self.staging.shape, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        for h in self.host:
            h.numpy()[2 * n: 3 * n] = -1  # slot_mapping: every row is padding until a step fills it
        self.copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.turn = 0
        self.staging.copy_(self.host[0])
        self.block_tables = torch.zeros(n, block_table_width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits = torch.empty(n, model.lm_head.out_features, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _forward(self, bucket: int) -> None:
        """The model over the first `bucket` static rows, logits into the static logits buffer."""
        batch = AttentionBatch(
            positions=self.inputs["positions"][:bucket],
            slot_mapping=self.inputs["slot_mapping"][:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.inputs["seq_lens"][:bucket],
            block_tables=self.block_tables[:bucket],
            num_decodes=bucket,
        )
        hidden = self.model(self.inputs["input_ids"][:bucket], batch, self.kv_caches)
        self.logits[:bucket].copy_(self.model.compute_logits(hidden))

    def capture_all(self, progress: bool = True) -> None:
        """Captures every bucket, largest first (the smaller ones reuse its memory). The static
        rows are all padding meanwhile, so the warm-up passes write nothing into the pool."""
        if not self.capture:
            return
        pool = None
        for bucket in tqdm(sorted(self.buckets, reverse=True), desc="CUDA graphs", unit="graph", disable=not progress):
            side = torch.cuda.Stream()  # warm-up off the default stream, as graph capture wants
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(bucket)  # compiles the kernels, sets up cuBLAS for this shape
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def run(self, buffers: dict[str, np.ndarray], num_seqs: int, width: int, feed: "Feed | None" = None) -> torch.Tensor:
        """fp32 logits [num_seqs, vocab] of a decode-only step planned into `buffers` (input ids
        patched by `feed`): a view of the static logits buffer, valid until this object's next run
        (the caller launches the sampler on it first)."""
        bucket = next(b for b in self.buckets if b >= num_seqs)
        turn, n = self.turn, self.max_batch
        self.turn ^= 1
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # the copy two steps ago has read this host buffer
        h = self.host[turn].numpy()
        for i, name in enumerate(_INPUTS):
            h[i * n: i * n + num_seqs] = buffers[name][:num_seqs]
        h[num_seqs: bucket] = 0  # padding rows: a valid id (a buffer may hold placeholders) ...
        h[2 * n + num_seqs: 2 * n + bucket] = -1  # ... no slot ...
        h[3 * n + num_seqs: 3 * n + bucket] = 0  # ... and no context
        start, used = len(_INPUTS) * n, len(_INPUTS) * n + num_seqs * width
        tables = buffers["block_tables"][: num_seqs * self.width].reshape(num_seqs, self.width)[:, :width]
        h[start:used].reshape(num_seqs, width)[:] = tables
        self.staging[:used].copy_(self.host[turn][:used], non_blocking=True)
        if self.copied[turn] is not None:
            self.copied[turn].record()
        self.block_tables[:num_seqs, :width].copy_(self.staging[start:used].view(num_seqs, width))
        if feed is not None:
            feed.patch_inputs(self.inputs["input_ids"])
        if self.capture:
            self.graphs[bucket].replay()
        else:
            self._forward(bucket)
        return self.logits[:num_seqs]
