"""Drafting in big segments (issue 25): the demo pair with drafting on and off, measured on this
machine and simulated with the H200's step costs.

- `demo_cpu`: the shipped demo pair, real forward passes on this machine, held-out problems one at a
  time (greedy, 400 tokens at most), split and big modes, drafting off and on. Per mode: big-model
  steps per offloaded token, the acceptance rate, tok/s (median of --repeats runs) and latency per
  offloaded token (off over on: above 1 means drafting made it faster).
- `simulated_h200`: the same engine, requests and tokens, but each forward step charged the H200's
  cost for its model, rows and tokens (bench/costs/h200_1.5b_32b.json; the `auto` choice of k reads
  the same costs) under the default co-scheduling, at batch 1, 16 and 64: the time with drafting
  off over the time with it on (split_b*, big_b1), and latency per offloaded token at batch 1 (off
  over on). Every figure there is SIMULATED: the forward passes are real, their time is not.
- `greedy_token_exact`: every request's tokens are the same with drafting on and off, in every run
  (checked here: a difference fails the run).
- Not here yet: the measured cost of verify steps (k = 0..8 at 1-64 rows) on a GPU, which would check
  the cost model the simulation charges for them (base + per_row * rows + per_token * k * rows).

The prefix cache is off (the settings answer the same problems; with it on, the second would find
the first one's prompts). `--smoke` runs 3 problems, batch 1 and 4, in seconds (CI).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import check_sane, machine, machine_line, parse_with_smoke, summary, write_json  # noqa: E402

from splitreason_engine import Engine, SamplingParams  # noqa: E402
from splitreason_engine.demo import pair_paths  # noqa: E402
from splitreason_engine.demo.evaluate import prompt_for  # noqa: E402
from splitreason_engine.demo.task import evaluation_problems  # noqa: E402
from splitreason_engine.step_costs import SimulatedClock, StepCosts  # noqa: E402

COSTS = Path(__file__).parent / "costs" / "h200_1.5b_32b.json"
TARGETS = {"demo_cpu_big_steps_per_offloaded_token": 0.75, "split_b1": 1.2, "latency_per_offloaded_token_b1": 1.4,
           "split_b16": 1.1, "split_b64": 1.05, "big_b1": 2.0}


def run(engine: Engine, mode: str, problems, batch: int, speculate: "int | None", max_tokens: int) -> dict:
    """Answers `problems` in batches of `batch` (speculate: the requests' own, None for the
    engine's); the engine's clock gives the time."""
    tokens, outs = [], []
    start = engine.clock.now()
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, mode=mode, speculate=speculate)
                  for _ in chunk]
        for out in engine.generate([prompt_for(engine, mode, p) for p in chunk], params, use_tqdm=False):
            if out.error:
                raise RuntimeError(f"{mode}, speculate={speculate}: {out.error}")
            tokens.append(out.token_ids)
            outs.append(out)
    elapsed = engine.clock.now() - start
    m = [o.metrics for o in outs]
    big = sum(x.big_tokens for x in m)
    drafts = sum(x.draft_tokens for x in m)
    return {"tokens": tokens, "time_s": elapsed, "generated": sum(len(t) for t in tokens), "big_tokens": big,
            "big_steps_per_offloaded_token": sum(x.big_steps for x in m) / big if big else None,
            "acceptance": sum(x.accepted_draft_tokens for x in m) / drafts if drafts else None,
            "latency_per_offloaded_token_s": sum(x.catch_up_time + x.big_time for x in m) / big if big else None}


def demo_cpu(problems, speculate, max_tokens: int, repeats: int, failures: list[str]) -> dict:
    engine = Engine(*pair_paths(), prefix_caching=False, speculate=speculate, progress=False)
    result = {}
    for mode in ("split", "big"):
        runs = {name: [run(engine, mode, problems, 1, k, max_tokens) for _ in range(repeats)] for name, k in
                (("off", 0), ("on", None))}
        off, on = runs["off"][0], runs["on"][0]
        _same_tokens(f"demo_cpu {mode}", off, on, failures)
        tok_s = {name: summary([r["generated"] / r["time_s"] for r in rs]) for name, rs in runs.items()}
        lats = {name: [r["latency_per_offloaded_token_s"] for r in rs] for name, rs in runs.items()}
        if any(None in values for values in lats.values()):
            failures.append(f"demo_cpu {mode}: no offloaded tokens, so no latency per offloaded token")
            continue
        lat = {name: statistics.median(values) for name, values in lats.items()}
        result[mode] = {"big_steps_per_offloaded_token": on["big_steps_per_offloaded_token"],
                        "big_steps_per_offloaded_token_off": off["big_steps_per_offloaded_token"],
                        "acceptance": on["acceptance"], "tok_s_off": tok_s["off"], "tok_s_on": tok_s["on"],
                        "speedup": tok_s["on"]["median"] / tok_s["off"]["median"],
                        "latency_per_offloaded_token_ratio": lat["off"] / lat["on"], "big_tokens": on["big_tokens"]}
    return result


def simulated_h200(problems, batch_problems, speculate, max_tokens: int, batches: list[int],
                   failures: list[str]) -> dict:
    costs = StepCosts.load(COSTS)
    result = {}
    for mode, sizes in (("split", batches), ("big", [1])):
        for batch in sizes:
            pool = problems if batch == 1 else batch_problems
            timed = {}
            for name, k in (("off", 0), ("on", None)):
                engine = Engine(*pair_paths(), prefix_caching=False, speculate=speculate, progress=False,
                                clock=SimulatedClock(costs), step_costs=str(COSTS))
                timed[name] = run(engine, mode, pool, batch, k, max_tokens)
            _same_tokens(f"simulated {mode} batch {batch}", timed["off"], timed["on"], failures)
            result[f"{mode}_b{batch}"] = timed["off"]["time_s"] / timed["on"]["time_s"]
            result[f"{mode}_b{batch}_detail"] = {name: {k: v for k, v in r.items() if k != "tokens"}
                                                 for name, r in timed.items()}
            if mode == "split" and batch == 1:
                result["latency_per_offloaded_token_b1"] = (timed["off"]["latency_per_offloaded_token_s"]
                                                            / timed["on"]["latency_per_offloaded_token_s"])
    return result


def _same_tokens(what: str, off: dict, on: dict, failures: list[str]) -> None:
    bad = sum(a != b for a, b in zip(off["tokens"], on["tokens"]))
    if bad:
        failures.append(f"{what}: {bad} requests' tokens differ with drafting on")


def table(result: dict) -> str:
    lines = [f"speculate={result['speculate']}, {result['problems']} problems; {machine_line(result['machine'])}",
             "demo pair on this machine (real forward passes):",
             f"  {'mode':<6} {'big steps/offloaded':>20} {'acceptance':>11} {'tok/s off':>10} {'tok/s on':>9} "
             f"{'lat/offl. off/on':>17}"]
    for mode, r in result["demo_cpu"].items():
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(f"  {mode:<6} {r['big_steps_per_offloaded_token']:>12.3f} (off {r['big_steps_per_offloaded_token_off']:.2f})"
                     f" {acc:>11} {r['tok_s_off']['median']:>10.1f} {r['tok_s_on']['median']:>9.1f}"
                     f" {r['latency_per_offloaded_token_ratio']:>17.2f}")
    sim = result["simulated_h200"]
    lines.append("SIMULATED with the H200 step costs (time off / time on; above 1: drafting is faster):")
    for key in [k for k in sim if not k.endswith("_detail")]:
        target = TARGETS.get(key)
        lines.append(f"  {key:<34} {sim[key]:6.2f}x" + (f"   target >= {target}" if target else ""))
    lines.append(f"greedy tokens identical with drafting on and off: {result['greedy_token_exact']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=60, help="held-out demo problems at batch 1")
    p.add_argument("--batch-problems", type=int, default=128, help="problems for the batched simulations")
    p.add_argument("--speculate", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="drafting when on: auto or the most drafts per big step (default: auto)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--max-tokens", type=int, default=400, help="per problem (a demo answer needs up to 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="e.g. bench/results/speculate.json")
    args = parse_with_smoke(p, dict(problems=2, batch_problems=4, batches="1,4", max_tokens=120, repeats=3), argv=argv)
    problems = evaluation_problems(args.problems, args.seed)
    batch_problems = evaluation_problems(args.batch_problems, args.seed + 1)
    failures: list[str] = []
    began = time.perf_counter()
    result = {"machine": machine(), "speculate": args.speculate, "problems": args.problems,
              "batch_problems": args.batch_problems, "prefix_caching": False, "costs_file": str(COSTS.name),
              "max_tokens": args.max_tokens,
              "demo_cpu": demo_cpu(problems, args.speculate, args.max_tokens, args.repeats, failures),
              "simulated_h200": simulated_h200(problems, batch_problems, args.speculate, args.max_tokens,
                                               [int(b) for b in args.batches.split(",")], failures)}
    result["greedy_token_exact"] = not failures
    result["targets"] = {key: target for key, target in TARGETS.items()}
    result["wall_s"] = time.perf_counter() - began
    print(table(result))
    write_json(args.json, result)
    check_sane(failures)


if __name__ == "__main__":
    main()
