"""bench/device_check.sh's report: merges the steps' statuses, the pytest summaries and the
benchmarks' JSON into device_check_<card>.json (and $OUT), after every step, so a run cut short
still returns what it measured; with --table, prints the final table against the targets of issue
12 (split mode in a batch) and issue 13 (decode against the bandwidth floor, the kernels).

Reads its inputs from the environment device_check.sh sets (DC_*).
"""

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

SKIPPED = 200  # device_check.sh's exit status for a step it did not run (compute-sanitizer missing)


def load(path: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def pytest_summary(log: str) -> "str | None":
    try:
        lines = Path(log).read_text().splitlines()
    except OSError:
        return None
    return next((line.strip("= ") for line in reversed(lines)
                 if re.search(r"\b(passed|failed|errors?|skipped|deselected|no tests ran)\b", line)), None)


def read_steps(path: str) -> list[dict]:
    steps = []
    for line in Path(path).read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        rc = int(rc)
        state = ("ok" if rc == 0 else "TIMEOUT" if rc in (124, 137) else "skipped" if rc == SKIPPED
                 else f"FAILED (exit {rc})")
        steps.append({"step": name, "exit": rc, "seconds": int(seconds), "timeout_s": int(limit), "status": state})
    return steps


def merge(env: dict) -> dict:
    kernels, decode, split = load(env["DC_KERNELS"]), load(env["DC_DECODE"]), load(env["DC_SPLIT"])
    info = kernels or decode or {}
    stress = pytest_summary(env["DC_PYTEST_LOG"])
    return {
        "card": info.get("card"), "driver": info.get("driver"), "torch": info.get("torch"),
        "triton": info.get("triton"), "cuda": info.get("cuda"), "smoke": env["DC_SMOKE"] == "1",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "total_s": int(time.time()) - int(env["DC_START"]),
        "steps": read_steps(env["DC_STATUS"]),
        "pytest": {"summary": stress,
                   "counts": {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)",
                                                              stress or "")}},
        "sanitizers": {tool: pytest_summary(f"{env['DC_LOGS']}/{tool}.log") for tool in ("memcheck", "initcheck")},
        "gpu_decode": decode, "split_batch": split, "gpu_kernels": kernels, "tune_kernels": load(env["DC_TUNE"]),
        "verify_costs": load(env["DC_VERIFY"]),
        "targets": [t for bench in (decode, kernels, split) for t in (bench or {}).get("targets", [])],
    }


def print_table(merged: dict, env: dict) -> None:
    print()
    print("=" * 100)
    print(f"DEVICE CHECK{' (SMOKE: CPU, not a measurement)' if merged['smoke'] else ''} | card {merged['card']} | "
          f"driver {merged['driver']} | torch {merged['torch']} | triton {merged['triton']} | {merged['total_s']} s")
    for s in merged["steps"]:
        extra = {"pytest": merged["pytest"]["summary"], **merged["sanitizers"]}.get(s["step"])
        print(f"  {s['step']:<12} {s['status']:<18} {s['seconds']:>4} s{'  ' + extra if extra else ''}")
    kernels, decode, split = merged["gpu_kernels"], merged["gpu_decode"], merged["split_batch"]
    if decode:
        print(f"  {'decode e2e (tok/s)':<22} {'engine':>8} {'HF':>8} {'floor':>8} {'eng/fl':>7} {'eng/HF':>7}")
        for name, r in decode["models"].items():
            e, h = r.get("engine", {}).get("tok_s"), r.get("hf", {}).get("tok_s")
            f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
            print(f"  {name:<22} {f(e, '.1f'):>8} {f(h, '.1f'):>8} {r['floor_tok_s']:>8.1f} "
                  f"{f(r.get('engine_over_floor'), '.1%'):>7} {f(r.get('engine_over_hf'), '.2f'):>7}"
                  + "".join(f"  {who} error: {r[who]['error'][:60]}" for who in ("engine", "hf")
                            if "error" in r.get(who, {})))
    if split:
        print(f"  split / big-only ({split['headline_policy']}): "
              + ", ".join(f"b{b} random {split.get(f'speedup_b{b}') or 0:.2f}x split "
                          f"{split.get(f'speedup_split_b{b}') or 0:.2f}x" for b in split["config"]["batches"])
              + f" | JIT compiles after start-up: {split.get('jit_compiles_after_startup')}")
    if kernels:
        mm = kernels["matmul"]
        print(f"  ceilings: copy {kernels['copy_bandwidth_gb_s']:.0f} GB/s (read+write) | {mm['n']}^3 {mm['dtype']} "
              f"matmul {mm['best_tflops']:.0f} TFLOP/s")
        print(f"  {'decode attention':<22} {'us':>8} {'of copy':>8} {'ref/krn':>8} {'rel err':>8}")
        for r in kernels["decode_attention"]:
            if "error" in r:
                print(f"  {r['case']:<22} ERROR {r['error'][:70]}")
                continue
            ratio = f"{r['ref_over_kernel']:.1f}" if "ref_over_kernel" in r else "-"
            print(f"  {r['case']:<22} {r['us_best']:>8.1f} {r['copy_fraction']:>8.1%} {ratio:>8} "
                  f"{r['rel_err_vs_fp32']:>8.1e}{'' if r['correct'] else '  WRONG'}")
    for name in ("gpu_decode", "split_batch", "verify_costs", "gpu_kernels", "tune_kernels"):
        if merged[name] is None and f" {name.replace('tune_kernels', 'tune')} " in env["DC_STEPS"]:
            print(f"  {name}: no JSON (the step failed, timed out or did not start: see its log)")
    print("  targets (issue 13: decode and kernels; issue 12: split mode in a batch):")
    for t in merged["targets"]:
        v, unit = t.get("value"), t["unit"]
        value = ("-" if v is None else f"{v:.1f} us" if unit == "us" else f"{v:.1f} tok/s" if unit == "tok/s"
                 else f"{v:.2f}x" if unit == "x" else str(v) if unit == "count" else f"{v:.1%}")
        note = f"  ({t['note']})" if t.get("note") else ""
        print(f"    {t['name']:<44} {value:>11}  {t['target']:<34} {'meets' if t['meets'] else 'MISSES'}{note}")
    failed = [s["step"] for s in merged["steps"] if s["exit"] not in (0, SKIPPED)]
    print(f"  JSON: {env['DC_MERGED']}" + (" (and $OUT)" if env.get("OUT") else "") + f" | logs: {env['DC_LOGS']}"
          + (f" | failed steps: {', '.join(failed)}" if failed else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="also print the final table")
    args = p.parse_args()
    env = os.environ
    merged = merge(env)
    out = Path(env["DC_MERGED"])
    out.write_text(json.dumps(merged, indent=2) + "\n")
    if env.get("OUT"):
        shutil.copy(out, Path(env["OUT"]) / out.name)
        for key in ("DC_KERNELS", "DC_DECODE", "DC_SPLIT", "DC_VERIFY", "DC_TUNE"):
            if Path(env[key]).is_file():
                shutil.copy(env[key], Path(env["OUT"]) / Path(env[key]).name)
    if args.table:
        print_table(merged, env)


if __name__ == "__main__":
    main()
