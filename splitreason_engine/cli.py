"""The `splitreason` command."""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import demo
from .demo import evaluate as demo_eval, train as demo_train
from .engine import Engine
from .engine_config import add_options, config_from_args
from .limits import ServerLimits
from .loader import ModelSource
from .sampling import MODES, SamplingParams, generation_defaults


def add_limit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request limits (past one: 400, or 413 for the body, before any engine work)")
    d = ServerLimits()
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body (default: {d.max_body_bytes})")
    g.add_argument("--max-prompt-tokens", type=int, help="longest prompt in tokens (default: max-model-len - 1)")
    g.add_argument("--max-completion-tokens", type=int, help="largest max_tokens (default: max-model-len - 1)")
    g.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help=f"most stop strings (default: {d.max_stop_strings})")
    g.add_argument("--max-stop-length", type=int, default=d.max_stop_length,
                   help=f"longest stop string in characters (default: {d.max_stop_length})")
    g.add_argument("--max-logit-bias", type=int, default=d.max_logit_bias,
                   help=f"most logit_bias entries (default: {d.max_logit_bias})")
    g.add_argument("--max-messages", type=int, default=d.max_messages,
                   help=f"most chat messages (default: {d.max_messages})")
    g.add_argument("--chat-template-timeout", type=float, default=d.chat_template_timeout_s,
                   help=f"longest a chat template may render, in seconds (default: {d.chat_template_timeout_s:g})")
    g.add_argument("--max-n", type=int, default=d.max_n, help=f"most samples per prompt, n (default: {d.max_n})")
    g.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help=f"most alternatives per token: completions logprobs, chat top_logprobs (default: "
                        f"{d.max_logprobs})")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help=f"most prompts in one completions request (default: {d.max_prompts})")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--mode", choices=MODES, help="split: the small model hands <bigmodel> segments to the big one; "
                   "small / big: one model alone; random: chunks go to either model at random "
                   "(default: split with --big, else small)")
    g.add_argument("--max-offload-tokens", type=int, default=512,
                   help="most big-model tokens per offloaded segment, then the close tag is forced (default: 512)")
    g.add_argument("--switch-ratio", type=float, default=9.0,
                   help="random mode: a chunk goes to the big model with probability 1/(ratio+1) (default: 9)")
    g.add_argument("--switch-chunk", type=int, default=16, help="random mode: tokens per chunk (default: 16)")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)")
    g.add_argument("--max-tokens", type=int, default=512, help="most new tokens (default: 512)")
    g.add_argument("--temperature", type=float, help="0 is greedy (default: the small model's generation_config.json, "
                   "else 1.0; the demo pair's is greedy)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 disables (default: generation_config.json, "
                   "else 0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default: generation_config.json, else 1.0)")
    g.add_argument("--sampling-seed", type=int, help="per-request seed: the same seed gives the same tokens")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--logprobs", action="store_true", help="report the log-probability of each chosen token")
    g.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                   help="also each token's N most likely alternatives, with --json (default: 0)")
    g.add_argument("--prompt-logprobs", type=int, metavar="N",
                   help="score the prompt: each prompt token's log-probability and N alternatives, with --json "
                        "(modes small and big)")


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
    gen.add_argument("--stats", action="store_true",
                     help="print the SplitReason figures (tokens per model, handoffs, catch-up, latencies) to stderr")
    add_options(gen)
    add_sampling_options(gen)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                           description="Serve /v1/completions, /v1/chat/completions (streaming as server-sent "
                                       "events), /v1/models, /health and /metrics (Prometheus).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="queued requests beyond which new ones get 503 with Retry-After (default: 256)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the small model's folder name)")
    serve.add_argument("--api-key", default=os.environ.get("SPLITREASON_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every /v1 route (default: $SPLITREASON_API_KEY; "
                            "none: open)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they end with an "
                            "error (default: 30)")
    serve.add_argument("--default-mode", choices=MODES,
                       help="the mode of requests that name none (default: split with two models, else small); "
                            "clients that cannot send a mode, such as lm-eval's loglikelihood requests, get this one")
    add_limit_options(serve)
    add_options(serve)
    train = sub.add_parser("train-demo", help="train the demo model pair (small with tags, big without)",
                           description="Trains the demo pair on the synthetic multiplication-chain task: the small "
                                       "model on traces whose hard steps are wrapped in <bigmodel> tags, the big one "
                                       "(about ten times larger) on the same traces without tags. Deterministic "
                                       "from --seed; writes OUT/small and OUT/big as checkpoint folders.")
    train.add_argument("--out", required=True, type=Path, help="folder for small/ and big/")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights and the training problems (default: 0)")
    train.add_argument("--small-steps", type=int, default=demo_train.SMALL_STEPS,
                       help=f"optimizer steps of the small model (default: {demo_train.SMALL_STEPS})")
    train.add_argument("--big-steps", type=int, default=demo_train.BIG_STEPS,
                       help=f"optimizer steps of the big model (default: {demo_train.BIG_STEPS})")
    train.add_argument("--batch-size", type=int, default=32, help="problems per step (default: 32)")
    ev = sub.add_parser("eval-demo", help="accuracy, offload and wall time of the demo pair per mode",
                        description="Answers held-out demo problems greedily in small, big, split and random mode "
                                    "(random's switch ratio matched to split's offload fraction) and prints "
                                    "accuracy, offload fraction and wall time per mode. The prefix cache is "
                                    "off: the modes answer the same problems.")
    ev.add_argument("--problems", type=int, default=500, help="held-out problems per mode (default: 500)")
    ev.add_argument("--batch-size", type=int, default=1,
                    help="problems run at once (default: 1, one at a time: the latency of a single query)")
    ev.add_argument("--modes", nargs="+", choices=demo_eval.MODES, default=list(demo_eval.MODES),
                    help="modes to run (default: all four)")
    ev.add_argument("--max-tokens", type=int, default=400, help="most new tokens per answer (default: 400)")
    ev.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON, one object per mode")
    add_options(ev)
    return parser


def model_paths(args) -> "tuple[str | Path, str | Path | None]":
    """The models named on the command line, or the shipped demo pair when none is."""
    if args.small is None and args.big is None:
        return demo.pair_paths()
    if args.small is None:
        raise ValueError("--big needs --small (the model that writes and marks the offloaded segments)")
    return args.small, args.big


def small_checkpoint(args) -> Path:
    """The small model's folder (its tokenizer, chat template and generation_config.json)."""
    return ModelSource(Path(model_paths(args)[0])).folder


def engine_from_args(args) -> Engine:
    small, big = model_paths(args)
    return Engine(config=config_from_args(args, small=small, big=big))


def parse_logit_bias(items: list[str]) -> dict[int, float]:
    bias = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias takes ID=BIAS (e.g. 42=5.0), got {item!r}") from None
        if not sep:
            raise ValueError(f"--logit-bias takes ID=BIAS (e.g. 42=5.0), got {item!r}")
    return bias


def sampling_from_args(args) -> SamplingParams:
    """Options given on the command line, then the small model's generation_config.json, then SamplingParams'."""
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    chosen = {**generation_defaults(small_checkpoint(args)), **given}
    return SamplingParams(**chosen, seed=args.sampling_seed,
                          max_tokens=args.max_tokens, stop=args.stop, stop_token_ids=args.stop_token_id,
                          ignore_eos=args.ignore_eos, logprobs=args.logprobs, top_logprobs=args.top_logprobs,
                          prompt_logprobs=args.prompt_logprobs, mode=args.mode,
                          max_offload_tokens=args.max_offload_tokens, switch_ratio=args.switch_ratio,
                          switch_chunk=args.switch_chunk, logit_bias=parse_logit_bias(args.logit_bias))


# Control characters other than newline and tab, shown as U+FFFD so model output cannot drive the terminal.
_CONTROL = {c: 0xFFFD for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F)}


