"""Rotary position embedding (rotate-half layout, as Qwen2 and Llama) fused with the KV-cache store."""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3's long-context RoPE (`rope_type: llama3`): frequencies whose wavelength exceeds
    original_max_position_embeddings / low_freq_factor are slowed by `factor`, those shorter than
    original / high_freq_factor are kept, and the band between is a linear blend of the two."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The scaled inverse frequencies, computed as Hugging Face's _compute_llama3_parameters does."""
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * slowed / self.factor + smooth * slowed
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, slowed)


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, dtype: torch.dtype, device,
                 scaling: "Llama3RopeScaling | None" = None) -> torch.Tensor:
    """A [max_positions, 2, head_dim] table: row 0 is (cos, cos), row 1 is (-sin, sin).

    With it, rotate-half RoPE is x * row0 + roll(x, head_dim / 2) * row1: four ops, no cat.
    Computed in fp32 like Hugging Face, then cast, so positions far out stay exact. `scaling`
    rescales the inverse frequencies; the kernels read only the table, so they need no change.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    t = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1).to(dtype)


def apply_rope_ref(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [..., T, H, D] by `rope` [T, 2, D] (rows of rope_cos_sin)."""
    return x * rope[:, 0:1] + x.roll(x.shape[-1] // 2, dims=-1) * rope[:, 1:2]


def rope_store_kv_ref(
    qk: torch.Tensor,
    v: torch.Tensor,
    rope: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates qk [N, Hq + Hkv, D] (query heads, then key heads) by `rope` [N, 2, D] (the rows of
    rope_cos_sin at each token's position), writes the keys and v [N, Hkv, D] into the paged caches
    ([pages, page_tokens, Hkv, D]) at `slot_mapping` (page * page_tokens + offset; negative slots
    are padding and skipped), and returns the rotated (q, k)."""
    qk = apply_rope_ref(qk, rope)
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
