"""End-to-end decode on one GPU: this engine beside Hugging Face `generate`, at the real model shapes,
against the memory-bandwidth floor, all in one run on one card.

Both contenders run random (dummy) weights at the DeepSeek-R1-Distill-Qwen shapes (1.5B, 14B, 32B;
configs written from DESIGN.md into a temp folder), or, when named, R1-Distill-Llama-8B and Qwen3-8B
(the configs shipped in splitreason_engine/configs/), bf16, batch 1, a ~3500-token random prompt and
128 generated tokens (ignore_eos). One model at a time; memory is freed in between.

- Engine: CUDA graphs for decode, the Triton kernels (kernels="auto"). Decode tok/s =
  (generated - 1) / (finished_time - first_token_time) from the request's metrics: the prefill is
  outside it. Best of --repeats, after a warm-up run of the same prompt length.
- Hugging Face: the family's *ForCausalLM built from the same config straight on the GPU in bf16 (random
  normal(0, 0.02) weights, unit norms), attn_implementation="sdpa", the default dynamic cache.
  Decode tok/s = 128 / (time of generate(129 new tokens) - time of generate(1 new token)), each the
  best of --repeats: the difference is 128 decode steps, prefill excluded.
- Floor: tokens/s if a step only read its bytes once at the measured copy bandwidth: every weight
  once (bf16; the embedding only one row, the LM head once, tied or not) + the K and V of the mean
  context (prompt + half the generated tokens). The bandwidth is common.copy_bandwidth, which counts
  bytes read + bytes written; the floor divides it by the bytes read alone (as bench/cpu_decode.py
  does), so a kernel that reads as fast as a copy reads and writes sits at 100%.

32B runs only on a card with more than 100 GB (with the 1.5B beside it, as SplitReason runs it, it
needs the H200's memory), but it is measured in an engine that holds the 32B alone; on a smaller
card the default list takes 14B instead. --smoke runs a tiny config on the CPU (Triton
kernels in the interpreter, no CUDA graphs, HF in fp32): the code path, not a measurement.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before they are imported

sys.path.insert(0, str(Path(__file__).parent))
from common import BASE, MODELS, copy_bandwidth, machine, machine_line, write_json  # noqa: E402
from gpu_kernels import card_info, device_and_dtype  # noqa: E402

from splitreason_engine import Engine, SamplingParams  # noqa: E402
from splitreason_engine.kernels.ops import KERNEL_CHOICES  # noqa: E402


BIG_CARD_BYTES = 100e9  # 32B beside 1.5B needs more than an 80 GB card
# Fractions of the bandwidth floor (issue 13, on the H200: the 1.5B >= 980 tok/s); tiny only so
# that --smoke runs this code.
FLOOR_TARGETS = {"1.5B": 0.75, "14B": 0.68, "32B": 0.90, "tiny": 0.75}


def config_for(name: str, smoke: bool) -> dict:
    cfg = {**BASE, **MODELS[name]}
    if smoke:
        cfg["torch_dtype"] = "float32"
    return cfg


def write_config(folder: Path, name: str, cfg: dict) -> Path:
    path = folder / name / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def kv_bytes_per_token(cfg: dict, elem: int) -> int:
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim(cfg) * elem


def step_bytes(cfg: dict, context: float, elem: int, batch: int = 1) -> float:
    """Bytes one decode step of `batch` sequences must read: every weight once (the embedding one
    row per sequence, the LM head in full, tied or not) and the K and V of `context` tokens each."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * head_dim(cfg), cfg["num_key_value_heads"] * head_dim(cfg)
    layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * inter + 2 * h  # qkv (+bias), o, MLP, 2 norms
    weights = cfg["num_hidden_layers"] * layer + h + vocab * h + batch * h  # final norm, LM head, embedding rows
    return weights * elem + kv_bytes_per_token(cfg, elem) * context * batch


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def free_memory(device: torch.device) -> float:
    """Collects garbage and returns cached blocks; GiB still allocated (0 unless something leaked)."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def run_engine(config_path: Path, cfg: dict, args, device: torch.device, dtype: torch.dtype, batch: int = 1) -> dict:
    """Decode tok/s of `batch` sequences decoding together (summed over them): each request's
    generated tokens after its first, over the time from the last first token to the last finish."""
    elem = torch.empty((), dtype=dtype).element_size()
    max_len = args.prompt_len + args.new_tokens + 16
    start = time.perf_counter()
    engine = Engine(config_path, load_format="dummy", device=device.type, dtype=dtype,
                    kv_cache_bytes=kv_bytes_per_token(cfg, elem) * (max_len + 64) * batch, max_model_len=max_len,
                    max_num_seqs=batch, max_num_batched_tokens=max(2048, batch), kernels=args.kernels,
                    cuda_graphs=args.cuda_graphs, progress=False, overlap=args.overlap,
                    tensor_parallel_size=args.tensor_parallel_size)
    build_s = time.perf_counter() - start
    vocab = cfg["vocab_size"]
    # Warm-up at the same prompt length: compiles every kernel variant, captures the decode graph.
    engine.generate([random_prompt(args.prompt_len, vocab, 1)],
                    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rates, ttfts = [], []
    for r in range(args.repeats):
        outs = engine.generate([random_prompt(args.prompt_len, vocab, 2 + r * batch + i) for i in range(batch)],
                               params, use_tqdm=False)
        if any(len(o.token_ids) != args.new_tokens for o in outs):
            raise RuntimeError(f"engine generated {[len(o.token_ids) for o in outs]} tokens, expected {args.new_tokens}")
        ms = [o.metrics for o in outs]
        decode_s = max(m.finished_time for m in ms) - max(m.first_token_time for m in ms)
        rates.append(sum(len(o.token_ids) - 1 for o in outs) / decode_s)
        ttfts.append(max(m.first_token_time - m.arrival_time for m in ms))
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    engine.close()  # tensor parallel: the workers go before the next engine starts
    return {"tok_s": max(rates), "tok_s_all": rates, "ttft_s_best": min(ttfts), "build_s": build_s,
            "peak_gib": memory, "kernels": engine.ops.name, "cuda_graphs": engine.runners[0].graphs is not None,
            "overlap": engine.overlap, "steps_ahead": engine.stats.steps_ahead, "batch": batch,
            "tensor_parallel_size": args.tensor_parallel_size}


def build_hf(cfg: dict, device: torch.device, dtype: torch.dtype):
    """The family's HF model made directly on the device in `dtype` (no CPU copy of the weights), random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")}
    config = AutoConfig.for_model(cfg["model_type"], **fields, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the rotary inv_freq is built in fp32 explicitly, so it stays fp32
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def run_hf(cfg: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    start = time.perf_counter()
    model = build_hf(cfg, device, dtype)
    build_s = time.perf_counter() - start
    ids = torch.tensor([random_prompt(args.prompt_len, cfg["vocab_size"], 2)], device=device)
    mask = torch.ones_like(ids)

    def timed(new: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        if out.shape[1] != ids.shape[1] + new:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {new}")
        return elapsed

    timed(2)  # warm-up: cuBLAS handles, SDPA kernel selection, allocator
    prefill = min(timed(1) for _ in range(args.repeats))
    full = min(timed(1 + args.new_tokens) for _ in range(args.repeats))
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tok_s": args.new_tokens / (full - prefill), "prefill_s": prefill, "generate_s": full,
            "build_s": build_s, "peak_gib": memory, "attn_implementation": "sdpa"}


def run_batched(path: Path, cfg: dict, args, device: torch.device, dtype: torch.dtype, mean_context: float,
                bw: float, elem: int) -> dict:
    """The engine at batch args.batch beside its floor; a failure is reported, not raised."""
    floor = args.batch * bw / step_bytes(cfg, mean_context, elem, args.batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        engine = run_engine(path, cfg, args, device, dtype, args.batch)
    except Exception as e:
        engine = {"error": f"{type(e).__name__}: {e}"}
        print(f"batch {args.batch}: engine failed: {engine['error']}", file=sys.stderr)
    free_memory(device)
    out = {"batch": args.batch, "floor_tok_s": floor, "engine": engine}
    if "tok_s" in engine:
        out["engine_over_floor"] = engine["tok_s"] / floor
    return out


def target_for(name: str, card: "str | None", result: dict) -> "dict | None":
    """The model's target (a fraction of its bandwidth floor) with its figure and verdict."""
    want = FLOOR_TARGETS.get(name)
    if want is None:
        return None
    value = result["engine_over_floor"]
    return {"name": f"{name} engine decode / floor", "value": value, "unit": "fraction",
            "target": f">= {want:.0%} of the bandwidth floor", "meets": value >= want}


def pick_models(requested: "list[str] | None", smoke: bool, total_bytes: "int | None") -> list[str]:
    if smoke:
        return ["tiny"]
    big_card = total_bytes is not None and total_bytes > BIG_CARD_BYTES
    models = requested or ["1.5B", "32B" if big_card else "14B"]
    if "32B" in models and not big_card:
        print(f"32B needs a card with more than {BIG_CARD_BYTES / 1e9:.0f} GB; running 14B instead", file=sys.stderr)
        models = [m for m in models if m != "32B"] + ([] if "14B" in models else ["14B"])
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "tiny"],
                   help="models to run (default: 1.5B and 32B on a card of > 100 GB, else 1.5B and 14B)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 3500; smoke 40)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default: 128; smoke 6)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per contender, the best counts (default: 2)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default=None,
                   help="the engine's kernels (default: auto; smoke: triton in the interpreter)")
    p.add_argument("--skip-hf", action="store_true", help="run the engine only")
    p.add_argument("--batch", type=int, default=32, metavar="B",
                   help="also run the engine at batch B, against its own floor (default: 32; smoke 3; 0: skip)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                   help="the plain step loop: each step waits for the previous step's tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the engine's model over N GPUs (cuda:0..N-1); peak_gib is rank 0's (default: 1)")
    p.add_argument("--smoke", action="store_true", help="a tiny config on the CPU: the code path, not a measurement")
    args = p.parse_args()

    smoke = args.smoke
    device, dtype = device_and_dtype(smoke, "gpu_decode.py")
    elem = torch.empty((), dtype=dtype).element_size()
    args.prompt_len = args.prompt_len or (40 if smoke else 3500)
    args.new_tokens = args.new_tokens or (6 if smoke else 128)
    args.kernels = args.kernels or ("triton" if smoke else "auto")
    args.cuda_graphs = False if smoke else None  # None: the engine's default (on with the Triton kernels)
    args.batch = 3 if smoke and args.batch == 32 else args.batch
    info = card_info()
    card = info["card"] if device.type == "cuda" else None
    total = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None
    models = pick_models(args.models, smoke, total)

    bw = copy_bandwidth(device.type, mib=32 if smoke else 1024)
    print(machine_line(machine()))
    print(f"card: {card or 'none (CPU smoke run)'} | driver {info['driver']} | torch {info['torch']} | "
          f"triton {info['triton']} | copy bandwidth {bw / 1e9:.0f} GB/s (read+write)", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            cfg = config_for(name, smoke)
            path = write_config(Path(tmp), name, cfg)
            mean_context = args.prompt_len + args.new_tokens / 2
            floor = bw / step_bytes(cfg, mean_context, elem)
            r: dict = {"config": cfg, "floor_tok_s": floor, "step_bytes": step_bytes(cfg, mean_context, elem)}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                r["engine"] = run_engine(path, cfg, args, device, dtype)
            except Exception as e:  # report it and go on: the other contender and models still run
                r["engine"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name}: engine failed: {r['engine']['error']}", file=sys.stderr)
            r["leftover_gib_after_engine"] = free_memory(device)
            if not args.skip_hf:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    r["hf"] = run_hf(cfg, args, device, dtype)
                except Exception as e:
                    r["hf"] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"{name}: HF failed: {r['hf']['error']}", file=sys.stderr)
                r["leftover_gib_after_hf"] = free_memory(device)
            if "tok_s" in r["engine"]:
                r["engine_over_floor"] = r["engine"]["tok_s"] / floor
                if "tok_s" in r.get("hf", {}):
                    r["engine_over_hf"] = r["engine"]["tok_s"] / r["hf"]["tok_s"]
                r["target"] = target_for(name, card, r)
            if args.batch > 1:
                r["batched"] = run_batched(path, cfg, args, device, dtype, mean_context, bw, elem)
            results[name] = r
            e, h = r["engine"].get("tok_s"), r.get("hf", {}).get("tok_s")
            print(f"  {name}: engine {e if e is None else round(e, 1)} tok/s, HF {h if h is None else round(h, 1)} "
                  f"tok/s, floor {floor:.1f} tok/s", flush=True)

    print(f"\ndecode, batch 1, prompt {args.prompt_len} + {args.new_tokens} generated, "
          f"{str(dtype).removeprefix('torch.')}; tok/s after the first token")
    print(f"{'model':>6} {'engine':>9} {'HF':>9} {'floor':>9} {'eng/HF':>7} {'eng/floor':>9} {'HF/floor':>8} "
          f"{'TTFT s':>7}")
    for name, r in results.items():
        e, h = r["engine"].get("tok_s"), r.get("hf", {}).get("tok_s")
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"{name:>6} {fmt(e, '9.1f'):>9} {fmt(h, '9.1f'):>9} {r['floor_tok_s']:>9.1f} "
              f"{fmt(r.get('engine_over_hf'), '.2f'):>7} {fmt(r.get('engine_over_floor'), '.1%'):>9} "
              f"{fmt(h / r['floor_tok_s'] if h else None, '.1%'):>8} {fmt(r['engine'].get('ttft_s_best'), '.3f'):>7}")
    print("(floor: bytes read per step at the copy bandwidth, which counts read + write)")
    batched = {n: r["batched"] for n, r in results.items() if r.get("batched")}
    if batched:
        print(f"\ndecode, batch {args.batch} (engine only), tok/s summed over the batch")
        print(f"{'model':>6} {'engine':>9} {'floor':>9} {'eng/floor':>9}")
        for name, b in batched.items():
            e = b["engine"].get("tok_s")
            print(f"{name:>6} {'-' if e is None else format(e, '9.1f'):>9} {b['floor_tok_s']:>9.1f} "
                  f"{'-' if e is None else format(e / b['floor_tok_s'], '.1%'):>9}")
    goals = [r["target"] for r in results.values() if r.get("target")]
    for name, r in results.items():
        if "error" in r["engine"]:  # a failed run misses its target
            goals.append({"name": f"{name} engine decode", "value": None, "unit": "", "target": "runs",
                          "meets": False})
    for t in goals:
        t["card"] = card
        t["note"] = "smoke run: not a measurement" if smoke else ""
        value = "-" if t["value"] is None else (f"{t['value']:.1%}" if t["unit"] == "fraction"
                                                else f"{t['value']:.1f} {t['unit']}")
        print(f"  {t['name']:<32} {value:>12}  {t['target']:<32} {'meets' if t['meets'] else 'MISSES'}")
    write_json(args.json, {"benchmark": "gpu_decode", "smoke": smoke, "machine": machine(), **info,
                           "copy_bandwidth_gb_s": bw / 1e9, "copy_bandwidth_convention": "bytes read + bytes written",
                           "floor_convention": "copy bandwidth (read+write bytes/s) / bytes read per step",
                           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "dtype": str(dtype).removeprefix("torch."), "models": results, "targets": goals,
                           "median_engine_tok_s": {n: statistics.median(r["engine"]["tok_s_all"])
                                                   for n, r in results.items() if "tok_s_all" in r["engine"]}})
    failed = [f"{n} {who}" for n, r in results.items() for who in ("engine", "hf") if "error" in r.get(who, {})]
    if failed:
        sys.exit(f"gpu_decode.py: failed runs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
