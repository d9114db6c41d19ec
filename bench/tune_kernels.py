"""Sweeps the decode kernels' launch parameters on this card and writes splitreason_engine/kernels/configs/<card>.json.

For every kernel and shape the engine runs at decode time (the 1.5B and 32B projections at 1 to 16
rows; decode attention at both head layouts, batch 1 and 32, at a 4k context; the sampler at
vocabulary 151936, batch 1 and 32, top-p 0.95), each candidate configuration the kernel
module exports is timed (a CUDA graph of one call per rotated input, replayed and timed with CUDA
events, median of a few samples), checked against the kernel's PyTorch reference, and the fastest
correct one is kept when it beats the kernel's own heuristic (config=None) by more than 2%; that
is the entry the table gets. Inputs rotate through enough copies to exceed the L2 cache, so the
weights and KV are read cold, as in a forward pass.

The whole sweep stops adding shapes after --budget-s seconds (default 280: the issue allows five
minutes) and writes what it has. The kernels read the file at start-up (kernels/tuning.py); with
no entry they use their heuristics. --smoke runs a few tiny shapes on the CPU in Triton's
interpreter (its timings mean nothing) and writes to --out only.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before they are imported

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_json  # noqa: E402
from gpu_kernels import card_info, device_and_dtype, time_per_call  # noqa: E402

from splitreason_engine.kernels import linear_triton as lin  # noqa: E402
from splitreason_engine.kernels import paged_attention_triton as attn  # noqa: E402
from splitreason_engine.kernels import sample_triton as smp  # noqa: E402
from splitreason_engine.kernels.paged_attention import paged_decode_attention_ref  # noqa: E402
from splitreason_engine.kernels.linear import linear_ref, silu_mul_linear_ref  # noqa: E402
from splitreason_engine.kernels.sample import sample_and_detect_ref  # noqa: E402
from splitreason_engine.kernels.tuning import CONFIG_DIR, card_slug  # noqa: E402

# (hidden, intermediate, q heads, kv heads) of the models the engine serves on this card.
MODELS = {"1.5B": (1536, 8960, 12, 2), "32B": (5120, 27648, 40, 8)}
HEAD_DIM = 128
KEEP_MARGIN = 0.98  # a candidate must beat the heuristic by 2% to be written


def projection_shapes(hidden: int, inter: int, heads: int, kv_heads: int) -> list[tuple[str, int, int]]:
    """(kernel, out features, in features) of one decoder layer's projections."""
    qkv = (heads + 2 * kv_heads) * HEAD_DIM
    return [("linear", qkv, hidden), ("linear", hidden, heads * HEAD_DIM), ("linear", 2 * inter, hidden),
            ("silu_mul_linear", hidden, inter)]


