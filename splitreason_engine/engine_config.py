"""The engine's options, each documented and validated once, grouped by concern.

`EngineConfig` holds seven frozen parts: the models, the KV cache, the scheduler, co-scheduling,
tensor parallelism, the SplitReason protocol and tracing. `Engine(small, big, **options)` builds one from
its keywords (every field below, by name), `Engine(config=...)` takes one whole, and the CLI's
flags (`generate`, `serve`, `eval-demo`) are made from the same fields (`add_options`,
`config_from_args`), so an option is spelled out here and nowhere else. A field's `help` is its
documentation; a bad value is a ValueError that names the field.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import parse_dtype
from .coschedule import POLICIES
from .kernels.ops import KERNEL_CHOICES
from .protocol import CATCH_UP_POLICIES, PromptTemplate
from .sampling import MAX_SPECULATE
from .step_costs import StepCosts
from .tags import Tags
from .trace import DEFAULT_MAX_EVENTS

LOAD_FORMATS = ("auto", "safetensors", "dummy")
DTYPES = ("float32", "bfloat16", "float16")


def option(default, help: str, flag: "str | None" = None, cli: bool = True, **argparse_kwargs):
    """A field with its documentation and, unless cli=False, the CLI flag made from it (`flag`:
    a name other than --field-name; argparse_kwargs: choices, type, metavar)."""
    return field(default=default, metadata=dict(help=help, flag=flag, cli=cli, argparse=argparse_kwargs))


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelOptions:
    small: "str | Path | None" = option(
        None, "small model: a Hugging Face checkpoint folder (config.json, safetensors or shards, tokenizer.json) "
        "of the Qwen2, Llama or Qwen3 family, or a config.json with load_format='dummy'; default: the embedded "
        "tiny Qwen2 with random weights (the CLI's default is the shipped demo pair)", metavar="PATH")
    big: "str | Path | None" = option(
        None, "big model checkpoint folder, with the small model's tokenizer; with it the default mode is split",
        metavar="PATH")
    load_format: str = option("auto", "'dummy' builds random weights from config.json (real shapes, no download)",
                              choices=LOAD_FORMATS)
    device: str = option("cpu", "cpu or cuda (optionally cuda:N)")
    dtype: "str | torch.dtype | None" = option(None, "weights and KV dtype (default: float32 on cpu, bfloat16 on "
                                               "cuda)", choices=DTYPES)
    kernels: str = option("auto", "compute ops: the Triton kernels or the PyTorch references (auto: Triton on "
                          "CUDA; triton on the CPU only in Triton's interpreter, TRITON_INTERPRET=1)",
                          choices=KERNEL_CHOICES)
    seed: int = option(0, "engine seed: dummy weights, unseeded sampling (in eval-demo also which problems and "
                       "random mode's draws)", type=int)

    def __post_init__(self):
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {self.device!r}") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {self.device!r}")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        _one_of("load_format", self.load_format, LOAD_FORMATS)
        _one_of("kernels", self.kernels, KERNEL_CHOICES)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class CacheOptions:
    page_tokens: int = option(16, "tokens per KV page for the model with the most KV per token", type=int)
    kv_cache_bytes: "int | None" = option(None, "size of the shared KV pool in bytes", type=int)
    kv_cache_memory_fraction: "float | None" = option(
        None, "KV pool as a fraction of the memory free after loading both models (default: 0.9 on cuda, 0.05 on "
        "the host)", type=float)
    prefix_caching: bool = option(
        True, "keep full KV pages after their request (until the pool needs them, least recently used first) and "
        "serve later requests that start with the same tokens from them, in either model; never changes tokens",
        flag="--no-prefix-caching")

    def __post_init__(self):
        _positive_int("page_tokens", self.page_tokens)
        if self.kv_cache_bytes is not None:
            _positive_int("kv_cache_bytes", self.kv_cache_bytes)
        fraction = self.kv_cache_memory_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction}")


@dataclass(frozen=True)
class SchedulerOptions:
    max_num_seqs: int = option(256, "most requests running at once", type=int)
    max_num_batched_tokens: int = option(2048, "token budget of one step per model, prefill chunks included",
                                         type=int)
    max_model_len: "int | None" = option(None, "longest prompt + output in tokens (default: the models' context)",
                                         type=int)
    cuda_graphs: "bool | None" = option(
        None, "replay decode-only CUDA steps from CUDA graphs captured per batch-size bucket (default: on for CUDA "
        "with the Triton kernels)", flag="--no-cuda-graphs")
    overlap: "bool | None" = option(
        None, "launch each step before the previous step's tokens reach the host when they cannot change its "
        "inputs; the same tokens either way (default: on for CUDA without tensor parallelism)", flag="--no-overlap")

    def __post_init__(self):
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer of at least 2, got {self.max_model_len!r}")


@dataclass(frozen=True)
class CoscheduleOptions:
    coschedule: str = option(
        "auto", "when the big model runs: in every step a row needs it (eager), or gathered for many rows with "
        "bounded waiting (gather); auto: gather when the step costs say the big model is weight-bound",
        choices=POLICIES)
    max_big_wait_steps: "int | None" = option(None, "gather: longest a row waits for the big model, in held steps",
                                              type=int)
    max_big_wait_s: "float | None" = option(
        None, "gather: longest a row waits for the big model, in seconds (default: 64 one-row big-model steps)",
        type=float)
    gather_min_share: "float | None" = option(
        None, "gather: share of the rows with work that must wait for the big model before it runs (default: "
        "T_big / (T_small + T_big) from the step costs)", type=float)
    step_costs: "str | Path | StepCosts | None" = option(
        None, "calibration file of per-model step costs, such as bench/costs/h200_1.5b_32b.json (default: timed "
        "at start-up)", type=Path, metavar="JSON")

    def __post_init__(self):
        _one_of("coschedule", self.coschedule, POLICIES)


@dataclass(frozen=True)
class ParallelOptions:
    tensor_parallel_size: int = option(
        1, "split both models over N processes (on CUDA one GPU each, cuda:0..N-1; gloo on the CPU)", type=int,
        metavar="N")
    tp_timeout_s: float = option(60.0, "with tensor_parallel_size > 1: longest a collective may take before the "
                                 "engine gives up", type=float, metavar="S")

    def __post_init__(self):
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size > 1 and not self.tp_timeout_s > 0:
            raise ValueError(f"tp_timeout_s must be positive, got {self.tp_timeout_s!r}")


@dataclass(frozen=True)
class ProtocolOptions:
    template: PromptTemplate = option(PromptTemplate(), "the prompt template of split and random modes (the "
                                      "DeepSeek-R1 markers and the reference's hint sentence)", cli=False)
    tags: Tags = option(Tags(), "the tag spellings (open <bigmodel>, close </bigmodel> or <\\bigmodel>)", cli=False)
    catch_up: str = option("lazy", "when the big model reads the small model's text: at each handoff (lazy) or in "
                           "the background with spare batch budget (eager)", choices=CATCH_UP_POLICIES)
    speculate: "int | str" = option(
        0, "drafting in big segments, random mode's big chunks and big mode: the most tokens the small model drafts "
        "for one big step to "
        f"verify (0 off, up to {MAX_SPECULATE}), or 'auto' (per request, from its acceptance and the step costs); "
        "requests may set their own (SamplingParams.speculate)", type=lambda v: v if v == "auto" else int(v),
        metavar="auto|K")

    def __post_init__(self):
        _one_of("catch_up", self.catch_up, CATCH_UP_POLICIES)
        if self.speculate != "auto" and not (isinstance(self.speculate, int) and not isinstance(self.speculate, bool)
                                             and 0 <= self.speculate <= MAX_SPECULATE):
            raise ValueError(f"speculate must be 'auto' or an integer in 0..{MAX_SPECULATE}, got {self.speculate!r}")


@dataclass(frozen=True)
class TracingOptions:
    trace: "str | Path | None" = option(
        None, "write a timeline of the run to this file: a Chrome / Perfetto trace (JSON; open it in "
        "ui.perfetto.dev) of each model's steps, each request's phases and handoffs, and the tokens per model; "
        "written when the engine closes or the process exits, and by engine.trace.write() (docs/tracing.md)",
        type=Path, metavar="PATH")
    trace_max_events: int = option(DEFAULT_MAX_EVENTS, "events the trace keeps in memory, the newest (bounds its "
                                   "memory; the file says how many older ones were dropped)", type=int)

    def __post_init__(self):
        _positive_int("trace_max_events", self.trace_max_events)


PARTS = {"model": ModelOptions, "cache": CacheOptions, "scheduler": SchedulerOptions,
         "coschedule": CoscheduleOptions, "parallel": ParallelOptions, "protocol": ProtocolOptions,
         "tracing": TracingOptions}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    coschedule: CoscheduleOptions = field(default_factory=CoscheduleOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    protocol: ProtocolOptions = field(default_factory=ProtocolOptions)
    tracing: TracingOptions = field(default_factory=TracingOptions)

    def __post_init__(self):
        tp, sched = self.parallel.tensor_parallel_size, self.scheduler
        if tp > 1 and sched.cuda_graphs:
            raise ValueError("cuda_graphs=True is not supported with tensor_parallel_size > 1")
        if tp > 1 and sched.overlap:
            raise ValueError("overlap=True is not supported with tensor_parallel_size > 1")
        device = torch.device(self.model.device)
        if tp > 1 and device.type == "cuda" and (device.index or 0) != 0:
            raise ValueError(f"with tensor_parallel_size > 1 rank r runs on cuda:r; pass device='cuda', "
                             f"got {self.model.device!r}")
        if sched.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs device='cuda', got device={self.model.device!r}")
        if self.protocol.speculate != 0 and self.model.big is None:
            raise ValueError(f"speculate={self.protocol.speculate!r} needs two models: the small one drafts, the big "
                             "one verifies (pass big=...)")
        if sched.cuda_graphs and self.model.kernels == "torch":
            raise ValueError("cuda_graphs=True needs the Triton kernels (the PyTorch reference ops sync with the host)")

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        """The config of Engine's keyword form: every field of every part, by name."""
        parts = {name: {} for name in PARTS}
        owner = {f.name: name for name, part in PARTS.items() for f in dataclasses.fields(part)}
        for key, value in options.items():
            if key not in owner:
                raise TypeError(f"unknown engine option {key!r} (the options: {', '.join(sorted(owner))})")
            parts[owner[key]][key] = value
        return cls(**{name: PARTS[name](**values) for name, values in parts.items()})


