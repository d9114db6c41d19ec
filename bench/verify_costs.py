"""What a verify step of drafting (issue 25) costs on this machine, against the cost model the
simulation in bench/speculate.py charges for it.

One big-model step that verifies k drafts for each of `rows` requests computes k + 1 positions
per request over its context and samples every one of them; then the engine's verify op (the
fused Triton kernel on CUDA, the PyTorch reference elsewhere) decides them. Here each such step is
planned into the engine's own big-model runner as serving plans it (rows chunks of k + 1 tokens
over --context tokens of padding pages: slot -1, nothing stored) and timed with the verify op,
for k = 0..8 and rows in --rows; medians of --repeats after a warm-up run of each shape.

The model: base + per_row * rows + per_token * k * rows, with the calibration file's big-model
figures (bench/costs/h200_1.5b_32b.json, fitted from decode and prefill steps); the table gives
measured / modelled per shape. On a GPU the pair is the 1.5B + 32B shapes with dummy weights
(bench/split_batch.py's), on the CPU the small dummy pair: CPU figures say nothing about a GPU's,
they check the script. bench/device_check.sh runs it on a lent card.

    python bench/verify_costs.py [--json PATH] [--device cuda] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import check_sane, machine, machine_line, parse_with_smoke, write_json  # noqa: E402
from split_batch import write_pair  # noqa: E402

from splitreason_engine import Engine, SamplingParams  # noqa: E402
from splitreason_engine.requests import BIG  # noqa: E402
from splitreason_engine.speculation import VerifyGroup, verify  # noqa: E402
from splitreason_engine.step_costs import StepCosts  # noqa: E402

COSTS = Path(__file__).parent / "costs" / "h200_1.5b_32b.json"


def plan_verify_step(runner, rows: int, k: int, context: int) -> tuple[int, int, int]:
    """Plans `rows` chunks of k + 1 new tokens after `context` tokens each (every slot -1: nothing
    stored; every page table row page 0), every position sampled; returns (seqs, tokens, width)."""
    b, page_tokens = runner.buffers, runner.kv_caches[0][0].shape[1]
    span = k + 1
    tokens = rows * span
    width = -(-(context + span) // page_tokens)
    b["input_ids"][:tokens] = 0
    b["positions"][:tokens] = np.tile(np.arange(context, context + span), rows)
    b["slot_mapping"][:tokens] = -1
    b["query_start_loc"][: rows + 1] = np.arange(rows + 1) * span
    b["seq_lens"][:rows] = context + span
    b["block_tables"][: rows * runner.stride] = 0
    b["logits_indices"][:tokens] = np.arange(tokens)
    return rows, tokens, width


def time_shape(engine: Engine, rows: int, k: int, context: int, repeats: int) -> float:
    """Median seconds of the step and its verify op (k = 0: one plain sampled position per row)."""
    runner, vocab = engine.runners[BIG], engine.real_vocab[BIG]
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0)
    q = torch.full((vocab,), 1 / vocab, device=engine.device)
    groups = [VerifyGroup(params, [i % vocab for i in range(k)], [q] * k, 0) for _ in range(rows)]
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    seconds = []
    for _ in range(repeats + 1):  # the first run warms the shape up
        seqs, tokens, width = plan_verify_step(runner, rows, k, context)
        sync()
        start = time.perf_counter()
        logits = runner.execute(seqs, tokens, 0, tokens, width)
        verify(logits, groups, vocab, generator, BIG, engine.ops.verify_rows).tokens.cpu()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="1,4,16,64", help="requests verifying in one step")
    p.add_argument("--max-k", type=int, default=8, help="drafts per request: 0..max-k")
    p.add_argument("--context", type=int, default=1024, help="tokens each request has before its drafts")
    p.add_argument("--hidden", type=int, default=256, help="CPU pair's hidden size")
    p.add_argument("--small-layers", type=int, default=2)
    p.add_argument("--big-layers", type=int, default=8)
    p.add_argument("--json", metavar="PATH", help="e.g. bench/results/verify_costs_<card>.json")
    args = parse_with_smoke(p, dict(rows="1,4", max_k=2, context=64, hidden=128, small_layers=1, big_layers=1,
                                    repeats=3), repeats=5, argv=argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    model = StepCosts.load(COSTS).models[BIG]
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        small, big, pair = write_pair(Path(tmp), args)
        engine = Engine(small, big, load_format="dummy", device=args.device, max_model_len=args.context + 64,
                        max_num_seqs=max(rows_list), max_num_batched_tokens=max(rows_list) * (args.max_k + 1),
                        prefix_caching=False, progress=False,
                        kv_cache_bytes=None if args.device == "cuda" else 1 << 28)
        shapes = []
        for rows in rows_list:
            for k in range(args.max_k + 1):
                measured = time_shape(engine, rows, k, args.context, args.repeats)
                modelled = model(rows, rows * (k + 1))
                shapes.append({"rows": rows, "k": k, "measured_s": measured, "modelled_s": modelled,
                               "measured_over_modelled": measured / modelled})
                if not measured > 0:
                    failures.append(f"rows {rows}, k {k}: no time measured")
    result = {"machine": machine(), "pair": pair, "device": args.device, "context": args.context,
              "costs_file": COSTS.name, "model": "base + per_row * rows + per_token * k * rows (big model)",
              "shapes": shapes}
    print(f"{pair}; {machine_line(result['machine'])}; context {args.context}; medians of {args.repeats}")
    print("verify step ms (measured / modelled by the calibration file)")
    print("rows " + "".join(f"{'k=' + str(k):>16}" for k in range(args.max_k + 1)))
    for rows in rows_list:
        cells = [s for s in shapes if s["rows"] == rows]
        print(f"{rows:>4} " + "".join(f"{1e3 * s['measured_s']:>8.2f}/{1e3 * s['modelled_s']:<7.2f}" for s in cells))
    write_json(args.json, result)
    check_sane(failures)


if __name__ == "__main__":
    main()