def rotations(nbytes: int, smoke: bool) -> int:
    """Copies of an input to cycle through so that the set is >= 4x the L2 cache (cold reads)."""
    if smoke:
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size or 50 * 2**20
    return max(1, min(64, -(-4 * l2 // max(1, nbytes))))


def median_us(calls: list[Callable[[], object]], device: torch.device, smoke: bool) -> float:
    times, _ = time_per_call(calls, device, samples=1 if smoke else 5, inner=1 if smoke else 20)
    return statistics.median(times) * 1e6


def sweep_one(name: str, key: str, candidates: list[dict], make: Callable[[dict | None], list[Callable]],
              check: Callable[[dict | None], bool], device: torch.device, smoke: bool) -> dict:
    """Times the heuristic and every candidate on one shape; returns the row for the table."""
    base = median_us(make(None), device, smoke)
    best, best_us, tried, failed = None, base, 0, 0
    for cand in candidates:
        try:
            us = median_us(make(cand), device, smoke)
            ok = check(cand)
        except Exception as e:  # a configuration that does not compile or fit on this card
            print(f"  {name} {key} {cand}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            failed += 1
            continue
        tried += 1
        if ok and us < best_us * (KEEP_MARGIN if best is None else 1.0):
            best, best_us = cand, us
    return dict(kernel=name, key=key, heuristic_us=base, best_us=best_us, config=best, tried=tried, failed=failed)


def linear_cases(device, dtype, smoke: bool):
    """(kernel, key, candidates, make, check) for every projection shape and row bucket."""
    buckets = (1, 2, 16) if smoke else lin.ROW_BUCKETS
    shapes = [("linear", 40, 72), ("silu_mul_linear", 40, 72)] if smoke else \
        [s for dims in MODELS.values() for s in projection_shapes(*dims)]
    for m in buckets:  # batch 1 first: what split mode's small model runs most
        for kernel, n, k in shapes:
            in_features = 2 * k if kernel == "silu_mul_linear" else k
            copies = rotations(n * k * dtype.itemsize, smoke)
            weights = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for _ in range(copies)]
            x = torch.randn(m, in_features, device=device, dtype=dtype)
            op = lin.silu_mul_linear if kernel == "silu_mul_linear" else lin.linear
            ref = silu_mul_linear_ref if kernel == "silu_mul_linear" else linear_ref

            def make(cfg, op=op, x=x, weights=weights):
                return [lambda w=w: op(x, w, config=cfg) for w in weights]

            def check(cfg, op=op, ref=ref, x=x, w=weights[0]):
                want = ref(x.float(), w.float())
                got = op(x, w, config=cfg).float()
                return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))

            yield (kernel, lin.linear_key(m, n, k, dtype), lin.linear_candidates(m), make, check)


def sample_cases(device, dtype, smoke: bool):
    """The sampler at batch 1 and 32 (the buckets the warm-up reaches, so a tuned variant is
    compiled at start-up), top-p 0.95 at temperature 0.6 (DeepSeek-R1's setting): tokens and
    detection words must equal the reference's."""
    vocab = 3001 if smoke else 151936
    for rows in ((1, 3) if smoke else (1, 32)):
        g = torch.Generator(device=device).manual_seed(rows)
        logits = torch.randn(rows, vocab, device=device, generator=g) * 3
        args = (logits, torch.full((rows,), 0.6, device=device), torch.zeros(rows, dtype=torch.int32, device=device),
                torch.full((rows,), 0.95, device=device), torch.randint(0, 2**62, (rows,), device=device, generator=g),
                vocab, torch.zeros(rows, dtype=torch.int32, device=device),
                torch.zeros(1, vocab, dtype=torch.int32, device=device),
                torch.zeros(1, vocab, dtype=torch.uint8, device=device), torch.zeros(1, dtype=torch.bool, device=device),
                torch.full((rows, 2), vocab - 1, dtype=torch.int32, device=device))
        want = sample_and_detect_ref(*args)
        candidates = ([dict(c, chunk=1024) for c in smp.SAMPLE_CANDIDATES if c["block"] <= 1024][:2] if smoke
                      else smp.SAMPLE_CANDIDATES)

        def make(cfg, args=args):
            return [lambda: smp.sample_and_detect(*args, config=cfg)]

        def check(cfg, args=args, want=want):
            got = smp.sample_and_detect(*args, config=cfg)
            return bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))

        yield ("sample", smp.sample_key(vocab, rows), candidates, make, check)


