"""Token-for-token and logit parity with Hugging Face transformers on tiny random Qwen2 models."""

import pytest
import torch

from hf_models import (CONFIGS, LogitCapture, assert_greedy_matches_hf, assert_greedy_matches_hf_under_preemption,
                       assert_logits_match_hf, hf_greedy, hf_model, ragged_prompts_for, save_tiny_qwen2)
from splitreason_engine import Engine, SamplingParams

NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


ragged_prompts = ragged_prompts_for


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf(tiny_checkpoints, name):
    assert_greedy_matches_hf(tiny_checkpoints[name], ragged_prompts(len(name)), NEW_TOKENS)


@pytest.mark.parametrize("name", ["gqa2-untied-1e6", "gqa6-h96-tied"])
def test_greedy_matches_hf_under_preemption(tiny_checkpoints, name):
    assert_greedy_matches_hf_under_preemption(tiny_checkpoints[name], ragged_prompts(7 + len(name)), NEW_TOKENS)


def test_sharded_checkpoint_matches_hf(tmp_path):
    folder = save_tiny_qwen2(tmp_path / "sharded", "gqa2-untied-1e6", seed=5, shards=True)
    assert (folder / "model.safetensors.index.json").is_file()
    prompt = ragged_prompts(3, count=1)[0]
    engine = Engine(folder, kv_cache_bytes=1 << 22, progress=False)
    [out] = engine.generate([prompt], GREEDY, use_tqdm=False)
    assert out.token_ids == hf_greedy(folder, prompt, NEW_TOKENS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_logits_match_hf(tiny_checkpoints, name):
    """Prefill logits of every prompt position and of 8 decode steps within 1e-4 of HF's."""
    assert_logits_match_hf(tiny_checkpoints[name], ragged_prompts(11, count=1)[0] + [1, 2, 3])


def test_mixed_batch_prefill_chunks_and_decodes_match_single_runs(tiny_checkpoints):
    """A tiny token budget forces chunked prefills to share steps with decodes; results match
    each prompt run alone."""
    folder = tiny_checkpoints["gqa2-h80-untied"]
    prompts = ragged_prompts(21, count=10)
    engine = Engine(folder, kv_cache_bytes=1 << 22, max_num_batched_tokens=7, max_num_seqs=4, progress=False)
    batched = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    alone = Engine(folder, kv_cache_bytes=1 << 22, progress=False)
    for prompt, out in zip(prompts, batched):
        [single] = alone.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
        assert out.token_ids == single.token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_track_hf(tiny_checkpoints, dtype):
    """In bf16 / fp16 the prefill logits stay within half-precision error of HF in the same dtype."""
    folder = tiny_checkpoints["gqa2-untied-1e6"]
    prompt = ragged_prompts(13, count=1)[0] + [4, 5]
    engine = Engine(folder, dtype=dtype, kv_cache_bytes=1 << 22, progress=False)
    assert engine.models[0].embed_tokens.weight.dtype == dtype
    capture = LogitCapture(engine.models[0])
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    hf = hf_model(folder, dtype)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1].float()
    ours = capture.seen[0][0]
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= 0.03 * scale
    assert ours.argmax() == expected.argmax()