def add_options(parser: argparse.ArgumentParser) -> None:
    """The engine's CLI flags, one per field (cli=True), with each field's help."""
    for name, part in PARTS.items():
        group = parser.add_argument_group(f"engine: {name}")
        for f in dataclasses.fields(part):
            meta = f.metadata
            if not meta["cli"]:
                continue
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            if flag.startswith("--no-"):  # a switch that is on (or automatic) unless given
                group.add_argument(flag, dest=f.name, action="store_false", default=f.default, help=meta["help"])
                continue
            default = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag, dest=f.name, default=f.default, help=meta["help"] + default, **meta["argparse"])


def config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig of parsed add_options flags; `overrides` replace fields (the CLI's models)."""
    names = {f.name for part in PARTS.values() for f in dataclasses.fields(part) if f.metadata["cli"]}
    return EngineConfig.from_options(**{**{n: getattr(args, n) for n in names}, **overrides})


def options_table() -> str:
    """Every option as a markdown table: docs/usage.md holds it between its `options` markers
    (tests/test_layout.py checks that it is this table)."""
    rows = ["| option | default | CLI | what |", "|---|---|---|---|"]
    for name, part in PARTS.items():
        for f in dataclasses.fields(part):
            meta = f.metadata
            flag = (meta["flag"] or "--" + f.name.replace("_", "-")) if meta["cli"] else "-"
            shown = f"{type(f.default).__name__}()" if dataclasses.is_dataclass(f.default) else repr(f.default)
            default = f"`{shown}`"
            rows.append(f"| `{f.name}` ({name}) | {default} | `{flag}` | {meta['help'].replace('|', '/')} |")
    return "\n".join(rows)
