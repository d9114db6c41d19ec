"""The demo pair's targets (issue 5): accuracy, offload fraction and wall time per mode.

The same evaluation as `splitreason eval-demo` (held-out problems, greedy, one problem at a time
by default; random mode's switch ratio matched to split's offload fraction), plus a plot of
accuracy against wall time per mode.

Targets on 500 problems: big accuracy >= small + 0.30; split accuracy >= small + 0.20 with at
most 15% of tokens from the big model; split accuracy above random at the same offload; split
wall time <= 0.5 x big-only wall time.

The prefix cache is off (the modes answer the same problems, so with it on a later mode would find
an earlier one's prompts). `--smoke` answers 4 problems in every mode and checks the run (CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import check_sane, write_json  # noqa: E402

from splitreason_engine import Engine  # noqa: E402
from splitreason_engine.demo import evaluate, pair_paths  # noqa: E402


def plot(results: dict[str, evaluate.ModeResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results.values():
        ax.scatter(r.wall_s, r.accuracy, s=60)
        ax.annotate(f"{r.mode} ({100 * r.offload_fraction:.1f}% big)", (r.wall_s, r.accuracy),
                    textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("accuracy")
    ax.set_title("demo pair, held-out problems")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="e.g. bench/results/eval_demo.json")
    p.add_argument("--plot", metavar="PNG", help="accuracy against wall time per mode")
    p.add_argument("--smoke", action="store_true", help="4 problems per mode, with the sanity checks")
    args = p.parse_args(argv)
    if args.smoke:
        args.problems = 4
    engine = Engine(*pair_paths(), seed=args.seed, prefix_caching=False, progress=False)
    results = evaluate.evaluate(engine, args.problems, args.seed, args.batch_size, progress=not args.smoke)
    if engine.stats.summary()["prefix_cache_hit_tokens_small"]:
        check_sane(["the prefix cache served tokens, though it was off"])
    text, payload = evaluate.report(results, args.problems, args.seed, args.batch_size)
    print(text)
    write_json(args.json, payload)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
