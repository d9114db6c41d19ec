"""Projections (x @ W^T + b), alone and with the decoder's neighbours fused: the residual add after
them, and SwiGLU before the down projection.

These are the PyTorch path (in the inputs' dtype, exactly nn.Linear, then the add) and the oracle
of the Triton decode GEMV (linear_triton.py), which computes in fp32 and rounds once: it is tested
against these references evaluated on fp32 copies of its inputs.
"""

import torch
import torch.nn.functional as F

from .activation import silu_and_mul_ref


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None,
               residual: "torch.Tensor | None" = None) -> torch.Tensor:
    """F.linear(x, weight, bias), plus `residual` when given."""
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def silu_mul_linear_ref(gate_up: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None,
                        residual: "torch.Tensor | None" = None) -> torch.Tensor:
    """linear_ref(silu(gate) * up, ...), where `gate_up` is [..., 2 * I] with gate first: the down
    projection of a SwiGLU MLP. The activation is in gate_up's dtype, as silu_and_mul_ref's."""
    return linear_ref(silu_and_mul_ref(gate_up), weight, bias, residual)
