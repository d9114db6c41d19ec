"""The fused verify op: the Triton kernel (Triton's interpreter without CUDA) against its PyTorch
reference, kernels/verify.py.

Every call mixes greedy, plain-temperature, top-k, top-p and top-k + top-p rows, drafts that are the
argmax, random drafts and rows without one, and q close to p (drafts often kept), far from it, and
above it everywhere (an empty residual). Tokens and acceptances must be the reference's, except
where the reference's own race scores (or u_accept * q(d) and p(d)) are within rounding of each
other: the kernel's logs and exps are not torch's. The interpreter is slow, so vocabularies are a
few hundred to a few thousand ids; the `gpu` test runs the real size. Inputs are fresh each run;
the seed is in every failure message.
"""

import math

import pytest
import torch

from properties import test_seed
from splitreason_engine.kernels.ops import TORCH_OPS
from splitreason_engine.kernels.sample import filtered_log_probs, noise_at, noise_uniform
from splitreason_engine.kernels.verify import ACCEPT_ID, verify_rows_ref
from splitreason_engine.kernels.verify_triton import launch_config, verify_rows

pytestmark = pytest.mark.interpreter  # the CPU tests; the gpu-marked one runs on CUDA

DTYPES = [torch.float32, torch.float16]
CUDA = torch.device("cuda")
# (temperature, top_k, top_p): greedy, plain, top-k, top-p, both, a tiny top_p, top_k past the
# vocabulary (off), top_k 1, greedy with filters set (ignored), a hot plain row.
KINDS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 40, 0.6), (2.0, 0, 0.05),
         (1.1, 10**6, 1.0), (0.5, 1, 1.0), (0.0, 3, 0.5), (1.8, 0, 1.0)]
SCORE_TOL = 1e-4  # race scores (about -20 to 20) this close are a near-tie: either id may win
ACCEPT_TOL = 1e-5  # u_accept * q(d) this close to p(d): either decision


@pytest.fixture
def seed() -> int:
    return test_seed()


