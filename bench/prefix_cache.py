"""Prefix caching: time to first token and throughput on 64 questions under one shared template.

Every prompt is the same few-shot preamble (worked demo problems) followed by its own question,
as in an evaluation harness. The same requests run with the prefix cache on and off, in one run on
one machine, in two ways:
- sequential: one request at a time, so time to first token is the prefill alone;
- burst: all requests at once, so it includes queueing, and output tokens per second is the
  throughput.
Greedy tokens must be identical with and without the cache (exit 1 otherwise).

Target: the cache cuts the mean time to first token by at least the share of the prompt that is
shared (on / off <= 1 - shared share). Two floors stand in the way, and the table shows the first:
only full pages are shared, so the tokens of the last shared partial page are computed again
(prompt tokens computed on / off), and a step that computes only the unshared tokens still reads
every weight and does its host work (the cost of a one-token step).

Each figure is the median of `--repeats` runs (a fresh engine each, so the cache starts empty),
with its spread. Checked in every run (exit 1 otherwise): the runs with the cache off take nothing
from it and compute every prompt token, the runs with it on do hit it, and the tokens are the same.
`--smoke` runs 8 questions on a tiny model in seconds (CI).

Default model: a dummy Qwen2 (random weights, hidden 512, 4 layers, byte-level tokenizer) in small
mode; `--mode split` adds a 12-layer big model (the question then goes into the SplitReason template).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (check_sane, machine, machine_line, parse_with_smoke, summary, write_dummy_pair,  # noqa: E402
                    write_json)

from splitreason_engine import Engine, SamplingParams  # noqa: E402
from splitreason_engine.demo.task import evaluation_problems, sample_problem  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--examples", type=int, default=5, help="worked problems in the shared preamble")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--mode", choices=["small", "split"], default="small")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--small-layers", type=int, default=4)
    p.add_argument("--big-layers", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PNG", help="time-to-first-token distributions, cache on and off")
    args = parse_with_smoke(p, dict(questions=8, examples=2, max_tokens=4, hidden=128, small_layers=1, big_layers=2))
    return args


def preamble(examples: int) -> str:
    """Instructions and worked problems: the part every prompt shares."""
    rng = random.Random(1)
    shots = [sample_problem(rng, held_out=False) for _ in range(examples)]
    text = "Solve each problem step by step and box the final three-digit answer.\n\n"
    return text + "".join(f"Problem: {p.question}\nSolution: {p.trace(tagged=False)}\n\n" for p in shots)


def shared_tokens(prompts: list[list[int]]) -> int:
    """Length of the longest prefix every prompt has in common."""
    n = 0
    while all(len(p) > n and p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def run(engine: Engine, questions: list[str], params: SamplingParams, sequential: bool) -> dict:
    start = time.perf_counter()
    if sequential:
        outs = [engine.generate([q], params, use_tqdm=False)[0] for q in questions]
    else:
        outs = engine.generate(questions, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = [o.metrics.time_to_first_token for o in outs]
    generated = sum(len(o.token_ids) for o in outs)
    return {"tokens": [o.token_ids for o in outs], "ttft_s": ttft, "ttft_mean_s": statistics.mean(ttft),
            "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": sorted(ttft)[int(0.9 * (len(ttft) - 1))],
            "wall_s": wall, "output_tokens_per_s": generated / wall,
            "cached_tokens": sum(sum(o.metrics.cached_tokens) for o in outs),
            "computed_prompt_tokens": sum(min(o.metrics.tokens_processed[0] - o.metrics.cached_tokens[0],
                                              len(o.prompt_token_ids)) for o in outs),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs)}


def main() -> int:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="prefix-cache-"))
    small, big = write_dummy_pair(root, args.hidden, args.small_layers, args.big_layers)
    models = (small, big) if args.mode == "split" else (small,)
    head = preamble(args.examples)
    questions = [head + f"Problem: {p.question}\nSolution:" for p in evaluation_problems(args.questions, seed=7)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, mode=args.mode)
    repeats: list[dict[str, dict]] = []
    for _ in range(args.repeats):
        results: dict[str, dict] = {}
        for caching in (False, True):
            for way in ("sequential", "burst"):  # a fresh engine each: the cache starts empty
                engine = Engine(*models, device=args.device, dtype=args.dtype, load_format="dummy",
                                max_model_len=4096, prefix_caching=caching, progress=False)
                engine.generate(["warm-up, unrelated to the template"], params, use_tqdm=False)
                results[f"{way}_{'on' if caching else 'off'}"] = run(engine, questions, params, way == "sequential")
        repeats.append(results)
    tokenized = [engine.tokenizer.encode(engine.template.small(q) if args.mode == "split" else q,
                                         add_special_tokens=False) for q in questions]
    shared = shared_tokens(tokenized)
    mean_prompt = statistics.mean(len(p) for p in tokenized)
    share = shared / mean_prompt
    failures = []
    for results in repeats:
        for name, r in results.items():
            if name.endswith("_off") and (r["cached_tokens"] or r["computed_prompt_tokens"] < r["prompt_tokens"]):
                failures.append(f"{name}: the cache was off, yet {r['cached_tokens']} tokens came from it and "
                                f"{r['computed_prompt_tokens']} of {r['prompt_tokens']} prompt tokens were computed")
            if name.endswith("_on") and not r["cached_tokens"]:
                failures.append(f"{name}: the cache was on and found nothing")
            if r["tokens"] != results["sequential_off"]["tokens"]:
                failures.append(f"{name}: tokens differ from the cache-off sequential run")
    rows, summaries = [], {}
    for way in ("sequential", "burst"):
        ratio = summary([rep[f"{way}_on"]["ttft_mean_s"] / rep[f"{way}_off"]["ttft_mean_s"] for rep in repeats])
        speed = summary([rep[f"{way}_on"]["output_tokens_per_s"] / rep[f"{way}_off"]["output_tokens_per_s"]
                         for rep in repeats])
        on = repeats[0][f"{way}_on"]
        summaries[way] = {"ttft_on_over_off": ratio["median"], "ttft_on_over_off_repeats": ratio,
                          "meets_target": ratio["median"] <= 1 - share,
                          "identical_tokens": all(rep[f"{way}_on"]["tokens"] == rep[f"{way}_off"]["tokens"]
                                                  for rep in repeats),
                          "throughput_on_over_off": speed["median"], "throughput_on_over_off_repeats": speed,
                          "hit_share": on["cached_tokens"] / on["prompt_tokens"]}
        for name in ("off", "on"):
            runs = [rep[f"{way}_{name}"] for rep in repeats]
            med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
            rows.append((way, name, med("ttft_mean_s") * 1e3, med("ttft_p50_s") * 1e3, med("ttft_p90_s") * 1e3,
                         med("output_tokens_per_s"), runs[0]["cached_tokens"] / runs[0]["prompt_tokens"]))
    m = machine()
    print(machine_line(m))
    print(f"{args.questions} questions, mode {args.mode}, prompt {mean_prompt:.0f} tokens on average, "
          f"{shared} shared ({100 * share:.1f}%), {args.max_tokens} new tokens each; median of {args.repeats} runs")
    print(f"{'way':<11} {'cache':<5} {'TTFT mean ms':>13} {'p50 ms':>9} {'p90 ms':>9} {'out tok/s':>10} {'hit share':>10}")
    for way, name, mean, p50, p90, tps, hit in rows:
        print(f"{way:<11} {name:<5} {mean:>13.1f} {p50:>9.1f} {p90:>9.1f} {tps:>10.1f} {100 * hit:>9.1f}%")
    for way, s in summaries.items():
        print(f"{way}: TTFT on/off {s['ttft_on_over_off']:.3f} (spread {s['ttft_on_over_off_repeats']['spread']:.2f}; "
              f"target <= {1 - share:.3f}: {'PASS' if s['meets_target'] else 'FAIL'}; prompt tokens computed on/off "
              f"{1 - s['hit_share']:.3f}), throughput on/off {s['throughput_on_over_off']:.2f}x, "
              f"tokens identical: {s['identical_tokens']}")
    results = repeats[0]
    write_json(args.json, {"machine": m, "args": vars(args), "prefix_caching": "off and on, fresh engines",
                           "mean_prompt_tokens": mean_prompt, "shared_tokens": shared, "shared_share": share,
                           "summary": summaries, "sanity_failures": failures,
                           "runs": [{k: {f: v for f, v in r.items() if f != "tokens"} for k, r in rep.items()}
                                    for rep in repeats]})
    if args.plot:
        plot(results, args.plot)
    check_sane(failures)
    return 0


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, way in zip(axes, ("sequential", "burst")):
        for name in ("off", "on"):
            ttft = sorted(t * 1e3 for t in results[f"{way}_{name}"]["ttft_s"])
            ax.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], where="post", label=f"cache {name}")
        ax.set(title=way, xlabel="time to first token (ms)", ylabel="share of requests")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
