"""pass@k and maj@k on the demo task through a real `splitreason serve`, and what the n samples of a
prompt cost in prompt tokens.

Each of `--problems` held-out demo problems goes to /v1/completions once with `n` samples (choice j
seeded `--seed + j`), in `--mode` (split by default). In split and random the server puts the
question into the SplitReason template; in small and big the bench sends the model's own prompt
(the server scores a prompt as given there). The demo checker marks every sample. Figures:

- pass@1: the mean over all samples; pass@n: the unbiased estimator 1 - C(n-c, k)/C(n, k) with k = n
  (Chen et al., 2021), averaged over problems; maj@n: the most common answer among the samples that
  give one (ties: the earliest) is right.
- The prompt's sharing: `usage.prompt_tokens` (the prompt, counted once) against
  `usage.prompt_tokens_computed` (what the model computed over the n samples; the rest came from the
  prefix cache). computed / prompt is 1 when the prompt is computed once and n when every sample
  computes its own.
- /metrics' splitreason_prefix_cache_hit_tokens_total, per model, over the run.
- Wall time of the run (one warm-up request before it).

Without --url each repeat starts a fresh server on a free loopback port (the demo pair, with
--server-arg additions), so every repeat begins with an empty cache; figures are medians over the
repeats. With --url it runs once against that server: after one run its cache holds the prompts.
`--smoke`: 2 problems, n=4, one repeat, with the sanity checks (CI).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import check_sane, machine, machine_line, summary, write_json  # noqa: E402
from serve import server_prefix_caching  # noqa: E402
from soak import free_port, parse_metrics  # noqa: E402

from splitreason_engine.demo.task import Problem, evaluation_problems, parse_answer, sample_problem  # noqa: E402
from splitreason_engine.protocol import PromptTemplate  # noqa: E402

HITS = "splitreason_prefix_cache_hit_tokens_total"
FIGURES = ("pass@1", "pass@n", "maj@n", "prompt_tokens_per_request", "computed_tokens_per_request",
           "computed_over_prompt", "cache_hit_tokens_small", "cache_hit_tokens_big", "big_token_share", "wall_s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (default: start the demo pair's)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one argument for the started `splitreason serve` (repeat; write --server-arg=--flag=value)")
    p.add_argument("--model", help="model id (default: the first of /v1/models)")
    p.add_argument("--problems", type=int, default=40, help="held-out demo problems (default: 40)")
    p.add_argument("--problem-seed", type=int, default=0, help="which problems (evaluation_problems' seed)")
    p.add_argument("--n", type=int, default=8, help="samples per problem (default: 8)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="sample j of every problem is seeded seed + j")
    p.add_argument("--mode", default="split", choices=("split", "small", "big", "random"))
    p.add_argument("--max-tokens", type=int, default=400, help="a full demo trace is about 290 tokens")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (each n samples; default: 8)")
    p.add_argument("--repeats", type=int, default=3, help="runs, each on a fresh server (default: 3; 1 with --url)")
    p.add_argument("--json", metavar="PATH", help="e.g. bench/results/pass_at_k.json")
    p.add_argument("--smoke", action="store_true", help="2 problems, n=4, one repeat, with the sanity checks")
    args = p.parse_args(argv)
    if args.smoke:
        args.problems, args.n, args.repeats = 2, 4, 1
    if args.url and args.repeats != 1:
        args.repeats = 1
        print("--url: one run (the server's prefix cache holds the prompts after it)")
    return args


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of the chance that k of the n samples, c of them right, hold a right one."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_right(problem: Problem, texts: list[str]) -> bool:
    answers = [a for a in map(parse_answer, texts) if a is not None]
    return bool(answers) and Counter(answers).most_common(1)[0][0] == problem.answer


def prompt_for(mode: str, question: str) -> str:
    """What the bench sends: the question where the server templates it, else the model's prompt."""
    if mode == "small":
        return PromptTemplate().small(question)
    if mode == "big":
        return PromptTemplate().big(question)
    return question


