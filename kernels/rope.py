"""Rotary position embedding (rotate-half layout, as Qwen2) fused with the KV-cache store."""

import torch


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A [max_positions, head_dim] table: cos in the first half of the columns, sin in the second.

    Computed in fp32 like Hugging Face, then cast, so positions far out stay exact.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_store_kv_ref(
    qk: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates qk [N, Hq + Hkv, D] (query heads, then key heads) at `positions`, writes the keys
    and v [N, Hkv, D] into the paged caches ([pages, page_tokens, Hkv, D]) at `slot_mapping`
    (page * page_tokens + offset; negative slots are padding and skipped), and returns the rotated
    (q, k)."""
    half = qk.shape[-1] // 2
    table = cos_sin[positions].unsqueeze(1)
    qk = _rotate(qk, table[..., :half], table[..., half:])
    q, k = qk.split([qk.shape[1] - v.shape[1], v.shape[1]], dim=1)
    page_tokens = k_cache.shape[1]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k_store, v_store = slot_mapping[valid], k[valid], v[valid]
    else:
        k_store, v_store = k, v
    pages, offsets = slot_mapping // page_tokens, slot_mapping % page_tokens
    k_cache[pages, offsets] = k_store
    v_cache[pages, offsets] = v_store
    return q, k
