"""Triton decode GEMV: the projections of a step of 1 to 16 token rows, beside the PyTorch
references in linear.py (same arguments, same results).

At decode batch sizes a projection reads its whole weight to produce a handful of rows, so its time
is the weight's bytes over the memory bandwidth; cuBLAS splits some of these shapes over K and adds
a reduce kernel, and the bias, the SwiGLU before the down projection and the residual after it are
each a kernel more. Here one launch does all of it:
  - grid cdiv(N, BLOCK_N): each program owns BLOCK_N output columns for every row and walks K in
    BLOCK_K tiles, so the weight is read exactly once and no partial sums leave the program (no
    split-K, no reduce kernel, bit-stable: the summation order is fixed by the launch parameters);
  - prologue: silu(gate) * up (silu_mul_linear) computed in fp32 from the loaded gate_up tiles and
    rounded to the weight's dtype, as the unfused silu_and_mul's output was;
  - epilogue: bias and residual added in fp32 to the fp32 sums, rounded once.
Two inner loops, a launch parameter: "fma" keeps BLOCK_M x BLOCK_N x BLOCK_K fp32 partial products
in registers and reduces them over K once at the end (CUDA cores; for 1 to 4 rows, where BLOCK_M is
the row bucket), "dot" runs tl.dot on tiles padded to 16 rows (tensor cores; 8 and 16 rows, where
CUDA cores would be the limit). Small BLOCK_N keeps enough programs in flight for the narrow
shapes (N = 1536: o_proj and down of a 1.5B model) to use every SM without splitting K.

Above MAX_ROWS rows (prefill) the work is compute bound: F.linear (cuBLAS) and the unfused
epilogue ops in torch.

Launch parameters come from the card's tuned table (tuning.tuned("linear" or "silu_mul_linear",
linear_key(bucket, N, K, dtype))), else from `_heuristic`; `config=` overrides both (the sweep,
bench/tune_kernels.py, tries LINEAR_CANDIDATES that way). A configuration is a dict
{"BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "mode": "fma" | "dot"}.

Compiled variants: the row count changes every step and is in `do_not_specialize`; the constexprs
(BLOCK_M from the row bucket, 1 / 2 / 4 / 8 / 16, and the tile sizes chosen from it and the
model's shapes) make one variant per projection shape and bucket, all of which the warm-up reaches
(splitreason_engine/warmup.py). No host sync: CUDA-graph capturable.
"""

import functools

import torch
import triton
import triton.language as tl

from .activation_triton import silu_and_mul
from .linear import linear_ref
from .tuning import tuned

MAX_ROWS = 16  # more rows run F.linear
ROW_BUCKETS = (1, 2, 4, 8, 16)
TARGET_PROGRAMS = 256  # about two per SM on an H100 / H200 (132 SMs)
FMA_PARTIALS = 4096  # fp32 partial products per program in "fma" (32 registers a thread at 4 warps)
MAX_PARTIALS_PER_THREAD = 128  # linear_candidates drops "fma" entries above this (register spills)

