"""Every Triton kernel variant the engine's warm-up reaches, compiled for the cards our users have
(Hopper sm_90a, Ampere sm_80) on a machine without a GPU, with each variant's registers, spills and
shared memory, and the merge kernels' barrier before their release atomic checked in the PTX.

What is compiled. For each shipped deployment (DEPLOYMENTS: the DeepSeek-R1-Distill-Qwen 1.5B + 32B
pair, R1-Distill-Llama-8B, Qwen3-8B, the demo pair) in bf16 and fp16, the
engine's warm-up (splitreason_engine/warmup.py) runs for each model at the engine's default limits
(16-token pages, 256 sequences, 2048 batched tokens, the models' context) with every kernel launch
recorded instead of run (bench/launches.py: Triton's own binder gives each launch's specialization
key, and the CUDA-only launch choices are made as on a GPU of 132 SMs). The models have their real
shapes and KV-pool geometry (every layer's cache view, so every layer launches the same variants:
checked) but one decoder layer and no weights: nothing is computed, F.linear (cuBLAS on a GPU, no
Triton) gives shapes only. A pair's sampler runs with a tag detector over the tokenizer's vocabulary,
as in split mode. This is the "default" round, what serving runs with no tuned file: the hot path.
Then one round per tuning candidate: round i hands every kernel its i-th candidate (LINEAR_CANDIDATES
through linear_candidates(bucket), DECODE_CANDIDATES, SAMPLE_CANDIDATES) as the card's tuned entry
for every shape, so every configuration bench/tune_kernels.py may write is compiled too.

Each distinct key is compiled once per target with triton.compile(ASTSource(...),
target=GPUTarget("cuda", capability, 32)), which runs Triton's bundled ptxas, in --workers processes.

Checks (exit status 1, listed in the JSON's "problems"):
  - a variant that does not compile, for any target;
  - a default-round variant that spills registers (spill stores or loads in ptxas -v);
  - a default-round variant whose shared memory exceeds the card's per-block limit;
  - fewer variants than MIN_VARIANTS (a warm-up that silently stopped reaching kernels);
  - a merge kernel (MERGE_KERNELS: its programs meet at an acq_rel atomic counter) whose PTX lacks,
    between its last global store and each such atomic, the CTA barrier (bar.sync) of the source's
    tl.debug_barrier() (found by the PTX's line info): without it the other threads' partials are
    released with the atomic only thanks to a barrier Triton 3.x emits for the atomic's own result
    slot. A control compiles the merge kernels from copies without debug_barrier(): the check must
    fail on them, or this bench fails.
Candidate variants that spill or exceed a card's shared memory are listed, not failed: the sweep
times them (and one over the limit fails to launch there and is skipped).

    python bench/compile_check.py [--json PATH] [--workers N] [--targets ...] [--candidate-targets ...] [--smoke]

CI runs it with --candidate-targets sm_90a (the candidates for the card the sweep runs on; every
warm-up variant for both targets): about 4 minutes on 2 cores with an empty Triton cache.
"""

import os

if __name__ == "__main__":
    # The kernels must be JITFunctions, whose helpers Triton compiles (the interpreter's are not):
    # Triton reads this when they are defined.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns without it; 1 is its default

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from types import ModuleType  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import BASE, MODELS, machine, machine_line, write_json  # noqa: E402
from launches import LaunchRecorder, Variant, as_jit, cuda_like, patching  # noqa: E402

from splitreason_engine.config import ModelConfig  # noqa: E402
from splitreason_engine.demo import PAIR_DIR  # noqa: E402
from splitreason_engine.kernels import linear_triton, paged_attention_triton, sample_triton, tuning  # noqa: E402
from splitreason_engine.kernels.ops import triton_ops  # noqa: E402
from splitreason_engine.kv_pool import KVPool, page_bytes_for  # noqa: E402
from splitreason_engine.models import CausalLM  # noqa: E402
from splitreason_engine.sampling import DetectTables  # noqa: E402
from splitreason_engine.tags import Tags, TagDetector  # noqa: E402
from splitreason_engine.tokenizer import Tokenizer  # noqa: E402
from splitreason_engine.warmup import warm_up_kernels  # noqa: E402

