"""What log-probabilities add to a decode step: batch 32 decoding with no logprobs, with the
chosen token's, and with the top 20 alternatives (SamplingParams.top_logprobs), on the CPU path.

Two models: cpu_decode's random ~25M Qwen2 (vocabulary 4096), and the same shape with
R1-Distill-Qwen's vocabulary (151936), where the log-softmax and top-k over the vocabulary weigh
the most. Each repeat times every decode step of a batch, with the settings interleaved so that
drift on a noisy machine hits them alike; a figure is the median step over the repeats' medians.
Target: top-20 adds at most 10% to a batch-32 decode step.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import check_sane, machine, machine_line, parse_with_smoke, save_random_qwen2, summary, write_json  # noqa: E402
from cpu_decode import MODEL, prompts  # noqa: E402

from splitreason_engine import Engine, SamplingParams  # noqa: E402

SETTINGS = {"none": {}, "logprobs": dict(logprobs=True), "top20": dict(top_logprobs=20)}
TARGET = 1.10


def decode_steps(engine: Engine, inputs: list[list[int]], new_tokens: int, extra: dict, failures: list[str]) -> float:
    """Median seconds per engine step once every request has its first token (pure decode)."""
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens, ignore_eos=True, **extra)
    ids = [engine.add_request(p, params) for p in inputs]
    reqs = [engine._requests[i] for i in ids]
    while any(not r.tokens for r in reqs):
        engine.step()
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for r in reqs:
        if len(r.tokens) != new_tokens:
            failures.append(f"{extra}: a request ended with {len(r.tokens)} tokens")
        if extra.get("top_logprobs") and any(len(lp.top) != extra["top_logprobs"] for lp in r.logprobs):
            failures.append("a token lacks its 20 alternatives")
    return statistics.median(times)


def measure(folder: Path, vocab: int, batch: int, prompt_len: int, new_tokens: int, repeats: int,
            failures: list[str]) -> dict:
    engine = Engine(folder, kv_cache_bytes=512 << 20, max_model_len=1024, prefix_caching=False, progress=False)
    inputs = prompts(batch, prompt_len, vocab)
    decode_steps(engine, inputs, 4, {}, failures)  # warm-up
    steps: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name, extra in SETTINGS.items():
            steps[name].append(decode_steps(engine, inputs, new_tokens, extra, failures))
    return {name: summary(values) for name, values in steps.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--batch", type=int, default=32, help="requests decoding together (default: 32)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--new-tokens", type=int, default=48, help="generated tokens per request (default: 48)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[MODEL["vocab_size"], 151936],
                   help="vocabulary sizes of the model (default: 4096 151936)")
    args = parse_with_smoke(p, dict(batch=4, new_tokens=6, vocabs=[512]), repeats=5)

    results: dict = {"machine": machine(), "model": MODEL, "batch": args.batch, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "target_top20_over_none": TARGET}
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocabs:
            folder = save_random_qwen2(Path(tmp) / f"v{vocab}", **dict(MODEL, vocab_size=vocab))
            results[f"vocab_{vocab}"] = measure(folder, vocab, args.batch, args.prompt_len, args.new_tokens,
                                                args.repeats, failures)
    print(machine_line(results["machine"]))
    print(f"{'vocab':>7} {'none ms':>9} {'logprobs ms':>12} {'top20 ms':>9} {'lp/none':>8} {'top20/none':>11}  spread")
    for vocab in args.vocabs:
        r = results[f"vocab_{vocab}"]
        none, lp, top = (r[k]["median"] for k in SETTINGS)
        r["logprobs_over_none"], r["top20_over_none"] = lp / none, top / none
        spread = max(r[k]["spread"] for k in SETTINGS)
        print(f"{vocab:>7} {none * 1e3:>9.2f} {lp * 1e3:>12.2f} {top * 1e3:>9.2f} {lp / none:>8.3f} {top / none:>11.3f}"
              f"  {spread:.2f}")
    print(f"(batch {args.batch} decode step, median over {args.repeats} repeats of each run's median step; "
          f"temperature 0.8; spread: (max - min) / median of the repeats, worst setting)")
    for vocab in args.vocabs:
        ratio = results[f"vocab_{vocab}"]["top20_over_none"]
        print(f"target top20_over_none <= {TARGET} at vocab {vocab}: {'meets' if ratio <= TARGET else 'MISSES'} "
              f"({ratio:.3f})")
    results["sanity_failures"] = failures
    write_json(args.json, results)
    check_sane(failures)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
