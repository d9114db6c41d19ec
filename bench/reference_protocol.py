"""The reference SplitReason orchestration, as a client over two OpenAI-compatible servers, beside
this engine's native split mode on the same prompts.

The reference (the paper's public code) runs the small and the big model as two servers and
drives them over HTTP with text, re-sending the whole text at every call:
- the small model writes until it emits `<bigmodel>` (a stop string);
- the big model then writes in chunks of `--chunk` (64) tokens from the hint-free prompt plus the
  text so far with the tags removed;
- after each chunk the small model is probed with `--probe-tokens` (8) token continuations of
  every token prefix of the chunk, all at once; the first prefix whose probe contains `</big`
  ends the segment there, with `</bigmodel>` appended;
- at most `--max-offload` (512) big tokens per segment, `--max-tokens` overall.
(The reference's own code has an index bug in the probe loop; this client does what it meant.)

Point `--small-url` and `--big-url` at two vLLM servers (vLLM's CPU build here, its GPU build on a
GPU machine) or at two `splitreason serve` processes each holding one model; `--native-url` at a
`splitreason serve --small S --big B` for the native side. Reports wall time per request, big-model
tokens and latency per offloaded token, side by side; `--json` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, machine_line, write_json  # noqa: E402
from serve import server_prefix_caching  # noqa: E402

from splitreason_engine.protocol import PromptTemplate  # noqa: E402
from splitreason_engine.tags import Tags  # noqa: E402
from splitreason_engine.tokenizer import Tokenizer  # noqa: E402

QUESTIONS = ["What is the sum of the first 20 odd numbers?", "Is 221 a prime number?",
             "How many ways can 5 books be arranged on a shelf?", "What is 17 * 23?",
             "Find the remainder of 2^20 divided by 7.", "What is the derivative of x^3 + 2x?",
             "How many diagonals does a hexagon have?", "What is the greatest common divisor of 84 and 126?"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small-url", required=True, help="small-model server, .../v1")
    p.add_argument("--big-url", required=True, help="big-model server, .../v1")
    p.add_argument("--native-url", help="this engine's split server, .../v1 (optional)")
    p.add_argument("--tokenizer", required=True, type=Path, help="folder with the models' tokenizer.json")
    p.add_argument("--prompts", type=Path, help="questions, one per line (default: built-in)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--probe-tokens", type=int, default=8)
    p.add_argument("--max-offload", type=int, default=512)
    p.add_argument("--small-extra", type=json.loads, default={}, help="extra fields for small-model requests (JSON)")
    p.add_argument("--big-extra", type=json.loads, default={}, help="extra fields for big-model requests (JSON)")
    p.add_argument("--max-connections", type=int, default=128,
                   help="HTTP connections per client at once; further requests queue (default: 128)")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


class Client:
    def __init__(self, http: httpx.AsyncClient, url: str, extra: dict):
        self.http, self.url, self.extra, self.model = http, url, extra, None

    async def complete(self, prompt: str, max_tokens: int, **fields) -> dict:
        if self.model is None:
            self.model = (await self.http.get(self.url + "/models")).json()["data"][0]["id"]
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                **self.extra, **fields}
        for attempt in range(3):  # a connection the server closed under us is retried, not fatal
            try:
                r = await self.http.post(self.url + "/completions", json=body)
                break
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError):
                if attempt == 2:
                    raise
        r.raise_for_status()
        return r.json()


async def reference(small: Client, big: Client, tok: Tokenizer, question: str, args) -> dict:
    template, tags = PromptTemplate(), Tags()
    small_prompt, big_prompt = template.small(question), template.big(question)
    start, text, used, big_tokens, offload_time = time.perf_counter(), "", 0, 0, 0.0
    while used < args.max_tokens:
        r = await small.complete(small_prompt + text, args.max_tokens - used, stop=list(tags.open))
        choice = r["choices"][0]
        text += choice["text"]
        used += r["usage"]["completion_tokens"]
        if choice["finish_reason"] != "stop" or choice.get("stop_reason") not in tags.open:
            break  # end of sequence or length
        text += tags.open[0]
        segment_start, seg_big, ended, cut = time.perf_counter(), 0, False, None
        while seg_big < args.max_offload and used < args.max_tokens and not ended:
            want = min(args.chunk, args.max_offload - seg_big, args.max_tokens - used)
            b = await big.complete(big_prompt + tags.strip(text), want)
            chunk = b["choices"][0]["text"]
            ids = tok.encode(chunk, add_special_tokens=False)
            prefixes = [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]
            probes = await asyncio.gather(*(small.complete(small_prompt + text + p, args.probe_tokens)
                                            for p in prefixes))
            cut = next((k for k, pr in enumerate(probes) if "</big" in pr["choices"][0]["text"]), None)
            if cut is not None:
                text += prefixes[cut] + tags.close[0]
                taken, ended = cut + 1, True
            else:
                text += chunk
                taken = len(ids)
                ended = b["choices"][0]["finish_reason"] == "stop"  # the big model ended the sequence
            seg_big += taken
            used += taken
            big_tokens += taken
        if seg_big >= args.max_offload:
            text += tags.close[0]
        offload_time += time.perf_counter() - segment_start
        if ended and cut is None:
            break
    return {"wall_s": time.perf_counter() - start, "big_tokens": big_tokens, "tokens": used,
            "latency_per_offloaded_token_s": offload_time / big_tokens if big_tokens else None}


async def native(client: Client, question: str, args) -> dict:
    start = time.perf_counter()
    r = await client.complete(question, args.max_tokens, mode="split")
    u = r["usage"]
    return {"wall_s": time.perf_counter() - start, "big_tokens": u["big_tokens"], "tokens": u["completion_tokens"],
            "latency_per_offloaded_token_s": u.get("latency_per_offloaded_token_s")}


def summarize(rows: list[dict]) -> dict:
    per_token = [r["latency_per_offloaded_token_s"] for r in rows if r["latency_per_offloaded_token_s"]]
    return {"requests": len(rows), "mean_wall_s": statistics.fmean(r["wall_s"] for r in rows),
            "big_tokens": sum(r["big_tokens"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
            "latency_per_offloaded_token_s": statistics.fmean(per_token) if per_token else None, "rows": rows}


async def run(args) -> dict:
    questions = ([q for q in args.prompts.read_text().splitlines() if q.strip()] if args.prompts else QUESTIONS)
    questions = [questions[i % len(questions)] for i in range(args.num_prompts)]
    tok = Tokenizer(args.tokenizer)
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout could close one under us.
    limits = httpx.Limits(max_connections=args.max_connections, max_keepalive_connections=args.max_connections,
                          keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        small, big = Client(http, args.small_url, args.small_extra), Client(http, args.big_url, args.big_extra)
        start = time.perf_counter()
        ref_rows = await asyncio.gather(*(reference(small, big, tok, q, args) for q in questions))
        result = {"reference": summarize(list(ref_rows)) | {"total_s": time.perf_counter() - start}}
        if args.native_url:
            client = Client(http, args.native_url, args.small_extra)
            start = time.perf_counter()
            native_rows = await asyncio.gather(*(native(client, q, args) for q in questions))
            result["native"] = summarize(list(native_rows)) | {"total_s": time.perf_counter() - start}
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    result.update(machine=machine(), config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    # Whether each server keeps a prefix cache (the reference re-sends the whole text at every call,
    # so a cache changes what it pays): as each server's /metrics says, None where it does not.
    result["prefix_caching"] = {name: server_prefix_caching(url) for name, url in
                                (("small", args.small_url), ("big", args.big_url), ("native", args.native_url)) if url}
    print(machine_line(result["machine"]))
    print("prefix cache per server: " + ", ".join(f"{k} {({True: 'on', False: 'off'}).get(v, 'not reported')}"
                                                  for k, v in result["prefix_caching"].items()))
    print(f"{args.num_prompts} prompts at once, max_tokens {args.max_tokens}, chunk {args.chunk}, "
          f"probes of {args.probe_tokens} tokens")
    print(f"{'':<12}{'total s':>10}{'mean wall s':>13}{'tokens':>8}{'big tokens':>12}{'ms / offloaded tok':>20}")
    for name in ("reference", "native"):
        if name in result:
            r = result[name]
            lat = r["latency_per_offloaded_token_s"]
            print(f"{name:<12}{r['total_s']:>10.2f}{r['mean_wall_s']:>13.2f}{r['tokens']:>8}{r['big_tokens']:>12}"
                  f"{(f'{1e3 * lat:.2f}' if lat else '-'):>20}")
    if "native" in result:
        result["native_over_reference_total"] = result["native"]["total_s"] / result["reference"]["total_s"]
        print(f"native / reference end-to-end time: {result['native_over_reference_total']:.3f}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
