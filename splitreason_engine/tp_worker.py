"""A tensor-parallel worker rank: its shards of the models and its share of the KV pool, then the
forward pass of every step message rank 0 broadcasts (runner.py packs them), until STOP."""

import torch

from .kernels.ops import select_ops
from .kv_pool import KVPool
from .loader import build_model, load_config
from .parallel import TPGroup, WorkerSpec, local_heads
from .runner import HEADER, STOP, packed_layout, packed_views, run_forward


@torch.inference_mode()
def serve_worker(spec: WorkerSpec, group: TPGroup, device: torch.device) -> None:
    """A worker rank's life: its shards of the models, then rank 0's set-up message (pages, page
    bytes, message size) and its pool, then each step message's forward pass until STOP."""
    ops = select_ops(spec.config.model.kernels, device)
    configs = [load_config(s) for s in spec.sources]
    models = [build_model(s, c, spec.dtype, device, spec.max_model_len, spec.config.model.seed + i, False, ops, group)
              for i, (s, c) in enumerate(zip(spec.sources, configs))]
    num_pages, page_bytes, capacity = group.receive_setup()
    if num_pages == 0:  # rank 0 gave up during start-up
        return
    kv_heads = [local_heads(c, group.world_size)[1] for c in configs]
    pool = KVPool(configs, spec.dtype, device, page_bytes, num_pages, kv_heads)
    host = torch.empty(capacity, dtype=torch.int32)
    staging = host if device.type == "cpu" else torch.empty(capacity, dtype=torch.int32, device=device)
    while True:
        group.broadcast(host)
        op, m, num_seqs, num_tokens, num_decodes, num_samples, width, max_query_len = host[:HEADER].tolist()
        if op == STOP:
            return
        gather = 0 < num_samples < num_tokens
        if staging is not host:
            staging.copy_(host)
        layout = packed_layout(num_seqs, num_tokens, num_samples if gather else 0, width)
        t = packed_views(staging, layout, num_seqs, width)
        run_forward(models[m], pool.kv_caches[m], t, num_decodes, max_query_len, num_samples, gather)