def marked_text(output, decode, tty: bool) -> str:
    """The output with offloaded (big-model) segments in colour on a terminal, else in [big] markers."""
    parts = []
    for model, text in output.segments(decode):
        text = text.translate(_CONTROL) if tty else text
        if model == 1:
            text = f"\x1b[36m{text}\x1b[0m" if tty else f"[big]{text}[/big]"
        parts.append(text)
    return "".join(parts)


def print_stats(engine: Engine, output) -> None:
    m = output.metrics
    rows = [("mode", m.mode), ("small-model tokens", m.small_tokens), ("big-model tokens", m.big_tokens),
            ("offload fraction", f"{m.offload_fraction:.3f}"), ("handoffs", m.handoffs),
            ("catch-up tokens small / big", f"{m.catch_up_tokens[0]} / {m.catch_up_tokens[1]}"),
            ("tokens processed small / big", f"{m.tokens_processed[0]} / {m.tokens_processed[1]}"),
            ("tokens rolled back", m.rolled_back_tokens),
            ("time small / big / catch-up (s)", f"{m.small_time:.3f} / {m.big_time:.3f} / {m.catch_up_time:.3f}"),
            ("handoff latency mean (ms)", f"{1e3 * sum(m.handoff_latencies) / len(m.handoff_latencies):.2f}"
             if m.handoff_latencies else "-"),
            ("latency per offloaded token (ms)", f"{1e3 * m.latency_per_offloaded_token:.2f}"
             if m.latency_per_offloaded_token else "-"),
            ("drafts kept / verified", f"{m.accepted_draft_tokens} / {m.draft_tokens}"
             + (f" ({m.acceptance_rate:.2f})" if m.draft_tokens else "")),
            ("big steps per offloaded token", f"{m.big_steps_per_offloaded_token:.2f}"
             if m.big_steps_per_offloaded_token is not None else "-"),
            ("peak KV pages small / big", " / ".join(map(str, m.peak_pages[:len(engine.models)]))),
            ("engine: preemptions / big views dropped", f"{engine.scheduler.num_preemptions} / "
                                                        f"{engine.scheduler.num_view_drops}")]
    st = engine.stats.summary()
    if len(engine.models) > 1:
        ms = lambda x: "-" if x is None else f"{1e3 * x:.2f}"  # noqa: E731
        rows += [("engine: co-scheduling", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in st["coschedule"].items())),
                 ("engine: steps small / big", f"{st['steps_small']} / {st['steps_big']}"),
                 ("engine: mean rows per big step", "-" if st["mean_rows_per_big_step"] is None
                  else f"{st['mean_rows_per_big_step']:.1f}"),
                 ("engine: wait before big p50 / p99 (ms)", f"{ms(st['big_wait_p50_s'])} / {ms(st['big_wait_p99_s'])}")]
    rows += [("engine: JIT compiles after start-up", st["jit_compiles_after_startup"])]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=sys.stderr)


