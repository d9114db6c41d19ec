"""The start-up warm-up reaches every Triton kernel variant that serving reaches (on the CPU).

Triton compiles a kernel once per specialization key. Here every launch of the project's kernels
is intercepted and its key computed by Triton's own binder, without compiling or running anything
(bench/launches.py, which bench/compile_check.py also uses to compile those variants). The ops still
compute: each op runs the Triton wrapper (which builds the real launch arguments, outputs
included) and fills the wrapper's outputs with the PyTorch reference's results, so the engine
serves real tokens at PyTorch speed.

The CUDA-only choices are made as on CUDA (launches.cuda_like): the runner's staging layout,
decode_splits from an SM count, the GPU's decode, extend and sampler launch parameters. A real
workload (split, random, big and small modes; batches of 1 to 64; prompts of many lengths; chunked
prefill and eager catch-up; decode steps from the static padded graph buffers and eagerly; every
sampling option and stop-id widths up to 40) must launch no key the warm-up did not.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from mixed_workload import mixed_workload
from split_models import save_pair
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.decode_graphs import DecodeGraphs
from splitreason_engine.kernels.ops import TORCH_OPS, Ops
from splitreason_engine.warmup import WarmupReport, warm_up_kernels, warmup_steps

triton = pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from launches import KERNEL_MODULES, KERNELS, LaunchRecorder, as_jit, cuda_like, kernels_of  # noqa: E402

from splitreason_engine.kernels import linear_triton  # noqa: E402

# The decode GEMV compiles per projection shape (qkv, o_proj, gate_up, down) and row bucket.
VARIANTS_PER_MODEL = {"_linear_kernel": 4 * len(linear_triton.ROW_BUCKETS)}
FAKE_SMS = 8  # decode_splits as on a GPU of 8 SMs: max_splits from 16 (batch 1) down to 1


def hybrid_ops() -> Ops:
    """The Triton op set's wrappers (launch arguments and outputs exactly as serving builds them)
    with the references' values written into their outputs."""
    from splitreason_engine.kernels.ops import triton_ops

    tr, ref = triton_ops(), TORCH_OPS

    def rms_norm(x, weight, eps, out=None):
        return tr.rms_norm(x, weight, eps, out=out).copy_(ref.rms_norm(x, weight, eps))

    def add_rms_norm(x, residual, weight, eps, out=None):
        expected, new_residual = ref.add_rms_norm(x, residual, weight, eps)
        normed, res = tr.add_rms_norm(x, residual, weight, eps, out=out)
        return normed.copy_(expected), res.copy_(new_residual)

    def rope_store_kv(qk, v, rope, k_cache, v_cache, slot_mapping):
        q_ref, k_ref = ref.rope_store_kv(qk, v, rope, k_cache, v_cache, slot_mapping)
        q, k = tr.rope_store_kv(qk, v, rope, k_cache, v_cache, slot_mapping)
        q.copy_(q_ref)
        k.copy_(k_ref)
        return q, k

    def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_splits=None, out=None):
        got = tr.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_splits=max_splits, out=out)
        return got.copy_(ref.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale))

    def extend_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len):
        got = tr.extend_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len)
        return got.copy_(ref.extend_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                              max_query_len))

    def silu_and_mul(gate_up, out=None):
        return tr.silu_and_mul(gate_up, out=out).copy_(ref.silu_and_mul(gate_up))

    def sample_and_detect(*args, **kwargs):
        got = tr.sample_and_detect(*args, **kwargs)
        for g, r in zip(got, ref.sample_and_detect(*args, **kwargs)):
            g.copy_(r)
        return got

    def verify_rows(*args, **kwargs):
        got = tr.verify_rows(*args, **kwargs)
        for g, r in zip(got, ref.verify_rows(*args, **kwargs)):
            g.copy_(r)
        return got

    def linear(x, weight, bias=None, residual=None):
        return tr.linear(x, weight, bias, residual).copy_(ref.linear(x, weight, bias, residual))

    def silu_mul_linear(gate_up, weight, bias=None, residual=None):
        return tr.silu_mul_linear(gate_up, weight, bias, residual).copy_(
            ref.silu_mul_linear(gate_up, weight, bias, residual))

    return Ops("triton", rms_norm, add_rms_norm, rope_store_kv, decode_attention, extend_attention, silu_and_mul,
               sample_and_detect, verify_rows, linear, silu_mul_linear, tr.begin_forward)


def use_ops(engine: Engine, ops: Ops) -> None:
    """Puts `ops` in every module of every model, and in the engine (its sampler and verify op)."""
    engine.ops = ops
    engine.loop.sample_op, engine.loop.verify_op = ops.sample_and_detect, ops.verify_rows
    for model in engine.models:
        for module in model.modules():
            if hasattr(module, "ops"):
                module.ops = ops


def static_graphs(engine: Engine, max_batch: int) -> None:
    """Decode-only steps up to max_batch run through the graphs' static padded buffers (eagerly)."""
    for runner, model in zip(engine.runners, engine.models):
        runner.graphs = DecodeGraphs(model, runner.kv_caches, max_batch, runner.stride, engine.device, capture=False)


