"""The Triton RoPE + KV store, RMSNorm and SwiGLU kernels against their PyTorch references.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so these
use tiny shapes and only fp32/fp16 (the interpreter gets bf16 arithmetic wrong); fp16 results are
compared with the reference evaluated in fp32 on the upcast inputs. The `gpu` tests cover bf16 at
real model shapes. Inputs are fresh each run; the seed is in every failure message.
"""

from typing import Callable

import pytest
import torch

from properties import test_seed
from splitreason_engine.kernels import add_rms_norm_ref, rms_norm_ref, rope_cos_sin, rope_store_kv_ref, silu_and_mul_ref
from splitreason_engine.kernels import rope_triton
from splitreason_engine.kernels.activation_triton import silu_and_mul
from splitreason_engine.kernels.norms_triton import add_rms_norm, rms_norm
from splitreason_engine.kernels.rope_triton import rope_store_kv

pytestmark = pytest.mark.interpreter  # the CPU tests; the gpu-marked ones run on CUDA

Close = Callable[[torch.Tensor, torch.Tensor, str], None]
EPS = 1e-6
MAX_POSITIONS = 4096
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def seed() -> int:
    return test_seed()


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def _tol_close(dtype: torch.dtype, seed: int, fp16_tol: float) -> Close:
    """assert_close with fp32-tight tolerance, or `fp16_tol` (rtol and atol) for fp16 results."""
    tol = 1e-5 if dtype == torch.float32 else fp16_tol

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol, msg=lambda m: f"{what}, seed {seed}: {m}")
    return close


def _rel_close(seed: int, limit: float = 1e-2) -> Close:
    """Max error relative to the reference's largest magnitude, for bf16 results. Empty tensors
    (nothing to compare) must be empty on both sides."""
    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        assert actual.shape == expected.shape, f"{what}, seed {seed}: shape {actual.shape} != {expected.shape}"
        if expected.numel() == 0:
            return
        err = ((actual.float() - expected).abs().max() / expected.abs().max()).item()
        assert err <= limit, f"{what}, seed {seed}: relative error {err:.3g} > {limit}"
    return close


# --- RoPE + paged KV store -------------------------------------------------------------------