LINEAR_CANDIDATES: list[dict] = [
    *({"mode": "fma", "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": 3}
      for bn, bk, w in [(4, 256, 2), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 4), (8, 512, 8),
                        (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8)]),
    *({"mode": "dot", "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
      for bn, bk, w, s in [(16, 128, 2, 4), (16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                           (64, 128, 4, 4)]),
]


def row_bucket(rows: int) -> int:
    """The smallest of ROW_BUCKETS holding `rows` (1 <= rows <= MAX_ROWS)."""
    return next(b for b in ROW_BUCKETS if b >= rows)


def linear_key(m_bucket: int, n: int, k: int, dtype: torch.dtype) -> str:
    """The tuning table's key of one shape: 'm1_n1536_k8960_bfloat16'."""
    return f"m{m_bucket}_n{n}_k{k}_{str(dtype).removeprefix('torch.')}"


def linear_candidates(m_bucket: int) -> list[dict]:
    """LINEAR_CANDIDATES worth timing at `m_bucket` rows: "fma" entries hold BLOCK_M x BLOCK_N x
    BLOCK_K partial sums in registers, so the big ones only fit the small buckets."""
    return [c for c in LINEAR_CANDIDATES if c["mode"] == "dot"
            or m_bucket * c["BLOCK_N"] * c["BLOCK_K"] <= MAX_PARTIALS_PER_THREAD * 32 * c["num_warps"]]


@triton.jit
def _load_act(ptrs, mask, inter, SILU_MUL: tl.constexpr, dtype: tl.constexpr):
    """A tile of the GEMV's input in `dtype`: x itself, or silu(gate) * up from gate_up rows
    (up `inter` columns after gate), computed in fp32 and rounded once."""
    if SILU_MUL:
        gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        return (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(dtype)


@triton.jit(do_not_specialize=["rows"])
def _linear_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, rows, n, k, x_s0, w_s0, res_s0, out_s0,
                   SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < rows, offs_n < n
    w_dtype = w_ptr.dtype.element_ty
    if DOT:
        # [BLOCK_M, BLOCK_K] activations x [BLOCK_N, BLOCK_K] weights, rows padded with zeros.
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * x_s0
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * w_s0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < k
            w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            a = _load_act(x_rows + ks[None, :], m_mask[:, None] & k_mask[None, :], k, SILU_MUL, w_dtype)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        # Loaded straight into the [BLOCK_M, BLOCK_N, BLOCK_K] product's layout: no conversion.
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * x_s0
        w_rows = w_ptr + offs_n.to(tl.int64)[None, :, None] * w_s0
        partial = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            ks = (k0 + offs_k)[None, None, :]
            k_mask = ks < k
            w = tl.load(w_rows + ks, mask=n_mask[None, :, None] & k_mask, other=0.0)
            a = _load_act(x_rows + ks, m_mask[:, None, None] & k_mask, k, SILU_MUL, w_dtype)
            partial += a.to(tl.float32) * w.to(tl.float32)
        acc = tl.sum(partial, axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_m.to(tl.int64)[:, None] * res_s0 + offs_n[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_s0 + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _heuristic(m_bucket: int, n: int, k: int) -> dict:
    """Launch parameters without a tuned entry: "fma" up to 4 rows, "dot" above; the widest
    BLOCK_N that still gives TARGET_PROGRAMS programs (narrow shapes get narrow blocks), and for
    "fma" the longest BLOCK_K within FMA_PARTIALS partial sums (fewer, longer loads per row)."""
    mode = "fma" if m_bucket <= 4 else "dot"
    widths = (32, 16, 8, 4) if mode == "fma" else (64, 32, 16)
    block_n = next((w for w in widths if triton.cdiv(n, w) >= TARGET_PROGRAMS), widths[-1])
    if mode == "fma":
        block_k = min(1024, max(64, FMA_PARTIALS // (m_bucket * block_n)), triton.next_power_of_2(k))
        return {"mode": mode, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 3}
    return {"mode": mode, "BLOCK_N": block_n, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}


@functools.lru_cache(maxsize=None)
def _launch_params(kernel: str, m_bucket: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The tuned entry over the heuristic's (an entry may set only some parameters); looked up
    once per shape, so steps pay no table lookup."""
    return {**_heuristic(m_bucket, n, k), **(tuned(kernel, linear_key(m_bucket, n, k, dtype), device) or {})}


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` as rows with contiguous columns (the kernel's loads assume column stride 1)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _gemv(act: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", residual: "torch.Tensor | None",
          config: "dict | None", silu_mul: bool) -> torch.Tensor:
    n, k = weight.shape
    rows = act.shape[:-1].numel()
    act2 = _unit_stride(act.reshape(rows, act.shape[-1]))
    weight = _unit_stride(weight)
    out = torch.empty(rows, n, dtype=act.dtype, device=act.device)
    if rows:
        bucket = row_bucket(rows)
        kernel = "silu_mul_linear" if silu_mul else "linear"
        p = {**_launch_params(kernel, bucket, n, k, weight.dtype, act.device), **(config or {})}
        dot = p["mode"] == "dot"
        res2 = _unit_stride(residual.reshape(rows, n)) if residual is not None else out
        _linear_kernel[(triton.cdiv(n, p["BLOCK_N"]),)](
            act2, weight, bias if bias is not None else weight, res2, out, rows, n, k,
            act2.stride(0), weight.stride(0), res2.stride(0), out.stride(0),
            SILU_MUL=silu_mul, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, DOT=dot,
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
            BLOCK_M=MAX_ROWS if dot else bucket, BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"],
            num_warps=p["num_warps"], num_stages=p["num_stages"])
    return out.view(*act.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None,
           residual: "torch.Tensor | None" = None, config: "dict | None" = None) -> torch.Tensor:
    """`linear_ref` of x [..., K] with weight [N, K] (same dtype): the GEMV up to MAX_ROWS rows,
    F.linear above. `config` overrides the launch parameters (see the module doc)."""
    if x.shape[:-1].numel() > MAX_ROWS:
        return linear_ref(x, weight, bias, residual)
    return _gemv(x, weight, bias, residual, config, silu_mul=False)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None,
                    residual: "torch.Tensor | None" = None, config: "dict | None" = None) -> torch.Tensor:
    """`silu_mul_linear_ref` of gate_up [..., 2 * K] (gate first) with weight [N, K]: one GEMV with
    the SwiGLU in its prologue up to MAX_ROWS rows; above, the silu_and_mul kernel and F.linear."""
    if gate_up.shape[:-1].numel() > MAX_ROWS:
        return linear_ref(silu_and_mul(gate_up), weight, bias, residual)
    return _gemv(gate_up, weight, bias, residual, config, silu_mul=True)