def _rows(g: torch.Generator, n: int, real: int, pad: int, dtype: torch.dtype, biased: bool) -> dict:
    """n rows over `real` ids (+ `pad` padding ids with huge logits). Drafts cycle through the argmax,
    a random id and none; q is p of slightly moved logits (often kept), a random distribution, or
    all ones (>= p everywhere: the residual is empty); zeros on greedy rows and rows without a draft.
    With `biased`, the decisions' logits are the raw ones plus a bias on a few ids of some rows."""
    raw = torch.randn(n, real + pad, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))
    raw[:, real:] = 1e4
    raw = raw.to(dtype)
    logits = raw
    if biased:
        logits = raw.clone()
        for row in range(0, n, 3):
            ids = torch.randint(0, real, (3,), generator=g)
            logits[row, ids] += torch.tensor([5.0, -3.0, 2.0]).to(dtype)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    temperature = torch.tensor([k[0] for k in kinds])
    top_k = torch.tensor([k[1] for k in kinds], dtype=torch.int32)
    top_p = torch.tensor([k[2] for k in kinds])
    x = logits[:, :real].float()
    argmax = x.argmax(dim=-1)
    drafts = torch.tensor([[int(argmax[i]), int(torch.randint(0, real, (), generator=g)), -1][(i // 2) % 3]
                           for i in range(n)], dtype=torch.int64)
    near = filtered_log_probs(x + 0.3 * torch.randn(n, real, generator=g), temperature.clamp(min=0.1), top_k,
                              top_p).exp()
    far = torch.softmax(2 * torch.randn(n, real, generator=g), dim=-1)
    q = torch.zeros(n, real)
    for i in range(n):
        if temperature[i] != 0 and drafts[i] >= 0:
            q[i] = [near[i], far[i], torch.ones(real)][i % 3]
    return dict(logits=logits, raw_logits=raw, drafts=drafts, q=q, temperature=temperature, top_k=top_k, top_p=top_p,
                keys=torch.randint(0, 2**63 - 1, (n,), generator=g), real_vocab=real)


def _race_scores(args: dict, row: int) -> torch.Tensor:
    """The reference's race scores of a sampled row, as verify_rows_ref computes them."""
    real = args["real_vocab"]
    x = args["logits"][row: row + 1, :real].float()
    logp = filtered_log_probs(x, args["temperature"][row: row + 1], args["top_k"][row: row + 1],
                              args["top_p"][row: row + 1])[0]
    gumbel = -torch.log(-torch.log(noise_uniform(args["keys"][row: row + 1], real)[0]))
    if args["drafts"][row] < 0:
        return logp + gumbel
    p = logp.exp()
    residual = (p - args["q"][row, :real]).clamp(min=0)
    return (residual if residual.sum() > 0 else p).log() + gumbel


def _accept_margin(args: dict, row: int) -> float:
    """|u_accept * q(d) - p(d)| of a sampled draft row, by the reference's formulas."""
    real, d = args["real_vocab"], int(args["drafts"][row])
    p = filtered_log_probs(args["logits"][row: row + 1, :real].float(), args["temperature"][row: row + 1],
                           args["top_k"][row: row + 1], args["top_p"][row: row + 1]).exp()[0, d]
    u = noise_at(args["keys"][row], torch.tensor(ACCEPT_ID))
    return float((u * args["q"][row, d] - p).abs())


def _check(args: dict, got: tuple, rows: "list[int] | None", msg: str) -> None:
    """`got` is the reference's on `rows` (all by default): greedy rows exactly; sampled rows up to
    near-ties; logprobs within 1e-5; the finite flag of every row."""
    expected = verify_rows_ref(**args)
    n = args["logits"].shape[0]
    rows = list(range(n)) if rows is None else rows
    tokens, accepted = got[0].tolist(), got[1].tolist()
    assert all(0 <= t < args["real_vocab"] for t in tokens), msg
    for i in rows:
        if args["temperature"][i] == 0:
            assert (tokens[i], accepted[i]) == (int(expected[0][i]), bool(expected[1][i])), f"{msg}, greedy row {i}"
            continue
        if tokens[i] != int(expected[0][i]):
            scores = _race_scores(args, i)
            gap = float(scores[int(expected[0][i])] - scores[tokens[i]])
            assert abs(gap) <= SCORE_TOL, f"{msg}, row {i}: token {tokens[i]} instead of {int(expected[0][i])} ({gap})"
        if accepted[i] != bool(expected[1][i]):
            assert _accept_margin(args, i) <= ACCEPT_TOL, f"{msg}, row {i}: accepted {accepted[i]}"
    for j in (2, 3):  # logprobs of the token the kernel chose, and of the draft
        at = torch.tensor(rows, dtype=torch.long)
        lp = torch.log_softmax(args["raw_logits"][at, :args["real_vocab"]].float(), dim=-1)
        ids = (got[0][at].long() if j == 2 else args["drafts"][at].clamp(min=0))[:, None]
        torch.testing.assert_close(got[j][at], lp.gather(1, ids).squeeze(1), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{msg}: {m}")
    assert got[4].tolist() == expected[4].tolist(), msg


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("real,pad,n,cfg,biased", [
    (301, 35, 20, {"block": 64, "search_block": 16, "pivots": 256}, False),
    (3001, 29, 10, {"block": 256, "search_block": 64, "pivots": 16}, True),
    (1000, 0, 10, {"block": 128, "search_block": 32, "pivots": 64}, True)],
    ids=["301-pad35-256-pivots", "3001-pad29-biased", "1000-no-pad-biased"])
def test_kernel_matches_reference(seed, dtype, real, pad, n, cfg, biased):
    """Vocabularies that are not a multiple of the block, padding ids past the real vocabulary (never
    chosen), logits apart from the raw ones (a logit bias) or the same tensor."""
    args = _rows(torch.Generator().manual_seed(seed), n, real, pad, dtype, biased)
    got = verify_rows(**args, config=cfg)
    _check(args, got, None, f"seed {seed}")
    expected = verify_rows_ref(**args)
    sampled = args["temperature"] != 0
    assert bool(expected[1][~sampled & (args["drafts"] >= 0)].any()), "no greedy draft was kept"
    assert bool(expected[1][sampled].any()), "no sampled draft was kept"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_nonfinite_rows_are_flagged(seed, dtype):
    """`finite` is False exactly where the raw logits (ids < real_vocab) hold a NaN or an inf, padding
    not checked. Every row still gets an id < real_vocab; the finite rows, and rows whose only
    non-finite logits are -inf, are decided as the reference decides them."""
    real, n = 500, 10
    args = _rows(torch.Generator().manual_seed(seed), n, real, 20, dtype, False)
    x = args["raw_logits"]
    x[0, 17] = math.nan
    x[1, 140] = math.inf
    x[2, [5, 300, 499]] = -math.inf  # -inf in a plain sampled row
    x[3, 200] = math.nan
    x[3, 201] = -math.inf
    x[4, [0, 499]] = -math.inf  # -inf at the ends of a top-k + top-p row
    x[5, real + 3] = math.nan  # padding: not checked
    x[7, :] = -math.inf  # -inf everywhere but one id, in a top-k 1 row
    x[7, 123] = 1.0
    got = verify_rows(**args, config={"block": 64, "search_block": 32, "pivots": 64})
    assert got[4].tolist() == [i not in (0, 1, 2, 3, 4, 7) for i in range(n)], f"seed {seed}"
    _check(args, got, [2, 4, 5, 6, 7, 8, 9], f"seed {seed}")
    assert int(got[0][7]) == 123, f"seed {seed}"


def test_no_rows_and_the_op_sets():
    args = _rows(torch.Generator().manual_seed(0), 0, 50, 0, torch.float32, False)
    got = verify_rows(**args)
    assert [t.shape for t in got] == [(0,)] * 5
    assert [t.dtype for t in got] == [torch.int32, torch.bool, torch.float32, torch.float32, torch.bool]
    from splitreason_engine.kernels.ops import triton_ops

    assert TORCH_OPS.verify_rows is verify_rows_ref and triton_ops().verify_rows is verify_rows


def test_launch_configuration():
    assert launch_config("cpu", {"pivots": 32})["pivots"] == 32
    assert set(launch_config("cpu")) == {"block", "search_block", "pivots", "num_warps"}
    for bad in ({"block": 100}, {"search_block": 8}, {"pivots": 2}):
        with pytest.raises(ValueError):
            launch_config("cpu", bad)


# ---- real vocabulary size on the GPU --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference_on_gpu(seed, dtype):
    """A full verify step at the real vocabulary (64 requests x 9 rows, 271 padding ids)."""
    args = _rows(torch.Generator().manual_seed(seed), 576, 151665, 271, dtype, True)
    args = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    got = verify_rows(**args)
    on_cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    got = tuple(t.cpu() for t in got)
    _check(on_cpu, got, None, f"seed {seed}")