def warm_up(engine: Engine, max_num_seqs: int, max_num_batched_tokens: int) -> list[WarmupReport]:
    return [warm_up_kernels(model, engine.pool.kv_caches[i], engine.ops, engine.device, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, max_model_len=engine.max_model_len,
                            real_vocab=engine.real_vocab[i], detect_tables=engine.detect_tables,
                            block_table_width=engine.runners[i].stride, name=f"model {i}")
            for i, model in enumerate(engine.models)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), special_tags=True)


def test_warmup_covers_every_variant_serving_launches(pair, monkeypatch):
    from tokenizers import Tokenizer

    cuda_like(monkeypatch.setattr, FAKE_SMS)
    recorder = LaunchRecorder()
    recorder.install(monkeypatch.setattr)
    seqs, tokens = 64, 96
    engine = Engine(*pair, kernels="torch", kv_cache_bytes=1 << 24, max_model_len=384, page_tokens=7,
                    max_num_seqs=seqs, max_num_batched_tokens=tokens, catch_up="eager", speculate=3, progress=False)
    use_ops(engine, hybrid_ops())

    reports = warm_up(engine, seqs, tokens)
    assert all(r.steps >= 10 and r.samples >= 5 and r.compiled == 0 for r in reports), reports
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    warm = {name: {k for p, k in keys if p == "warmup"} for name, keys in recorder.keys.items()}
    assert set(warm) == KERNELS, f"the warm-up launched {sorted(warm)}"

    recorder.phase = "serve"
    static_graphs(engine, max_batch=16)
    tok = Tokenizer.from_file(str(Path(pair[0]) / "tokenizer.json"))
    tags = {tok.token_to_id("<bigmodel>"): 3.0, tok.token_to_id("</bigmodel>"): 2.5, tok.token_to_id("<"): 1.0}
    outs = mixed_workload(engine, tags)
    assert all(o.error is None for o in outs)
    assert sum(o.metrics.handoffs for o in outs) > 0 and any(o.metrics.big_tokens for o in outs)
    assert sum(o.metrics.draft_tokens for o in outs) > 0  # the verify op ran while serving
    assert recorder.launches["serve"] > 5 * recorder.launches["warmup"]

    served = {name: {k for p, k in keys if p == "serve"} for name, keys in recorder.keys.items()}
    assert {name for name, keys in served.items() if keys} == KERNELS, f"serving launched {sorted(served)}"
    missing = {name: sorted(keys - warm.get(name, set())) for name, keys in served.items() if keys - warm.get(name, set())}
    assert not missing, "variants launched while serving that the warm-up never launched:\n" + json.dumps(
        missing, indent=1)[:6000]
    # One variant per kernel and model (the sampler's differ by vocabulary; extend's q is aligned here).
    for name, keys in served.items():
        bound = VARIANTS_PER_MODEL.get(name, 1) * len(engine.models)
        assert len(keys) <= bound, f"{name}: {len(keys)} variants while serving: {sorted(keys)}"


def test_specialization_classes_are_tracked(monkeypatch):
    """The recorder's keys do follow Triton's specialization: a specialized integer's classes
    (1, multiple of 16, other) and a pointer's alignment give different keys, a do_not_specialize
    argument does not."""
    recorder = LaunchRecorder()
    recorder.install(monkeypatch.setattr)
    rec = linear_triton._linear_kernel
    seen = lambda: recorder.seen("_linear_kernel", "warmup")  # noqa: E731
    buf = torch.zeros(64)
    consts = dict(SILU_MUL=False, HAS_BIAS=False, HAS_RESIDUAL=False, DOT=False, DOT_PRECISION="ieee", BLOCK_M=4,
                  BLOCK_N=4, BLOCK_K=4)
    for x_s0, rows in [(1, 3), (32, 3), (5, 3), (5, 1), (5, 16), (5, 17)]:
        rec[(1,)](buf, buf, buf, buf, buf, rows, 4, 4, x_s0, 4, 4, 4, **consts)
    rec[(1,)](buf, buf, buf, buf, buf[1:], 3, 4, 4, 5, 4, 4, 4, **consts)  # unaligned out
    rec[(1,)](buf[1:], buf, buf, buf, buf, 3, 4, 4, 5, 4, 4, 4, **consts)  # unaligned x
    assert len(seen()) == 5  # x_s0 1 / 32 / 5, then the two pointers; rows never


