"""Builds a model from a Hugging Face checkpoint folder, or with random weights (`dummy`).

With tensor parallelism each rank reads only its slice of each checkpoint tensor
(parallel.shard_of), and its dummy weights are the slices of the full dummy weights; the
vocabulary's padding rows (past its end) are zeros in both."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import ModelConfig
from .kernels.ops import TORCH_OPS, Ops
from .models import CausalLM
from .parallel import TPGroup, pad, shard_of, take

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Projections computed as one matmul but stored as separate checkpoint tensors (weights and biases), in row order.
_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_FUSED = {part: (fused, i) for fused, parts in _PARTS.items() for i, part in enumerate(parts)}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: its folder (or a config.json file) and how to get its weights."""

    path: Path
    load_format: str = "auto"

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path.suffix == ".json" else self.path

    @property
    def config_file(self) -> Path:
        return self.path if self.path.suffix == ".json" else self.path / "config.json"


def load_config(source: ModelSource) -> ModelConfig:
    if not source.path.exists():
        raise FileNotFoundError(f"model path {source.path} does not exist")
    if not source.config_file.is_file():
        raise FileNotFoundError(f"{source.folder} has no config.json: not a Hugging Face checkpoint folder")
    return ModelConfig.from_file(source.config_file)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is corrupt: {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"missing checkpoint shard(s) listed in {index.name}: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{folder} has no model.safetensors or model.safetensors.index.json "
        "(use load_format='dummy' for random weights)"
    )


def _target(model: CausalLM, name: str) -> tuple[torch.Tensor, int, str]:
    """The parameter a checkpoint tensor goes into, its shard index (-1: whole), and its own name."""
    own = name.removeprefix("model.")
    parts = own.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        own = ".".join(parts[:-2] + [fused, parts[-1]])
        return model.get_parameter(own), shard, own
    return model.get_parameter(own), -1, own


def _shard_slice(model: CausalLM, param_name: str, shard: int) -> slice:
    """Where part `shard` of a fused parameter lies in this rank's (local) tensor."""
    *_, fused, _ = param_name.split(".")
    sizes = [_part_sizes(model, part)[1] for part in _PARTS[fused]]
    start = sum(sizes[:shard])
    return slice(start, start + sizes[shard])


def _part_sizes(model: CausalLM, part: str) -> tuple[int, int]:
    """(full, local) output rows of one part of a fused projection."""
    c = model.config
    full = {"q_proj": c.num_heads * c.head_dim, "k_proj": c.num_kv_heads * c.head_dim,
            "v_proj": c.num_kv_heads * c.head_dim}.get(part, c.intermediate_size)
    shard = _shard(model, part, "weight")
    return full, full if shard is None else shard.size


def _shard(model: CausalLM, module: str, kind: str):
    tp = model.tp
    return None if tp is None else shard_of(module, kind, model.config, tp.rank, tp.world_size)


def _checkpoint_names(model: CausalLM) -> list[str]:
    """Every tensor name a checkpoint must hold for `model` (without "model."), fused ones split."""
    names = []
    for name, _ in model.named_parameters():
        *prefix, module, kind = name.split(".")
        if module in _PARTS:
            names += [".".join([*prefix, part, kind]) for part in _PARTS[module]]
        elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            names.append(name)
    return names


def load_weights(model: CausalLM, folder: Path, progress: bool = True) -> None:
    """Copies every tensor of the checkpoint into `model`, checking names and shapes."""
    files = _weight_files(folder)
    loaded: set[str] = set()  # checkpoint names, without the "model." prefix
    handles = []
    for file in files:
        try:
            handles.append((file, safe_open(str(file), framework="pt", device="cpu")))
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"cannot read checkpoint file {file}: {e}") from e
    bar = tqdm(total=sum(len(f.keys()) for _, f in handles), desc=f"loading {folder.name}", unit="tensor",
               disable=not progress)
    for file, handle in handles:
        with handle as f:
            for name in f.keys():
                bar.update(1)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue
                try:
                    param, shard, own = _target(model, name)
                except AttributeError:
                    raise ValueError(f"{file.name}: unexpected tensor {name!r} for a {model.config.family} model "
                                     "with this config.json") from None
                dest = param.data if shard < 0 else param.data[_shard_slice(model, own, shard)]
                *_, module, kind = name.split(".")
                piece = _shard(model, module, kind)
                lazy = f.get_slice(name)
                shape, expected = tuple(lazy.get_shape()), list(dest.shape)
                if piece is not None:
                    expected[piece.dim] = piece.full
                if shape != tuple(expected):
                    raise ValueError(
                        f"{file.name}: tensor {name!r} has shape {shape}, expected {tuple(expected)} from config.json"
                    )
                index = tuple(slice(None) if piece is None or d != piece.dim else
                              slice(piece.start, piece.start + piece.size) for d in range(len(shape)))
                dest.copy_(pad(lazy[index], piece))
                loaded.add(name.removeprefix("model."))
    bar.close()
    missing = sorted(set(_checkpoint_names(model)) - loaded)
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks tensors for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))


def init_dummy_weights(model: CausalLM, seed: int, std: float = 0.02, progress: bool = True) -> None:
    """Random weights at the real shapes, drawn on the model's device (the same seed gives the same
    weights on the same kind of device): normal(0, std) matrices and biases, unit norms (q/k norms too).
    A tensor-parallel rank draws each full tensor and keeps its slice, so its weights are the
    slices of the one-process weights."""
    params = list(model.named_parameters())
    g = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, p in tqdm(params, desc="random weights", unit="tensor", disable=not progress):
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif model.tp is None:
            p.data.normal_(0.0, std, generator=g)
        else:
            p.data.copy_(_local_part(model, name, _full_normal(model, name, p, std, g)))


def _full_normal(model: CausalLM, name: str, p: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    """A draw at the shape `name` has in one process."""
    *_, module, kind = name.split(".")
    shape = list(p.shape)
    if module in _PARTS:
        shape[0] = sum(_part_sizes(model, part)[0] for part in _PARTS[module])
    else:
        piece = _shard(model, module, kind)
        if piece is not None:
            shape[piece.dim] = piece.full
    return torch.empty(shape, dtype=p.dtype, device=p.device).normal_(0.0, std, generator=g)


def _local_part(model: CausalLM, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a one-process tensor; a fused one sliced part by part."""
    *_, module, kind = name.split(".")
    if module not in _PARTS:
        return take(full, _shard(model, module, kind))
    parts = full.split([_part_sizes(model, part)[0] for part in _PARTS[module]])
    return torch.cat([take(t, _shard(model, part, kind)) for t, part in zip(parts, _PARTS[module])])


def build_model(source: ModelSource, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, seed: int = 0, progress: bool = True, ops: Ops = TORCH_OPS,
                tp: "TPGroup | None" = None) -> CausalLM:
    """`config` is load_config(source), read once by the caller; `ops` is the op set its steps run;
    with `tp`, this rank's shard."""
    if source.load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {source.load_format!r}")
    with torch.device("meta"):  # no time spent on initialisations that get overwritten
        model = CausalLM(config, max_positions, ops, tp).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    if source.load_format == "dummy":
        init_dummy_weights(model, seed, progress=progress)
    else:
        load_weights(model, source.folder, progress)
    model.init_rope()
    model.eval().requires_grad_(False)
    logger.info("loaded %s (%s, %.1fM parameters, %s)", source.folder, source.load_format,
                config.num_parameters() / 1e6, dtype)
    return model
