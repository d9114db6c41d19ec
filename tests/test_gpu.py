"""CUDA path (skipped without a GPU): the same engine on the device matches Hugging Face, and the
Triton path matches the PyTorch ops at the real shapes of the Llama and Qwen3 families."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from hf_models import hf_greedy, ragged_prompts_for
from splitreason_engine import Engine, SamplingParams


@pytest.mark.gpu
def test_cuda_fp32_greedy_matches_hf(tiny_checkpoints):
    folder = tiny_checkpoints["gqa2-untied-1e6"]
    prompts = ragged_prompts_for(2, count=8)
    engine = Engine(folder, device="cuda", dtype="float32", kv_cache_bytes=1 << 24, progress=False)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(folder, prompt, 32)


def shipped_shape(folder: Path, name: str, layers: int) -> Path:
    """The shipped config.json of `name` (splitreason_engine/configs/) with only `layers` layers."""
    raw = json.loads((resources.files("splitreason_engine") / "configs" / name / "config.json").read_text())
    path = folder / name / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(raw, num_hidden_layers=layers)))
    return path


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["r1-distill-llama-8b", "qwen3-8b"])
def test_real_shapes_triton_path_equals_torch_ops(tmp_path, name):
    """R1-Distill-Llama-8B (llama3 RoPE) and Qwen3-8B (q/k norms, head_dim 128) at their real widths,
    two layers, dummy weights, fp32: the Triton kernels with CUDA graphs pick the PyTorch ops'
    tokens on the same GPU, with the same logprobs."""
    config = shipped_shape(tmp_path, name, layers=2)
    vocab = json.loads(config.read_text())["vocab_size"]
    prompts = ragged_prompts_for(6, count=4, vocab=vocab, lo=50, hi=1200)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=True, ignore_eos=True)
    kwargs = dict(device="cuda", dtype="float32", load_format="dummy", kv_cache_bytes=1 << 30, max_model_len=2048,
                  progress=False)
    expected = Engine(config, kernels="torch", **kwargs).generate(prompts, params, use_tqdm=False)
    engine = Engine(config, kernels="triton", **kwargs)
    assert engine.ops.name == "triton" and engine.runners[0].graphs is not None
    for a, b in zip(expected, engine.generate(prompts, params, use_tqdm=False)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-3, rtol=1e-3)