def test_warmup_steps_fit_any_limits():
    for page_tokens, seqs, tokens, model_len in [(16, 256, 2048, 4096), (7, 1, 1, 2), (5, 3, 4, 9), (1, 2, 64, 64)]:
        steps = warmup_steps(page_tokens, seqs, tokens, model_len)
        assert steps
        for s in steps:
            n_seqs = len(s.decode_lens) + len(s.chunks)
            assert 1 <= n_seqs <= seqs
            assert len(s.decode_lens) + sum(c for c, _ in s.chunks) <= min(tokens, 64)
            assert all(1 <= c <= model_len for c in s.decode_lens)
            assert all(c >= 1 and c + p <= model_len for c, p in s.chunks)
        assert any(not s.chunks for s in steps)  # decode-only
        if tokens >= 2 and seqs >= 2 and model_len >= 2:
            assert any(s.chunks and not s.decode_lens for s in steps)  # extend-only: q aligned
            assert any(s.chunks and len(s.decode_lens) == 1 for s in steps)  # q after one decode row


def test_warmup_writes_nothing_into_the_pool(tmp_path):
    """On the PyTorch ops (the same steps), the arena is bit for bit what it was."""
    small, _ = save_pair(tmp_path, special_tags=True)
    engine = Engine(small, kv_cache_bytes=1 << 20, max_model_len=128, page_tokens=5, max_num_seqs=20,
                    max_num_batched_tokens=40, progress=False)
    engine.pool.arena.normal_()
    before = engine.pool.arena.clone()
    (report,) = warm_up(engine, 20, 40)
    assert report.steps > 10 and report.compiled == 0
    assert torch.equal(engine.pool.arena, before)


def test_jit_compiles_sums_the_kernel_caches(monkeypatch):
    """jit_compiles() sums each kernel's per-device caches (first element of each device entry, as
    in Triton 3.3 to 3.9), counts a kernel reachable under two names once, and never looks a device
    up (the caches are defaultdicts that would build a binder, which needs a GPU driver)."""
    import os
    import sys
    import types

    from splitreason_engine import jit

    base = jit.jit_compiles()
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert base == 0  # interpreted kernels are not JITFunctions: nothing is compiled

    def no_device(*_):
        raise AssertionError("looked a device up")

    fake = types.SimpleNamespace(device_caches=defaultdict(no_device))
    fake.device_caches[0] = ({"k1": object(), "k2": object()}, {}, None, None, None)  # Triton 3.6 / 3.9 layout
    fake.device_caches[1] = ({"k3": object()}, None, None, None)  # Triton 3.3 layout
    name = "splitreason_engine.kernels.rope_triton"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    others = jit.jit_compiles()  # every kernel module's compiles but this one's
    module = types.ModuleType(name)
    module._one_kernel, module._alias = fake, fake
    monkeypatch.setitem(sys.modules, name, module)
    assert jit.jit_compiles() == others + 3
    assert sorted(jit.jit_variants()["rope_triton._alias"]) == ["k1", "k2", "k3"]


def test_jit_compiles_without_triton():
    """0, and Triton never imported, where Triton is not installed."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "from splitreason_engine.jit import jit_compiles\n"
            "assert jit_compiles() == 0\n"
            "from splitreason_engine.warmup import should_warm_up\n"
            "import torch; assert not should_warm_up(None, torch.device('cpu'))\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_warmup_covers_both_alignments_of_extend_q(tmp_path, monkeypatch):
    """A model whose fused qkv row is not a multiple of 16 bytes (3 + 2 heads of 18 fp32 = 360 B):
    extend's q = qkv[num_decodes:] is then 16-byte aligned or not by num_decodes, two variants
    of the extend kernel, and the warm-up reaches both."""
    cuda_like(monkeypatch.setattr, FAKE_SMS)
    recorder = LaunchRecorder()
    recorder.install(monkeypatch.setattr)
    config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=48, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1, head_dim=18, vocab_size=96,
                  max_position_embeddings=256, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    seqs, tokens = 16, 32
    engine = Engine(tmp_path, load_format="dummy", kernels="torch", kv_cache_bytes=1 << 20, max_model_len=200,
                    page_tokens=5, max_num_seqs=seqs, max_num_batched_tokens=tokens, progress=False)
    use_ops(engine, hybrid_ops())
    warm_up(engine, seqs, tokens)
    recorder.phase = "serve"
    prompts = [[(3 * k + i) % 90 for k in range(1 + (i * 13) % 70)] for i in range(24)]
    engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=3 + i % 9, ignore_eos=True) for i in range(24)],
                    use_tqdm=False)
    extend = recorder.keys["_extend_kernel"]
    warm, served = {k for p, k in extend if p == "warmup"}, {k for p, k in extend if p == "serve"}
    assert len(served) == 2 and served <= warm, (sorted(warm), sorted(served))
    for name, keys in recorder.keys.items():
        assert {k for p, k in keys if p == "serve"} <= {k for p, k in keys if p == "warmup"}, name


def test_do_not_specialize_names_are_parameters():
    """Triton ignores a do_not_specialize name that is not a parameter: a typo would silently
    specialize again."""
    for module in KERNEL_MODULES:
        for name, obj in kernels_of(module).items():
            jit = as_jit(obj)
            params = {p.name for p in jit.params}
            names = set(jit.do_not_specialize or ())
            assert names <= params, f"{name}: {sorted(names - params)} are not parameters"
