"""GPU ceilings and paged decode attention, measured in one run on one card.

Ceilings, so every other figure is a fraction of something measured on the same card:
- copy bandwidth: common.copy_bandwidth on 1 GiB device buffers (synchronized, best of 10). It counts
  bytes read + bytes written, so a copy of N bytes moves 2N.
- matmul rate: 8192^3 bf16 products on random data, timed with CUDA events, best of several.

Decode GEMV: every projection of a 1.5B and a 32B layer at 1 and 16 rows (the down projection with
SiLU-and-mul fused in), weights rotated past the L2 cache, against F.linear; bytes = the weights.

Decode attention: one call of kernels.paged_decode_attention (one launch; splits merged by the last) per
layer, at the 1.5B (12 query / 2 KV heads) and 32B (40 / 8) shapes, head dim 128, bf16, 16-token
pages scattered at random over a pool laid out like the engine's arena (every layer of a page side
by side, so K and V are strided views). A CUDA graph of one call per layer is replayed many times
and timed with CUDA events; the "layers" rotate through enough distinct KV (>= 4x the L2 cache)
that the figure is for cold data, as in a real forward pass. Bytes moved per call = K and V of
every context token + q + block table + seq_lens read, + out written (the split workspace is not
counted: it is overhead). Those bytes per second over the copy bandwidth is the kernel's fraction
of the copy ceiling (both count every byte that crosses device memory once, read or written).
The PyTorch reference (gather + SDPA) is timed the same way at the same shapes, for a ratio, and
checks the kernel's output (relative error against fp32).

Sampling: one call of kernels.sample_and_detect (token ids, detection words, logprobs) at the real
vocabulary (151936), batch 1 and 32, greedy and top-p 0.95 rows, for two pass lengths (`block`),
checked against the PyTorch reference (tokens and words equal); targets 15 us greedy, 40 / 60 us
top-p at batch 1 / 32 (the H200's, issue 13).

--smoke runs the same code on the CPU with tiny contexts, the Triton kernels in Triton's
interpreter (fp32: bf16 arithmetic is wrong there) and perf_counter timing; its numbers mean nothing.
"""

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before they are imported

import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, machine, machine_line, write_json  # noqa: E402

from splitreason_engine.kernels.paged_attention import paged_decode_attention_ref  # noqa: E402
from splitreason_engine.kernels.paged_attention_triton import decode_splits, paged_decode_attention  # noqa: E402
from splitreason_engine.kernels.sample import sample_and_detect_ref  # noqa: E402
from splitreason_engine.kernels.sample_triton import sample_and_detect  # noqa: E402
from splitreason_engine.kernels.activation import silu_and_mul_ref  # noqa: E402
from splitreason_engine.kernels.linear import linear_ref, silu_mul_linear_ref  # noqa: E402
from splitreason_engine.kernels.linear_triton import linear, silu_mul_linear  # noqa: E402

HEAD_DIM = 128
PAGE_TOKENS = 16
SHAPES = {"1.5B": (12, 2), "32B": (40, 8)}  # query heads, KV heads
# (shape, batch, context) on the GPU; --smoke keeps the shapes and shrinks the contexts.
CASES = [("1.5B", 1, 1024), ("1.5B", 1, 4096), ("32B", 1, 4096), ("1.5B", 1, 32768), ("32B", 1, 32768),
         ("1.5B", 32, 4096), ("32B", 32, 4096)]
SMOKE_CONTEXT = {1024: 40, 4096: 80, 32768: 200}
SMOKE_BATCH = {1: 1, 32: 3}
# Targets (H200, issue 13): microseconds per call, or a fraction of the copy bandwidth.
US_TARGETS = {("1.5B", 1, 1024): 3.0, ("1.5B", 1, 4096): 8.0, ("1.5B", 1, 32768): 20.0}
SAMPLER_US_TARGETS = {("greedy", 1): 15.0, ("greedy", 32): 15.0, ("top_p", 1): 40.0, ("top_p", 32): 60.0}
BANDWIDTH_TARGET = 0.75  # decode attention at batch 32, 4k, both shapes
GEMV_TARGET = 0.85  # decode GEMV: fraction of the copy bandwidth (bytes read / s over read+write copy rate)
TARGET_CARD = "H200"
# Projections of one decoder layer: (name, out features, in features); the down projection runs
# with SiLU-and-mul fused in, reading gate_up rows of twice its in features.
GEMV_SHAPES = {"1.5B": [("qkv", 2048, 1536), ("o_proj", 1536, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960)],
               "32B": [("qkv", 7168, 5120), ("o_proj", 5120, 5120), ("gate_up", 55296, 5120), ("down", 5120, 27648)]}
