"""Triton RMSNorm and residual-add + RMSNorm: the GPU twins of `norms.rms_norm_ref` and
`norms.add_rms_norm_ref`.

One program per row (hidden up to 8192 fits one block). The rounding order is the reference's:
normalise in fp32, cast to the input dtype, then multiply by the weight, so results match
Hugging Face's Qwen2RMSNorm. add_rms_norm reads x and the residual once and writes the sum back
into the residual buffer in place, saving a full read and write per layer.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_normed(s, out_ptrs, w_ptr, w_s0, cols, mask, hidden, eps, in_dtype: tl.constexpr):
    """Stores rms_norm(s) * weight, with s already the fp32 value of an `in_dtype` row."""
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / hidden + eps)
    y = (s * rstd).to(in_dtype).to(tl.float32)
    w = tl.load(w_ptr + cols * w_s0, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (y * w).to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, hidden, eps, x_s0, x_s1, w_s0, out_s0, out_s1,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_s0 + cols * x_s1, mask=mask, other=0.0).to(tl.float32)
    _store_normed(x, out_ptr + row * out_s0 + cols * out_s1, w_ptr, w_s0, cols, mask, hidden, eps,
                  x_ptr.dtype.element_ty)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, hidden, eps, x_s0, x_s1, res_s0, res_s1,
                         w_s0, out_s0, out_s1, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_s0 + cols * x_s1, mask=mask, other=0.0).to(tl.float32)
    res_ptrs = res_ptr + row * res_s0 + cols * res_s1
    r = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(res_ptr.dtype.element_ty)
    tl.store(res_ptrs, s, mask=mask)
    _store_normed(s.to(tl.float32), out_ptr + row * out_s0 + cols * out_s1, w_ptr, w_s0, cols, mask,
                  hidden, eps, res_ptr.dtype.element_ty)


def _launch_params(hidden: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for one row of `hidden` elements per program."""
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // 512, 1), 16)


def _new_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The reference's output for normalising x: its shape, and the dtype `weight * normed` promotes to."""
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """`rms_norm_ref` of x [..., H]; written into `out` when given (same shape as x)."""
    hidden = x.shape[-1]
    out = _new_out(x, weight) if out is None else out
    rows = x.shape[:-1].numel()
    x2, out2 = x.reshape(rows, hidden), out.view(rows, hidden)
    if rows:
        block, warps = _launch_params(hidden)
        _rms_norm_kernel[(rows,)](x2, weight, out2, hidden, eps, *x2.stride(), weight.stride(0),
                                         *out2.stride(), BLOCK=block, num_warps=warps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: "torch.Tensor | None" = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_ref`, fused: returns (rms_norm(x + residual), residual), where `residual`
    ([..., H], viewable as rows) is the caller's buffer, overwritten IN PLACE with x + residual.
    The normed rows go to `out` when given, else to a new tensor."""
    hidden = x.shape[-1]
    out = _new_out(residual, weight) if out is None else out
    rows = x.shape[:-1].numel()
    x2, res2, out2 = x.reshape(rows, hidden), residual.view(rows, hidden), out.view(rows, hidden)
    if rows:
        block, warps = _launch_params(hidden)
        _add_rms_norm_kernel[(rows,)](x2, res2, weight, out2, hidden, eps, *x2.stride(), *res2.stride(),
                                             weight.stride(0), *out2.stride(), BLOCK=block, num_warps=warps)
    return out, residual
