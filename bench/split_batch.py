"""Split mode in a batch: throughput and latency of each co-scheduling policy against either model alone.

For batch 1, 16 and 64: small-only, big-only, random mode (each 16-token chunk goes to the big model
with probability `--offload`) and split mode with forced segments (a logit_bias on `<bigmodel>`,
calibrated so about `--offload` of the tokens are offloaded, in segments of `--segment` big tokens
ended by max_offload_tokens), under each policy (`eager`: the big model runs whenever a row needs
it; `gather`: big-model work is gathered, with bounded waiting). It reports tokens per second, the
ratio to big-only at the same batch, p50/p99 request latency, handoff latency, the wait before each
big segment, and the big model's step figures (steps, mean rows per step).

Where it runs:
- on a GPU, the 1.5B + 32B shapes (1.5B + 14B on a card under 100 GB), dummy weights, bf16;
- on the CPU, a small dummy pair (`--hidden`, `--small-layers`, `--big-layers`), real forward passes;
- with `--simulate COSTS.json`, the CPU pair's real scheduling and protocol, but each forward step
  charged the step cost the file gives for its model, rows and tokens (bench/costs/h200_1.5b_32b.json
  is fitted from the H200's measurements); every time figure is then simulated, and says so.

Every request is seeded and ignores EOS, so each mode writes the same tokens under every policy
(checked here: a run whose tokens differ between policies fails). Warm-up runs are not timed.
The prefix cache is off: the policies run the same prompts and write the same text, so with it on
every run after the first would find the earlier one's pages, and the comparison would be between
cached and uncached work (checked: every run computes every token it reads). Each row is the
median of `--repeats` runs by wall time, with the spread of tok/s. `--smoke` runs batch 1 and 4
of a tiny pair in seconds, with the same checks (CI).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (check_sane, machine, machine_line, parse_with_smoke, printable_ascii_bias, random_seeds,  # noqa: E402
                    summary, write_dummy_pair, write_json)

from splitreason_engine import Engine, SamplingParams  # noqa: E402
from splitreason_engine.stats import quantile  # noqa: E402
from splitreason_engine.step_costs import SimulatedClock, StepCosts  # noqa: E402

QUESTIONS = ["Question %d: what is the sum of the first %d odd numbers? Show the steps." % (i, i + 3)
             for i in range(256)]
MODES = ("small", "big", "random", "split")
# Issue 12's targets on the H200 (split / big-only tok/s under the headline policy).
TARGETS = {"speedup_b16": 2.0, "speedup_b64": 1.8, "speedup_b1": 4.5}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--policies", nargs="+", default=["eager", "gather"], choices=["eager", "gather"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--tokens", type=int, default=256, help="tokens generated per request")
    p.add_argument("--offload", type=float, default=0.1, help="offload fraction of random and split modes")
    p.add_argument("--segment", type=int, default=16, help="big tokens per forced split segment")
    p.add_argument("--simulate", metavar="COSTS.json", help="charge each step the cost this file gives")
    p.add_argument("--max-wait-s", type=float, help="gather's wait bound (default: from the step costs)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--hidden", type=int, default=256, help="CPU pair: hidden size")
    p.add_argument("--small-layers", type=int, default=2)
    p.add_argument("--big-layers", type=int, default=8)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PNG", help="split / big-only per batch, mode and policy")
    args = parse_with_smoke(p, dict(batches=[1, 4], tokens=32, segment=4, offload=0.25, hidden=128, small_layers=1,
                                        big_layers=2, device="cpu"))
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_pair(root: Path, args) -> tuple[Path, Path, str]:
    """Config folders for the pair (dummy weights) and its name."""
    small, big = write_dummy_pair(root, args.hidden, args.small_layers, args.big_layers, max_positions=4096)
    if args.device != "cuda":
        return small, big, f"CPU pair: hidden {args.hidden}, {args.small_layers} + {args.big_layers} layers"
    import torch
    from common import BASE, MODELS
    from gpu_decode import BIG_CARD_BYTES

    big_name = "32B" if torch.cuda.get_device_properties(0).total_memory > BIG_CARD_BYTES else "14B"
    for folder, name in ((small, "1.5B"), (big, big_name)):
        (folder / "config.json").write_text(json.dumps({**BASE, **MODELS[name]}, indent=2))
    return small, big, f"1.5B + {big_name} (dummy weights, bf16)"


class Runner:
    def __init__(self, engine: Engine, args):
        self.engine, self.args = engine, args
        tok = engine.tokenizer.hf
        self.open_id, self.close_id = tok.token_to_id("<bigmodel>"), tok.token_to_id("</bigmodel>")
        self.text_bias = printable_ascii_bias(engine)  # random weights, but text that round-trips
        self.open_bias = 0.0

    def now(self) -> float:
        return self.engine.clock.now()

    def params(self, mode: str, batch: int, tokens: int) -> list[SamplingParams]:
        base = dict(mode=mode, max_tokens=tokens, ignore_eos=True, logit_bias=self.text_bias)
        if mode == "random":
            return [SamplingParams(**base, seed=s, switch_ratio=1 / self.args.offload - 1, switch_chunk=16)
                    for s in random_seeds(self.args.offload, tokens // 16, batch)]
        if mode == "split":
            bias = {**self.text_bias, self.open_id: self.open_bias, self.close_id: -100.0}
            return [SamplingParams(**{**base, "logit_bias": bias}, seed=i, max_offload_tokens=self.args.segment)
                    for i in range(batch)]
        return [SamplingParams(**base, seed=i) for i in range(batch)]

    def prompts(self, mode: str, batch: int) -> list[str]:
        t = self.engine.template
        return [t.small(q) if mode == "small" else t.big(q) if mode == "big" else q for q in QUESTIONS[:batch]]

    def run(self, mode: str, batch: int, tokens: int) -> tuple[float, list]:
        start = self.now()
        outs = self.engine.generate(self.prompts(mode, batch), self.params(mode, batch, tokens), use_tqdm=False)
        errors = [o.error for o in outs if o.error]
        if errors:
            raise RuntimeError(f"{mode} batch {batch}: {errors[0]}")
        return self.now() - start, outs

    def calibrate(self) -> None:
        """The open-tag bias whose batch-1 split run offloads about `--offload` of its tokens."""
        lo, hi, best = -10.0, 25.0, (float("inf"), 0.0)
        for _ in range(8):
            self.open_bias = (lo + hi) / 2
            got = self.run("split", 1, self.args.tokens)[1][0].metrics.offload_fraction
            best = min(best, (abs(got - self.args.offload), self.open_bias))
            lo, hi = (self.open_bias, hi) if got < self.args.offload else (lo, self.open_bias)
        self.open_bias = best[1]


def measure_row(r: Runner, mode: str, batch: int, policy: str, failures: list[str]) -> tuple[dict, list]:
    """The run of median wall time of `--repeats`, with the spread of tok/s over all of them."""
    runs = [measure_once(r, mode, batch, policy, failures) for _ in range(r.args.repeats)]
    if any(tokens != runs[0][1] for _, tokens in runs):
        raise RuntimeError(f"{mode} batch {batch} {policy}: repeats wrote different tokens")
    runs.sort(key=lambda run: run[0]["wall_s"])
    row = runs[len(runs) // 2][0]
    row["tok_s_repeats"] = summary([run[0]["tok_s"] for run in runs])
    return row, runs[0][1]


def measure_once(r: Runner, mode: str, batch: int, policy: str, failures: list[str]) -> tuple[dict, list]:
    e = r.engine
    e.use_policy(policy, max_wait_s=r.args.max_wait_s)
    before = (list(e.stats.steps), list(e.stats.rows), e.stats.held_steps)
    wall, outs = r.run(mode, batch, r.args.tokens)
    steps = [a - b for a, b in zip(e.stats.steps, before[0])]
    rows = [a - b for a, b in zip(e.stats.rows, before[1])]
    m = [o.metrics for o in outs]
    failures += [f"{mode} batch {batch} {policy}: {sum(mm.cached_tokens)} tokens came from the prefix cache"
                 for mm in m if sum(mm.cached_tokens)]
    tokens = sum(len(o.token_ids) for o in outs)
    handoffs = sorted(x for mm in m for x in mm.handoff_latencies)
    waits = sorted(x for mm in m for x in mm.big_waits)
    latencies = sorted(mm.latency for mm in m)
    row = {"mode": mode, "batch": batch, "policy": policy, "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
           "small_tokens": sum(mm.small_tokens for mm in m), "big_tokens": sum(mm.big_tokens for mm in m),
           "offload_fraction": sum(mm.big_tokens for mm in m) / tokens, "handoffs": sum(mm.handoffs for mm in m),
           "latency_p50_s": quantile(latencies, 0.5), "latency_p99_s": quantile(latencies, 0.99),
           "handoff_p50_s": quantile(handoffs, 0.5), "handoff_p99_s": quantile(handoffs, 0.99),
           "big_wait_p50_s": quantile(waits, 0.5), "big_wait_p99_s": quantile(waits, 0.99),
           "big_wait_max_s": waits[-1] if waits else None,
           "steps_small": steps[0], "steps_big": steps[1], "held_steps": e.stats.held_steps - before[2],
           "mean_rows_per_big_step": rows[1] / steps[1] if steps[1] else None,
           "coschedule": e.policy.describe()}
    return row, [(o.token_ids, o.token_models) for o in outs]


def run(args) -> dict:
    costs = StepCosts.load(args.simulate) if args.simulate else None
    if args.simulate and args.device != "cpu":
        raise SystemExit("--simulate runs the CPU pair: leave --device at cpu")
    with tempfile.TemporaryDirectory() as tmp:
        small, big, pair = write_pair(Path(tmp), args)
        start = time.perf_counter()
        engine = Engine(small, big, load_format="dummy", device=args.device, max_model_len=args.tokens + 512,
                        max_num_seqs=max(args.batches), step_costs=costs, prefix_caching=False,
                        clock=SimulatedClock(costs) if costs else None, progress=False,
                        kv_cache_bytes=None if args.device == "cuda" else 1 << 30)
        startup_s = time.perf_counter() - start
        jit_at_start = engine.stats.jit_counter()
        r = Runner(engine, args)
        if "split" in args.modes:
            r.calibrate()
        rows, tokens_seen, failures = [], {}, []
        for batch in args.batches:
            if not costs:  # warm-up, untimed: every mode at this batch, a few tokens
                for mode in args.modes:
                    r.engine.generate(r.prompts(mode, batch), r.params(mode, batch, 32), use_tqdm=False)
            for mode in args.modes:
                for policy in (args.policies if mode in ("random", "split") else args.policies[:1]):
                    row, tokens = measure_row(r, mode, batch, policy, failures)
                    if tokens_seen.setdefault((mode, batch), tokens) != tokens:
                        raise RuntimeError(f"{mode} batch {batch}: policy {policy} changed the tokens")
                    rows.append(row)
                    print(f"  batch {batch} {mode} {policy}: {row['tok_s']:.1f} tok/s", file=sys.stderr)
        jit_after = engine.stats.jit_counter() - jit_at_start
        measured_costs = engine.step_costs.to_json() if engine.step_costs else None
    result = {"pair": pair, "simulated": bool(costs), "costs_file": args.simulate, "step_costs": measured_costs,
              "startup_s": startup_s, "rows": rows, "machine": machine(), "config": vars(args),
              "prefix_caching": False, "sanity_failures": failures,
              "jit_compiles_after_startup": None if costs or args.device != "cuda" else jit_after}
    add_ratios(result, args)
    return result


def add_ratios(result: dict, args) -> None:
    """split / big-only tok/s per row, and the headline figures under the default policy (gather)."""
    big = {r["batch"]: r["tok_s"] for r in result["rows"] if r["mode"] == "big"}
    small = {r["batch"]: r for r in result["rows"] if r["mode"] == "small"}
    for r in result["rows"]:
        r["speedup_over_big"] = r["tok_s"] / big[r["batch"]] if r["batch"] in big else None
        s, b = small.get(r["batch"]), next((x for x in result["rows"] if x["mode"] == "big" and x["batch"] == r["batch"]), None)
        if r["mode"] in ("random", "split") and s and b:  # the ideal: each token at its model's batch cost
            ideal = r["small_tokens"] * s["wall_s"] / s["tokens"] + r["big_tokens"] * b["wall_s"] / b["tokens"]
            r["ideal_s"], r["efficiency"] = ideal, ideal / r["wall_s"]
    policy = "gather" if "gather" in args.policies else args.policies[0]
    for batch in args.batches:
        for mode, key in (("random", "speedup_b%d"), ("split", "speedup_split_b%d")):
            row = next((x for x in result["rows"] if (x["mode"], x["batch"], x["policy"]) == (mode, batch, policy)), None)
            result[key % batch] = row["speedup_over_big"] if row else None
    result["headline_policy"] = policy
    result["targets"] = targets(result, args)


def targets(result: dict, args) -> list[dict]:
    """Issue 12's targets, in the shape every GPU bench reports them (device_check.sh's table): the
    ratios, batch 1's efficiency, p50 latency against big-only at each batch, no JIT compile after
    start-up. Only a GPU run measures them."""
    policy, rows = result["headline_policy"], result["rows"]
    note = None if args.device == "cuda" and not result["simulated"] else "not a GPU run: not a measurement"
    out = [dict(name=f"split / big-only, batch {key.removeprefix('speedup_b')}", value=result.get(key), unit="x",
                target=f">= {goal}x", meets=result.get(key) is not None and result[key] >= goal)
           for key, goal in TARGETS.items()]
    b1 = next((r for r in rows if (r["mode"], r["batch"], r["policy"]) == ("random", 1, policy)), None)
    if b1 and b1.get("efficiency") is not None:
        out.append(dict(name="batch 1 efficiency (of n_s t_s + n_b t_b)", value=b1["efficiency"], unit="x",
                        target=">= 0.95", meets=b1["efficiency"] >= 0.95))
    for batch in args.batches:
        mine = next((r for r in rows if (r["mode"], r["batch"], r["policy"]) == ("random", batch, policy)), None)
        big = next((r for r in rows if (r["mode"], r["batch"]) == ("big", batch)), None)
        if mine and big:
            ratio = mine["latency_p50_s"] / big["latency_p50_s"]
            out.append(dict(name=f"p50 latency / big-only's, batch {batch}", value=ratio, unit="x", target="<= 1.0",
                            meets=ratio <= 1.0))
    jit = result.get("jit_compiles_after_startup")
    out.append(dict(name="JIT compiles after start-up", value=jit, unit="count", target="0", meets=jit == 0))
    for t in out:
        t["note"] = note or (None if t["value"] is not None else "not measured in this run")
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(r["mode"], r["policy"]) for r in result["rows"] if r["mode"] in ("random", "split")})
    batches = result["config"]["batches"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for k, (mode, policy) in enumerate(series):
        values = [next((r["speedup_over_big"] for r in result["rows"]
                        if (r["mode"], r["policy"], r["batch"]) == (mode, policy, b)), 0) for b in batches]
        ax.bar([i + width * (k - (len(series) - 1) / 2) for i in range(len(batches))], values, width=width,
               label=f"{mode}, {policy}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("tok/s, x big model alone")
    sim = f" (SIMULATED: step costs of {Path(result['costs_file']).name})" if result["simulated"] else ""
    ax.set_title(result["pair"] + sim, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    r = run(args)
    print(machine_line(r["machine"]))
    sim = " -- SIMULATED: every time below is charged from " + args.simulate if r["simulated"] else ""
    print(f"{r['pair']}; {args.tokens} tokens per request; offload {args.offload:.0%} "
          f"(random: chunks of 16; split: segments of {args.segment}){sim}")
    if r["step_costs"]:
        print("step costs (ms): " + "; ".join(f"{name} base {m['base_ms']:.3f} per row {m['per_row_ms']:.4f} per token "
                                              f"{m['per_token_ms']:.4f}" for name, m in zip(("small", "big"), r["step_costs"]["models"]))
              + f" ({r['step_costs']['source']})")
    ms = lambda x: "-" if x is None else f"{1e3 * x:.0f}"  # noqa: E731
    print(f"prefix cache off; median of {args.repeats} runs per row (spread: (max - min) / median of tok/s)")
    print(f"{'mode':<7}{'batch':>6}{'policy':>8}{'tok/s':>10}{'spread':>7}{'x big':>7}{'eff':>6}{'offload':>8}{'lat p50':>9}"
          f"{'p99 ms':>8}{'handoff p50':>12}{'p99 ms':>8}{'wait p50':>9}{'p99 ms':>8}{'big steps':>10}{'rows/big':>9}")
    for x in r["rows"]:
        eff = f"{x['efficiency']:.2f}" if x.get("efficiency") else "-"
        rows_big = f"{x['mean_rows_per_big_step']:.1f}" if x["mean_rows_per_big_step"] else "-"
        print(f"{x['mode']:<7}{x['batch']:>6}{x['policy'] if x['mode'] in ('random', 'split') else '-':>8}"
              f"{x['tok_s']:>10.1f}{x['tok_s_repeats']['spread']:>7.2f}{x['speedup_over_big']:>7.2f}{eff:>6}{100 * x['offload_fraction']:>7.1f}%"
              f"{ms(x['latency_p50_s']):>9}{ms(x['latency_p99_s']):>8}{ms(x['handoff_p50_s']):>12}"
              f"{ms(x['handoff_p99_s']):>8}{ms(x['big_wait_p50_s']):>9}{ms(x['big_wait_p99_s']):>8}"
              f"{x['steps_big']:>10}{rows_big:>9}")
    print(f"split / big-only under {r['headline_policy']}"
          + (" (SIMULATED)" if r["simulated"] else "") + ": "
          + ", ".join(f"batch {b}: random {r.get(f'speedup_b{b}') or 0:.2f}x, split {r.get(f'speedup_split_b{b}') or 0:.2f}x"
                      for b in args.batches))
    for key, target in TARGETS.items():
        if r.get(key) is not None:
            print(f"target {key} >= {target}: {'meets' if r[key] >= target else 'MISSES'} ({r[key]:.2f})")
    if r["jit_compiles_after_startup"] is not None:
        print(f"JIT compiles after start-up: {r['jit_compiles_after_startup']}; start-up {r['startup_s']:.1f} s")
    write_json(args.json, r)
    if args.plot:
        plot(r, args.plot)
    check_sane(r["sanity_failures"])


if __name__ == "__main__":
    main()
