"""Microseconds per scheduler step with a full decode batch, the CPU cost paid on every engine step.

Prefills `--num-requests` random prompts, then times steady-state decode steps: schedule() (plan
plus filling the flat arrays), and separately the per-request append() calls through which the
engine hands each sampled token back. The target is us_per_step <= 50, so the scheduler stays
small next to a GPU decode step.

The scheduler runs as the engine runs it, prefix caching on (every full page is keyed and
published as it completes); `--no-prefix-caching` times it off. The figures are medians over
`--repeats` runs of the whole measurement (each a fresh scheduler), with their spread. Checked in
every run: each timed step is a full decode batch. `--smoke` is a seconds-long run (CI).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, machine_line, parse_with_smoke, summary, write_json  # noqa: E402

from splitreason_engine import _C  # noqa: E402

TARGET_US = 50.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256, help="requests decoding together (also max_num_seqs)")
    p.add_argument("--prompt-min", type=int, default=512, help="shortest random prompt, tokens")
    p.add_argument("--prompt-max", type=int, default=1024, help="longest random prompt, tokens")
    p.add_argument("--page-tokens", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-model-len", type=int, default=4096, help="longest sequence a request may reach")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget of one step")
    p.add_argument("--warmup", type=int, default=200, help="untimed decode steps before timing")
    p.add_argument("--steps", type=int, default=2000, help="timed decode steps")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and sampled tokens")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="time the scheduler with prefix caching off (the engine's default is on)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parse_with_smoke(p, dict(num_requests=16, prompt_min=32, prompt_max=64, warmup=10, steps=50,
                                        max_model_len=256))
    if args.prompt_max + args.warmup + args.steps >= args.max_model_len:
        p.error("prompt-max + warmup + steps must stay under max-model-len, or requests finish mid-run")
    if not 1 <= args.prompt_min <= args.prompt_max:
        p.error("need 1 <= prompt-min <= prompt-max")
    return args


def append_sampled(s: _C.Scheduler, tokens: np.ndarray) -> None:
    """What the engine does with a step's samples: one append per sampled request."""
    n = int(s.counts()[3])
    for rid, token in zip(s.buffers(0)["sample_request_ids"][:n].tolist(), tokens[:n].tolist()):
        s.append(rid, 0, [token])


def prefill(s: _C.Scheduler, n: int, tokens: np.ndarray) -> int:
    """Runs steps until every request has sampled a token; returns how many steps that took."""
    counts = s.counts()
    steps = 0
    while counts[2] != n:  # num_decodes: not yet one new token per request
        s.schedule()
        append_sampled(s, tokens)
        steps += 1
    return steps


def run(args: argparse.Namespace) -> dict[str, object]:
    runs = [run_once(args) for _ in range(args.repeats)]
    n = args.num_requests
    result = {key: summary([r[key] for r in runs])["median"] for key in runs[0]}
    result["us_per_step_repeats"] = summary([r["us_per_step"] for r in runs])
    result["us_per_step_with_appends_repeats"] = summary([r["us_per_step_with_appends"] for r in runs])
    return result | {
        "target_us": TARGET_US, "prefix_caching": args.prefix_caching,
        "config": {k: v for k, v in vars(args).items() if k != "json"}
        | {"num_pages": n * math.ceil(args.max_model_len / args.page_tokens)},
        "machine": machine(),
    }


def run_once(args: argparse.Namespace) -> dict[str, float]:
    n = args.num_requests
    num_pages = n * math.ceil(args.max_model_len / args.page_tokens)
    s = _C.Scheduler(num_pages, n, args.max_num_batched_tokens, args.max_model_len, [args.page_tokens],
                     prefix_caching=args.prefix_caching)
    rng = np.random.default_rng(args.seed)
    for rid in range(n):
        length = int(rng.integers(args.prompt_min, args.prompt_max + 1))
        s.add_request(rid, [rng.integers(0, 32000, length).tolist()], [_C.RUN_FOREGROUND])
    tokens = rng.integers(0, 32000, n, dtype=np.int32)
    prefill_steps = prefill(s, n, tokens)
    counts = s.counts()
    sched_ns = np.empty(args.warmup + args.steps, dtype=np.int64)
    total_ns = np.empty_like(sched_ns)
    for k in range(args.warmup + args.steps):
        t0 = time.perf_counter_ns()
        s.schedule()
        t1 = time.perf_counter_ns()
        append_sampled(s, tokens)
        t2 = time.perf_counter_ns()
        sched_ns[k], total_ns[k] = t1 - t0, t2 - t0
        if counts[0] != n or counts[2] != n or counts[3] != n:
            raise RuntimeError(f"step {k} is not a full decode batch: counts {counts.tolist()}")
    assert s.num_preemptions == 0 and s.num_running == n
    sched_us, total_us = sched_ns[args.warmup:] / 1e3, total_ns[args.warmup:] / 1e3
    return {
        "us_per_step": float(sched_us.mean()),
        "us_per_step_with_appends": float(total_us.mean()),
        "us_per_step_p50": float(np.percentile(sched_us, 50)),
        "us_per_step_p99": float(np.percentile(sched_us, 99)),
        "us_per_step_with_appends_p50": float(np.percentile(total_us, 50)),
        "us_per_step_with_appends_p99": float(np.percentile(total_us, 99)),
        "prefill_steps": prefill_steps,
    }


def main() -> None:
    args = parse_args()
    r = run(args)
    m = r["machine"]
    print(machine_line(m))
    print(f"{args.num_requests} requests decoding, page_tokens {args.page_tokens}, prompts "
          f"{args.prompt_min}-{args.prompt_max}, {args.steps} timed steps after {args.warmup} warm-up; prefix "
          f"caching {'on' if args.prefix_caching else 'off'}; medians of {args.repeats} runs (spread of the mean "
          f"{r['us_per_step_repeats']['spread']:.2f})")
    print(f"{'per step':<28}{'mean us':>10}{'p50 us':>10}{'p99 us':>10}")
    print(f"{'schedule + fill':<28}{r['us_per_step']:>10.2f}{r['us_per_step_p50']:>10.2f}{r['us_per_step_p99']:>10.2f}")
    print(f"{'schedule + fill + appends':<28}{r['us_per_step_with_appends']:>10.2f}"
          f"{r['us_per_step_with_appends_p50']:>10.2f}{r['us_per_step_with_appends_p99']:>10.2f}")
    verdict = "meets" if r["us_per_step"] <= TARGET_US else "MISSES"
    print(f"target us_per_step <= {TARGET_US:.0f}: {verdict}")
    write_json(args.json, r)


if __name__ == "__main__":
    main()
