"""Tiny random checkpoints written by Hugging Face transformers (Qwen2, Llama, Qwen3), and the
checks that compare the engine with transformers on them."""

from pathlib import Path

import numpy as np
import torch

from splitreason_engine import Engine, SamplingParams, _C

# (name, overrides): head ratios 1, 2, 6; tied and untied; hidden not a power of two; theta 1e4 / 1e6.
CONFIGS = {
    "mha-tied-1e4": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                         rope_theta=1e4),
    "gqa2-untied-1e6": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=False, rope_theta=1e6),
    "gqa6-h96-tied": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True,
                          rope_theta=1e6),
    "gqa2-h80-untied": dict(hidden_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=20,
                            tie_word_embeddings=False, rope_theta=1e4),
}
# Llama-3 RoPE with a short original context, so prompts of a few dozen tokens reach the scaled band.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
LLAMA_CONFIGS = {
    "mha-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                     rope_theta=1e4),
    "gqa4-h96-llama3": dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                            rope_parameters=LLAMA3_ROPE),
    "gqa2-h80-bias": dict(hidden_size=80, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE),
    "gqa8-hd64": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1, head_dim=64,
                      tie_word_embeddings=True, rope_theta=5e5),
}
# Qwen3 sets head_dim apart from hidden / heads.
QWEN3_CONFIGS = {
    "gqa2-hd32-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           tie_word_embeddings=True, rope_theta=1e6),
    "gqa4-h80-untied": dict(hidden_size=80, num_attention_heads=8, num_key_value_heads=2, head_dim=24,
                            tie_word_embeddings=False, rope_theta=1e4),
    "gqa8-hd128-bias": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                            tie_word_embeddings=False, attention_bias=True, rope_theta=1e6),
}
FAMILY_CONFIGS = {"qwen2": CONFIGS, "llama": LLAMA_CONFIGS, "qwen3": QWEN3_CONFIGS}


def save_tiny(folder: Path, family: str, name: str, seed: int = 0, vocab_size: int = 160, num_layers: int = 2,
              shards: bool = False) -> Path:
    """Saves a random `family` model of FAMILY_CONFIGS[family][name], with a spread of logits wide
    enough that greedy decoding has no near-ties."""
    from transformers import AutoConfig, AutoModelForCausalLM

    over = dict(FAMILY_CONFIGS[family][name])
    config = AutoConfig.for_model(family, vocab_size=vocab_size, intermediate_size=2 * over["hidden_size"] + 24,
                                  num_hidden_layers=num_layers, max_position_embeddings=512, eos_token_id=None,
                                  bos_token_id=None, **over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15 if p.dim() > 1 else 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="60KB" if shards else "2GB")
    return folder


def save_tiny_qwen2(folder: Path, name: str, seed: int = 0, vocab_size: int = 160, num_layers: int = 2,
                    shards: bool = False) -> Path:
    return save_tiny(folder, "qwen2", name, seed, vocab_size, num_layers, shards)


def ragged_prompts_for(seed: int, count: int = 8, vocab: int = 160, lo: int = 1, hi: int = 48) -> list[list[int]]:
    """`count` random prompts with lengths in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_model(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def hf_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model(folder).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy_params(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)


def assert_greedy_matches_hf(folder: Path, prompts: list[list[int]], new_tokens: int, **engine_kwargs) -> None:
    """A ragged batch in one engine gives HF's greedy tokens for every prompt."""
    engine = Engine(folder, kv_cache_bytes=1 << 22, max_num_batched_tokens=64, progress=False, **engine_kwargs)
    for prompt, out in zip(prompts, engine.generate(prompts, greedy_params(new_tokens), use_tqdm=False)):
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(folder, prompt, new_tokens)


def assert_greedy_matches_hf_under_preemption(folder: Path, prompts: list[list[int]], new_tokens: int) -> None:
    """Tokens still match HF's when a small pool makes the requests preempt each other."""
    probe = Engine(folder, kv_cache_bytes=1 << 20, max_model_len=128, progress=False)
    page_bytes = probe.pool.page_bytes
    # Room for ~2.5 full requests: eight running requests must preempt each other.
    engine = Engine(folder, kv_cache_bytes=page_bytes * 20, max_model_len=128, page_tokens=16, progress=False)
    outputs = engine.generate(prompts, greedy_params(new_tokens), use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(folder, prompt, new_tokens)
    assert engine.scheduler.num_free_pages == engine.pool.num_pages


class LogitCapture:
    """Wraps a model's compute_logits to keep every logits tensor the engine computes."""

    def __init__(self, model):
        self.model, self.inner, self.seen = model, model.compute_logits, []
        model.compute_logits = self

    def __call__(self, hidden):
        logits = self.inner(hidden)
        self.seen.append(logits.clone())
        return logits


def assert_logits_match_hf(folder: Path, prompt: list[int]) -> None:
    """Prefill logits of every prompt position and of 8 decode steps within 1e-4 of HF's (fp32)."""
    engine = Engine(folder, kv_cache_bytes=1 << 22, progress=False)
    capture = LogitCapture(engine.models[0])
    [out] = engine.generate([prompt], greedy_params(9), use_tqdm=False)
    with torch.no_grad():
        full = hf_model(folder)(torch.tensor([prompt + out.token_ids])).logits[0]
    ours = torch.cat(capture.seen)  # one row per step: end of prefill, then each decode
    expected = full[len(prompt) - 1: len(prompt) - 1 + len(ours)]
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)

    # Every position of a prefill: run the model directly over a fresh engine's pool (nothing cached).
    engine = Engine(folder, kv_cache_bytes=1 << 22, progress=False)
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
