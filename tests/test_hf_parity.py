"""Token-for-token and logit parity with Hugging Face transformers on tiny random Qwen2 models."""

import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from hf_models import CONFIGS, hf_greedy, ragged_prompts_for, save_tiny_qwen2
from splitreason_engine import Engine, SamplingParams, _C

NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


ragged_prompts = ragged_prompts_for


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf(tiny_checkpoints, name):
    folder = tiny_checkpoints[name]
    prompts = ragged_prompts(len(name))
    engine = Engine(folder, kv_cache_bytes=1 << 22, max_num_batched_tokens=64, progress=False)
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(folder, prompt, NEW_TOKENS)


@pytest.mark.parametrize("name", ["gqa2-untied-1e6", "gqa6-h96-tied"])
def test_greedy_matches_hf_under_preemption(tiny_checkpoints, name):
    folder = tiny_checkpoints[name]
    prompts = ragged_prompts(7 + len(name))
    probe = Engine(folder, kv_cache_bytes=1 << 20, max_model_len=128, progress=False)
    page_bytes = probe.pool.page_bytes
    # Room for ~2.5 full requests: eight running requests must preempt each other.
    engine = Engine(folder, kv_cache_bytes=page_bytes * 20, max_model_len=128, page_tokens=16, progress=False)
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(folder, prompt, NEW_TOKENS)
    assert engine.scheduler.num_free_pages == engine.pool.num_pages


def test_sharded_checkpoint_matches_hf(tmp_path):
    folder = save_tiny_qwen2(tmp_path / "sharded", "gqa2-untied-1e6", seed=5, shards=True)
    assert (folder / "model.safetensors.index.json").is_file()
    prompt = ragged_prompts(3, count=1)[0]
    engine = Engine(folder, kv_cache_bytes=1 << 22, progress=False)
    [out] = engine.generate([prompt], GREEDY, use_tqdm=False)
    assert out.token_ids == hf_greedy(folder, prompt, NEW_TOKENS)


class _LogitCapture:
    """Wraps a model's compute_logits to keep every logits tensor the engine computes."""

    def __init__(self, model):
        self.model, self.inner, self.seen = model, model.compute_logits, []
        model.compute_logits = self

    def __call__(self, hidden):
        logits = self.inner(hidden)
        self.seen.append(logits.clone())
        return logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_logits_match_hf(tiny_checkpoints, name):
    """Prefill logits of every prompt position and of 8 decode steps within 1e-4 of HF's."""
    folder = tiny_checkpoints[name]
    prompt = ragged_prompts(11, count=1)[0] + [1, 2, 3]
    engine = Engine(folder, kv_cache_bytes=1 << 22, progress=False)
    capture = _LogitCapture(engine.models[0])
    [out] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), use_tqdm=False)
    hf = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        full = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    ours = torch.cat(capture.seen)  # one row per step: end of prefill, then each decode
    expected = full[len(prompt) - 1: len(prompt) - 1 + len(ours)]
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)

    # Every position of a prefill: run the model directly over the engine's pool.
    runner = engine.runners[0]
    engine.scheduler.add_request(999, [prompt], [_C.RUN_FOREGROUND])
    engine.scheduler.schedule()
    num_seqs, num_tokens, num_decodes, _, width = engine.scheduler.counts()[:5].tolist()
    logits = _all_rows(runner, num_seqs, num_tokens, num_decodes, width)
    torch.testing.assert_close(logits, full[: len(prompt)], atol=1e-4, rtol=0)
    engine.scheduler.finish(999)


@torch.inference_mode()
def _all_rows(runner, num_seqs, num_tokens, num_decodes, width):
    b = runner.buffers
    runner.buffers = dict(b, logits_indices=np.arange(num_tokens, dtype=np.int32))
    try:
        return runner.execute(num_seqs, num_tokens, num_decodes, num_tokens, width)
    finally:
        runner.buffers = b


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
    capture = _LogitCapture(engine.models[0])
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    hf = Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1].float()
    ours = capture.seen[0][0]
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= 0.03 * scale
    assert ours.argmax() == expected.argmax()
