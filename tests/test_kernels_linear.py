"""The Triton decode GEMV (linear, silu_mul_linear) against its PyTorch references.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so these
use tiny shapes that are not powers of two and only fp32/fp16 (the interpreter gets bf16 wrong).
The kernel computes in fp32 and rounds once, so fp16 results are compared with the references
evaluated on fp32 copies of the inputs; silu_mul_linear rounds its activation to the weights' dtype
before the product (as the unfused silu_and_mul's output is), and the expected value does too.
Weights are scaled by K^-0.5, as a model's are, so outputs are O(1). The `gpu` tests cover bf16 at
the real 1.5B shapes. Inputs are fresh each run; the seed is in every failure message.
"""

import json

import pytest
import torch

from properties import test_seed
from splitreason_engine.kernels import linear_triton, tuning
from splitreason_engine.kernels.activation import silu_and_mul_ref
from splitreason_engine.kernels.linear import linear_ref, silu_mul_linear_ref
from splitreason_engine.kernels.linear_triton import (LINEAR_CANDIDATES, linear, linear_candidates, linear_key,
                                                      silu_mul_linear)
from splitreason_engine.warmup import LINEAR_ROWS

pytestmark = pytest.mark.interpreter  # the CPU tests; the gpu-marked ones run on CUDA

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def seed() -> int:
    return test_seed()


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


