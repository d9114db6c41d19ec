"""Load generator for any OpenAI-compatible completions endpoint (this engine, vLLM, SGLang).

Sends `--num-requests` streamed completions, either `--concurrency` at a time or as Poisson
arrivals at `--rate` per second, with prompts from `--prompts` (one per line) or random token ids
(`--input-len`, `--output-len`). Reports request throughput, output tokens/s, time to first token,
time per output token (after the first), inter-token latency and end-to-end latency (mean,
median, p99), the HTTP status counts (503s under overload), and the offload figures when the
server returns them in `usage`; prints a table, writes JSON (`--json`) and a PNG of the latency
percentiles (`--plot`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, machine_line, write_json  # noqa: E402


@dataclass
class Result:
    status: int = 0
    start: float = 0.0
    ttft: "float | None" = None
    e2e: "float | None" = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    usage: dict = field(default_factory=dict)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    p.add_argument("--model", help="model id (default: the first of /v1/models)")
    p.add_argument("--num-requests", type=int, default=64)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: 8)")
    g.add_argument("--rate", type=float, help="Poisson arrivals per second instead of fixed concurrency")
    p.add_argument("--duration", type=float, help="with --rate: keep sending for this many seconds instead")
    p.add_argument("--prompts", type=Path, help="file with one prompt per line (default: random token ids)")
    p.add_argument("--input-len", type=int, default=128, help="random prompts: tokens each")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--vocab", type=int, default=200, help="random prompts: ids drawn from [0, vocab)")
    p.add_argument("--extra", type=json.loads, default={}, help='extra request fields as JSON, e.g. \'{"mode": "split"}\'')
    p.add_argument("--server-pid", type=int, help="sample this local process's resident memory every second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a plot of latency percentiles")
    return p.parse_args(argv)


def prompts_for(args) -> list:
    rng = random.Random(args.seed)
    if args.prompts:
        lines = [line for line in args.prompts.read_text().splitlines() if line.strip()]
        return [lines[i % len(lines)] for i in range(args.num_requests)]
    return [[rng.randrange(args.vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]


async def one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    r = Result(start=time.perf_counter())
    try:
        return await _stream(client, url, body, r)
    except httpx.TransportError as e:  # counted, not fatal: status 0 with the error's name
        r.status, r.usage = 0, {"transport_error": type(e).__name__}
        return r


async def _stream(client: httpx.AsyncClient, url: str, body: dict, r: Result) -> Result:
    last = None
    async with client.stream("POST", url, json=body) as resp:
        r.status = resp.status_code
        if resp.status_code != 200:
            await resp.aread()
            return r
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                r.usage = chunk["usage"]
            if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if last is None:
                r.ttft = now - r.start
            else:
                r.itl.append(now - last)
            last = now
            r.output_tokens += 1
    r.e2e = time.perf_counter() - r.start
    if r.usage.get("completion_tokens"):
        r.output_tokens = r.usage["completion_tokens"]
    return r


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def sample_memory(pid: int, samples: list[float]) -> None:
    while True:
        samples.append(rss_mib(pid))
        await asyncio.sleep(1.0)


async def run(args, memory: list[float]) -> tuple[list[Result], float]:
    sampler = asyncio.create_task(sample_memory(args.server_pid, memory)) if args.server_pid else None
    try:
        return await _run(args)
    finally:
        if sampler:
            sampler.cancel()


async def _run(args) -> tuple[list[Result], float]:
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout could close one under us.
    limits = httpx.Limits(max_connections=1000, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        model = args.model or (await client.get(args.base_url + "/models")).json()["data"][0]["id"]
        url = args.base_url + "/completions"
        bodies = [{"model": model, "prompt": p, "max_tokens": args.output_len, "temperature": 0, "stream": True,
                   "ignore_eos": True, "stream_options": {"include_usage": True}, **args.extra}
                  for p in prompts_for(args)]
        start = time.perf_counter()
        if args.rate:
            rng = random.Random(args.seed)
            tasks, k = [], 0
            while (k < len(bodies)) if not args.duration else (time.perf_counter() - start < args.duration):
                tasks.append(asyncio.create_task(one(client, url, bodies[k % len(bodies)])))
                k += 1
                await asyncio.sleep(rng.expovariate(args.rate))
            results = await asyncio.gather(*tasks)
        else:
            gate = asyncio.Semaphore(args.concurrency)

            async def gated(body):
                async with gate:
                    return await one(client, url, body)
            results = await asyncio.gather(*(gated(b) for b in bodies))
        return list(results), time.perf_counter() - start


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200]
    statuses = {str(s) if s else "transport_error": sum(r.status == s for r in results)
                for s in sorted({r.status for r in results})}

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "median": None, "p99": None}
        values = sorted(values)
        return {"mean": statistics.fmean(values), "median": statistics.median(values),
                "p99": values[min(len(values) - 1, int(0.99 * len(values)))]}

    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    out = {"requests": len(results), "completed": len(ok), "status_counts": statuses, "wall_s": wall,
           "request_throughput": len(ok) / wall, "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall,
           "ttft_s": stats([r.ttft for r in ok if r.ttft is not None]), "tpot_s": stats(tpot),
           "itl_s": stats([x for r in ok for x in r.itl]), "e2e_s": stats([r.e2e for r in ok])}
    with_offload = [r.usage for r in ok if "big_tokens" in r.usage]
    if with_offload:
        big = sum(u["big_tokens"] for u in with_offload)
        total = big + sum(u["small_tokens"] for u in with_offload)
        out["offload"] = {"big_tokens": big, "offload_fraction": big / total if total else 0.0,
                          "handoffs": sum(u["handoffs"] for u in with_offload)}
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["ttft_s", "tpot_s", "itl_s", "e2e_s"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, stat in enumerate(["mean", "median", "p99"]):
        values = [1e3 * (summary[n][stat] or 0) for n in names]
        ax.bar([i + 0.27 * (k - 1) for i in range(len(names))], values, width=0.27, label=stat)
    ax.set_xticks(range(len(names)), ["TTFT", "TPOT", "ITL", "end to end"])
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title(f"{summary['completed']} requests, {summary['output_tokens_per_s']:.0f} output tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def server_prefix_caching(base_url: str) -> "bool | None":
    """Whether the server keeps a prefix cache, as its /metrics says (this engine's gauge, or
    vLLM's cache_config_info); None when it does not say."""
    try:
        text = httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    ours = re.search(r"^splitreason_prefix_caching_enabled (\d)", text, re.M)
    vllm = re.search(r'enable_prefix_caching="(\w+)"', text)
    return bool(int(ours.group(1))) if ours else (vllm.group(1) == "True") if vllm else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    memory: list[float] = []
    results, wall = asyncio.run(run(args, memory))
    summary = summarize(results, wall)
    summary["prefix_caching"] = server_prefix_caching(args.base_url)
    if memory:
        summary["server_rss_mib"] = {"first": memory[0], "last": memory[-1], "max": max(memory), "samples": memory}
    summary.update(machine=machine(), config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    print(machine_line(summary["machine"]))
    cache = {True: "on", False: "off", None: "not reported"}[summary["prefix_caching"]]
    print(f"{args.base_url}: {summary['completed']}/{summary['requests']} completed in {wall:.2f} s, "
          f"status {summary['status_counts']}; server's prefix cache {cache}")
    print(f"request throughput {summary['request_throughput']:.2f}/s, output {summary['output_tokens_per_s']:.1f} tok/s")
    print(f"{'ms':<12}{'mean':>10}{'median':>10}{'p99':>10}")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        row = summary[name]
        cells = "".join(f"{1e3 * row[s]:>10.2f}" if row[s] is not None else f"{'-':>10}" for s in ("mean", "median", "p99"))
        print(f"{name[:-2].upper():<12}{cells}")
    if "server_rss_mib" in summary:
        m = summary["server_rss_mib"]
        print(f"server memory (RSS): first {m['first']:.0f} MiB, last {m['last']:.0f} MiB, max {m['max']:.0f} MiB")
    if "offload" in summary:
        o = summary["offload"]
        print(f"offload: {o['big_tokens']} big-model tokens ({100 * o['offload_fraction']:.1f}%), {o['handoffs']} handoffs")
    write_json(args.json, summary)
    if args.plot:
        plot(summary, args.plot)
    return summary


if __name__ == "__main__":
    main()