logger = logging.getLogger("compile_check")

# capability -> (cards, the most shared memory one block may use there, bytes)
TARGETS = {"sm_90a": (90, "H100 / H200", 227 * 1024), "sm_80": (80, "A100", 163 * 1024)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Engine defaults (Engine.__init__): the warm-up's shapes depend on them.
PAGE_TOKENS, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS = 16, 256, 2048
SM_COUNT = 132  # an H100 / H200: only the decode split count (not specialized on) depends on it
MIN_VARIANTS = 40
MERGE_KERNELS = ("_decode_split_kernel", "_sample_detect_kernel")
# tuning.tuned's kernel names -> what bench/tune_kernels.py sweeps (linear: linear_candidates(bucket)).
CANDIDATES = {"decode_attention": paged_attention_triton.DECODE_CANDIDATES, "sample": sample_triton.SAMPLE_CANDIDATES}


@dataclass(frozen=True)
class Deployment:
    """Models served together (a pair shares the pool and runs the tag detector) and the size of
    their tokenizer's vocabulary (ids at or past it are padding rows the sampler never picks)."""

    models: tuple[tuple[str, dict], ...]  # (name, config.json contents)
    tokenizer_vocab: int


def _qwen(name: str) -> tuple[str, dict]:
    return name, {**BASE, **MODELS[name]}


def _demo() -> Deployment:
    configs = tuple((f"demo {role}", json.loads((PAIR_DIR / role / "config.json").read_text()))
                    for role in ("small", "big"))
    return Deployment(configs, Tokenizer(PAIR_DIR / "small").vocab_size)


# R1-Distill-Qwen's tokenizer has 151665 entries (151936 / 152064 embedding rows); Llama 3's
# 128256; Qwen3's 151669.
DEPLOYMENTS = {
    "1.5B + 32B": lambda: Deployment((_qwen("1.5B"), _qwen("32B")), 151665),
    "R1-Distill-Llama-8B": lambda: Deployment((("llama-8B", {**BASE, **MODELS["llama-8B"]}),), 128256),
    "Qwen3-8B": lambda: Deployment((("qwen3-8B", {**BASE, **MODELS["qwen3-8B"]}),), 151669),
    "demo pair": _demo,
}


# ---- recording ----------------------------------------------------------------------------------

def _shape_only_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _launch_only_ops():
    """The Triton op set, with the sampler's outputs (left uninitialised by recorded launches) zeroed:
    the warm-up reads the tokens back."""
    ops = triton_ops()

    def sample_and_detect(*args, **kwargs):
        return tuple(t.zero_() for t in ops.sample_and_detect(*args, **kwargs))

    return replace(ops, sample_and_detect=sample_and_detect)


def _detect_tables(vocab: int) -> DetectTables:
    """A tag detector over `vocab` one-byte pieces with the tags as two of them: the tables have the
    shapes (and strides) of the real tokenizer's."""
    tags = Tags()
    pieces = [bytes([32 + i % 95]) for i in range(vocab)]
    pieces[vocab - 2], pieces[vocab - 1] = tags.open[0].encode(), tags.close[0].encode()
    return DetectTables.build(TagDetector(tags, pieces), torch.device("cpu"))


def _build(deployment: Deployment, dtype: torch.dtype, folder: Path):
    """(models with one layer, their full-depth KV caches, real vocab sizes, detect tables, max_model_len)."""
    configs = []
    for name, raw in deployment.models:
        path = folder / name.replace(" ", "_") / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(raw))
        configs.append(ModelConfig.from_file(path))
    max_model_len = min(c.max_position_embeddings for c in configs)
    pool = KVPool(configs, dtype, torch.device("cpu"), page_bytes_for(configs, dtype, PAGE_TOKENS), num_pages=2)
    ops = triton_ops()
    models, caches = [], []
    for config, layers in zip(configs, pool.kv_caches):
        # Every layer's K and V views must sit at the same 16-byte alignment as layer 0's.
        assert all(k.data_ptr() % 16 == layers[0][0].data_ptr() % 16 and v.data_ptr() % 16 ==
                   layers[0][1].data_ptr() % 16 for k, v in layers), "a layer's cache view is aligned differently"
        with torch.device("meta"):
            model = CausalLM(replace(config, num_layers=1), max_model_len, ops).to(dtype)
        model = model.to_empty(device="cpu")
        model.tie_weights()
        model.init_rope()
        models.append(model.eval().requires_grad_(False))
        caches.append(layers[:1])
    real_vocab = [min(deployment.tokenizer_vocab, c.vocab_size) for c in configs]
    tables = _detect_tables(deployment.tokenizer_vocab) if len(configs) > 1 else DetectTables.build(None, "cpu")
    return models, caches, real_vocab, tables, max_model_len


