"""The `splitreason` command."""

import argparse
import json
import logging
import sys
import time

from .engine import Engine
from .sampling import MODES, SamplingParams


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models and engine")
    g.add_argument("--small", metavar="PATH", help="small model: a Hugging Face checkpoint folder (config.json, "
                   "safetensors, tokenizer.json); default: the embedded tiny Qwen2 with random weights")
    g.add_argument("--big", metavar="PATH", help="big model checkpoint folder (optional)")
    g.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="auto",
                   help="'dummy' builds random weights from config.json (real shapes, no download); default: auto")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and KV dtype (default: float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output in tokens (default: the models' context)")
    g.add_argument("--kv-cache-bytes", type=int, help="size of the shared KV pool in bytes")
    g.add_argument("--kv-cache-memory-fraction", type=float,
                   help="KV pool as a fraction of memory free after loading (default: 0.9 cuda, 0.05 cpu)")
    g.add_argument("--page-tokens", type=int, default=16,
                   help="tokens per KV page for the model with the most KV per token (default: 16)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step per model, prefill chunks included (default: 2048)")
    g.add_argument("--seed", type=int, default=0, help="engine seed: dummy weights, unseeded sampling (default: 0)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--mode", choices=MODES, default="small", help="which model generates (default: small)")
    g.add_argument("--max-tokens", type=int, default=128, help="most new tokens (default: 128)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    g.add_argument("--sampling-seed", type=int, help="per-request seed: the same seed gives the same tokens")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--logprobs", action="store_true", help="report the log-probability of each chosen token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitreason", description="SplitReason inference engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine set-up (pool size, loading)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt",
                         description="Generate a completion. The prompt comes from the argument, or stdin when "
                                     "the argument is omitted or '-'. Text streams to stdout; a summary line "
                                     "goes to stderr.")
    gen.add_argument("prompt", nargs="?", default="-", help="prompt text, or '-' / omitted to read stdin")
    gen.add_argument("--json", action="store_true", help="print the output as one JSON object instead of text")
    add_engine_options(gen)
    add_sampling_options(gen)
    return parser


def engine_from_args(args) -> Engine:
    return Engine(args.small, args.big, device=args.device, dtype=args.dtype, load_format=args.load_format,
                  page_tokens=args.page_tokens, kv_cache_bytes=args.kv_cache_bytes,
                  kv_cache_memory_fraction=args.kv_cache_memory_fraction, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                  seed=args.seed)


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.sampling_seed,
                          max_tokens=args.max_tokens, stop=args.stop, stop_token_ids=args.stop_token_id,
                          ignore_eos=args.ignore_eos, logprobs=args.logprobs, mode=args.mode)


# Control characters other than newline and tab, shown as U+FFFD so model output cannot drive the terminal.
_CONTROL = {c: 0xFFFD for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F)}


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_from_args(args)
    engine = engine_from_args(args)
    start = time.perf_counter()
    output = None
    tty = sys.stdout.isatty()
    for event in engine.generate_stream([prompt], params):
        if not args.json:
            sys.stdout.write(event.text.translate(_CONTROL) if tty else event.text)
            sys.stdout.flush()
        output = event.output or output
    elapsed = time.perf_counter() - start
    if output.error:
        print(f"error: {output.error}", file=sys.stderr)
        return 2
    n = len(output.token_ids)
    if args.json:
        json.dump({"text": output.text, "token_ids": output.token_ids, "finish_reason": output.finish_reason,
                   "logprobs": output.logprobs, "prompt_tokens": len(output.prompt_token_ids),
                   "time_to_first_token_s": output.metrics.time_to_first_token, "latency_s": output.metrics.latency},
                  sys.stdout)
        print()
    else:
        print()
    print(f"[{args.mode}] {len(output.prompt_token_ids)} prompt + {n} generated tokens in {elapsed:.2f} s "
          f"({n / elapsed:.1f} tok/s), finish: {output.finish_reason}", file=sys.stderr)
    return 0


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
