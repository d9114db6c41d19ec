"""Mixed steps on one GPU (a catch-up or prefill chunk and decodes in one eager step), once warm:
wall time per step against the sum of its GPU kernels' times (torch.profiler), with the step's
inputs staged (one pinned buffer, one asynchronous copy: runner.py) and read in place (one
pageable copy per array, each a host sync: the runner before staging), side by side.

The model has the 1.5B's shapes (12 / 2 heads, head dim 128, hidden 1536, bf16, random weights)
with --layers of its 28 layers (default 8: the overhead per layer is what matters). Each case is
D decoding sequences of context C beside one chunk of Q new tokens after a cached prefix of P,
every row sampled (greedy). The KV pool is the engine's; slots are real, so RoPE + KV store
writes as serving does. After a warm-up (the start-up kernel warm-up, then a few steps of the
case), `compiles_while_timed` must be 0.

    python bench/mixed_steps.py --json bench/results/mixed_steps.json
    python bench/mixed_steps.py --smoke      # tiny shapes on the CPU (interpreter): the code path only
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before they are imported

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, machine_line, write_json  # noqa: E402
from gpu_kernels import card_info, device_and_dtype  # noqa: E402

from splitreason_engine import Engine, SamplingParams  # noqa: E402
from splitreason_engine import runner as runner_module  # noqa: E402
from splitreason_engine.jit import jit_compiles  # noqa: E402
from splitreason_engine.runner import ModelRunner  # noqa: E402
from splitreason_engine.sampling import sample_and_detect  # noqa: E402
from splitreason_engine.warmup import warm_up_kernels  # noqa: E402

SHAPE = dict(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
             vocab_size=151936, tie_word_embeddings=True)
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, vocab_size=512,
            tie_word_embeddings=True)
# (decodes D, their context C, chunk Q, its cached prefix P)
CASES = [(1, 2000, 128, 1000), (8, 2000, 256, 2000), (32, 1000, 512, 0), (64, 1000, 64, 3000)]
SMOKE_CASES = [(2, 12, 6, 5)]


def write_config(folder: Path, layers: int, smoke: bool) -> Path:
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=layers,
               max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu",
               torch_dtype="float32" if smoke else "bfloat16", **(TINY if smoke else SHAPE))
    path = folder / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


class Case:
    """Scheduler-like arrays for one mixed step, over pages of the engine's pool."""

    def __init__(self, decodes: int, context: int, chunk: int, prefix: int, page_tokens: int, max_seqs: int,
                 max_tokens: int, width: int):
        self.name = f"D{decodes}xC{context} + Q{chunk}@P{prefix}"
        self.decodes, self.seqs, self.tokens = decodes, decodes + 1, decodes + chunk
        contexts = [context] * decodes + [prefix + chunk]
        lens = [1] * decodes + [chunk]
        self.width = max(-(-c // page_tokens) for c in contexts)
        self.buffers = {name: np.zeros(n, dtype=np.int32) for name, n in (
            ("input_ids", max_tokens), ("positions", max_tokens), ("slot_mapping", max_tokens),
            ("query_start_loc", max_seqs + 1), ("seq_lens", max_seqs), ("block_tables", max_seqs * width),
            ("logits_indices", max_seqs))}
        b, next_page, rows = self.buffers, 0, []
        starts = np.concatenate([[0], np.cumsum(lens)])
        b["query_start_loc"][: self.seqs + 1] = starts
        b["seq_lens"][: self.seqs] = contexts
        b["logits_indices"][: self.seqs] = starts[1:] - 1
        for i, (n, c) in enumerate(zip(lens, contexts)):
            pages = np.arange(next_page, next_page + -(-c // page_tokens), dtype=np.int32)
            next_page += len(pages)
            b["block_tables"][i * width: i * width + len(pages)] = pages
            positions = np.arange(c - n, c)
            b["positions"][starts[i]: starts[i + 1]] = positions
            b["slot_mapping"][starts[i]: starts[i + 1]] = pages[positions // page_tokens] * page_tokens + positions % page_tokens
            rows.append(len(pages))
        b["input_ids"][: self.tokens] = np.arange(self.tokens) % 97
        self.pages = next_page


def run_step(runner: ModelRunner, case: Case, engine: Engine, generator: torch.Generator) -> None:
    logits = runner.execute(case.seqs, case.tokens, case.decodes, case.seqs, case.width)
    params = [SamplingParams(temperature=0, max_tokens=1)] * case.seqs
    tokens, _, _ = sample_and_detect(logits, params, [0] * case.seqs, generator, engine.real_vocab[0],
                                     engine.ops.sample_and_detect, [-1] * case.seqs, engine.detect_tables,
                                     [()] * case.seqs)
    tokens.tolist()  # the host waits for the tokens, as the engine does


def kernel_times(fn, device: torch.device) -> "dict | None":
    """Sum of the GPU kernel and memcpy times of one call of fn, from torch.profiler (None off CUDA)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = memcpy = 0.0
    launches = 0
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        if "memcpy" in e.name.lower() or "memset" in e.name.lower():
            memcpy += us
        else:
            kernels += us
            launches += 1
    return {"kernels_ms": kernels / 1e3, "memcpy_ms": memcpy / 1e3, "kernel_launches": launches}


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)  # fn ends in a host sync (the sampled tokens)
    return out


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; smoke 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per case and path (default 20; smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the code path, not a measurement")
    args = p.parse_args()
    device, dtype = device_and_dtype(args.smoke, "mixed_steps.py")
    layers = args.layers or (2 if args.smoke else 8)
    repeats = args.repeats or (1 if args.smoke else 20)
    cases = SMOKE_CASES if args.smoke else CASES
    max_seqs = max(c[0] for c in cases) + 1
    max_tokens = max(c[0] + c[2] for c in cases)
    info = card_info()
    print(machine_line(machine()))
    print(f"card: {info['card'] if device.type == 'cuda' else 'none (CPU smoke run)'} | torch {info['torch']} | "
          f"triton {info['triton']} | {layers} layers of the {'tiny' if args.smoke else '1.5B'} shape, {dtype}",
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), layers, args.smoke)
        max_len = max(max(c[1], c[2] + c[3]) for c in cases) + 16
        shape = TINY if args.smoke else SHAPE
        kv_per_token = layers * 2 * shape["num_key_value_heads"] * (shape["hidden_size"] // shape["num_attention_heads"])
        pages = max_seqs * -(-max_len // 16) + 64  # every case's sequences on pages of their own
        engine = Engine(config, load_format="dummy", device=device.type, dtype=dtype, kernels="triton",
                        cuda_graphs=False, max_model_len=max_len, max_num_seqs=max_seqs,
                        max_num_batched_tokens=max_tokens, page_tokens=16, progress=False,
                        kv_cache_bytes=pages * 16 * kv_per_token * torch.empty((), dtype=dtype).element_size())
    model, kv = engine.models[0], engine.pool.kv_caches[0]
    page_tokens, width = kv[0][0].shape[1], engine.runners[0].stride
    start = time.perf_counter()
    warm_up_kernels(model, kv, engine.ops, device, max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens,
                    max_model_len=max_len, real_vocab=engine.real_vocab[0], detect_tables=engine.detect_tables,
                    block_table_width=width)
    warm_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    results = []
    for spec in cases:
        case = Case(*spec, page_tokens=page_tokens, max_seqs=max_seqs, max_tokens=max_tokens, width=width)
        if case.pages > engine.pool.num_pages:
            raise RuntimeError(f"{case.name} needs {case.pages} pages, the pool has {engine.pool.num_pages}")
        row = {"case": case.name, "decodes": spec[0], "context": spec[1], "chunk": spec[2], "prefix": spec[3]}
        for path, staged in (("staged", True), ("in_place", False)):
            runner_module_stages = runner_module.stages
            runner_module.stages = lambda d, staged=staged: staged
            try:
                runner = ModelRunner(model, kv, case.buffers, width, device)
            finally:
                runner_module.stages = runner_module_stages
            step = lambda: run_step(runner, case, engine, generator)  # noqa: E731
            for _ in range(2):
                step()  # warm: allocator, cuBLAS handles, kernel variants
            compiles = jit_compiles()
            walls = timed(step, device, repeats)
            row[path] = {"wall_ms_median": 1e3 * statistics.median(walls), "wall_ms_best": 1e3 * min(walls),
                         "compiles_while_timed": jit_compiles() - compiles}
            if staged:
                row["gpu"] = kernel_times(step, device)
        gpu = row.get("gpu")
        if gpu:
            row["staged"]["host_overhead_ms"] = row["staged"]["wall_ms_median"] - gpu["kernels_ms"]
            row["in_place_over_staged"] = row["in_place"]["wall_ms_median"] / row["staged"]["wall_ms_median"]
        results.append(row)

    print(f"kernel warm-up: {warm_s:.2f} s")
    print(f"{'case':<26} {'staged ms':>10} {'in place':>10} {'kernels':>9} {'memcpy':>8} {'launches':>9} "
          f"{'overhead':>9} {'compiles':>8}")
    for r in results:
        g = r.get("gpu") or {}
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"{r['case']:<26} {r['staged']['wall_ms_median']:>10.3f} {r['in_place']['wall_ms_median']:>10.3f} "
              f"{f(g.get('kernels_ms')):>9} {f(g.get('memcpy_ms')):>8} {g.get('kernel_launches', '-'):>9} "
              f"{f(r['staged'].get('host_overhead_ms')):>9} "
              f"{r['staged']['compiles_while_timed'] + r['in_place']['compiles_while_timed']:>8}")
    write_json(args.json, {"info": info, "machine": machine(), "smoke": args.smoke, "layers": layers,
                           "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "warmup_s": warm_s,
                           "cases": results})


if __name__ == "__main__":
    main()
