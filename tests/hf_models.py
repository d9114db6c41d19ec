"""Tiny random Qwen2 checkpoints written by Hugging Face transformers, for oracle comparisons."""

from pathlib import Path

import torch

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


def save_tiny_qwen2(folder: Path, name: str, seed: int = 0, vocab_size: int = 160, num_layers: int = 2,
                    shards: bool = False) -> Path:
    """Saves a random Qwen2 with a spread of logits wide enough that greedy decoding has no near-ties."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    over = dict(CONFIGS[name])
    config = Qwen2Config(vocab_size=vocab_size, intermediate_size=2 * over["hidden_size"] + 24,
                         num_hidden_layers=num_layers, max_position_embeddings=512, eos_token_id=None,
                         bos_token_id=None, **over)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15 if p.dim() > 1 else 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="60KB" if shards else "2GB")
    return folder


def ragged_prompts_for(seed: int, count: int = 8, vocab: int = 160, lo: int = 1, hi: int = 48) -> list[list[int]]:
    """`count` random prompts with lengths in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()