@contextmanager
def started_server(server_args: list[str], timeout: float = 180.0) -> Iterator[str]:
    """A fresh `splitreason serve` on a free port of 127.0.0.1; yields its URL, stops it after."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "splitreason_engine.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), *server_args], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.perf_counter() + timeout
            while not healthy(url):
                if proc.poll() is not None or time.perf_counter() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not come up:\n{log.read()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def cache_hits(url: str) -> dict[str, float]:
    """Prefix-cache hit tokens so far, per model."""
    metrics = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
    return {m: metrics.get(f'{HITS}{{model="{m}"}}', 0) for m in ("small", "big")}


async def complete(client: httpx.AsyncClient, gate: asyncio.Semaphore, url: str, body: dict) -> dict:
    async with gate:
        r = await client.post(url + "/v1/completions", json=body)
    r.raise_for_status()
    return r.json()


async def ask_all(url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=3600) as client:
        return await asyncio.gather(*(complete(client, gate, url, body) for body in bodies))


def run(url: str, args, problems: list[Problem]) -> dict:
    """One pass over the problems on the server at `url`: its figures and per-problem verdicts."""
    model = args.model or httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    common = dict(model=model, n=args.n, seed=args.seed, temperature=args.temperature, max_tokens=args.max_tokens,
                  mode=args.mode)
    warm = sample_problem(random.Random(args.problem_seed), held_out=False)  # not one of the measured problems
    asyncio.run(ask_all(url, [dict(common, prompt=prompt_for(args.mode, warm.question), n=1)], 1))
    before = cache_hits(url)
    t = time.perf_counter()
    answers = asyncio.run(ask_all(url, [dict(common, prompt=prompt_for(args.mode, p.question)) for p in problems],
                                  args.concurrency))
    wall = time.perf_counter() - t
    after = cache_hits(url)
    texts = [[c["text"] for c in sorted(a["choices"], key=lambda c: c["index"])] for a in answers]
    right = [[parse_answer(t) == p.answer for t in ts] for p, ts in zip(problems, texts)]
    usage = [a["usage"] for a in answers]
    prompt, computed = sum(u["prompt_tokens"] for u in usage), sum(u["prompt_tokens_computed"] for u in usage)
    completion = sum(u["completion_tokens"] for u in usage)
    return {
        "pass@1": sum(sum(r) / len(r) for r in right) / len(problems),
        "pass@n": sum(pass_at_k(len(r), sum(r), len(r)) for r in right) / len(problems),
        "maj@n": sum(majority_right(p, ts) for p, ts in zip(problems, texts)) / len(problems),
        "prompt_tokens_per_request": prompt / len(problems),
        "computed_tokens_per_request": computed / len(problems),
        "computed_over_prompt": computed / prompt,
        "cache_hit_tokens_small": after["small"] - before["small"],
        "cache_hit_tokens_big": after["big"] - before["big"],
        "big_token_share": sum(u.get("big_tokens", 0) for u in usage) / completion,
        "wall_s": wall,
        "prompt_tokens": prompt, "prompt_tokens_computed": computed, "completion_tokens": completion,
        "choices": [len(ts) for ts in texts],
        "correct_per_problem": [sum(r) for r in right],
    }


def sanity(runs: list[dict], args, caching: "bool | None") -> list[str]:
    """What must hold for the figures to mean what they say."""
    failures = []
    for i, r in enumerate(runs):
        if r["choices"] != [args.n] * args.problems:
            failures.append(f"run {i}: a request did not return {args.n} choices: {r['choices']}")
        if not r["pass@1"] <= r["pass@n"] <= 1:
            failures.append(f"run {i}: pass@1 {r['pass@1']} > pass@n {r['pass@n']}")
        shared = args.n * r["prompt_tokens"] - r["prompt_tokens_computed"]
        if caching and shared <= 0:
            failures.append(f"run {i}: the samples shared no prompt tokens though the cache is on")
        hits = r["cache_hit_tokens_big" if args.mode == "big" else "cache_hit_tokens_small"]
        if hits < shared:
            failures.append(f"run {i}: /metrics counts {hits} prompt-model hit tokens, usage {shared}")
    return failures


def report(payload: dict, args) -> str:
    runs, s = payload["runs"], payload["summary"]
    cache = {True: "on", False: "off", None: "not reported"}[payload["prefix_caching"]]
    lines = [machine_line(payload["machine"]),
             f"{args.problems} held-out demo problems (seed {args.problem_seed}), n={args.n}, {args.mode} mode, "
             f"temperature {args.temperature}, seeds {args.seed}..{args.seed + args.n - 1}; {len(runs)} run(s)"
             f"{'' if args.url else ', each on a fresh server'}; prefix cache {cache}",
             f"{'figure':<36}{'median':>10}{'min':>10}{'max':>10}"]
    names = {"pass@n": f"pass@{args.n}", "maj@n": f"maj@{args.n}",
             "computed_over_prompt": f"computed / prompt (1 once, {args.n} each)"}
    for key in FIGURES:
        f = s[key]
        lines.append(f"{names.get(key, key):<36}{f['median']:>10.3f}{f['min']:>10.3f}{f['max']:>10.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    problems = evaluation_problems(args.problems, args.problem_seed)
    runs, caching = [], None
    for _ in range(args.repeats):
        if args.url:
            url = args.url.rstrip("/").removesuffix("/v1")
            caching, result = server_prefix_caching(url), run(url, args, problems)
        else:
            with started_server(args.server_arg) as url:
                caching, result = server_prefix_caching(url), run(url, args, problems)
        runs.append(result)
    payload = {"machine": machine(), "prefix_caching": caching, "config": vars(args), "runs": runs,
               "summary": {key: summary([r[key] for r in runs]) for key in FIGURES},
               "identical_verdicts_across_runs": all(r["correct_per_problem"] == runs[0]["correct_per_problem"]
                                                     for r in runs)}
    payload["sanity_failures"] = sanity(runs, args, caching)
    print(report(payload, args))
    write_json(args.json, payload)
    check_sane(payload["sanity_failures"])
    return payload


if __name__ == "__main__":
    main()