def _candidate_of(round_: int):
    """tuning.tuned's stand-in for candidate round `round_`: each kernel's round-th candidate, if any."""
    def tuned(kernel: str, key: str, device) -> "dict | None":
        if kernel in ("linear", "silu_mul_linear"):
            options = linear_triton.linear_candidates(int(key.split("_")[0][1:]))  # key 'm4_n..._k..._dtype'
        else:
            options = CANDIDATES.get(kernel, [])
        return dict(options[round_]) if round_ < len(options) else None
    return tuned


def candidate_rounds() -> int:
    return max(len(linear_triton.LINEAR_CANDIDATES), *(len(c) for c in CANDIDATES.values()))


def record(names: list[str], dtypes: list[str], rounds: int, recorder: LaunchRecorder, major: int) -> None:
    """Runs the warm-up of every model of `names` in `dtypes` as on a GPU of compute capability
    `major`.x: the default round, then `rounds` candidate rounds, with recorder.phase "default" /
    "candidate"."""
    with tempfile.TemporaryDirectory() as tmp, patching() as patch:
        cuda_like(patch, SM_COUNT, major)
        recorder.install(patch)
        patch(F, "linear", _shape_only_linear)
        ops = _launch_only_ops()
        for name in names:
            for dtype_name in dtypes:
                models, caches, real_vocab, tables, max_model_len = _build(DEPLOYMENTS[name](), DTYPES[dtype_name],
                                                                           Path(tmp) / name / dtype_name)
                for round_ in range(-1, rounds):
                    recorder.phase = "default" if round_ < 0 else "candidate"
                    tuned = _candidate_of(round_) if round_ >= 0 else (lambda kernel, key, device: None)
                    patch(tuning, "tuned", tuned)
                    patch(linear_triton, "tuned", tuned)
                    linear_triton._launch_params.cache_clear()
                    for i, (model, kv) in enumerate(zip(models, caches)):
                        warm_up_kernels(model, kv, ops, torch.device("cpu"), max_num_seqs=MAX_NUM_SEQS,
                                        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_model_len=max_model_len,
                                        real_vocab=real_vocab[i], detect_tables=tables, name=f"{name} {i}")
                logger.info("sm_%d: %s %s: %d variants so far", major * 10, name, dtype_name, len(recorder.variants))
        linear_triton._launch_params.cache_clear()


# ---- compiling ----------------------------------------------------------------------------------

_JOBS: list[tuple[Variant, str]] = []  # what the forked workers compile, by index
_SOURCES: dict[str, list[str]] = {}  # the kernels' source files' lines, by file name
_BARRIER = re.compile(r"^\s*(bar\.sync|barrier\.sync|barrier\.cta\.sync)\b")
_RELEASE_ATOMIC = re.compile(r"^\s*(@%p\d+\s+)?atom\.[\w.]*(acq_rel|release)\b")
_GLOBAL_STORE = re.compile(r"^\s*(@%p\d+\s+)?st\.global\b")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')


