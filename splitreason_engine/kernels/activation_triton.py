"""Triton SwiGLU on the fused gate/up projection: the GPU twin of `activation.silu_and_mul_ref`.

Fusing silu and the product reads gate_up once and writes only the [N, I] result; computed in
fp32 and rounded once.
"""

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, inter, gu_s0, gu_s1, out_s0, out_s1, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate_ptrs = gu_ptr + row * gu_s0 + cols * gu_s1
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inter * gu_s1, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * out_s0 + cols * out_s1, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2 * I] (gate first) -> [..., I], written into `out` when given."""
    inter = gate_up.shape[-1] // 2
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    rows = gate_up.shape[:-1].numel()
    gu2, out2 = gate_up.reshape(rows, 2 * inter), out.view(rows, inter)
    if rows:
        block = min(triton.next_power_of_2(inter), _MAX_BLOCK)
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            gu2, out2, inter, *gu2.stride(), *out2.stride(), BLOCK=block)
    return out