def attention_cases(device, dtype, smoke: bool):
    """Decode attention at both head layouts, batch 1 and 32 (buckets the warm-up reaches), at a
    4k context: the key has no context, so one entry serves 1k to 32k (min_split_tokens adapts
    the split count). K and V pages are scattered over a pool of several layers' worth of KV."""
    page, context = (5, 60) if smoke else (16, 4096)
    layouts = {"tiny": (6, 2, 16)} if smoke else {m: (h, kv, HEAD_DIM) for m, (_, _, h, kv) in MODELS.items()}
    for batch in ((1, 3) if smoke else (1, 32)):
        for hq, hkv, d in layouts.values():
            pages = batch * -(-context // page)
            copies = rotations(2 * pages * page * hkv * d * dtype.itemsize, smoke)
            g = torch.Generator(device=device).manual_seed(batch * hq)
            caches = [(torch.randn(pages, page, hkv, d, device=device, dtype=dtype, generator=g),
                       torch.randn(pages, page, hkv, d, device=device, dtype=dtype, generator=g)) for _ in range(copies)]
            tables = torch.randperm(pages, device=device, generator=g).to(torch.int32).view(batch, -1)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            q = torch.randn(batch, hq, d, device=device, dtype=dtype, generator=g)
            scale = d ** -0.5
            want = paged_decode_attention_ref(q.float(), caches[0][0].float(), caches[0][1].float(), tables, lens, scale)

            def make(cfg, q=q, caches=caches, tables=tables, lens=lens, scale=scale):
                return [lambda k=k, v=v: attn.paged_decode_attention(q, k, v, tables, lens, scale, config=cfg)
                        for k, v in caches]

            def check(cfg, q=q, kv=caches[0], tables=tables, lens=lens, scale=scale, want=want):
                got = attn.paged_decode_attention(q, *kv, tables, lens, scale, config=cfg).float()
                return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))

            candidates = attn.DECODE_CANDIDATES[:3] if smoke else attn.DECODE_CANDIDATES
            yield ("decode_attention", attn.decode_key(batch, hq, hkv, d, page, dtype), candidates, make, check)


# (share of the budget, cases): the projections dominate a decode step's time.
FAMILIES = [(0.5, linear_cases), (0.25, attention_cases), (0.25, sample_cases)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=280.0, help="stop adding shapes after this many seconds")
    ap.add_argument("--out", help="configuration file (default splitreason_engine/kernels/configs/<card>.json)")
    ap.add_argument("--json", help="the sweep's rows and the machine, as JSON")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, in Triton's interpreter")
    args = ap.parse_args()
    device, dtype = device_and_dtype(args.smoke, "tune_kernels.py")
    info = card_info()
    if args.smoke and not args.out:
        sys.exit("--smoke writes only to an explicit --out")
    out = Path(args.out) if args.out else CONFIG_DIR / f"{card_slug(info['card'])}.json"
    start, rows, skipped, spent = time.perf_counter(), [], 0, 0.0
    for share, cases in FAMILIES:  # each family gets its share of the budget, and what others left
        spent += share * args.budget_s
        for kernel, key, candidates, make, check in cases(device, dtype, args.smoke):
            if time.perf_counter() - start > spent:
                skipped += 1
                continue
            rows.append(sweep_one(kernel, key, candidates, make, check, device, args.smoke))
    table: dict = {}
    for r in rows:
        if r["config"] is not None:
            table.setdefault(r["kernel"], {})[r["key"]] = r["config"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": info["card"], "written_by": "bench/tune_kernels.py", "kernels": table},
                              indent=1, sort_keys=True) + "\n")
    seconds = time.perf_counter() - start
    write_json(args.json, {"machine": info, "host": machine(), "seconds": seconds, "skipped_shapes": skipped,
                           "rows": rows, "config_file": str(out)})
    print(f"\n{info['card'] or 'CPU (interpreter: timings mean nothing)'}; sweep {seconds:.0f} s, "
          f"{skipped} shapes skipped for time; wrote {out}")
    print(f"{'kernel':<18} {'key':<34} {'heuristic us':>12} {'best us':>9} {'gain':>6}  config")
    for r in rows:
        gain = r["heuristic_us"] / r["best_us"]
        print(f"{r['kernel']:<18} {r['key']:<34} {r['heuristic_us']:>12.1f} {r['best_us']:>9.1f} {gain:>5.2f}x  "
              f"{r['config'] or '(heuristic)'}")


if __name__ == "__main__":
    main()