def barrier_before_release(ptx: str, sources: dict[str, list[str]]) -> "bool | None":
    """Whether every acq_rel / release atomic of `ptx` has, after the last global store before it, a
    CTA barrier that a tl.debug_barrier() of the source put there (by the PTX's .loc line info;
    `sources`: each kernel file's lines by file name, as a kernel from Triton's cache names the
    folder it was first compiled from). Triton also puts a barrier there for the atomic's own result
    slot in shared memory, which orders the other threads' stores only by accident (a later Triton
    may move it): that one does not count. None: the PTX has no such atomic."""
    lines = ptx.splitlines()
    files = {int(m[1]): Path(m[2]).name for m in map(_FILE.match, lines) if m}

    def from_debug_barrier(loc: "tuple[int, int] | None") -> bool:
        source = sources.get(files.get(loc[0], "")) if loc else None
        return source is not None and loc[1] <= len(source) and "tl.debug_barrier()" in source[loc[1] - 1]

    loc, barriers, stores, atomics = None, [], [], []
    for i, line in enumerate(lines):
        if m := _LOC.match(line):
            loc = (int(m[1]), int(m[2]))
        elif _BARRIER.match(line):
            barriers.append((i, from_debug_barrier(loc)))
        elif _GLOBAL_STORE.match(line):
            stores.append(i)
        elif _RELEASE_ATOMIC.match(line):
            atomics.append(i)
    if not atomics:
        return None
    for a in atomics:
        last_store = max((i for i in stores if i < a), default=-1)
        if not any(last_store < i < a and explicit for i, explicit in barriers):
            return False
    return True


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers, stack frame and spills of `ptx` as the ptxas Triton uses for `capability` reports
    them (ptxas -v; Triton runs the same command, but a kernel from Triton's cache has no log)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              str(source), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    stack, stores, loads = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                              r"(\d+) bytes spill loads", log).groups())
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)), "stack_bytes": stack,
            "spill_bytes": stores + loads}


def _compile(index: int) -> dict:
    variant, target_name = _JOBS[index]
    capability = TARGETS[target_name][0]
    target = GPUTarget("cuda", capability, 32)
    start = time.perf_counter()
    try:
        signature, constexprs, attrs, options = variant.compile_inputs(make_backend(target))
        kernel = triton.compile(ASTSource(variant.jit, signature, constexprs, attrs), target=target, options=options)
        # metadata.shared: the dynamic shared memory Triton asks for at launch, which it checks
        # against the card's per-block opt-in limit (TARGETS).
        result = {"ok": True, **ptxas_usage(kernel.asm["ptx"], capability), "shared_bytes": kernel.metadata.shared,
                  "barrier_before_release": barrier_before_release(kernel.asm["ptx"], _SOURCES)}
    except Exception as e:  # reported per variant: one failure must not hide the others
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    return {"index": index, "kernel": variant.kernel, "target": target_name, "seconds": time.perf_counter() - start,
            **result}


def compile_all(jobs: list[tuple[Variant, str]], workers: int) -> list[dict]:
    """Compiles each (variant, target) in `workers` forked processes; results in the jobs' order."""
    global _JOBS
    _JOBS = jobs
    for variant, _ in jobs:
        path = Path(variant.jit.fn.__code__.co_filename)
        _SOURCES.setdefault(path.name, path.read_text().splitlines())
    results = []
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for n, result in enumerate(pool.imap_unordered(_compile, range(len(jobs))), 1):
            results.append(result)
            if n % 50 == 0 or n == len(jobs):
                logger.info("compiled %d / %d", n, len(jobs))
    return sorted(results, key=lambda r: r["index"])


def _without_barriers(module: ModuleType, folder: Path) -> ModuleType:
    """A copy of kernel module `module` with every tl.debug_barrier() removed (the control of the
    barrier check: a refactor that drops them must be caught)."""
    source = Path(module.__file__).read_text()
    assert "tl.debug_barrier()" in source, f"{module.__name__} has no debug_barrier any more"
    source = source.replace("tl.debug_barrier()", "pass")
    source = source.replace("from . import", "from splitreason_engine.kernels import")
    name = f"_no_barrier_{module.__name__.rsplit('.', 1)[-1]}"
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    copy = importlib.util.module_from_spec(spec)
    sys.modules[name] = copy  # Triton's JIT reads its kernels' globals through the module
    spec.loader.exec_module(copy)
    return copy


def barrier_controls(variants: list[Variant], folder: Path) -> list[Variant]:
    """One variant of each merge kernel, compiled from a copy of its module without the barriers."""
    modules = {"_decode_split_kernel": paged_attention_triton, "_sample_detect_kernel": sample_triton}
    controls = []
    for kernel in MERGE_KERNELS:
        variant = next((v for v in variants if v.kernel == kernel), None)
        if variant is not None:
            copy = _without_barriers(modules[kernel], folder)
            controls.append(replace(variant, jit=as_jit(getattr(copy, kernel))))
    return controls


