"""How close split and random modes come to the ideal cost of their token mix.

For offload fractions of about 2%, 5% and 10%, at batch 1 and batch 16, on a dummy pair (default 4
and 12 layers of hidden 512): the measured wall time of generating `--tokens` tokens per request,
beside the ideal n_small * c_small + n_big * c_big, where c_small and c_big are each model's lowest
cost per token, measured in the same run by small-only and big-only runs of the same length at
every batch size from 1 up to the run's (powers of two). The ideal has no handoffs, no catch-up
prefill and no shadow decoding, and charges every token at its model's cheapest batch, so it
bounds the measured time from below and efficiency = ideal / measured <= 1 is what the protocol
overhead leaves. (Charging a big token at the full batch's cost alone is no bound: a split run's
big steps carry few rows, and on a CPU a step of few rows costs less.)

No reuse: the prefix cache is off, and every run has questions of its own. Figures are medians
of `--repeats` runs (fresh questions each), with their spread; efficiency is computed per repeat.

Random weights write random bytes, mostly invalid UTF-8, which re-tokenizes into more tokens than
it came from; a logit_bias keeps every run to printable ASCII, so text round-trips as real text does.
The offload fraction is forced: in split mode by a logit_bias on the `<bigmodel>` token
(calibrated here by bisection; sampling at temperature 1 with a seed per request, so the tag's
probability moves smoothly with the bias) with segments of exactly `--segment` big tokens (the close tag
biased away, so max_offload_tokens ends each segment); in random mode by switch_ratio = 1/f - 1
with chunks of 16 and seeds whose draws come closest to f.

Target: efficiency >= 0.85 at batch 1 on the CPU (`efficiency_b1`: the lowest over the fractions
and both modes), with a spread <= 10% over repeats. `--smoke` runs a tiny pair for seconds and
checks that every single-model run computed all of its own tokens (CI; a full run also fails when
an efficiency exceeds 1).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (check_sane, machine, machine_line, parse_with_smoke, printable_ascii_bias, random_seeds,  # noqa: E402
                    summary, write_dummy_pair, write_json)

from splitreason_engine import Engine, SamplingParams  # noqa: E402

TARGET = 0.85
TARGET_SPREAD = 0.10
FRESH = itertools.count(3)  # every run's questions are new: nothing is reused


def fresh_questions(count: int) -> list[str]:
    return ["What is the sum of the first %d odd numbers?" % next(FRESH) for _ in range(count)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.10])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens", type=int, default=512, help="tokens generated per request")
    p.add_argument("--segment", type=int, default=8, help="big tokens per split-mode segment")
    p.add_argument("--switch-chunk", type=int, default=16, help="random-mode chunk")
    p.add_argument("--catch-up", choices=["lazy", "eager"], default="lazy")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--small-layers", type=int, default=4)
    p.add_argument("--big-layers", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parse_with_smoke(p, dict(fractions=[0.1], batches=[1, 4], tokens=48, segment=4, hidden=128, small_layers=1,
                                        big_layers=2, switch_chunk=8))
    return args


class Bench:
    def __init__(self, engine: Engine, args: argparse.Namespace):
        self.engine, self.args = engine, args
        self.open_id = engine.tokenizer.hf.token_to_id("<bigmodel>")
        self.close_id = engine.tokenizer.hf.token_to_id("</bigmodel>")
        self.text_bias = printable_ascii_bias(engine)  # random weights, but text that round-trips
        self.failures: list[str] = []  # baselines that did not mean what they say

    def timed(self, prompts, params) -> tuple[float, list]:
        start = time.perf_counter()
        outs = self.engine.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, outs

    def single(self, batch: int, mode: str) -> float:
        """Wall time of `batch` one-model requests with the templated prompts of that model, each
        computed in full (the cache is off)."""
        template = self.engine.template
        prompts = [template.small(q) if mode == "small" else template.big(q) for q in fresh_questions(batch)]
        params = [SamplingParams(mode=mode, max_tokens=self.args.tokens, ignore_eos=True, seed=i,
                                 logit_bias=self.text_bias) for i in range(batch)]
        wall, outs = self.timed(prompts, params)
        m = int(mode == "big")
        self.failures += [f"{mode} batch {batch}: a prompt of {len(o.prompt_token_ids)} tokens computed "
                          f"{o.metrics.tokens_processed[m] - o.metrics.cached_tokens[m]} of its "
                          f"{len(o.prompt_token_ids) + len(o.token_ids) - 1} tokens"
                          for o in outs if o.metrics.tokens_processed[m] - o.metrics.cached_tokens[m]
                          < len(o.prompt_token_ids) + len(o.token_ids) - 1]
        return wall

    def cost_per_token(self, batch: int, mode: str) -> float:
        """The model's lowest cost per token at any batch size up to `batch` (powers of two and
        `batch` itself), medians of the repeats: a lower bound on what a token of it costs."""
        sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= batch} | {batch})
        return min(statistics.median(self.single(b, mode) for _ in range(self.args.repeats)) / (b * self.args.tokens)
                   for b in sizes)

    def split_params(self, bias: float, seed: int = 0) -> SamplingParams:
        return SamplingParams(mode="split", max_tokens=self.args.tokens, ignore_eos=True, seed=seed,
                              max_offload_tokens=self.args.segment,
                              logit_bias={**self.text_bias, self.open_id: bias, self.close_id: -100.0})

    def calibrate(self, fraction: float) -> float:
        """The open-tag bias whose batch-1 split run offloads about `fraction` of its tokens."""
        lo, hi = -10.0, 20.0
        best = (float("inf"), 0.0)
        for _ in range(8):
            mid = (lo + hi) / 2
            out = self.engine.generate(fresh_questions(1), self.split_params(mid), use_tqdm=False)[0]
            got = out.metrics.offload_fraction
            best = min(best, (abs(got - fraction), mid))
            lo, hi = (mid, hi) if got < fraction else (lo, mid)
        return best[1]

    def run_mode(self, mode: str, batch: int, fraction: float, bias: float) -> tuple[float, list]:
        if mode == "split":
            return self.timed(fresh_questions(batch), [self.split_params(bias, i) for i in range(batch)])
        params = [SamplingParams(mode="random", max_tokens=self.args.tokens, ignore_eos=True,
                                 switch_ratio=1 / fraction - 1, switch_chunk=self.args.switch_chunk, seed=s,
                                 logit_bias=self.text_bias)
                  for s in random_seeds(fraction, self.args.tokens // self.args.switch_chunk, batch)]
        return self.timed(fresh_questions(batch), params)


def run(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small, big = write_dummy_pair(Path(tmp), args.hidden, args.small_layers, args.big_layers)
        engine = Engine(small, big, load_format="dummy", device=args.device, dtype=args.dtype,
                        max_model_len=args.tokens + 256, catch_up=args.catch_up, prefix_caching=False,
                        kv_cache_bytes=None if args.device != "cpu" else 1 << 30, progress=False)
        b = Bench(engine, args)
        b.single(1, "small")  # warm-up
        biases = {f: b.calibrate(f) for f in args.fractions}
        for batch in args.batches:
            c_small, c_big = b.cost_per_token(batch, "small"), b.cost_per_token(batch, "big")
            for fraction in args.fractions:
                for mode in ("split", "random"):
                    runs = []
                    for _ in range(args.repeats):
                        wall, outs = b.run_mode(mode, batch, fraction, biases[fraction])
                        n_small = sum(o.metrics.small_tokens for o in outs)
                        n_big = sum(o.metrics.big_tokens for o in outs)
                        runs.append({"wall": wall, "ideal": n_small * c_small + n_big * c_big,
                                     "offload": n_big / (n_small + n_big),
                                     "handoffs": sum(o.metrics.handoffs for o in outs) / batch,
                                     "big_catch_up": sum(o.metrics.catch_up_tokens[1] for o in outs) / batch,
                                     "small_reads": sum(o.metrics.catch_up_tokens[0] for o in outs) / batch})
                    efficiency = summary([r["ideal"] / r["wall"] for r in runs])
                    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
                    rows.append({"mode": mode, "batch": batch, "target_fraction": fraction,
                                 "offload_fraction": med("offload"), "handoffs_per_request": med("handoffs"),
                                 # Where the overhead goes: text the big model reads at handoffs and
                                 # big tokens the small model reads to decide where segments end.
                                 "big_catch_up_per_request": med("big_catch_up"),
                                 "small_reads_per_request": med("small_reads"),
                                 "c_small_ms": 1e3 * c_small, "c_big_ms": 1e3 * c_big,
                                 "ideal_s": med("ideal"), "measured_s": summary([r["wall"] for r in runs]),
                                 "efficiency": efficiency["median"], "efficiency_repeats": efficiency})
                    if efficiency["max"] > 1.0 and not args.smoke:  # timing: no verdict from a smoke run
                        b.failures.append(f"{mode} batch {batch} at {fraction}: efficiency {efficiency['max']:.3f} "
                                          "> 1, so the ideal is no bound")
                    print(f"  batch {batch} {mode} {fraction:.2f}: done", file=sys.stderr)
    b1 = [r for r in rows if r["batch"] == 1]
    return {"rows": rows, "efficiency_b1": min((r["efficiency"] for r in b1), default=None),
            "efficiency_b1_split": min((r["efficiency"] for r in b1 if r["mode"] == "split"), default=None),
            "spread_b1": max((r["efficiency_repeats"]["spread"] for r in b1), default=None),
            "split_biases": biases, "target": TARGET, "target_spread": TARGET_SPREAD, "prefix_caching": False,
            "sanity_failures": b.failures, "machine": machine(), "config": vars(args)}


def main() -> None:
    args = parse_args()
    r = run(args)
    print(machine_line(r["machine"]))
    print(f"dummy pair: hidden {args.hidden}, {args.small_layers} and {args.big_layers} layers; "
          f"{args.tokens} tokens per request; catch-up {args.catch_up}; prefix cache off, fresh questions; "
          f"median of {args.repeats} runs")
    print(f"{'mode':<8}{'batch':>6}{'offload':>9}{'handoffs':>10}{'big reads':>10}{'small reads':>12}"
          f"{'c_small ms':>12}{'c_big ms':>10}{'ideal s':>9}{'measured s':>12}{'efficiency':>12}{'spread':>8}")
    for row in r["rows"]:
        print(f"{row['mode']:<8}{row['batch']:>6}{100 * row['offload_fraction']:>8.1f}%{row['handoffs_per_request']:>10.1f}"
              f"{row['big_catch_up_per_request']:>10.0f}{row['small_reads_per_request']:>12.0f}"
              f"{row['c_small_ms']:>12.2f}{row['c_big_ms']:>10.2f}{row['ideal_s']:>9.2f}"
              f"{row['measured_s']['median']:>12.2f}{row['efficiency']:>12.3f}{row['efficiency_repeats']['spread']:>8.3f}")
    print("(per request: handoffs; tokens of catch-up the big model prefilled; tokens the small model read "
          "from the other model. c: each model's lowest cost per token over batch sizes up to the row's; "
          "spread: (max - min) / median of the efficiencies)")
    if r["efficiency_b1"] is not None:
        ok = r["efficiency_b1"] >= TARGET and r["spread_b1"] <= TARGET_SPREAD
        print(f"target efficiency_b1 >= {TARGET} with spread <= {TARGET_SPREAD}: {'meets' if ok else 'MISSES'} "
              f"({r['efficiency_b1']:.3f}, spread {r['spread_b1']:.3f})")
    write_json(args.json, r)
    check_sane(r["sanity_failures"])


if __name__ == "__main__":
    main()
