"""Compute ops over the shared paged KV pool.

Each op has a plain-PyTorch reference (`*_ref`): the CPU runtime path and the oracle for the
Triton kernels that sit beside it.
"""

from .activation import silu_and_mul_ref
from .linear import linear_ref, silu_mul_linear_ref
from .norms import add_rms_norm_ref, rms_norm_ref
from .paged_attention import paged_decode_attention_ref, paged_extend_attention_ref
from .rope import apply_rope_ref, rope_cos_sin, rope_store_kv_ref

__all__ = [
    "add_rms_norm_ref",
    "apply_rope_ref",
    "linear_ref",
    "paged_decode_attention_ref",
    "paged_extend_attention_ref",
    "rms_norm_ref",
    "rope_cos_sin",
    "rope_store_kv_ref",
    "silu_and_mul_ref",
    "silu_mul_linear_ref",
]