# ---- report -------------------------------------------------------------------------------------

def launch_summary(variant: Variant) -> str:
    """The variant's constexprs and launch options, for the tables."""
    consts = {k: v for k, v in variant.constexprs.items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in {**consts, **{k: v for k, v in variant.launch_options.items()
                                                         if k not in consts}}.items())


def report(jobs: list[tuple[Variant, str]], controls: int, hot: set, results: list[dict], targets: list[str],
           min_variants: int) -> dict:
    """The JSON's summary: per-kernel figures and every problem (see the module doc). The last
    `controls` jobs are the barrier-less merge kernels; `hot`: the default round's (target, kernel, key)."""
    problems, rows, spilling, over = [], [], [], []
    control_results = results[len(results) - controls:]
    jobs, results = jobs[:len(jobs) - controls], results[:len(results) - controls]
    for r in results:
        v, target = jobs[r["index"]]
        where = f"{v.kernel} [{target}] ({launch_summary(v)})"
        is_hot = (target, v.kernel, v.key) in hot
        if not r["ok"]:
            problems.append(f"does not compile: {where}: {r['error'][-600:]}")
            continue
        limit = TARGETS[target][2]
        entry = {"kernel": v.kernel, "target": target, "hot_path": is_hot, "registers": r["registers"],
                 "stack_bytes": r["stack_bytes"], "spill_bytes": r["spill_bytes"], "shared_bytes": r["shared_bytes"],
                 "launch": launch_summary(v)}
        rows.append(entry)
        if r["spill_bytes"]:
            spilling.append(entry)
            if is_hot:
                problems.append(f"spills registers on the hot path ({r['spill_bytes']} B of spill stores and loads, "
                                f"{r['registers']} registers): {where}")
        if r["shared_bytes"] > limit:
            over.append(entry)
            if is_hot:
                problems.append(f"needs {r['shared_bytes']} B of shared memory, over {limit} B: {where}")
        if v.kernel in MERGE_KERNELS and r["barrier_before_release"] is not True:
            problems.append(f"merge kernel without a barrier before its release atomic "
                            f"({r['barrier_before_release']}): {where}")
    for r in control_results:
        if not r["ok"] or r["barrier_before_release"] is not False:
            problems.append(f"the barrier check does not catch {r['kernel']} without its debug_barrier: "
                            f"{r.get('barrier_before_release', r.get('error'))}")
    per_target = {t: sum(target == t for _, target in jobs) for t in targets}
    for t, n in per_target.items():
        if n < min_variants:
            problems.append(f"only {n} variants for {t} (at least {min_variants} expected): "
                            "does the warm-up still reach every kernel?")
    kernels = {}
    for name in sorted({v.kernel for v, _ in jobs}):
        per = {}
        for t in targets:
            mine = [e for e in rows if e["kernel"] == name and e["target"] == t]
            hot_rows = [e for e in mine if e["hot_path"]]
            per[t] = {"variants": sum(v.kernel == name and target == t for v, target in jobs),
                      "hot_path_variants": len(hot_rows),
                      "max_shared_bytes": max((e["shared_bytes"] for e in mine), default=None),
                      "max_shared_bytes_hot_path": max((e["shared_bytes"] for e in hot_rows), default=None),
                      "shared_limit_bytes": TARGETS[t][2],
                      "max_registers_hot_path": max((e["registers"] for e in hot_rows), default=None),
                      "spilling": sum(e in spilling for e in mine)}
        kernels[name] = per
    return {"variants": len(jobs), "variants_per_target": per_target, "hot_path_variants": len(hot),
            "failures": [p for p in problems if p.startswith("does not compile")], "spilling": spilling,
            "over_shared_limit": over,
            "barrier_controls": [{"kernel": r["kernel"], "barrier_before_release": r.get("barrier_before_release")}
                                 for r in control_results],
            "kernels": kernels, "compile_s": sum(r["seconds"] for r in results), "problems": problems}


