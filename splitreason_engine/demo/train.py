"""Trains the demo pair: SFT of a small Qwen2 on tagged traces, and of a big one on the same
traces without tags (the SFT stage of SplitReason, at toy scale), on the CPU in minutes.

The models here are plain dense PyTorch modules with Hugging Face Qwen2 parameter names, so the
saved folders load in this engine and in transformers alike.
"""

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..kernels import apply_rope_ref, rope_cos_sin
from ..protocol import PromptTemplate
from . import chartok
from .task import DIGITS, OPEN_TAG, Problem, sample_problem

logger = logging.getLogger(__name__)

MAX_POSITIONS = 1024
IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    def hf_config(self, vocab_size: int, bos: int, eos: int) -> dict:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "vocab_size": vocab_size, "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": bos,
                "eos_token_id": eos, "torch_dtype": "float32"}


@dataclass(frozen=True)
class TrainConfig:
    shape: ModelShape
    tagged: bool  # the small model learns the tags; the big one reads traces without them
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    bf16: bool = True  # bf16 autocast for the matmuls (fp32 weights and optimizer): about 1.5x faster on CPUs with AMX


SMALL = ModelShape(hidden_size=112, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=448)
BIG = ModelShape(hidden_size=192, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=768)


class _Attention(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.hidden_size // s.num_heads
        self.q_proj = nn.Linear(s.hidden_size, s.hidden_size)
        self.k_proj = nn.Linear(s.hidden_size, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(s.hidden_size, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(s.hidden_size, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        q, k = apply_rope_ref(q, rope), apply_rope_ref(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(s.hidden_size, eps=1e-6)
        self.self_attn = _Attention(s)
        self.post_attention_layernorm = nn.RMSNorm(s.hidden_size, eps=1e-6)
        self.mlp = _MLP(s)

    def forward(self, x, rope):
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, s: ModelShape, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(_Layer(s) for _ in range(s.num_layers))
        self.norm = nn.RMSNorm(s.hidden_size, eps=1e-6)


class TrainingQwen2(nn.Module):
    """Dense causal Qwen2 with tied embeddings, for training only (the engine serves the result)."""

    def __init__(self, shape: ModelShape, vocab_size: int):
        super().__init__()
        self.model = _Body(shape, vocab_size)
        self.register_buffer("rope", rope_cos_sin(shape.hidden_size // shape.num_heads, MAX_POSITIONS, 10000.0,
                                                  torch.float32, "cpu"), persistent=False)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 0.02 / math.sqrt(2 * shape.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            nn.init.normal_(p, 0.0, std) if p.dim() > 1 else nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, rope = self.model.embed_tokens(ids), self.rope[: ids.shape[1]]
        for layer in self.model.layers:
            x = layer(x, rope)
        return F.linear(self.model.norm(x), self.model.embed_tokens.weight)


def encode_example(tok, template: PromptTemplate, problem: Problem, tagged: bool) -> tuple[list[int], int]:
    """(token ids of prompt + trace + EOS, prompt length). The small model's prompt has the hint."""
    prompt = (template.small if tagged else template.big)(problem.question)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
    trace_ids = tok.encode(problem.trace(tagged), add_special_tokens=False).ids
    return prompt_ids + trace_ids + [tok.token_to_id(chartok.EOS)], len(prompt_ids)


def make_batch(rows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets from encode_example rows; only the trace and EOS are learned (the prompt is given)."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        seq = torch.tensor(ids)
        inputs[i, : len(ids) - 1] = seq[:-1]
        targets[i, n_prompt - 1: len(ids) - 1] = seq[n_prompt:]
    return inputs, targets


def hard_step_accuracy(model: TrainingQwen2, tok, template, problems: list[Problem], tagged: bool) -> float:
    """Fraction of hard steps (the products) predicted exactly, teacher-forced, greedy."""
    rows = [encode_example(tok, template, p, tagged) for p in problems]
    inputs, targets = make_batch(rows)
    with torch.no_grad():
        pred = model(inputs).argmax(-1)
    correct = total = 0
    for i, (p, (_, n_prompt)) in enumerate(zip(problems, rows)):
        trace, k = p.trace(tagged), 0
        while (k := trace.find(" = ", k)) >= 0:
            k += 3 + (len(OPEN_TAG) if tagged else 0)  # the product's first character
            span = slice(n_prompt - 1 + k, n_prompt + DIGITS + k)  # trace characters are tokens one for one
            correct += bool((pred[i, span] == targets[i, span]).all())
            total += 1
    return correct / total


def train_model(config: TrainConfig, out: Path, progress: bool = True) -> dict:
    """Trains one model and writes its checkpoint folder; returns the training log."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tok, template = chartok.build_tokenizer(), PromptTemplate()
    vocab = chartok.save_tokenizer(out)
    padded_vocab = (vocab + 7) // 8 * 8
    model = TrainingQwen2(config.shape, padded_vocab)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / config.steps))))
    eval_rng = random.Random(config.seed + 1)
    eval_problems = [sample_problem(eval_rng, held_out=True) for _ in range(64)]
    log = {"config": asdict(config), "parameters": sum(p.numel() for p in model.parameters()), "steps": []}
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"training {out.name}", disable=not progress)
    for step in bar:
        inputs, targets = make_batch([encode_example(tok, template, sample_problem(rng, held_out=False), config.tagged)
                                      for _ in range(config.batch_size)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0 or step == config.steps - 1:
            entry = {"step": step, "loss": round(loss.item(), 5), "elapsed_s": round(time.perf_counter() - start, 1)}
            if step % 200 == 0 or step == config.steps - 1:
                model.eval()
                entry["hard_step_accuracy"] = hard_step_accuracy(model, tok, template, eval_problems, config.tagged)
                model.train()
            log["steps"].append(entry)
            logger.info("%s step %d: %s", out.name, step, entry)
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    save_checkpoint(model, config.shape, padded_vocab, tok, out)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def save_checkpoint(model: TrainingQwen2, shape: ModelShape, vocab_size: int, tok, out: Path) -> None:
    config = shape.hf_config(vocab_size, tok.token_to_id(chartok.BOS), tok.token_to_id(chartok.EOS))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {name: p.detach().contiguous() for name, p in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


SMALL_STEPS, BIG_STEPS = 500, 1000


def train_pair(out: Path, seed: int = 0, small_steps: int = SMALL_STEPS, big_steps: int = BIG_STEPS,
               batch_size: int = 32, progress: bool = True) -> dict[str, dict]:
    """Both demo models under out/small and out/big, from one seed."""
    logs = {}
    for name, shape, tagged, steps in (("small", SMALL, True, small_steps), ("big", BIG, False, big_steps)):
        config = TrainConfig(shape=shape, tagged=tagged, steps=steps, batch_size=batch_size, seed=seed)
        logs[name] = train_model(config, Path(out) / name, progress)
    return logs
