"""The CUDA path's parts: the Triton op set inside the engine, and the static, padded decode
buffers CUDA graphs replay. On CPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1) and the graph buffers run eagerly; the gpu-marked tests run the real thing."""

import pytest
import torch

from hf_models import ragged_prompts_for
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.decode_graphs import DecodeGraphs, buckets_for


def static_decode(engine: Engine, max_batch: int) -> list[list[int]]:
    """Puts eager (capture=False) static decode buffers on every runner; returns a log of the
    (batch, bucket) pairs they serve."""
    log = []
    for runner, model in zip(engine.runners, engine.models):
        graphs = DecodeGraphs(model, runner.kv_caches, max_batch, runner.stride, engine.device, capture=False)
        run = graphs.run

        def logged(buffers, num_seqs, width, feed=None, run=run, graphs=graphs):
            log.append((num_seqs, next(b for b in graphs.buckets if b >= num_seqs)))
            return run(buffers, num_seqs, width, feed)

        graphs.run = logged
        runner.graphs = graphs
    return log


def greedy(engine: Engine, prompts, max_tokens) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    return [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]


def test_buckets_cover_every_batch_size():
    for max_batch in (1, 3, 8, 9, 100, 256):
        buckets = buckets_for(max_batch)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
        assert all(any(b >= n for b in buckets) for n in range(1, max_batch + 1))


def test_padded_static_decode_equals_eager(tiny_checkpoints):
    """Decode batches shrink as requests finish (7, 6, ..., 1): most of them are padded up to a
    bucket, with padding rows that must neither write the pool nor disturb the real rows."""
    folder = tiny_checkpoints["gqa2-untied-1e6"]
    prompts = ragged_prompts_for(5, count=9)
    max_tokens = [3, 5, 6, 8, 9, 11, 12, 14, 16]
    kwargs = dict(kv_cache_bytes=1 << 22, page_tokens=5, progress=False)
    expected = greedy(Engine(folder, **kwargs), prompts, max_tokens)
    engine = Engine(folder, **kwargs)
    log = static_decode(engine, max_batch=7)
    assert greedy(engine, prompts, max_tokens) == expected
    assert any(bucket > n for n, bucket in log), log  # some steps were padded
    assert {n for n, _ in log} >= {1, 2, 3, 5, 7}, log


def test_cuda_graphs_need_cuda(tiny_checkpoints):
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda'"):
        Engine(tiny_checkpoints["mha-tied-1e4"], cuda_graphs=True, kv_cache_bytes=1 << 22, progress=False)


def test_unknown_kernels_choice_is_named(tiny_checkpoints):
    with pytest.raises(ValueError, match="kernels must be one of"):
        Engine(tiny_checkpoints["mha-tied-1e4"], kernels="cutlass", kv_cache_bytes=1 << 22, progress=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("name,page_tokens", [("gqa2-h80-untied", 7), ("gqa6-h96-tied", 16)])
def test_triton_ops_generate_like_the_torch_ops(tiny_checkpoints, name, page_tokens):
    """The engine on the Triton kernels (interpreted, fp32) picks the PyTorch path's tokens: chunked
    prefill (extend over a cached prefix), mixed prefill + decode steps, and padded decode steps."""
    folder = tiny_checkpoints[name]
    prompts = ragged_prompts_for(7, count=5, lo=3, hi=30)
    max_tokens = [4, 6, 3, 7, 5]
    kwargs = dict(kv_cache_bytes=1 << 22, page_tokens=page_tokens, max_num_batched_tokens=24, progress=False)
    expected = greedy(Engine(folder, kernels="torch", **kwargs), prompts, max_tokens)
    engine = Engine(folder, kernels="triton", **kwargs)
    assert engine.ops.name == "triton"
    log = static_decode(engine, max_batch=4)
    assert greedy(engine, prompts, max_tokens) == expected
    assert log and any(bucket > n for n, bucket in log), log


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa2-untied-1e6", "gqa2-h80-untied"])
def test_cuda_path_greedy_equals_cpu_path(tiny_checkpoints, name):
    """Triton kernels and CUDA graphs on the GPU (fp32, so no rounding separates the devices)
    against the CPU's PyTorch path, token for token."""
    folder = tiny_checkpoints[name]
    prompts = ragged_prompts_for(3, count=9)
    max_tokens = [8, 12, 16, 20, 24, 28, 32, 32, 32]
    kwargs = dict(dtype="float32", kv_cache_bytes=1 << 24, page_tokens=16, progress=False)
    expected = greedy(Engine(folder, device="cpu", **kwargs), prompts, max_tokens)
    engine = Engine(folder, device="cuda", **kwargs)
    assert engine.ops.name == "triton" and engine.runners[0].graphs is not None
    assert greedy(engine, prompts, max_tokens) == expected
    assert engine.runners[0].graphs.graphs  # decode steps ran from captured graphs


@pytest.mark.gpu
def test_cuda_bf16_path_tracks_fp32_logits(tiny_checkpoints):
    """bf16 on the GPU (the real configuration): the first token equal to the fp32 CPU model's and
    its logprob within bf16 rounding (later tokens may part at near-ties)."""
    folder = tiny_checkpoints["gqa2-untied-1e6"]
    prompts = ragged_prompts_for(4, count=8)
    cpu = Engine(folder, device="cpu", dtype="float32", kv_cache_bytes=1 << 24, progress=False)
    gpu = Engine(folder, device="cuda", kv_cache_bytes=1 << 24, progress=False)
    assert gpu.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=True, ignore_eos=True)
    for a, b in zip(cpu.generate(prompts, params, use_tqdm=False), gpu.generate(prompts, params, use_tqdm=False)):
        assert a.token_ids == b.token_ids
        assert abs(a.logprobs[0] - b.logprobs[0]) <= 5e-2 * max(1.0, abs(a.logprobs[0]))


def test_staged_inputs_equal_in_place_inputs(tiny_checkpoints, monkeypatch):
    """The CUDA layout of an eager step's inputs (one staging buffer, regions back to back, block-table
    rows compacted to the step's width, two host buffers in turn) run on the CPU: chunked prefill,
    mixed steps and sampled subsets give the in-place path's tokens."""
    from splitreason_engine import runner

    folder = tiny_checkpoints["gqa2-untied-1e6"]
    prompts = ragged_prompts_for(11, count=7, lo=2, hi=40)
    max_tokens = [5, 9, 3, 12, 7, 4, 10]
    kwargs = dict(kv_cache_bytes=1 << 22, page_tokens=5, max_num_batched_tokens=19, progress=False)
    expected = greedy(Engine(folder, **kwargs), prompts, max_tokens)
    monkeypatch.setattr(runner, "stages", lambda device: True)
    engine = Engine(folder, **kwargs)
    assert all(r.staged for r in engine.runners)
    assert greedy(engine, prompts, max_tokens) == expected