SMOKE_GEMV = {"tiny": [("qkv", 72, 40), ("down", 40, 72)]}
VOCAB, SMOKE_VOCAB = 151936, 700
SAMPLER_BLOCKS = (1024, 4096)


@dataclass
class Case:
    shape: str
    batch: int
    context: int
    heads: int
    kv_heads: int

    @property
    def name(self) -> str:
        return f"{self.shape} b{self.batch} ctx{self.context}"


def card_info() -> dict:
    """The card, its driver and the software versions: every GPU figure is named by these."""
    info: dict = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                  "card": None, "driver": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_cache_mib=getattr(p, "L2_cache_size", 0) / 2**20)
    if shutil.which("nvidia-smi"):
        try:
            line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
            name, driver = (s.strip() for s in line.split(",", 1))
            info["driver"] = driver
            info["card"] = info["card"] or name
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            pass
    return info


def device_and_dtype(smoke: bool, script: str) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16; with --smoke the CPU in fp32 (the Triton interpreter computes bf16 wrongly)."""
    if not smoke and not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA device (or --smoke for the CPU code path)")
    return (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)


def _capture(calls: list[Callable[[], object]]) -> "Callable[[], None] | None":
    """A CUDA graph of one pass over `calls` (already warmed up), or None if it cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the warm-up the capture docs ask for, off the default stream
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        return graph.replay
    except Exception as e:  # e.g. an op that syncs with the host: time eager launches instead
        print(f"  (CUDA graph capture failed, timing eager launches: {type(e).__name__}: {e})", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def time_per_call(calls: list[Callable[[], object]], device: torch.device, samples: int, inner: int,
                  graph: bool = True) -> tuple[list[float], str]:
    """Seconds per call, one figure per sample; each sample runs the pass over `calls` `inner` times.

    On CUDA the pass is a CUDA graph (no launch gaps from Python) when `graph` and it captures, and
    the samples are timed with CUDA events; on the CPU with perf_counter.
    """
    for call in calls:  # compile, autotune, allocate
        call()
    per_sample = inner * len(calls)
    times = []
    if device.type != "cuda":
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(inner):
                for call in calls:
                    call()
            times.append((time.perf_counter() - start) / per_sample)
        return times, "perf_counter"
    torch.cuda.synchronize()
    replay = _capture(calls) if graph else None
    method = "cuda-graph+events" if replay else "cuda-events"
    if replay is None:
        def replay():
            for call in calls:
                call()
    replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(samples):
        start.record()
        for _ in range(inner):
            replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per_sample)
    return times, method


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, samples: int) -> dict:
    """TFLOP/s of an n x n x n product on random data (zeros run faster and would flatter the ceiling)."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    c = torch.empty(n, n, dtype=dtype, device=device)
    times, method = time_per_call([lambda: torch.mm(a, b, out=c)], device, samples, inner=3, graph=False)
    flop = 2 * n**3
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "best_tflops": flop / min(times) / 1e12,
            "median_tflops": flop / statistics.median(times) / 1e12, "timing": method}


def rotation_layers(layer_bytes: int, device: torch.device) -> int:
    """Distinct layers of KV to cycle through so their total is >= 4x the L2 (cold reads), 2..64."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    return max(2, min(64, math.ceil(max(4 * l2, 256 * 2**20) / layer_bytes)))