def cmd_generate(args) -> int:
    # Like the shell's $(...): the line breaks that end piped text (echo's newline) are not part of it.
    prompt = sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
    params = sampling_from_args(args)
    engine = engine_from_args(args)
    mode = params.mode or ("split" if len(engine.models) > 1 else "small")
    start = time.perf_counter()
    output = None
    tty = sys.stdout.isatty()
    single = mode in ("small", "big")  # one writer: stream as it comes; else mark segments at the end
    for event in engine.generate_stream([prompt], params):
        if single and not args.json:
            sys.stdout.write(event.text.translate(_CONTROL) if tty else event.text)
            sys.stdout.flush()
        output = event.output or output
    elapsed = time.perf_counter() - start
    if output.error:
        print(f"error: {output.error}", file=sys.stderr)
        return 2
    n, m = len(output.token_ids), output.metrics
    if args.json:
        record = {"text": output.text, "token_ids": output.token_ids, "token_models": output.token_models,
                  "finish_reason": output.finish_reason, "logprobs": output.logprobs,
                  "top_logprobs": output.top_logprobs, "prompt_logprobs": output.prompt_logprobs,
                  "prompt_top_logprobs": output.prompt_top_logprobs,
                  "prompt_tokens": len(output.prompt_token_ids), "time_to_first_token_s": m.time_to_first_token,
                  "latency_s": m.latency}
        if args.stats:
            record["stats"] = engine.stats.summary()
        json.dump(record, sys.stdout)
        print()
    else:
        if not single and engine.tokenizer is not None:
            sys.stdout.write(marked_text(output, engine.tokenizer.decode, tty))
        print()
    split = f" (small {m.small_tokens}, big {m.big_tokens}, offload {100 * m.offload_fraction:.1f}%, " \
            f"{m.handoffs} handoffs)" if not single else ""
    print(f"[{mode}] {len(output.prompt_token_ids)} prompt + {n} generated tokens{split} in {elapsed:.2f} s "
          f"({n / elapsed:.1f} tok/s), finish: {output.finish_reason}", file=sys.stderr)
    if args.stats and not args.json:
        print_stats(engine, output)
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from . import chat
    from .async_engine import AsyncEngine
    from .server import GracefulServer, build_app

    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be at least 0, got {args.shutdown_timeout}")
    limits = ServerLimits(args.max_body_bytes, args.max_prompt_tokens, args.max_completion_tokens,
                          args.max_stop_strings, args.max_stop_length, args.max_logit_bias, args.max_messages,
                          args.chat_template_timeout, args.max_n, args.max_logprobs, args.max_prompts)
    checkpoint = small_checkpoint(args)
    name = args.served_model_name or ("splitreason-demo" if args.small is None else checkpoint.name)
    engine = AsyncEngine(lambda: engine_from_args(args), args.max_waiting)
    try:
        defaults = generation_defaults(checkpoint)
        if args.default_mode is not None:
            defaults["mode"] = args.default_mode
        app = build_app(engine, name, chat.load_chat_template(checkpoint), defaults, args.api_key or None, limits)
        server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"), engine,
                                args.shutdown_timeout)
        auth = "API key required" if args.api_key else "no API key"
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({auth})", file=sys.stderr, flush=True)
        server.run()
    finally:
        engine.shutdown()
    return 0


def cmd_train_demo(args) -> int:
    for name, value in (("--small-steps", args.small_steps), ("--big-steps", args.big_steps),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    logs = demo_train.train_pair(args.out, args.seed, args.small_steps, args.big_steps, args.batch_size)
    for name, log in logs.items():
        last = log["steps"][-1]
        print(f"{name}: {log['parameters'] / 1e6:.2f}M parameters, {log['config']['steps']} steps in "
              f"{log['train_seconds']:.0f} s, final loss {last['loss']:.4f}, hard-step accuracy "
              f"{last['hard_step_accuracy']:.3f} -> {args.out / name}")
    return 0


def cmd_eval_demo(args) -> int:
    if args.problems < 1 or args.batch_size < 1:
        raise ValueError("--problems and --batch-size must be at least 1")
    args.prefix_caching = False  # the modes share prompts: their wall times compare only without reuse
    engine = engine_from_args(args)
    results = demo_eval.evaluate(engine, args.problems, args.seed, args.batch_size, args.max_tokens, args.modes)
    text, payload = demo_eval.report(results, args.problems, args.seed, args.batch_size)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"generate": cmd_generate, "serve": cmd_serve, "train-demo": cmd_train_demo,
                    "eval-demo": cmd_eval_demo}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
