"""CUDA path (skipped without a GPU): the same engine on the device matches Hugging Face."""

import pytest

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