def decode_case(case: Case, device: torch.device, dtype: torch.dtype, copy_bw: float, samples: int,
                inner: int, ref_budget: "int | None") -> dict:
    """Times one decode-attention call per layer (kernel and reference) at one shape."""
    g = torch.Generator(device=device).manual_seed(case.batch * 1000 + case.context)
    elem = torch.empty((), dtype=dtype).element_size()
    width = -(-case.context // PAGE_TOKENS)
    num_pages = case.batch * width
    kv_layer_bytes = 2 * case.batch * case.context * case.kv_heads * HEAD_DIM * elem
    layers = rotation_layers(kv_layer_bytes, device)
    # The engine's arena: a page holds every layer's K and V ([layers, 2, page_tokens, Hkv, D]).
    arena = torch.randn(num_pages, layers, 2, PAGE_TOKENS, case.kv_heads, HEAD_DIM, dtype=dtype, device=device,
                        generator=g)
    caches = [(arena[:, l, 0], arena[:, l, 1]) for l in range(layers)]
    block_tables = torch.randperm(num_pages, device=device, generator=g).to(torch.int32).view(case.batch, width)
    seq_lens = torch.full((case.batch,), case.context, dtype=torch.int32, device=device)
    qs = [torch.randn(case.batch, case.heads, HEAD_DIM, dtype=dtype, device=device, generator=g) for _ in range(layers)]
    outs = [torch.empty_like(q) for q in qs]
    scale = HEAD_DIM ** -0.5
    splits = decode_splits(case.batch, case.kv_heads, device)

    # Correctness first, on a poisoned output: the timing means nothing if the result is wrong.
    outs[0].fill_(float("nan"))
    paged_decode_attention(qs[0], *caches[0], block_tables, seq_lens, scale, out=outs[0])
    k0, v0 = (c.float() for c in caches[0])
    want = paged_decode_attention_ref(qs[0].float(), k0, v0, block_tables, seq_lens, scale)
    rel_err = ((outs[0].float() - want).norm() / want.norm()).item()
    written = bool(torch.isfinite(outs[0]).all())
    del k0, v0, want

    def kernel(l: int) -> Callable[[], object]:
        return lambda: paged_decode_attention(qs[l], *caches[l], block_tables, seq_lens, scale, out=outs[l])

    times, method = time_per_call([kernel(l) for l in range(layers)], device, samples, inner)
    moved = kv_layer_bytes + 2 * case.batch * case.heads * HEAD_DIM * elem + block_tables.numel() * 4 + case.batch * 4
    best = min(times)
    row = {"case": case.name, "shape": case.shape, "batch": case.batch, "context": case.context,
           "heads": case.heads, "kv_heads": case.kv_heads, "head_dim": HEAD_DIM, "page_tokens": PAGE_TOKENS,
           "dtype": str(dtype).removeprefix("torch."), "max_splits": splits, "rotation_layers": layers,
           "us_best": best * 1e6, "us_median": statistics.median(times) * 1e6, "timing": method,
           "bytes_moved": moved, "gb_s_best": moved / best / 1e9, "copy_fraction": moved / best / copy_bw,
           "rel_err_vs_fp32": rel_err, "all_written": written, "correct": written and rel_err < 2e-2}

    # The reference gathers every page into a contiguous copy: ~2x the layer's KV, plus SDPA's scratch.
    if ref_budget is None or 4 * kv_layer_bytes * layers <= ref_budget:
        def ref(l: int) -> Callable[[], object]:
            return lambda: paged_decode_attention_ref(qs[l], *caches[l], block_tables, seq_lens, scale)

        ref_times, ref_method = time_per_call([ref(l) for l in range(layers)], device, samples, max(1, inner // 4))
        row.update(ref_us_best=min(ref_times) * 1e6, ref_us_median=statistics.median(ref_times) * 1e6,
                   ref_timing=ref_method, ref_over_kernel=min(ref_times) / best)
    return row  # the pool and the graphs go with this frame; the caller empties the cache


def sampler_case(batch: int, vocab: int, mode: str, block: int, device: torch.device, samples: int,
                 inner: int) -> dict:
    """Times one sample-and-detect call over `batch` rows of `vocab` logits, all greedy or all top-p 0.95."""
    g = torch.Generator(device=device).manual_seed(batch)
    logits = torch.randn(batch, vocab, device=device, generator=g) * 3
    greedy = mode == "greedy"
    temperature = torch.full((batch,), 0.0 if greedy else 0.7, device=device)
    top_k = torch.zeros(batch, dtype=torch.int32, device=device)
    top_p = torch.full((batch,), 1.0 if greedy else 0.95, device=device)
    keys = torch.randint(0, 2**62, (batch,), device=device, generator=g)
    states = torch.zeros(batch, dtype=torch.int32, device=device)
    tables = (torch.zeros(1, vocab, dtype=torch.int32, device=device), torch.zeros(1, vocab, dtype=torch.uint8, device=device),
              torch.zeros(1, dtype=torch.bool, device=device))
    stops = torch.full((batch, 2), vocab - 1, dtype=torch.int32, device=device)
    args = (logits, temperature, top_k, top_p, keys, vocab, states, *tables, stops)
    out = (torch.full((batch,), -1, dtype=torch.int32, device=device), torch.full((batch,), -1, dtype=torch.int32, device=device),
           torch.full((batch,), float("nan"), device=device))
    filters = not greedy  # as the engine passes it: a batch without top-k/top-p skips the searches
    sample_and_detect(*args, out=out, block=block, filters=filters)
    tokens, words, _ = sample_and_detect_ref(*args)
    correct = bool(torch.equal(out[0], tokens) and torch.equal(out[1], words) and torch.isfinite(out[2]).all())
    times, method = time_per_call([lambda: sample_and_detect(*args, out=out, block=block, filters=filters)], device,
                                  samples, inner)
    return {"batch": batch, "vocab": vocab, "mode": mode, "block": block, "us_best": min(times) * 1e6,
            "us_median": statistics.median(times) * 1e6, "timing": method, "correct": correct}


def gemv_case(model: str, name: str, n: int, k: int, rows: int, device: torch.device, dtype: torch.dtype,
              bw: float, samples: int, smoke: bool) -> dict:
    """The decode GEMV (with SiLU-and-mul for `down`) against F.linear (after a torch SiLU-and-mul),
    weights rotated past the L2 cache; bytes = the weight matrix, read once."""
    fused = name == "down"
    weight_bytes = n * k * dtype.itemsize
    copies = 1 if smoke else max(1, min(64, -(-4 * (torch.cuda.get_device_properties(0).L2_cache_size or 50 * 2**20)
                                                // weight_bytes)))
    weights = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(rows, 2 * k if fused else k, device=device, dtype=dtype)
    if fused:
        kernel = [lambda w=w: silu_mul_linear(x, w) for w in weights]
        torch_calls = [lambda w=w: F.linear(silu_and_mul_ref(x), w) for w in weights]
        want = silu_mul_linear_ref(x.float(), weights[0].float())
    else:
        kernel = [lambda w=w: linear(x, w) for w in weights]
        torch_calls = [lambda w=w: F.linear(x, w) for w in weights]
        want = linear_ref(x.float(), weights[0].float())
    got = kernel[0]().float()
    correct = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))
    inner = 1 if smoke else 10
    times, method = time_per_call(kernel, device, samples, inner)
    ref_times, _ = time_per_call(torch_calls, device, samples, inner)
    us, ref_us = min(times) * 1e6, min(ref_times) * 1e6
    return {"model": model, "proj": name, "rows": rows, "n": n, "k": k, "us_best": us, "torch_us_best": ref_us,
            "torch_over_kernel": ref_us / us, "gb_s": weight_bytes / us / 1e3,
            "copy_fraction": weight_bytes / (us * 1e-6) / bw, "timing": method, "correct": correct}


def targets(rows: list[dict], card: "str | None", smoke: bool, sampler_rows: list[dict] = (),
            gemv_rows: list[dict] = ()) -> list[dict]:
    """Each target with its figure and whether it is met (the targets are the H200's)."""
    found = []
    for r in sampler_rows:
        want = SAMPLER_US_TARGETS.get((r["mode"], 1 if r["batch"] == 1 else 32))
        if "error" not in r and want is not None:
            found.append({"name": f"sampler {r['mode']} batch {r['batch']} block {r['block']}", "value": r["us_best"],
                          "unit": "us", "target": f"<= {want:g} us", "meets": r["us_best"] <= want})
    for r in gemv_rows:
        if "error" not in r:
            found.append({"name": f"GEMV {r['model']} {r['proj']} rows {r['rows']}", "value": r["copy_fraction"],
                          "unit": "", "target": f">= {GEMV_TARGET:.0%} of copy bandwidth",
                          "meets": r["copy_fraction"] >= GEMV_TARGET})
    by_key = {(r["shape"], r["batch"], r["context"]): r for r in rows}
    scale_back = {v: k for k, v in SMOKE_CONTEXT.items()}
    batch_back = {v: k for k, v in SMOKE_BATCH.items()}
    for (shape, batch, context), r in by_key.items():
        if "error" in r:
            continue
        key = (shape, batch_back.get(batch, batch), scale_back.get(context, context)) if smoke else (shape, batch, context)
        if key in US_TARGETS:
            found.append({"name": f"decode attention {r['case']}", "value": r["us_best"], "unit": "us",
                          "target": f"<= {US_TARGETS[key]:g} us", "meets": r["us_best"] <= US_TARGETS[key]})
        if key[1] == 32 and key[2] == 4096:
            found.append({"name": f"decode attention {r['case']} copy fraction", "value": r["copy_fraction"],
                          "unit": "", "target": f">= {BANDWIDTH_TARGET:.0%} of copy bandwidth",
                          "meets": r["copy_fraction"] >= BANDWIDTH_TARGET})
    for t in found:
        t["target_card"] = TARGET_CARD
        t["card"] = card
        t["note"] = "smoke run: not a measurement" if smoke else (
            "" if TARGET_CARD in (card or "") else f"target set for the {TARGET_CARD}")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter, fp32)")
    p.add_argument("--samples", type=int, default=None, help="timed samples per figure (default: 30; smoke 2)")
    args = p.parse_args()

    smoke = args.smoke
    device, dtype = device_and_dtype(smoke, "gpu_kernels.py")
    samples = args.samples or (2 if smoke else 30)
    info = card_info()
    card = info["card"] if device.type == "cuda" else None

    bw = copy_bandwidth(device.type, mib=32 if smoke else 1024)
    mm = matmul_rate(device, 256 if smoke else 8192, dtype, samples=3 if smoke else 10)
    print(f"{machine_line(machine())}")
    print(f"card: {card or 'none (CPU smoke run)'} | driver {info['driver']} | torch {info['torch']} | "
          f"triton {info['triton']} | CUDA {info['cuda']}")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read+write) | {mm['n']}^3 {mm['dtype']} matmul "
          f"{mm['best_tflops']:.1f} TFLOP/s best, {mm['median_tflops']:.1f} median")

    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else None
    rows = []
    for shape, batch, context in CASES:
        heads, kv_heads = SHAPES[shape]
        if smoke:
            batch, context = SMOKE_BATCH[batch], SMOKE_CONTEXT[context]
        case = Case(shape, batch, context, heads, kv_heads)
        try:
            rows.append(decode_case(case, device, dtype, bw, samples, inner=1 if smoke else 10,
                                    ref_budget=None if free is None else free // 2))
        except Exception as e:  # record it and go on: the other shapes still tell something
            rows.append({"case": case.name, "shape": shape, "batch": batch, "context": context,
                         "error": f"{type(e).__name__}: {e}", "correct": False})
            print(f"{case.name}: failed: {rows[-1]['error']}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gemv_rows = []
    for model, shapes in (SMOKE_GEMV if smoke else GEMV_SHAPES).items():
        for name, n, k in shapes:
            for m in (1, 16):
                try:
                    gemv_rows.append(gemv_case(model, name, n, k, m, device, dtype, bw, samples, smoke))
                except Exception as e:  # record it and go on
                    gemv_rows.append({"model": model, "proj": name, "rows": m, "correct": False,
                                      "error": f"{type(e).__name__}: {e}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    sampler_rows = []
    for batch in (1, 32):
        for mode in ("greedy", "top_p"):
            for block in SAMPLER_BLOCKS:
                try:
                    sampler_rows.append(sampler_case(batch if not smoke else min(batch, 3), SMOKE_VOCAB if smoke else VOCAB,
                                                     mode, block, device, samples, inner=1 if smoke else 10))
                except Exception as e:  # record it and go on
                    sampler_rows.append({"batch": batch, "mode": mode, "block": block, "correct": False,
                                         "error": f"{type(e).__name__}: {e}"})

    print(f"\ndecode GEMV (SiLU-and-mul fused into down), {str(dtype).removeprefix('torch.')}, cold weights; "
          f"F.linear (after a separate SiLU-and-mul) beside it")
    print(f"{'model':<6} {'proj':<8} {'rows':>4} {'us best':>9} {'torch us':>9} {'torch/krn':>9} {'GB/s':>7} {'of copy':>7}")
    for r in gemv_rows:
        if "error" in r:
            print(f"{r['model']:<6} {r['proj']:<8} {r['rows']:>4} ERROR {r['error'][:80]}")
            continue
        print(f"{r['model']:<6} {r['proj']:<8} {r['rows']:>4} {r['us_best']:>9.1f} {r['torch_us_best']:>9.1f} "
              f"{r['torch_over_kernel']:>9.2f} {r['gb_s']:>7.0f} {r['copy_fraction']:>7.1%}"
              + ("" if r["correct"] else "  WRONG"))
    print(f"\ndecode attention, one launch (splits merged by the last), head dim {HEAD_DIM}, {PAGE_TOKENS}-token pages, "
          f"{str(dtype).removeprefix('torch.')}; bytes moved = KV + q + tables read + out written")
    print(f"{'case':<20} {'splits':>6} {'us best':>9} {'us med':>9} {'ref us':>9} {'ref/krn':>7} "
          f"{'MB moved':>9} {'GB/s':>7} {'of copy':>7} {'rel err':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<20} ERROR {r['error'][:90]}")
            continue
        ref = f"{r['ref_us_best']:.1f}" if "ref_us_best" in r else "-"
        ratio = f"{r['ref_over_kernel']:.1f}" if "ref_over_kernel" in r else "-"
        flag = "" if r["correct"] else "  WRONG"
        print(f"{r['case']:<20} {r['max_splits']:>6} {r['us_best']:>9.1f} {r['us_median']:>9.1f} {ref:>9} "
              f"{ratio:>7} {r['bytes_moved'] / 1e6:>9.2f} {r['gb_s_best']:>7.0f} {r['copy_fraction']:>7.1%} "
              f"{r['rel_err_vs_fp32']:>8.1e}{flag}")
    print(f"\nsample-and-detect, one call, vocab {SMOKE_VOCAB if smoke else VOCAB}")
    print(f"{'batch':>5} {'mode':<7} {'block':>6} {'us best':>9} {'us med':>9}")
    for r in sampler_rows:
        if "error" in r:
            print(f"{r['batch']:>5} {r['mode']:<7} {r['block']:>6} ERROR {r['error'][:80]}")
        else:
            print(f"{r['batch']:>5} {r['mode']:<7} {r['block']:>6} {r['us_best']:>9.1f} {r['us_median']:>9.1f}"
                  + ("" if r["correct"] else "  WRONG"))
    goals = targets(rows, card, smoke, sampler_rows, gemv_rows)
    print(f"\ntargets ({TARGET_CARD}; this card: {card or 'CPU smoke'}):")
    for t in goals:
        value = f"{t['value']:.1f} us" if t["unit"] == "us" else f"{t['value']:.1%}"
        print(f"  {t['name']:<44} {value:>9}  {t['target']:<28} {'meets' if t['meets'] else 'MISSES'}"
              + (f"  ({t['note']})" if t["note"] else ""))
    write_json(args.json, {"benchmark": "gpu_kernels", "smoke": smoke, "machine": machine(), **info,
                           "copy_bandwidth_gb_s": bw / 1e9, "copy_bandwidth_convention": "bytes read + bytes written",
                           "matmul": mm, "decode_attention": rows, "sampler": sampler_rows, "gemv": gemv_rows,
                           "targets": goals, "all_correct": all(r["correct"] for r in rows + sampler_rows + gemv_rows)})
    if not all(r["correct"] for r in rows + sampler_rows + gemv_rows):
        sys.exit("gpu_kernels.py: a case failed or computed a wrong result (see the tables)")


if __name__ == "__main__":
    main()
