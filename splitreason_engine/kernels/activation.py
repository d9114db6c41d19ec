"""SwiGLU activation on the fused gate/up projection."""

import torch
import torch.nn.functional as F


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where `gate_up` is [..., 2 * inter] with gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
