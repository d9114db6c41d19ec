"""Shared bits of the benchmarks: the machine's name, the model shapes, copy bandwidth, a random HF
checkpoint, and medians of repeats with their spread."""

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from splitreason_engine.machine import machine, machine_line  # noqa: F401  (re-exported for the scripts)


def shipped(name: str) -> dict:
    """A config shipped in splitreason_engine/configs/, without special tokens (HF must not stop at EOS)."""
    raw = json.loads((resources.files("splitreason_engine") / "configs" / name / "config.json").read_text())
    return dict(raw, bos_token_id=None, eos_token_id=None)


# The DeepSeek-R1-Distill-Qwen shapes (from DESIGN.md) and the shipped configs, for dummy weights.
BASE = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=8192,
            rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False,
            bos_token_id=None, eos_token_id=None, torch_dtype="bfloat16")
MODELS = {
    "1.5B": dict(num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "14B": dict(num_hidden_layers=48, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(num_hidden_layers=64, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False),
    "llama-8B": shipped("r1-distill-llama-8b"),
    "qwen3-8B": shipped("qwen3-8b"),
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256),
}


def copy_bandwidth(device: str = "cpu", mib: int = 512, repeats: int = 10) -> float:
    """STREAM-style copy bandwidth in bytes/s: (bytes read + bytes written) per second."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def save_random_qwen2(folder: Path, seed: int = 0, **config) -> Path:
    """A random Qwen2 checkpoint written by transformers (the same weights for every contender)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).float()
    model.save_pretrained(folder)
    return folder


def write_json(path: "str | None", payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def write_dummy_pair(root: Path, hidden: int = 512, small_layers: int = 4, big_layers: int = 12,
                     max_positions: int = 8192) -> tuple[Path, Path]:
    """Config folders (no weights: load with load_format="dummy") for a small and a big Qwen2 that
    share the embedded byte-level tokenizer, extended with `<bigmodel>` / `</bigmodel>` as single
    special tokens so a logit_bias can drive handoffs."""
    from splitreason_engine.engine import default_model_path

    spec = json.loads((default_model_path() / "tokenizer.json").read_text())
    next_id = max(t["id"] for t in spec["added_tokens"]) + 1
    for tag in ("<bigmodel>", "</bigmodel>"):
        spec["added_tokens"].append(dict(id=next_id, content=tag, single_word=False, lstrip=False, rstrip=False,
                                         normalized=False, special=True))
        next_id += 1
    folders = []
    for name, layers in (("small", small_layers), ("big", big_layers)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=hidden,
                      intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=max_positions, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, hidden_act="silu", torch_dtype="float32")
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        (folder / "tokenizer_config.json").write_text(
            (default_model_path() / "tokenizer_config.json").read_text())
        folders.append(folder)
    return folders[0], folders[1]


def printable_ascii_bias(engine) -> dict[int, float]:
    """A logit_bias that keeps random models to printable ASCII (plus newline), so their text
    decodes and re-tokenizes one to one, as real text does (random bytes are mostly invalid UTF-8)."""
    from splitreason_engine.tags import token_bytes

    pieces = token_bytes(engine.tokenizer)
    tags = set(engine.tags.all)
    printable = lambda p: bool(p) and all(32 <= b < 127 or b == 10 for b in p)  # noqa: E731
    return {i: -100.0 for i, p in enumerate(pieces) if p.decode(errors="replace") not in tags and not printable(p)}


def random_seeds(fraction: float, chunks: int, count: int) -> list[int]:
    """Seeds whose random-mode draws (chunk k is big iff draw k < 1/(switch_ratio+1) = fraction)
    give the number of big chunks out of `chunks` closest to `fraction`."""
    import random

    want, seeds = round(fraction * chunks), []
    for seed in range(1_000_000):
        rng = random.Random(seed)
        if sum(rng.random() < fraction for _ in range(chunks)) == want:
            seeds.append(seed)
            if len(seeds) == count:
                return seeds
    raise RuntimeError(f"no {count} seeds give {want} big chunks of {chunks}")


def summary(values: "list[float]") -> dict:
    """Median of repeats, with min, max and spread ((max - min) / median): the figures every
    headline number is reported with (these machines are noisy)."""
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values), "repeats": len(values),
            "spread": (max(values) - min(values)) / median if median else None}


def check_sane(failures: "list[str]") -> None:
    """Ends a --smoke run with exit status 1 if any baseline did not mean what it says."""
    for failure in failures:
        print(f"SANITY CHECK FAILED: {failure}", file=sys.stderr)
    if failures:
        sys.exit(1)


def parse_with_smoke(p: argparse.ArgumentParser, smoke: dict, repeats: int = 3, argv=None) -> argparse.Namespace:
    """Adds --repeats (medians need at least 3) and --smoke (`smoke`'s values replace the arguments:
    a seconds-long run with the same sanity checks, which CI runs), then parses."""
    p.add_argument("--repeats", type=int, default=repeats, help=f"runs per figure, at least 3: figures are their "
                   f"medians, with their spread (default: {repeats})")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on tiny shapes, with the sanity checks")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(smoke)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (figures are medians)")
    return args