def _kv_views(arena: torch.Tensor, page_tokens: int, hkv: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 1 of a two-layer model in the pool's layout: strided [pages, page_tokens, Hkv, D] views."""
    used = 2 * 2 * page_tokens * hkv * d
    view = arena[:, :used].view(arena.shape[0], 2, 2, page_tokens, hkv, d)
    return view[:, 1, 0], view[:, 1, 1]


def _check_rope_store_kv(n: int, hq: int, hkv: int, d: int, dtype: torch.dtype, slot_dtype: torch.dtype,
                         page_tokens: int, pad: float, device: torch.device, seed: int, close: Close) -> None:
    g = torch.Generator().manual_seed(seed)
    num_pages = -(-n // page_tokens) + 3
    qkv = _randn(g, n, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    qk_flat, v_flat = qkv.split([(hq + hkv) * d, hkv * d], dim=-1)
    qk, v = qk_flat.view(n, hq + hkv, d), v_flat.view(n, hkv, d)
    positions = torch.randint(0, MAX_POSITIONS, (n,), generator=g).to(device)
    rope = rope_cos_sin(d, MAX_POSITIONS, 1e6, dtype, device)[positions]

    # Distinct slots over a shuffled page order; a `pad` fraction (at least one when n > 1) is padding,
    # and, unless pad is 1, the last token is written (so n = 1 still checks the store).
    perm = torch.randperm(num_pages, generator=g)
    tokens = torch.randperm(num_pages * page_tokens, generator=g)[:n]
    slots = perm[tokens // page_tokens] * page_tokens + tokens % page_tokens
    padding = torch.rand(n, generator=g) < pad
    if n > 1:
        padding[0] = True
    if pad < 1:
        padding[-1] = False
    slots[padding] = -1
    slots = slots.to(device=device, dtype=slot_dtype)

    arena = _randn(g, num_pages, 4 * page_tokens * hkv * d + 24, dtype=dtype, device=device)
    written = torch.zeros_like(arena, dtype=torch.bool)
    for view in _kv_views(written, page_tokens, hkv, d):
        valid = slots[slots >= 0].long()
        view[valid // page_tokens, valid % page_tokens] = True
    before = arena.clone()
    expected_arena = arena.to(torch.float32, copy=True)
    expected_q, expected_k = rope_store_kv_ref(qk.float(), v.float(), rope.float(),
                                               *_kv_views(expected_arena, page_tokens, hkv, d), slots)
    arena[written] = float("nan")  # every slot the kernel must write starts poisoned
    qkv_before = qkv.clone()

    q, k = rope_store_kv(qk, v, rope, *_kv_views(arena, page_tokens, hkv, d), slots)

    assert q.data_ptr() == qk.data_ptr() and k.data_ptr() == qk[:, hq:].data_ptr(), f"seed {seed}: not in place"
    assert q.shape == (n, hq, d) and k.shape == (n, hkv, d), f"seed {seed}"
    close(q, expected_q, "q")
    close(k, expected_k, "k")
    assert torch.equal(qkv[:, (hq + hkv) * d:], qkv_before[:, (hq + hkv) * d:]), f"seed {seed}: v modified"
    assert torch.equal(arena[~written], before[~written]), f"seed {seed}: wrote outside the mapped slots"
    assert bool(written.any()) == bool((slots >= 0).any()), f"seed {seed}"
    close(arena[written], expected_arena[written], "cache")


@pytest.mark.parametrize("n", [1, 9])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (5, 1), (12, 2), (16, 2)], ids=["gqa1", "gqa5", "gqa6", "gqa8"])
@pytest.mark.parametrize("d", [20, 64])
@pytest.mark.parametrize("dtype,slot_dtype", [(torch.float32, torch.int64), (torch.float16, torch.int32)],
                         ids=["fp32", "fp16"])
def test_rope_store_kv(n, hq, hkv, d, dtype, slot_dtype, seed):
    _check_rope_store_kv(n, hq, hkv, d, dtype, slot_dtype, page_tokens=7, pad=0.3, device=CPU, seed=seed,
                         close=_tol_close(dtype, seed, 1e-3))


def test_rope_store_kv_head_blocks(seed, monkeypatch):
    """Heads split over several programs per token, the values' heads among them."""
    monkeypatch.setattr(rope_triton, "_MAX_BLOCK_ELEMS", 32)
    _check_rope_store_kv(9, 8, 4, 20, torch.float32, torch.int64, page_tokens=3, pad=0.3, device=CPU, seed=seed,
                         close=_tol_close(torch.float32, seed, 1e-3))


def test_rope_store_kv_all_padding(seed):
    """A batch of padding only still rotates q and k, and leaves the cache alone."""
    _check_rope_store_kv(4, 6, 2, 16, torch.float32, torch.int64, page_tokens=5, pad=1.0, device=CPU, seed=seed,
                         close=_tol_close(torch.float32, seed, 1e-3))


def test_rope_store_kv_odd_head_dim():
    qk, v = torch.zeros(1, 2, 5), torch.zeros(1, 1, 5)
    cache = torch.zeros(1, 1, 1, 5)
    with pytest.raises(ValueError, match="even head_dim"):
        rope_store_kv(qk, v, torch.zeros(1, 2, 5), cache, cache, torch.zeros(1, dtype=torch.int64))


# --- RMSNorm ---------------------------------------------------------------------------------


def _rows(g: torch.Generator, n: int, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n, hidden] rows with a row stride wider than hidden, like a slice of a larger buffer."""
    return _randn(g, n, hidden + 3, dtype=dtype, device=device)[:, 1: hidden + 1]


def _check_rms_norm(n: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int, close: Close) -> None:
    g = torch.Generator().manual_seed(seed)
    x, w = _rows(g, n, hidden, dtype, device), _randn(g, hidden, dtype=dtype, device=device)
    expected = rms_norm_ref(x.float(), w.float(), EPS)
    out = torch.full((n, hidden), float("nan"), dtype=dtype, device=device)
    assert rms_norm(x, w, EPS, out=out) is out
    close(out, expected, "rms_norm")
    fresh = rms_norm(x, w, EPS)
    assert fresh.shape == (n, hidden) and fresh.dtype == dtype, f"seed {seed}"
    close(fresh, expected, "rms_norm (new output)")


def _check_add_rms_norm(n: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int,
                        close: Close) -> None:
    g = torch.Generator().manual_seed(seed)
    x, w = _rows(g, n, hidden, dtype, device), _randn(g, hidden, dtype=dtype, device=device)
    residual = _randn(g, n, hidden, dtype=dtype, device=device)
    expected_out, expected_res = add_rms_norm_ref(x.float(), residual.float(), w.float(), EPS)
    out = torch.full((n, hidden), float("nan"), dtype=dtype, device=device)
    normed, new_residual = add_rms_norm(x, residual, w, EPS, out=out)
    assert normed is out and new_residual is residual, f"seed {seed}: not in place"
    close(normed, expected_out, "add_rms_norm out")
    close(residual, expected_res, "add_rms_norm residual")


@pytest.mark.parametrize("check", [_check_rms_norm, _check_add_rms_norm], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("hidden", [8, 20, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_norms(check, n, hidden, dtype, seed):
    check(n, hidden, dtype, CPU, seed, _tol_close(dtype, seed, 3e-3))


# --- SwiGLU ----------------------------------------------------------------------------------


def _check_silu_and_mul(n: int, inter: int, dtype: torch.dtype, device: torch.device, seed: int,
                        close: Close) -> None:
    g = torch.Generator().manual_seed(seed)
    gate_up = _rows(g, n, 2 * inter, dtype, device)
    expected = silu_and_mul_ref(gate_up.float())
    out = torch.full((n, inter), float("nan"), dtype=dtype, device=device)
    assert silu_and_mul(gate_up, out=out) is out
    close(out, expected, "silu_and_mul")
    fresh = silu_and_mul(gate_up)
    assert fresh.shape == (n, inter) and fresh.dtype == dtype, f"seed {seed}"
    close(fresh, expected, "silu_and_mul (new output)")


@pytest.mark.parametrize("n", [0, 1, 6])
@pytest.mark.parametrize("inter", [8, 24, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_silu_and_mul(n, inter, dtype, seed):
    _check_silu_and_mul(n, inter, dtype, CPU, seed, _tol_close(dtype, seed, 1e-3))


# --- bf16 at real shapes, on the GPU ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 300])
@pytest.mark.parametrize("hq,hkv", [(12, 2), (40, 8)])
def test_rope_store_kv_gpu(n, hq, hkv, seed):
    _check_rope_store_kv(n, hq, hkv, 128, torch.bfloat16, torch.int32, page_tokens=13, pad=0.1, device=CUDA,
                         seed=seed, close=_rel_close(seed))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1536, 5120])
def test_norms_gpu(hidden, seed):
    _check_rms_norm(300, hidden, torch.bfloat16, CUDA, seed, _rel_close(seed))
    _check_add_rms_norm(300, hidden, torch.bfloat16, CUDA, seed, _rel_close(seed))


@pytest.mark.gpu
def test_silu_and_mul_gpu(seed):
    _check_silu_and_mul(300, 8960, torch.bfloat16, CUDA, seed, _rel_close(seed))