def _rows(g: torch.Generator, m: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[m, width] rows with a row stride wider than width, like a slice of a larger buffer."""
    return _randn(g, m, width + 3, dtype=dtype, device=device)[:, 1: width + 1]


class Case:
    """One projection's inputs (silu: gate_up [M, 2K] instead of x [M, K]) and its expected output."""

    def __init__(self, silu: bool, m: int, n: int, k: int, bias: bool, residual: bool, dtype: torch.dtype,
                 device: torch.device, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.silu, self.seed = silu, seed
        self.x = _rows(g, m, 2 * k if silu else k, dtype, device)
        self.weight = _randn(g, n, k, dtype=dtype, device=device, scale=k ** -0.5)
        self.bias = _randn(g, n, dtype=dtype, device=device) if bias else None
        self.residual = _randn(g, m, n, dtype=dtype, device=device) if residual else None

    def run(self, x: "torch.Tensor | None" = None, **kwargs) -> torch.Tensor:
        op = silu_mul_linear if self.silu else linear
        return op(self.x if x is None else x, self.weight, self.bias, self.residual, **kwargs)

    def expected(self) -> torch.Tensor:
        f = [None if t is None else t.float() for t in (self.weight, self.bias, self.residual)]
        if not self.silu:
            return linear_ref(self.x.float(), *f)
        if self.x.dtype == torch.float32:
            return silu_mul_linear_ref(self.x, *f)
        return linear_ref(silu_and_mul_ref(self.x.float()).to(self.x.dtype).float(), *f)

    def check(self, actual: torch.Tensor, what: str = "") -> None:
        tol = 1e-5 if self.x.dtype == torch.float32 else 1e-3
        assert actual.dtype == self.x.dtype, f"seed {self.seed}: {actual.dtype}"
        torch.testing.assert_close(actual.float(), self.expected(), rtol=tol, atol=tol,
                                   msg=lambda m: f"{what} seed {self.seed}: {m}")


KERNELS = pytest.mark.parametrize("silu", [False, True], ids=["linear", "silu_mul_linear"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


@KERNELS
@DTYPES
@pytest.mark.parametrize("m,n,k", [(1, 200, 40), (3, 72, 40), (7, 200, 136), (16, 72, 24)])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "bias", "residual", "bias+residual"])
def test_matches_reference(silu, dtype, m, n, k, bias, residual, seed):
    case = Case(silu, m, n, k, bias, residual, dtype, CPU, seed)
    out = case.run()
    assert out.shape == (m, n)
    case.check(out)


@KERNELS
@DTYPES
def test_every_candidate_config(silu, dtype, seed):
    """Each configuration of the sweep gives the reference's answer ("fma" at 3 rows in a bucket of
    4, "dot" padded to 16), on rows from a contiguous buffer as well."""
    case = Case(silu, 3, 40, 24, True, True, dtype, CPU, seed)
    for config in LINEAR_CANDIDATES:
        case.check(case.run(config=config), f"{config}")
    case.check(case.run(x=case.x.contiguous(), config=LINEAR_CANDIDATES[0]), "contiguous x")


@KERNELS
@pytest.mark.parametrize("mode", ["fma", "dot"])
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, on the padding rows' NaN
def test_padding_rows_do_not_leak(silu, mode, seed):
    """Rows past the real ones, inside the launch (CUDA-graph padding: NaN and inf here) or past it
    in the buffer, change no real row."""
    case = Case(silu, 5, 72, 40, True, False, torch.float32, CPU, seed)
    config = next(c for c in LINEAR_CANDIDATES if c["mode"] == mode)
    padded = torch.cat([case.x, torch.full((3, case.x.shape[1]), float("nan")),
                        torch.full((2, case.x.shape[1]), float("inf"))])
    case.check(case.run(x=padded, config=config)[:5], "padded launch")
    case.check(case.run(x=padded[:5], config=config), "rows of a larger buffer")


@KERNELS
def test_more_rows_fall_back_to_torch(silu, seed):
    """Above 16 rows: F.linear (and the silu_and_mul kernel), so prefill keeps cuBLAS."""
    case = Case(silu, 23, 72, 40, True, True, torch.float32, CPU, seed)
    out = case.run()
    if not silu:
        assert torch.equal(out, linear_ref(case.x, case.weight, case.bias, case.residual))
    case.check(out)


@KERNELS
def test_leading_dims_and_empty(silu, seed):
    case = Case(silu, 6, 72, 40, False, False, torch.float32, CPU, seed)
    out = case.run(x=case.x.reshape(2, 3, -1))
    assert out.shape == (2, 3, 72)
    case.check(out.reshape(6, 72))
    assert case.run(x=case.x[:0]).shape == (0, 72)


def test_candidates_and_keys():
    assert linear_key(4, 1536, 8960, torch.bfloat16) == "m4_n1536_k8960_bfloat16"
    assert all({"mode", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} == set(c) for c in LINEAR_CANDIDATES)
    assert linear_candidates(1) == LINEAR_CANDIDATES
    # "fma" keeps BLOCK_M x BLOCK_N x BLOCK_K partial sums: fewer fit as the rows grow.
    eight = linear_candidates(8)
    assert {c["mode"] for c in eight} == {"fma", "dot"} and len(eight) < len(LINEAR_CANDIDATES)
    assert {c["mode"] for c in linear_candidates(16)} == {"dot"}
    assert linear_triton.row_bucket(1) == 1 and linear_triton.row_bucket(3) == 4 and linear_triton.row_bucket(9) == 16


def test_warmup_reaches_every_row_bucket():
    assert sorted({linear_triton.row_bucket(rows) for rows in LINEAR_ROWS}) == list(linear_triton.ROW_BUCKETS)
    assert max(linear_triton.ROW_BUCKETS) == linear_triton.MAX_ROWS


def test_tuned_entry_is_used(tmp_path, monkeypatch, seed):
    """A card's table entry (here a partial one) overrides the heuristic for its shape only."""
    entry = {"mode": "dot", "BLOCK_N": 32}
    path = tmp_path / "card.json"
    path.write_text(json.dumps({"card": "test", "kernels": {"linear": {linear_key(4, 72, 40, torch.float32): entry}}}))
    monkeypatch.setenv(tuning.CONFIG_ENV, str(path))
    linear_triton._launch_params.cache_clear()
    try:
        params = linear_triton._launch_params("linear", 4, 72, 40, torch.float32, CPU)
        assert params["mode"] == "dot" and params["BLOCK_N"] == 32 and "BLOCK_K" in params
        assert linear_triton._launch_params("silu_mul_linear", 4, 72, 40, torch.float32, CPU)["mode"] == "fma"
        case = Case(False, 3, 72, 40, True, False, torch.float32, CPU, seed)
        case.check(case.run())
    finally:
        linear_triton._launch_params.cache_clear()


# --- bf16 at real shapes, on the GPU ---------------------------------------------------------


QWEN_1_5B = [  # (kernel, N, K, bias, residual): qkv, o_proj, gate_up, down (+ residual)
    (False, 2048, 1536, True, False), (False, 1536, 1536, False, False), (False, 17920, 1536, False, False),
    (True, 1536, 8960, False, True)]


def _rel_check(case: Case, actual: torch.Tensor, what: str, limit: float = 1e-2) -> None:
    expected = case.expected()
    err = ((actual.float() - expected).abs().max() / expected.abs().max()).item()
    assert err <= limit, f"{what}, seed {case.seed}: relative error {err:.3g} > {limit}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8, 13, 16])
@pytest.mark.parametrize("silu,n,k,bias,residual", QWEN_1_5B, ids=["qkv", "o_proj", "gate_up", "down"])
def test_gpu_bf16_qwen_1_5b(silu, n, k, bias, residual, m, seed):
    case = Case(silu, m, n, k, bias, residual, torch.bfloat16, CUDA, seed)
    _rel_check(case, case.run(), "heuristic")
    if m in (1, 13):  # every candidate of the smallest and the largest bucket (compiles add up)
        for config in linear_candidates(linear_triton.row_bucket(m)):
            _rel_check(case, case.run(config=config), f"{config}")


@pytest.mark.gpu
def test_gpu_graph_replays_with_new_inputs(seed):
    """Captured once, replayed on new activations: no host sync, the same answer."""
    case = Case(True, 4, 1536, 8960, True, True, torch.bfloat16, CUDA, seed)
    x = case.x.clone()
    case.run(x=x)  # compiles outside the capture
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = case.run(x=x)
    x.normal_()
    case.x = x
    graph.replay()
    torch.cuda.synchronize()
    _rel_check(case, out, "replay")
