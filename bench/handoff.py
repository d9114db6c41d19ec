"""Handoff cost against a full re-prefill of the big model's view, at several contexts.

Scenario per context C (a dummy pair, default 4 and 12 layers of hidden 512, on the CPU): the big
model writes a chunk, the small model writes a `--segment`-token segment, then the big model takes
over again at about C tokens of context. The handoff latency (the switch -> the first big token)
is what the engine pays; a two-server orchestrator without a shared cache pays a re-prefill of
the big view instead, timed here as the first-token latency of a big-only request with a prompt of
the same length. The scenario uses the random-switch mode with a seed whose chunk draws are
(big, small, big), so the handoff lands exactly there; split-mode handoffs use the same catch-up.

Target: at 4096 tokens with a 128-token small segment, handoff <= 1/10 of the re-prefill
(`handoff_over_reprefill_4096`), with lazy catch-up (the eager policy is reported beside it).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, machine_line, write_dummy_pair, write_json  # noqa: E402

from splitreason_engine import Engine, SamplingParams  # noqa: E402

TARGET = 0.1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096], help="big-view tokens at the handoff")
    p.add_argument("--segment", type=int, default=128, help="small-model segment before the handoff (tokens)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--small-layers", type=int, default=4)
    p.add_argument("--big-layers", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p.parse_args()


def seed_for(pattern: list[int], ratio: float) -> int:
    """A request seed whose random-mode chunk draws start with `pattern` (1 = big), by the rule
    the engine documents: chunk k goes to the big model iff random.Random(seed)'s k-th draw is
    below 1 / (ratio + 1)."""
    for seed in range(10_000):
        rng = random.Random(seed)
        if [int(rng.random() < 1 / (ratio + 1)) for _ in pattern] == pattern:
            return seed
    raise RuntimeError("no seed found")


def measure(engine: Engine, question: str, chunk: int, seed: int) -> tuple[float, int]:
    """(handoff latency s, big-view tokens at the handoff) of one big / small / big request."""
    params = SamplingParams(mode="random", switch_ratio=1.0, switch_chunk=chunk, seed=seed, max_tokens=2 * chunk + 2,
                            ignore_eos=True, temperature=0)
    out = engine.generate([question], params, use_tqdm=False)[0]
    assert out.token_models[:2 * chunk + 1] == [1] * chunk + [0] * chunk + [1], "chunk draws not as planned"
    big_view = len(engine.tokenizer.encode(engine.template.big(question), add_special_tokens=False)) + 2 * chunk
    return out.metrics.handoff_latencies[0], big_view


def reprefill(engine: Engine, length: int) -> float:
    """First-token latency of a big-only request whose prompt is `length` tokens: a full prefill."""
    params = SamplingParams(mode="big", max_tokens=1, temperature=0, ignore_eos=True)
    out = engine.generate([[65 + i % 26 for i in range(length)]], params, use_tqdm=False)[0]
    return out.metrics.time_to_first_token


def run(args: argparse.Namespace) -> dict:
    rows = []
    seed = seed_for([1, 0, 1], 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        small, big = write_dummy_pair(Path(tmp), args.hidden, args.small_layers, args.big_layers,
                                      max_positions=max(args.contexts) + 1024)
        for context in args.contexts:
            chunk = min(args.segment, context // 4)
            row = {"context": context, "segment": chunk}
            for policy in ("lazy", "eager"):
                engine = Engine(small, big, load_format="dummy", device=args.device, dtype=args.dtype,
                                max_model_len=context + 2 * chunk + 64, max_num_batched_tokens=max(8192, context + 64),
                                kv_cache_bytes=None if args.device != "cpu" else 1 << 30, catch_up=policy,
                                progress=False)
                overhead = len(engine.tokenizer.encode(engine.template.big(""), add_special_tokens=False))
                question = "x" * max(1, context - 2 * chunk - overhead)  # one token per byte
                measure(engine, "warm up", 8, seed_for([1, 0, 1], 1.0))
                best, big_view = min(measure(engine, question, chunk, seed) for _ in range(args.repeats))
                row[f"handoff_{policy}_s"] = best
                row["big_view_tokens"] = big_view
                if policy == "lazy":
                    row["reprefill_s"] = min(reprefill(engine, big_view) for _ in range(args.repeats))
            row["handoff_over_reprefill"] = row["handoff_lazy_s"] / row["reprefill_s"]
            row["handoff_eager_over_reprefill"] = row["handoff_eager_s"] / row["reprefill_s"]
            rows.append(row)
            print(f"  context {context}: done", file=sys.stderr)
    result = {"rows": rows, "target": TARGET, "machine": machine(), "config": vars(args)}
    at_4096 = [r for r in rows if r["context"] == 4096 and r["segment"] == 128]
    if at_4096:
        result["handoff_over_reprefill_4096"] = at_4096[0]["handoff_over_reprefill"]
    return result


def main() -> None:
    args = parse_args()
    r = run(args)
    m = r["machine"]
    print(machine_line(m))
    print(f"dummy pair: hidden {args.hidden}, {args.small_layers} and {args.big_layers} layers, best of {args.repeats}")
    print(f"{'context':>8}{'segment':>9}{'re-prefill ms':>15}{'handoff lazy ms':>17}{'ratio':>8}"
          f"{'handoff eager ms':>18}{'ratio':>8}")
    for row in r["rows"]:
        print(f"{row['big_view_tokens']:>8}{row['segment']:>9}{1e3 * row['reprefill_s']:>15.1f}"
              f"{1e3 * row['handoff_lazy_s']:>17.1f}{row['handoff_over_reprefill']:>8.3f}"
              f"{1e3 * row['handoff_eager_s']:>18.1f}{row['handoff_eager_over_reprefill']:>8.3f}")
    if "handoff_over_reprefill_4096" in r:
        ok = r["handoff_over_reprefill_4096"] <= TARGET
        print(f"target handoff_over_reprefill_4096 <= {TARGET}: {'meets' if ok else 'MISSES'} "
              f"({r['handoff_over_reprefill_4096']:.3f})")
    write_json(args.json, r)


if __name__ == "__main__":
    main()
