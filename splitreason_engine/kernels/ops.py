"""The op set a model step runs: the PyTorch references or the Triton kernels, chosen per engine.

Every op has one signature in both sets, so the model code is the same on every device; two
Triton ops also work in place where their references return new tensors (rope_store_kv rotates qk
in place, add_rms_norm writes the sum into `residual`), so a caller must not reuse those inputs. The Triton
set is imported only when chosen: a CPU-only install never needs Triton, and on CPU the kernels
run only in Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined).
"""

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .activation import silu_and_mul_ref
from .linear import linear_ref, silu_mul_linear_ref
from .norms import add_rms_norm_ref, rms_norm_ref
from .paged_attention import paged_decode_attention_ref, paged_extend_attention_ref
from .rope import rope_store_kv_ref
from .sample import sample_and_detect_ref
from .verify import verify_rows_ref

KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope_store_kv: Callable
    decode_attention: Callable
    extend_attention: Callable  # (..., seq_lens, scale, max_query_len): the host knows the longest chunk
    silu_and_mul: Callable
    sample_and_detect: Callable
    verify_rows: Callable  # speculative decoding: decides each verify row (kernels/verify.py)
    linear: Callable  # (x, weight, bias=None, residual=None): the projections
    silu_mul_linear: Callable  # (gate_up, weight, bias=None, residual=None): SwiGLU + down projection
    # (device): called at the start of every forward pass, inside a captured CUDA graph too. The
    # Triton set zeroes the decode-attention counters there, so a launch that died halfway (its
    # merger never ran) cannot leave a counter that corrupts every later call.
    begin_forward: Callable


def _extend_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len):
    """The reference has no grid to size: it takes the chunks' lengths from query_start_loc."""
    return paged_extend_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)


def _nothing_to_reset(device: torch.device) -> None:
    """The references keep no state between calls."""


TORCH_OPS = Ops("torch", rms_norm_ref, add_rms_norm_ref, rope_store_kv_ref, paged_decode_attention_ref, _extend_ref,
                silu_and_mul_ref, sample_and_detect_ref, verify_rows_ref, linear_ref, silu_mul_linear_ref,
                _nothing_to_reset)


def triton_ops() -> Ops:
    from .activation_triton import silu_and_mul
    from .linear_triton import linear, silu_mul_linear
    from .norms_triton import add_rms_norm, rms_norm
    from .paged_attention_triton import paged_decode_attention, paged_extend_attention, reset_decode_counters
    from .rope_triton import rope_store_kv
    from .sample_triton import sample_and_detect
    from .verify_triton import verify_rows

    return Ops("triton", rms_norm, add_rms_norm, rope_store_kv, paged_decode_attention, paged_extend_attention,
               silu_and_mul, sample_and_detect, verify_rows, linear, silu_mul_linear, reset_decode_counters)


def select_ops(kernels: str, device: torch.device) -> Ops:
    """The op set for `kernels` on `device`; "auto" is the Triton kernels on CUDA, the references elsewhere."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if kernels == "torch":
        return TORCH_OPS
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels='triton' on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before starting Python")
    try:
        return triton_ops()
    except ImportError as e:
        raise ValueError(f"kernels='triton' needs Triton installed (pip install triton): {e}") from e