def print_table(summary: dict, targets: list[str]) -> None:
    head = f"{'kernel':<22}"
    for t in targets:
        head += f" | {t + ' variants':>15} {'hot':>4} {'regs':>5} {'smem KiB (limit)':>17} {'spill':>5}"
    print(head)
    for name, per in summary["kernels"].items():
        line = f"{name:<22}"
        for t in targets:
            p = per[t]
            regs = "-" if p["max_registers_hot_path"] is None else str(p["max_registers_hot_path"])
            smem = ("-" if p["max_shared_bytes"] is None
                    else f"{p['max_shared_bytes'] / 1024:.0f} ({p['shared_limit_bytes'] // 1024})")
            line += f" | {p['variants']:>15} {p['hot_path_variants']:>4} {regs:>5} {smem:>17} {p['spilling']:>5}"
        print(line)
    hot_spills = sum(e["hot_path"] for e in summary["spilling"])
    controls = ", ".join(f"{c['kernel']} {'caught' if c['barrier_before_release'] is False else 'NOT CAUGHT'}"
                         for c in summary["barrier_controls"])
    per_target = ", ".join(f"{t}: {n}" for t, n in summary["variants_per_target"].items())
    print(f"{summary['variants']} variants compiled ({per_target}; "
          f"{summary['hot_path_variants']} on the hot path); {len(summary['failures'])} failures; "
          f"{len(summary['spilling'])} spilling ({hot_spills} on the hot path); "
          f"{len(summary['over_shared_limit'])} over a card's shared memory; barrier removed: {controls or '-'}")
    print("hot: the default round's variants (no tuned file); regs: the most registers a thread of a hot one uses; "
          "smem: the most dynamic shared memory of any variant, against the card's per-block limit")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deployments", nargs="+", choices=list(DEPLOYMENTS), default=list(DEPLOYMENTS))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--candidate-targets", nargs="*", choices=list(TARGETS), default=None,
                   help="the targets the tuning candidates are compiled for (default: every target; none: only "
                        "the default round). CI compiles them for sm_90a alone, the card the sweep has run on")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compiling processes")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="the demo pair in fp16 for sm_90a, default round only")
    args = p.parse_args(argv)
    min_variants = MIN_VARIANTS
    candidate_targets = args.targets if args.candidate_targets is None else args.candidate_targets
    if args.smoke:
        args.deployments, args.dtypes, args.targets, candidate_targets = ["demo pair"], ["fp16"], ["sm_90a"], []
        min_variants = 20
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("splitreason_engine").setLevel(logging.WARNING)

    start = time.perf_counter()
    jobs, hot, rounds = [], set(), {}
    for target in args.targets:  # the extend kernel's launch depends on the card's generation
        major = TARGETS[target][0] // 10
        recorder = LaunchRecorder(make_backend(GPUTarget("cuda", TARGETS[target][0], 32)))
        rounds[target] = candidate_rounds() if target in candidate_targets else 0
        record(args.deployments, args.dtypes, rounds[target], recorder, major)
        jobs += [(v, target) for v in recorder.variants.values()]
        hot |= {(target, v.kernel, v.key) for v in recorder.variants.values()
                if v.key in recorder.seen(v.kernel, "default")}
    recorded_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        controls = barrier_controls([v for v, t in jobs if t == args.targets[0]], Path(tmp))
        results = compile_all(jobs + [(v, args.targets[0]) for v in controls], max(1, args.workers))
    summary = report(jobs + [(v, args.targets[0]) for v in controls], len(controls), hot, results, args.targets,
                     min_variants)
    total_s = time.perf_counter() - start

    print(machine_line(machine()))
    print(f"triton {triton.__version__}; deployments: {', '.join(args.deployments)}; dtypes: {', '.join(args.dtypes)}; "
          f"candidate rounds: {', '.join(f'{t}: {n}' for t, n in rounds.items())}; "
          f"recorded in {recorded_s:.0f} s, {total_s:.0f} s in all ({args.workers} compiling processes)")
    print_table(summary, args.targets)
    for problem in summary["problems"]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    write_json(args.json, {"machine": machine(), "triton": triton.__version__, "targets": args.targets,
                           "deployments": args.deployments, "dtypes": args.dtypes, "candidate_rounds": rounds,
                           "seconds": {"recording": recorded_s, "total": total_s}, **summary})
    sys.exit(1 if summary["problems"] else 0)


if __name__ == "__main__":
    main()
