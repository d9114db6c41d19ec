"""Model configuration read from a Hugging Face config.json, with the checks that need no weights."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .kernels.rope import Llama3RopeScaling

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Family:
    """How one architecture's config.json maps onto the shared decoder's switches."""

    model_type: str
    architecture: str
    fixed_qkv_bias: bool = False  # Qwen2: q/k/v biases always, no o bias; else both from `attention_bias`
    reads_mlp_bias: bool = False  # Llama: gate/up/down biases from `mlp_bias`
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before RoPE


FAMILIES = (
    Family("qwen2", "Qwen2ForCausalLM", fixed_qkv_bias=True),
    Family("llama", "LlamaForCausalLM", reads_mlp_bias=True),
    Family("qwen3", "Qwen3ForCausalLM", qk_norm=True),
)
SUPPORTED_ARCHITECTURES = tuple(f.architecture for f in FAMILIES)


def parse_dtype(name: "str | torch.dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    """The decoder hyper-parameters the engine uses; everything else in config.json is ignored."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    family: str  # a FAMILIES model_type
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # RMSNorm on each q and k head (q_norm, k_norm of head_dim) before RoPE
    rope_scaling: "Llama3RopeScaling | None"

    def kv_bytes_per_token(self, dtype: torch.dtype, kv_heads: "int | None" = None) -> int:
        """K and V of one token across all layers, of all KV heads or of `kv_heads` (one rank's share)."""
        heads = self.num_kv_heads if kv_heads is None else kv_heads
        return self.num_layers * 2 * heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def num_parameters(self) -> int:
        h, inter = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = 2 * h * q + 2 * h * kv + self.qkv_bias * (q + 2 * kv) + self.o_bias * h
        attn += self.qk_norm * 2 * self.head_dim
        mlp = 3 * h * inter + self.mlp_bias * (2 * inter + h)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + embed + h

    @staticmethod
    def from_file(path: Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json: {path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return ModelConfig.from_dict(raw, source=str(path))

    @staticmethod
    def from_dict(raw: dict, source: str = "config") -> "ModelConfig":
        family = _family(raw, source)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        if raw.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required fields {missing}")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        attention_bias = bool(raw.get("attention_bias", False))
        return ModelConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            family=family.model_type,
            qkv_bias=family.fixed_qkv_bias or attention_bias,
            o_bias=not family.fixed_qkv_bias and attention_bias,
            mlp_bias=family.reads_mlp_bias and bool(raw.get("mlp_bias", False)),
            qk_norm=family.qk_norm,
            rope_scaling=_rope_scaling(rope, source),
        )


def _family(raw: dict, source: str) -> Family:
    """The family named by `architectures`, else by `model_type`; anything else is refused by name."""
    archs = raw.get("architectures") or []
    family = (next((f for f in FAMILIES if f.architecture in archs), None)
              or next((f for f in FAMILIES if f.model_type == raw.get("model_type")), None))
    if family is not None:
        return family
    found = archs or raw.get("model_type")
    raise ValueError(f"{source}: unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope_scaling(rope: dict, source: str) -> "Llama3RopeScaling | None":
    """None for plain RoPE, Llama-3's scaling when asked for; other rope types are refused by name."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"{source}: rope scaling {rope_type!r} is not supported (supported: default, llama3)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in fields if k not in rope]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling lacks {missing}")
    return Llama3RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                             int(rope["original_max_position_embeddings"]))
