"""One KV arena shared by every model: fixed-size pages, each model with its own geometry.

A page of `page_bytes` holds `page_bytes // kv_bytes_per_token(model)` tokens of a model across
all of its layers ([layers, 2, page_tokens, kv_heads, head_dim]); the rest of the page is waste.
Page ids are global, so a page freed by one model is usable by the other at once.

With tensor parallelism every rank has the same pages (count and tokens per page, from the full
models' geometry) holding only its own KV heads, so its pages are smaller (arena_page_bytes).
"""

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .sampling import to_device

@dataclass(frozen=True)
class ModelGeometry:
    page_tokens: int
    kv_bytes_per_token: int
    page_bytes: int

    @property
    def waste_bytes_per_page(self) -> int:
        return self.page_bytes - self.page_tokens * self.kv_bytes_per_token

    @property
    def waste_fraction(self) -> float:
        return self.waste_bytes_per_page / self.page_bytes


def geometry(config: ModelConfig, dtype: torch.dtype, page_bytes: int) -> ModelGeometry:
    """How `config`'s model fills a page of `page_bytes`."""
    per_token = config.kv_bytes_per_token(dtype)
    return ModelGeometry(page_bytes // per_token, per_token, page_bytes)


def page_bytes_for(configs: list[ModelConfig], dtype: torch.dtype, page_tokens: int) -> int:
    """Pages sized so the model with the most KV per token gets exactly `page_tokens` per page."""
    return page_tokens * max(c.kv_bytes_per_token(dtype) for c in configs)


def available_bytes(device: torch.device) -> int:
    """Memory still free on `device`: CUDA's free memory, or MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass kv_cache_bytes")


def arena_page_bytes(configs: list[ModelConfig], dtype: torch.dtype, page_bytes: int, kv_heads: list[int]) -> int:
    """Bytes a page takes on a rank holding `kv_heads` KV heads of each model (page_bytes with all of them)."""
    return max(geometry(c, dtype, page_bytes).page_tokens * c.kv_bytes_per_token(dtype, h)
               for c, h in zip(configs, kv_heads))


class KVPool:
    """The arena and each model's per-layer [pages, page_tokens, kv_heads, head_dim] cache views.

    `kv_heads`: each model's KV heads on this rank (default: all of them)."""

    def __init__(self, configs: list[ModelConfig], dtype: torch.dtype, device: torch.device,
                 page_bytes: int, num_pages: int, kv_heads: "list[int] | None" = None):
        if num_pages < 1:
            raise ValueError(f"KV pool of {num_pages} pages: the budget is smaller than one page of {page_bytes} bytes")
        self.page_bytes, self.num_pages = page_bytes, num_pages
        elem = torch.empty((), dtype=dtype).element_size()
        self.geometries = [geometry(c, dtype, page_bytes) for c in configs]
        for g in self.geometries:
            if g.page_tokens < 1:
                raise ValueError(f"page of {page_bytes} bytes cannot hold one token ({g.kv_bytes_per_token} bytes)")
        row = page_bytes if kv_heads is None else arena_page_bytes(configs, dtype, page_bytes, kv_heads)
        kv_heads = kv_heads or [c.num_kv_heads for c in configs]
        self.arena = torch.zeros(num_pages, row // elem, dtype=dtype, device=device)
        self.kv_caches: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for c, g, heads in zip(configs, self.geometries, kv_heads):
            used = g.page_tokens * c.kv_bytes_per_token(dtype, heads) // elem
            view = self.arena[:, :used].view(num_pages, c.num_layers, 2, g.page_tokens, heads, c.head_dim)
            self.kv_caches.append([(view[:, l, 0], view[:, l, 1]) for l in range(c.num_layers)])

    def copy_pages(self, sources: list[int], destinations: list[int]) -> None:
        """Copies whole pages (every model's layout lives in the same arena row), queued on the
        device before the step that reads them."""
        src = to_device(np.array(sources, dtype=np.int64), self.arena.device)
        dst = to_device(np.array(destinations, dtype=np.int64), self.arena.device)
        self.arena.index_copy_(0, dst, self.arena.index_select(0, src))

    def capacity_tokens(self, model: int) -> int:
        return self.num_pages * self.geometries[model].page_tokens

    def describe(self) -> str:
        parts = [f"{self.num_pages} pages x {self.page_bytes / 2**10:.0f} KiB = {self.num_pages * self.page_bytes / 2**20:.1f} MiB"]
        for i, g in enumerate(self.geometries):
            parts.append(f"model {i}: {g.page_tokens} tokens/page, {self.capacity_tokens(i)} tokens, "
                         f"waste {g.waste_bytes_per_page} B/page ({100 * g.waste_fraction:.2f}%)")
        return "; ".join(parts)
