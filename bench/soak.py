"""Soak and chaos run of the real server: `splitreason serve` on the shipped demo pair, under an
open-loop mix of good, cut-off, malformed, oversized, unauthorised and bursty requests.

1. Starts `python -m splitreason_engine.cli serve` on a free port (the demo pair on the CPU unless
   the server arguments say otherwise; pass them with `--server-arg=ARG`, repeated, or after `--`),
   with `--api-key` (restarted without it if that server does not know the flag yet).
2. Capacity probe: `--probe-concurrency` clients in a closed loop for `--probe-s` seconds, on the
   valid part of the mix (endpoints, modes, streamed or not, max_tokens varied): completed requests
   per second of the window, each counted for the share of its lifetime inside the window (those
   running at its end are waited for), so that all clients starting at once biases nothing.
3. Soak: Poisson arrivals at `--load` times that capacity for `--duration` seconds. Every arrival
   is drawn (seeded) from the mix: /v1/completions and /v1/chat/completions, modes split / small /
   big / random, streamed or not, demo-task questions. Chaos shares: streamed requests closed at a
   random chunk (`--disconnect`, of the streamed ones), non-streamed ones cut by a client timeout
   (`--abort`, of the non-streamed ones), malformed bodies (`--malformed`), oversized ones
   (`--oversized`: a body over the body limit, max_tokens over the limit, too many or too long stop
   strings, a huge logit_bias, too many chat messages, a prompt over the context), wrong or missing
   API keys (`--wrong-key`), and one burst of `--burst` requests at once (503 with Retry-After
   expected once more than --max-waiting are queued; it goes after the first requests below, and
   by default before the RSS reference). Besides the Poisson arrivals, the soak starts with one
   request of every kind and variant (`--cover-spacing` apart), so a short run sees them all.
   Oversized requests are streamed and, should the server accept one, closed after its first
   chunk: the status is the finding. A 503 to a request that should have been refused counts
   neither way in the refusal checks.
4. Every request is classified: completed (final chunk or 200 body with finish_reason stop/length),
   disconnected / aborted by us, rejected 4xx (by status and error param/code), overload 503,
   error (5xx, finish_reason "error", a stream without [DONE], a refused connection), and LOST: the
   server took it, we did not cancel it, yet no final chunk came (the stream ended early, the
   connection broke, or no answer within `--request-timeout`). "Accepted" counts the 200s.
5. The server's RSS (VmRSS) and the requests in flight are sampled every `--sample-s` seconds;
   the RSS drift is measured against the sample at `--warmup` of the soak.
6. Then: wait until /metrics says idle (running 0, waiting 0), compare kv_pages_free with
   kv_pages_total (null if the server has no such metric; the leak check then uses the free pages
   before any traffic), send SIGTERM and time the exit (-15 means the signal killed it).

Prints a table last, writes JSON (`--json`) and optionally a PNG of RSS and in-flight requests over
time (`--plot`). Exit status 1 if a request was lost, pages leaked, the server did not go idle or
did not exit 0 (with `--strict`, also if any other check failed: errors, a refusal that was not a
4xx / 401, the RSS drift, a missing metric).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, machine_line, write_json  # noqa: E402
from serve import server_prefix_caching  # noqa: E402

from splitreason_engine.demo.task import sample_problem  # noqa: E402
from splitreason_engine.stats import quantile  # noqa: E402

MODES = ("split", "small", "big", "random")
MALFORMED = ("bad_json", "not_object", "wrong_type", "unknown_mode", "negative_max_tokens", "missing_messages",
             "unknown_model")
OVERSIZED = ("body", "max_tokens", "stop_count", "stop_length", "logit_bias", "messages", "prompt_tokens")
AUTH = ("wrong_key", "missing_key")
# The status each refusal should get (any 4xx passes the 4xx checks; these are the exact ones).
EXPECTED_STATUS = {**{f"malformed:{s}": 400 for s in MALFORMED}, "malformed:unknown_model": 404,
                   **{f"oversized:{s}": 400 for s in OVERSIZED}, "oversized:body": 413,
                   **{f"auth:{s}": 401 for s in AUTH}}
CLASSES = ("completed", "disconnected", "aborted", "rejected", "overload", "error", "lost")
# Server limits the oversized requests are sized from, as the flags' defaults (read from the
# server arguments when given there).
LIMIT_DEFAULTS = {"--max-body-bytes": 1 << 20, "--max-completion-tokens": None, "--max-stop-strings": 16,
                  "--max-stop-length": 256, "--max-logit-bias": 1024, "--max-messages": 256,
                  "--max-prompt-tokens": None, "--max-model-len": None, "--max-waiting": 256}


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    after = []
    if "--" in argv:
        i = argv.index("--")
        argv, after = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one argument for `splitreason serve` (repeat; write --server-arg=--flag=value); "
                        "everything after `--` is passed too")
    p.add_argument("--port", type=int, help="server port (default: a free one)")
    p.add_argument("--api-key", default="soak-key", help="key the server is started with (default: soak-key)")
    p.add_argument("--probe-s", type=float, default=45.0, help="capacity probe length in seconds (default: 45)")
    p.add_argument("--probe-concurrency", type=int, default=8, help="closed-loop clients of the probe (default: 8)")
    p.add_argument("--load", type=float, default=0.8, help="soak arrival rate as a share of capacity (default: 0.8)")
    p.add_argument("--duration", type=float, default=600.0, help="soak length in seconds (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and the request mix (default: 0)")
    g = p.add_argument_group("traffic mix")
    g.add_argument("--chat-share", type=float, default=0.5, help="share sent to /v1/chat/completions (default: 0.5)")
    g.add_argument("--stream-share", type=float, default=0.5, help="share of valid requests streamed (default: 0.5)")
    g.add_argument("--min-tokens", type=int, default=8, help="smallest max_tokens (default: 8)")
    g.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens, drawn log-uniformly (default: 256)")
    g.add_argument("--disconnect", type=float, default=0.10,
                   help="share of streamed requests closed early at a random chunk (default: 0.10)")
    g.add_argument("--abort", type=float, default=0.05,
                   help="share of non-streamed requests cut by a client timeout (default: 0.05)")
    g.add_argument("--malformed", type=float, default=0.05, help="share of malformed requests (default: 0.05)")
    g.add_argument("--oversized", type=float, default=0.02, help="share of oversized requests (default: 0.02)")
    g.add_argument("--wrong-key", type=float, default=0.01,
                   help="share sent with a wrong or no API key, 401 expected (default: 0.01)")
    g.add_argument("--burst", type=int,
                   help="requests sent at once, once, at --burst-at of the soak (default: twice the server's "
                        "--max-waiting, plus 64; 0: none)")
    g.add_argument("--burst-at", type=float, default=0.1,
                   help="when the burst goes, as a share of the soak (default: 0.1, before the RSS reference)")
    g.add_argument("--no-cover", dest="cover", action="store_false",
                   help="do not send one request of every kind at the start of the soak")
    g.add_argument("--cover-spacing", type=float, default=0.25,
                   help="seconds between those first requests, sent besides the Poisson arrivals (default: 0.25)")
    c = p.add_argument_group("checks and output")
    c.add_argument("--request-timeout", type=float, default=120.0,
                   help="a request the server took without answering within this many seconds is LOST (default: 120)")
    c.add_argument("--sample-s", type=float, default=2.0, help="RSS / in-flight sampling period (default: 2)")
    c.add_argument("--warmup", type=float, default=0.2,
                   help="the RSS reference is the first sample after this share of the soak (default: 0.2)")
    c.add_argument("--rss-tolerance", type=float, default=10.0, help="allowed RSS drift in %% (default: 10)")
    c.add_argument("--idle-timeout", type=float, default=60.0, help="wait this long for the server to go idle")
    c.add_argument("--startup-timeout", type=float, default=180.0, help="wait this long for /health")
    c.add_argument("--exit-timeout", type=float, default=60.0,
                   help="after SIGTERM, wait this long before SIGKILL (default: 60)")
    c.add_argument("--strict", action="store_true", help="exit 1 if any check fails, not only the hard ones")
    c.add_argument("--json", metavar="PATH", default="bench/results/soak.json",
                   help="write the results here (default: bench/results/soak.json; '' for none)")
    c.add_argument("--plot", metavar="PNG", help="write RSS and in-flight requests over time")
    c.add_argument("--server-log", metavar="PATH", help="keep the server's output here (default: a temporary file)")
    args = p.parse_args(argv)
    args.server_args = [*args.server_arg, *after]
    for name in ("load", "probe_s", "duration", "sample_s", "request_timeout"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("chat_share", "stream_share", "disconnect", "abort", "warmup", "burst_at"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.malformed + args.oversized + args.wrong_key > 1 or min(args.malformed, args.oversized, args.wrong_key) < 0:
        p.error("--malformed, --oversized and --wrong-key are shares in [0, 1] adding up to at most 1")
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    if args.probe_concurrency < 1:
        p.error("--probe-concurrency must be at least 1")
    return args


def server_option(args_list: list[str], flag: str):
    """The value of `flag` in a server argument list (`--flag V` or `--flag=V`), else None."""
    value = None
    for i, a in enumerate(args_list):
        if a == flag and i + 1 < len(args_list):
            value = args_list[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


# ---- the request mix --------------------------------------------------------------------------


@dataclass
class Plan:
    kind: str  # probe | valid | disconnect | abort | burst | malformed | oversized | auth
    sub: str = ""  # the malformed / oversized / auth variant
    path: str = "/v1/completions"
    content: bytes = b""
    headers: dict = field(default_factory=dict)
    stream: bool = False
    mode: "str | None" = None
    max_tokens: "int | None" = None
    disconnect_after: "int | None" = None  # tokens read before we close the stream
    abort_share: "float | None" = None  # client timeout, as a share of the probe's median latency

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.sub}" if self.sub else self.kind

    @property
    def refusal_expected(self) -> bool:
        return self.kind in ("malformed", "oversized", "auth")


class Mix:
    """Draws requests, seeded. `model` is the served model id; `limits` the server's limits."""

    def __init__(self, args, model: str, key: "str | None", limits: dict):
        self.args, self.model, self.limits = args, model, limits
        self.rng = random.Random(args.seed)
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.cover: list[tuple[str, str]] = []
        if args.cover:
            self.cover = ([("valid", "stream"), ("valid", "plain"), ("disconnect", ""), ("abort", "")]
                          + [("malformed", s) for s in MALFORMED] + [("oversized", s) for s in OVERSIZED]
                          + [("auth", s) for s in AUTH])
            self.rng.shuffle(self.cover)
        self._big_body: "bytes | None" = None

    def _headers(self) -> dict:
        return {"Content-Type": "application/json", **self.auth}

    def _valid_body(self, stream: bool, long: bool = False, rng: "random.Random | None" = None) -> tuple[dict, str]:
        rng = rng or self.rng
        a = self.args
        mode = rng.choice(MODES)
        question = sample_problem(rng, held_out=rng.random() < 0.5).question
        if long:
            max_tokens = rng.randint(max(a.max_tokens // 2, 64), max(a.max_tokens, 128))
        else:
            max_tokens = round(math.exp(rng.uniform(math.log(a.min_tokens), math.log(a.max_tokens))))
        body: dict = {"model": self.model, "mode": mode}
        if rng.random() < a.chat_share:
            path = "/v1/chat/completions"
            messages = [{"role": "user", "content": question}]
            if rng.random() < 0.2:
                messages.insert(0, {"role": "system", "content": "Work step by step."})
            body["messages"] = messages
            body["max_completion_tokens" if rng.random() < 0.3 else "max_tokens"] = max_tokens
        else:
            path = "/v1/completions"
            body["prompt"] = [question] if rng.random() < 0.1 else question
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        elif rng.random() < 0.3:
            body["stream"] = False
        if rng.random() < 0.4:
            body["temperature"] = 0.8
            if rng.random() < 0.5:
                body["seed"] = rng.randrange(1 << 30)
            if rng.random() < 0.3:
                body["top_p"] = 0.95
        else:
            body["temperature"] = 0
        if long or rng.random() < 0.25:
            body["ignore_eos"] = True
        if not long and rng.random() < 0.1:
            body["stop"] = rng.choice([["</think>"], ["keep 0", "keep 5"], "\n\n"])
        if rng.random() < 0.1:
            body["logit_bias"] = {str(rng.randrange(90)): round(rng.uniform(-2, 2), 2)}
        return body, path

    def valid(self, kind: str = "valid", stream: "bool | None" = None, rng: "random.Random | None" = None) -> Plan:
        rng = rng or self.rng
        if kind in ("disconnect", "abort"):  # cut off mid-stream, or by a timeout before the whole answer
            stream = kind == "disconnect"
        elif stream is None:
            stream = rng.random() < self.args.stream_share
        long = kind in ("disconnect", "abort")
        body, path = self._valid_body(stream, long, rng)
        plan = Plan(kind, path=path, content=json.dumps(body).encode(), headers=self._headers(), stream=stream,
                    mode=body["mode"], max_tokens=body.get("max_tokens", body.get("max_completion_tokens")))
        if kind == "disconnect":
            plan.disconnect_after = rng.randint(0, plan.max_tokens // 3)
        elif kind == "abort":
            plan.abort_share = rng.uniform(0.02, 0.3)
        return plan

    def burst(self) -> Plan:
        body = {"model": self.model, "prompt": sample_problem(self.rng, False).question, "max_tokens": 8,
                "mode": "small", "temperature": 0}
        return Plan("burst", content=json.dumps(body).encode(), headers=self._headers(), mode="small", max_tokens=8)

    def malformed(self, sub: str) -> Plan:
        q = sample_problem(self.rng, False).question
        path, body = "/v1/completions", {"model": self.model, "prompt": q, "max_tokens": 8}
        content = None
        if sub == "bad_json":
            content = json.dumps(body).encode()[:-self.rng.randint(2, 12)]
        elif sub == "not_object":
            content = json.dumps([body]).encode()
        elif sub == "wrong_type":
            field_, value = self.rng.choice([("max_tokens", "eight"), ("temperature", "hot"), ("stream", "yes"),
                                             ("prompt", 42), ("mode", 3), ("seed", 1.5), ("stop", 7)])
            body[field_] = value
        elif sub == "unknown_mode":
            body["mode"] = self.rng.choice(["medium", "SPLIT", "both", ""])
        elif sub == "negative_max_tokens":
            body["max_tokens"] = self.rng.choice([-1, -100, 0])
        elif sub == "missing_messages":
            path, body = "/v1/chat/completions", {"model": self.model, "max_tokens": 8}
            if self.rng.random() < 0.5:
                body["messages"] = []
        elif sub == "unknown_model":
            body["model"] = "no-such-model"
        stream = self.rng.random() < 0.5
        if content is None:
            body.setdefault("stream", stream)  # a wrong-typed "stream" stays as it is
            content = json.dumps(body).encode()
        return Plan("malformed", sub, path, content, self._headers(), stream=stream)

    def oversized(self, sub: str) -> Plan:
        lim = self.limits
        q = sample_problem(self.rng, False).question
        path, body = "/v1/completions", {"model": self.model, "prompt": q, "max_tokens": 8, "mode": "small"}
        if sub == "body":
            if self._big_body is None:
                pad = "x" * (lim["--max-body-bytes"] + 4096)
                self._big_body = json.dumps({**body, "prompt": pad, "stream": True}).encode()
            return self._oversized_plan(sub, path, self._big_body)
        if sub == "max_tokens":
            limit = lim["--max-completion-tokens"]
            body["max_tokens"] = limit + 1 if limit else 2**31 - 1
        elif sub == "stop_count":
            body["stop"] = [f"zz{i}" for i in range(lim["--max-stop-strings"] + 1)]
        elif sub == "stop_length":
            body["stop"] = ["z" * (lim["--max-stop-length"] + 1)]
        elif sub == "logit_bias":
            body["logit_bias"] = {str(i): 1.0 for i in range(max(4 * lim["--max-logit-bias"], 4096))}
        elif sub == "messages":
            # Empty contents, so only the count is over a limit, not the prompt's length.
            path = "/v1/chat/completions"
            body = {"model": self.model, "max_tokens": 8, "mode": "split",
                    "messages": [{"role": "user", "content": ""}] * (lim["--max-messages"] + 1)}
        elif sub == "prompt_tokens":
            longest = max(x for x in (lim["--max-prompt-tokens"], lim["--max-model-len"], 1024) if x)
            body["prompt"] = "x" * (longest + 64)
        return self._oversized_plan(sub, path, json.dumps({**body, "stream": True}).encode())

    def _oversized_plan(self, sub: str, path: str, content: bytes) -> Plan:
        # Streamed, and closed after the first chunk should the server accept it: the status is
        # the finding, and an accepted max_tokens of 2**31-1 would otherwise run to the context.
        return Plan("oversized", sub, path, content, self._headers(), stream=True, disconnect_after=0)

    def wrong_key(self, sub: str) -> Plan:
        plan = self.valid("auth", stream=self.rng.random() < 0.5)
        plan.sub = sub
        plan.headers = {"Content-Type": "application/json"}
        if sub == "wrong_key":
            plan.headers["Authorization"] = "Bearer not-the-key"
        return plan

    def cover_plans(self) -> list[Plan]:
        """One request of every kind and variant, in a seeded order."""
        plans = []
        for kind, sub in self.cover:
            if kind == "valid":
                plans.append(self.valid(stream=sub == "stream"))
            else:
                plans.append(self.valid(kind) if kind in ("disconnect", "abort") else self._chaos(kind, sub))
        return plans

    def next(self) -> Plan:
        a, u = self.args, self.rng.random()
        if u < a.malformed:
            return self._chaos("malformed", self.rng.choice(MALFORMED))
        if u < a.malformed + a.oversized:
            return self._chaos("oversized", self.rng.choice(OVERSIZED))
        if u < a.malformed + a.oversized + a.wrong_key:
            return self._chaos("auth", self.rng.choice(AUTH))
        stream = self.rng.random() < a.stream_share
        if stream and self.rng.random() < a.disconnect:
            return self.valid("disconnect", stream=True)
        if not stream and self.rng.random() < a.abort:
            return self.valid("abort", stream=False)
        return self.valid(stream=stream)

    def _chaos(self, kind: str, sub: str) -> Plan:
        return {"malformed": self.malformed, "oversized": self.oversized, "auth": self.wrong_key}[kind](sub)


# ---- sending and classifying ------------------------------------------------------------------


@dataclass
class Result:
    plan: Plan
    phase: str
    t_start: float = 0.0  # seconds since the run began
    status: "int | None" = None
    accepted: bool = False  # HTTP 200 (streamed: the stream started)
    outcome: "str | None" = None  # one of CLASSES
    cause: "str | None" = None
    finish_reason: "str | None" = None
    done: bool = False  # streamed: "data: [DONE]" seen
    ttft: "float | None" = None
    e2e: "float | None" = None
    tokens: "int | None" = None
    retry_after: "str | None" = None
    error_body: "dict | None" = None
    chunks: int = 0  # streamed: data chunks read
    seen: int = 0  # streamed: tokens read (the chunks' token_models, else one per chunk)
    limit_s: float = 0.0  # the client's deadline: --request-timeout, or an abort's timeout
    t_end: float = 0.0  # seconds since the run began


class Runner:
    def __init__(self, base: str, client: httpx.AsyncClient, request_timeout: float, t0: float):
        self.base, self.client, self.request_timeout, self.t0 = base, client, request_timeout, t0
        self.in_flight = 0
        self.results: list[Result] = []
        self.abort_base_s = 1.0  # the probe's median latency, once known

    async def send(self, plan: Plan, phase: str) -> Result:
        r = Result(plan, phase, time.perf_counter() - self.t0)
        self.results.append(r)
        self.in_flight += 1
        start = time.perf_counter()
        limit = max(0.02, plan.abort_share * self.abort_base_s) if plan.kind == "abort" else self.request_timeout
        r.limit_s = limit
        try:
            await asyncio.wait_for(self._exchange(plan, r, start), limit)
        except TimeoutError:
            if plan.kind == "abort":
                r.outcome = "aborted"
            elif plan.refusal_expected and not r.accepted:
                r.outcome, r.cause = "error", f"no answer within {limit:.0f} s"
            else:
                r.outcome, r.cause = "lost", f"no {'final chunk' if r.accepted else 'answer'} within {limit:.0f} s"
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            r.outcome, r.cause = "error", f"could not connect: {type(e).__name__}"
        except httpx.TransportError as e:
            # The request reached the server, which broke the connection: LOST unless the request
            # was one it may refuse by dropping the connection (an oversized body, say).
            what = f"connection broken {'mid-stream' if r.accepted else 'before an answer'}: {type(e).__name__}"
            r.outcome, r.cause = ("error" if plan.refusal_expected and not r.accepted else "lost"), what
        except Exception as e:  # noqa: BLE001  (a response we could not read is an error, not a crash)
            r.outcome, r.cause = "error", f"client: {type(e).__name__}: {e}"[:200]
        finally:
            self.in_flight -= 1
            r.t_end = time.perf_counter() - self.t0
        if r.outcome == "completed":
            r.e2e = time.perf_counter() - start
        return r

    async def _exchange(self, plan: Plan, r: Result, start: float) -> None:
        url = self.base + plan.path
        if not plan.stream:
            resp = await self.client.post(url, content=plan.content, headers=plan.headers)
            r.status = resp.status_code
            if resp.status_code != 200:
                self._refused(r, resp)
                return
            r.accepted = True
            body = resp.json()
            choice = (body.get("choices") or [{}])[0]
            r.finish_reason = choice.get("finish_reason")
            r.tokens = (body.get("usage") or {}).get("completion_tokens")
            self._finished(r, "200 body without finish_reason")
            return
        async with self.client.stream("POST", url, content=plan.content, headers=plan.headers) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                self._refused(r, resp)
                return
            r.accepted = True
            async for line in resp.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    r.done = True
                    continue
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                r.chunks += 1
                if r.ttft is None:
                    r.ttft = time.perf_counter() - start
                choices = chunk.get("choices") or []
                writers = choices[0].get("token_models") if choices else None
                r.seen += len(writers) if isinstance(writers, list) else 1
                if chunk.get("usage"):
                    r.tokens = chunk["usage"].get("completion_tokens")
                if choices and choices[0].get("finish_reason") is not None:
                    r.finish_reason = choices[0]["finish_reason"]
                    if isinstance(chunk.get("error"), dict):
                        r.error_body = chunk["error"]
                if plan.disconnect_after is not None and r.finish_reason is None and r.seen > plan.disconnect_after:
                    r.outcome = "disconnected"  # leaving the block closes the connection mid-stream
                    return
        self._finished(r, "stream ended without a final chunk")

    @staticmethod
    def _finished(r: Result, missing: str) -> None:
        if r.finish_reason in ("stop", "length"):
            if r.plan.stream and not r.done:
                r.outcome, r.cause = "error", "final chunk but no [DONE]"
            else:
                r.outcome = "completed"
        elif r.finish_reason is None:
            r.outcome, r.cause = ("lost", missing) if r.plan.stream else ("error", missing)
        elif r.finish_reason == "error":
            err = r.error_body or {}
            r.outcome = "error"
            r.cause = f"finish_reason error: {err.get('code') or err.get('type') or ''} {err.get('message', '')}"[:160]
        else:
            r.outcome, r.cause = "error", f"finish_reason {r.finish_reason}"

    @staticmethod
    def _refused(r: Result, resp: httpx.Response) -> None:
        try:
            err = resp.json().get("error")
        except (ValueError, AttributeError):
            err = None
        shape = isinstance(err, dict) and {"message", "type", "param", "code"} <= err.keys()
        detail = (err.get("param") or err.get("code") or "-") if isinstance(err, dict) else "-"
        suffix = "" if shape else " (not the OpenAI error shape)"
        if resp.status_code == 503:
            r.outcome, r.retry_after = "overload", resp.headers.get("retry-after")
            r.cause = f"503 {detail}{suffix}"
        elif 400 <= resp.status_code < 500:
            r.outcome, r.cause = "rejected", f"{resp.status_code} {detail}{suffix}"
        else:
            message = err.get("message", "") if isinstance(err, dict) else resp.text
            r.outcome, r.cause = "error", f"{resp.status_code} {detail}: {message}"[:160]


# ---- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> "float | None":
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: {name or name{labels}: value}, whole numbers as ints."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            out[name] = int(number) if number.is_integer() else number
    return out


class Server:
    def __init__(self, args):
        self.port = args.port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.extra = list(args.server_args)
        self.key = server_option(self.extra, "--api-key")
        self.key_supported: "bool | None" = None
        self.keep_log = bool(args.server_log)
        if self.keep_log:
            self.log_path = Path(args.server_log)
        else:
            fd, name = tempfile.mkstemp(prefix="soak-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.proc: "subprocess.Popen | None" = None
        self.argv: list[str] = []
        self.startup_s = None

    def _argv(self, with_key: bool) -> list[str]:
        argv = [sys.executable, "-m", "splitreason_engine.cli", "serve", "--host", "127.0.0.1", "--port",
                str(self.port), *self.extra]
        return argv + (["--api-key", self.key] if with_key else [])

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def start(self, key: str, timeout: float) -> None:
        given = self.key is not None
        if not given:
            self.key = key
        t = time.perf_counter()
        await self._launch(not given, timeout)
        if self.proc.poll() is not None and "unrecognized arguments" in self.log_tail() and "--api-key" in self.log_tail():
            # This server has no --api-key yet: run without one (the 401 checks will say so).
            self.key, self.key_supported = None, False
            await self._launch(False, timeout)
        elif self.key_supported is None:
            self.key_supported = True
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
        self.startup_s = time.perf_counter() - t

    async def _launch(self, with_key: bool, timeout: float) -> None:
        self.argv = self._argv(with_key)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.perf_counter() + timeout
        async with httpx.AsyncClient(timeout=2) as c:
            while time.perf_counter() < deadline and self.proc.poll() is None:
                try:
                    if (await c.get(self.base + "/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        if self.proc.poll() is None:
            self.kill()
            raise RuntimeError(f"server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def shown_argv(self) -> list[str]:
        return ["***" if i and self.argv[i - 1] == "--api-key" else a for i, a in enumerate(self.argv)]

    async def terminate(self, timeout: float) -> dict:
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None and time.perf_counter() - t < timeout:
            await asyncio.sleep(0.05)
        killed = self.proc.poll() is None
        if killed:
            self.kill()
        return {"signal": "SIGTERM", "exit_code": self.proc.returncode, "seconds": time.perf_counter() - t,
                "killed_after_timeout": killed}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kills the server if it still runs; drops its log unless --server-log named one."""
        self.kill()
        if not self.keep_log:
            self.log_path.unlink(missing_ok=True)


# ---- the run ----------------------------------------------------------------------------------


async def metrics(client: httpx.AsyncClient, base: str) -> "dict | None":
    try:
        resp = await client.get(base + "/metrics", timeout=10)
        return parse_metrics(resp.text) if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


def pages_used(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith("splitreason_kv_pages_used"))


async def sampler(server: Server, runner: Runner, client: httpx.AsyncClient, period: float, timeline: list,
                  phase: list) -> None:
    while True:
        m = await metrics(client, server.base) or {}
        timeline.append({"t": time.perf_counter() - runner.t0, "phase": phase[0], "rss_mib": rss_mib(server.proc.pid),
                         "in_flight": runner.in_flight, "running": m.get("splitreason_requests_running"),
                         "waiting": m.get("splitreason_requests_waiting"),
                         "kv_pages_free": m.get("splitreason_kv_pages_free")})
        await asyncio.sleep(period)


async def run(args) -> dict:
    server = Server(args)
    out: dict = {"machine": machine()}
    limits = {flag: (int(server_option(args.server_args, flag)) if server_option(args.server_args, flag)
                     else default) for flag, default in LIMIT_DEFAULTS.items()}
    burst = args.burst if args.burst is not None else 2 * limits["--max-waiting"] + 64
    try:
        await server.start(args.api_key, args.startup_timeout)
        out["server"] = {"argv": server.shown_argv(), "extra_args": args.server_args, "pid": server.proc.pid,
                         "api_key_supported": server.key_supported, "startup_s": server.startup_s,
                         "limits_assumed": limits}
        out["prefix_caching"] = server_prefix_caching(server.base)
        auth = {"Authorization": f"Bearer {server.key}"} if server.key else {}
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout could close one under us.
        http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                 limits=httpx.Limits(max_connections=None, keepalive_expiry=1.0))
        async with http as client:
            return await _run(args, server, client, auth, limits, burst, out)
    finally:
        server.close()


async def _run(args, server: Server, client: httpx.AsyncClient, auth: dict, limits: dict, burst: int,
               out: dict) -> dict:
    start_metrics = await metrics(client, server.base) or {}
    model = (await client.get(server.base + "/v1/models", headers=auth)).json()["data"][0]["id"]
    mix = Mix(args, model, server.key, limits)
    t0 = time.perf_counter()
    runner = Runner(server.base, client, args.request_timeout, t0)
    timeline: list[dict] = []
    phase = ["probe"]
    sampling = asyncio.create_task(sampler(server, runner, client, args.sample_s, timeline, phase))

    # Capacity probe: closed loop on the valid part of the mix. The requests running at the end
    # of the window are waited for, and each completed request counts for the share of its
    # lifetime that fell inside the window: no start-up bias from all clients starting at once.
    probe_rng = random.Random(args.seed + 1)
    deadline = time.perf_counter() + args.probe_s

    async def worker():
        while time.perf_counter() < deadline:
            r = await runner.send(mix.valid(rng=probe_rng), "probe")
            if r.outcome == "overload":  # a closed loop backs off as told instead of spinning on 503s
                try:
                    wait = float(r.retry_after or 1)
                except ValueError:
                    wait = 1.0
                await asyncio.sleep(min(max(wait, 0.05), 1.0, max(0.0, deadline - time.perf_counter())))

    await asyncio.gather(*(worker() for _ in range(args.probe_concurrency)))
    window = deadline - t0
    probe = [r for r in runner.results if r.phase == "probe"]
    done = [r for r in probe if r.outcome == "completed"]
    if not done:
        raise RuntimeError(f"the capacity probe completed no request (outcomes "
                           f"{dict(Counter(r.outcome for r in probe))})")
    credit = sum(max(0.0, min(r.t_end, window) - r.t_start) / max(r.t_end - r.t_start, 1e-9) for r in done)
    capacity = credit / window
    e2e = sorted(r.e2e for r in done)
    runner.abort_base_s = quantile(sorted(r.e2e for r in done if not r.plan.stream), 0.5) or quantile(e2e, 0.5)
    rate = args.load * capacity
    out["probe"] = {"window_s": window, "seconds": time.perf_counter() - t0, "concurrency": args.probe_concurrency,
                    "started": len(probe), "completed": len(done),
                    "completed_in_window": sum(r.t_end <= window for r in done), "capacity_rps": capacity,
                    "e2e_p50_s": quantile(e2e, 0.5), "abort_timeout_base_s": runner.abort_base_s}

    # The soak: open-loop Poisson arrivals, plus one request of every kind at the start and the burst.
    phase[0] = "soak"
    soak_t0 = time.perf_counter()
    tasks: list[asyncio.Task] = []

    async def at(offset: float) -> None:
        await asyncio.sleep(max(0.0, soak_t0 + offset - time.perf_counter()))

    async def cover():
        for i, plan in enumerate(mix.cover_plans()):
            await at(i * args.cover_spacing)
            tasks.append(asyncio.create_task(runner.send(plan, "soak")))

    burst_at = []

    async def fire_burst():  # not before the first requests are out: they are to be judged, not 503'd
        await at(max(args.burst_at * args.duration, len(mix.cover) * args.cover_spacing + 2))
        burst_at.append(time.perf_counter() - t0)
        tasks.extend(asyncio.create_task(runner.send(mix.burst(), "burst")) for _ in range(burst))

    senders = [asyncio.create_task(cover())] + ([asyncio.create_task(fire_burst())] if burst > 0 else [])
    arrivals, t, poisson = random.Random(args.seed + 2), 0.0, 0
    while True:
        t += arrivals.expovariate(rate)
        if t >= args.duration:
            break
        await at(t)
        tasks.append(asyncio.create_task(runner.send(mix.next(), "soak")))
        poisson += 1
    await asyncio.gather(*senders)
    await at(args.duration)
    soak_end = time.perf_counter() - t0
    phase[0] = "drain"
    await asyncio.gather(*tasks)
    drained = time.perf_counter() - t0
    out["soak"] = {"rate_rps": rate, "load": args.load, "duration_s": args.duration, "poisson_arrivals": poisson,
                   "cover_requests": len(mix.cover), "burst": {"requests": max(burst, 0), "at_s": burst_at[0] if burst_at else None},
                   "started_s": soak_t0 - t0, "ended_s": soak_end, "drained_s": drained}

    # Idle, then the pool.
    phase[0] = "idle"
    idle_start, m = time.perf_counter(), None
    while time.perf_counter() - idle_start < args.idle_timeout and server.proc.poll() is None:
        m = await metrics(client, server.base)
        if m and m.get("splitreason_requests_running") == 0 and m.get("splitreason_requests_waiting") == 0:
            break
        await asyncio.sleep(0.2)
    sampling.cancel()
    m = m or {}
    total = m.get("splitreason_kv_pages_total")
    free_start = start_metrics.get("splitreason_kv_pages_free")
    free = m.get("splitreason_kv_pages_free")
    reference = total if total is not None else free_start
    out["idle"] = {"reached": m.get("splitreason_requests_running") == 0 and m.get("splitreason_requests_waiting") == 0,
                   "after_s": time.perf_counter() - idle_start, "running": m.get("splitreason_requests_running"),
                   "waiting": m.get("splitreason_requests_waiting"), "kv_pages_free": free, "kv_pages_total": total,
                   "kv_pages_free_at_start": free_start, "kv_pages_used": pages_used(m) if m else None,
                   "leaked_pages": (reference - free) if reference is not None and free is not None else None,
                   "leak_reference": "kv_pages_total" if total is not None else "kv_pages_free before any request"}
    final_rss = rss_mib(server.proc.pid)
    timeline.append({"t": time.perf_counter() - t0, "phase": "idle", "rss_mib": final_rss, "in_flight": runner.in_flight,
                     "running": m.get("splitreason_requests_running"), "waiting": m.get("splitreason_requests_waiting"),
                     "kv_pages_free": free})
    died = server.proc.poll()
    out["shutdown"] = await server.terminate(args.exit_timeout)
    out["shutdown"]["died_before_sigterm"] = died is not None
    if out["shutdown"]["exit_code"] != 0:
        out["shutdown"]["log_tail"] = server.log_tail()
    out["results"] = runner.results
    out["timeline"] = timeline
    out["rss"] = rss_summary(timeline, soak_t0 - t0 + args.warmup * args.duration, args.rss_tolerance)
    return out


def rss_summary(timeline: list[dict], warm_t: float, tolerance: float) -> dict:
    samples = [s for s in timeline if s["rss_mib"] is not None]
    after = [s for s in samples if s["t"] >= warm_t]
    if not after:
        return {"warm_mib": None, "warm_t": None, "end_mib": samples[-1]["rss_mib"] if samples else None,
                "max_drift_pct": None, "tolerance_pct": tolerance, "samples": len(samples)}
    warm = after[0]["rss_mib"]
    drift = max(abs(s["rss_mib"] - warm) / warm * 100 for s in after)
    return {"warm_mib": warm, "warm_t": after[0]["t"], "end_mib": samples[-1]["rss_mib"],
            "max_mib": max(s["rss_mib"] for s in samples), "max_drift_pct": drift, "tolerance_pct": tolerance,
            "samples": len(samples)}


# ---- the report -------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), **{f"p{q}": quantile(values, q / 100) for q in (50, 90, 99)}}


def summarize(args, out: dict) -> dict:
    results: list[Result] = out.pop("results")
    counts = Counter(r.outcome for r in results)
    summary = {"total": len(results), "accepted": sum(r.accepted for r in results),
               **{c: counts.get(c, 0) for c in CLASSES}}
    summary["unclassified"] = sum(r.outcome not in CLASSES for r in results)
    by_kind = defaultdict(Counter)
    by_phase = defaultdict(Counter)
    causes = {c: Counter() for c in ("rejected", "overload", "error", "lost")}
    for r in results:
        by_kind[r.plan.kind][r.outcome] += 1
        by_phase[r.phase][r.outcome] += 1
        if r.outcome in causes:
            causes[r.outcome][r.cause or "-"] += 1
    refusals = defaultdict(Counter)
    for r in results:
        if r.plan.refusal_expected:
            refusals[r.plan.label][str(r.status) if r.status else r.outcome] += 1
    soak = [r for r in results if r.phase == "soak" and r.outcome == "completed"]
    out["counts"] = summary
    out["by_kind"] = {k: dict(v) for k, v in sorted(by_kind.items())}
    out["by_phase"] = {k: dict(v) for k, v in by_phase.items()}
    out["causes"] = {k: dict(v.most_common()) for k, v in causes.items()}
    out["refusals"] = {k: {"expected": EXPECTED_STATUS[k], "got": dict(v)} for k, v in sorted(refusals.items())}
    out["overload"] = {"count": counts.get("overload", 0),
                       "with_retry_after": sum(r.outcome == "overload" and r.retry_after is not None for r in results)}
    out["disconnect_or_abort_too_late"] = sum(r.plan.kind in ("disconnect", "abort") and r.outcome == "completed"
                                              for r in results)
    out["cutoffs"] = [{"label": r.plan.label, "outcome": r.outcome, "status": r.status, "stream": r.plan.stream,
                       "mode": r.plan.mode, "max_tokens": r.plan.max_tokens, "disconnect_after": r.plan.disconnect_after,
                       "abort_after_s": r.limit_s if r.plan.kind == "abort" else None,
                       "chunks": r.chunks, "tokens_seen": r.seen, "finish_reason": r.finish_reason}
                      for r in results if r.plan.kind in ("disconnect", "abort")]
    out["latency"] = {"e2e_s": percentiles([r.e2e for r in soak]),
                      "ttft_streamed_s": percentiles([r.ttft for r in soak if r.plan.stream and r.ttft is not None]),
                      "e2e_by_mode_s": {mode: percentiles([r.e2e for r in soak if r.plan.mode == mode]) for mode in MODES}}
    out["failed_requests"] = [{"label": r.plan.label, "phase": r.phase, "path": r.plan.path, "stream": r.plan.stream,
                                "mode": r.plan.mode, "t_start": r.t_start, "status": r.status, "outcome": r.outcome,
                                "cause": r.cause} for r in results if r.outcome in ("lost", "error")][:100]
    out["checks"] = checks(args, out)
    hard_failed = [n for n, c in out["checks"].items() if c["hard"] and not c["ok"]]
    soft_failed = [n for n, c in out["checks"].items() if not c["hard"] and c["ok"] is False]
    out["failed_checks"] = {"hard": hard_failed, "soft": soft_failed}
    out["passed"] = not hard_failed and not (args.strict and soft_failed)
    out["config"] = {k: v for k, v in vars(args).items() if k != "server_arg"}
    return out


def checks(args, out: dict) -> dict:
    c, idle, kinds = out["counts"], out["idle"], out["by_kind"]

    def check(ok, hard: bool, detail: str) -> dict:
        return {"ok": ok, "hard": hard, "detail": detail}

    def refused(kind: str, want) -> tuple[bool, str]:
        got = Counter()
        for label, row in out["refusals"].items():
            if label.startswith(kind + ":"):
                got.update(row["got"])
        # A 503 says the server was overloaded before it looked at the request: neither way.
        bad = {s: n for s, n in got.items() if not want(s) and s != "503"}
        judged = sum(n for s, n in got.items() if s != "503")
        return (not bad if judged else None), False, f"statuses {dict(got)}" + (f"; not as expected: {bad}" if bad else "")

    is_4xx = lambda s: s.isdigit() and 400 <= int(s) < 500  # noqa: E731
    leaked, used = idle["leaked_pages"], idle["kv_pages_used"]
    rss = out["rss"]
    mismatched = {label: row["got"] for label, row in out["refusals"].items()
                  if set(row["got"]) - {str(row["expected"]), "503"}}
    result = {
        "no_lost_requests": check(c["lost"] == 0, True, f"{c['lost']} lost: {out['causes']['lost']}"),
        "server_idle": check(idle["reached"], True, f"running {idle['running']}, waiting {idle['waiting']}"),
        "no_leaked_pages": check(leaked == 0 and not used, True,
                                 f"leaked {leaked} (free {idle['kv_pages_free']} vs {idle['leak_reference']} "
                                 f"{idle['kv_pages_total'] if idle['kv_pages_total'] is not None else idle['kv_pages_free_at_start']}), "
                                 f"pages held {used}"),
        "clean_exit": check(out["shutdown"]["exit_code"] == 0, True,
                            f"exit code {out['shutdown']['exit_code']} after {out['shutdown']['seconds']:.1f} s"),
        "all_classified": check(not c["unclassified"], True, f"{c['unclassified']} unclassified"),
        "no_errors": check(c["error"] == 0, False, f"{c['error']} errors: {out['causes']['error']}"),
        "malformed_refused_4xx": check(*refused("malformed", is_4xx)),
        "oversized_refused_4xx": check(*refused("oversized", is_4xx)),
        "wrong_key_refused_401": check(*refused("auth", lambda s: s == "401")),
        "exact_refusal_statuses": check(not mismatched, False,
                                        f"differ from {{413 body, 404 model, 401 key, else 400}}: {mismatched}"
                                        if mismatched else "all as expected"),
        "overload_has_retry_after": check(out["overload"]["with_retry_after"] == out["overload"]["count"]
                                          if out["overload"]["count"] else None, False,
                                          f"{out['overload']['with_retry_after']} of {out['overload']['count']} 503s"),
        "rss_flat": check(rss["max_drift_pct"] is not None and rss["max_drift_pct"] <= args.rss_tolerance, False,
                          f"max drift {rss['max_drift_pct']}% of {rss['warm_mib']} MiB (limit {args.rss_tolerance}%)"),
        "kv_pages_total_metric": check(idle["kv_pages_total"] is not None, False,
                                       "present" if idle["kv_pages_total"] is not None else "missing from /metrics"),
    }
    # Each intended class seen where it is meant to come from, and every kind of request sent.
    wanted = {"completed": kinds.get("valid", {}).get("completed", 0),
              "disconnected": kinds.get("disconnect", {}).get("disconnected", 0),
              "aborted": kinds.get("abort", {}).get("aborted", 0),
              "rejected": kinds.get("malformed", {}).get("rejected", 0)}
    if out["soak"]["burst"]["requests"]:
        wanted["overload"] = kinds.get("burst", {}).get("overload", 0)
    zero = [k for k, n in wanted.items() if not n]
    unsent = {"valid", "disconnect", "abort", "malformed", "oversized", "auth"} - set(kinds)
    result["every_class_counted"] = check(not zero and not unsent, False,
                                          f"none counted: {zero}; kinds never sent: {sorted(unsent)}"
                                          if zero or unsent else f"counted: {wanted}")
    if not out["server"]["api_key_supported"]:
        result["wrong_key_refused_401"]["detail"] += " (this server has no --api-key: started without one)"
    return result


def fmt(x, scale: float = 1.0, spec: str = ".0f") -> str:
    return "-" if x is None else format(x * scale, spec)


def print_report(out: dict) -> None:
    c, lat, rss, idle, sd, p, s = (out[k] for k in ("counts", "latency", "rss", "idle", "shutdown", "probe", "soak"))
    print(machine_line(out["machine"]))
    print("server: " + " ".join(out["server"]["argv"][1:]))
    print(f"probe: {p['concurrency']} clients x {p['window_s']:.1f} s, {p['completed']} completed "
          f"({p['completed_in_window']} inside the window) = {p['capacity_rps']:.2f} req/s; soak: {s['rate_rps']:.2f} req/s ({s['load']:.0%}) for "
          f"{s['duration_s']:.0f} s: {s['poisson_arrivals']} arrivals + {s['cover_requests']} of every kind + "
          f"a burst of {s['burst']['requests']}")
    rows = [("requests", c["total"], ""), ("accepted (200)", c["accepted"], ""),
            ("completed", c["completed"], f"{out['disconnect_or_abort_too_late']} cut-offs came too late"),
            ("disconnected (ours)", c["disconnected"], ""), ("aborted (ours)", c["aborted"], ""),
            ("rejected 4xx", c["rejected"], ", ".join(f"{k}: {n}" for k, n in out["causes"]["rejected"].items())),
            ("overload 503", c["overload"], f"{out['overload']['with_retry_after']} with Retry-After"),
            ("errors", c["error"], ", ".join(f"{k}: {n}" for k, n in out["causes"]["error"].items())),
            ("LOST", c["lost"], ", ".join(f"{k}: {n}" for k, n in out["causes"]["lost"].items()))]
    print(f"{'class':<22}{'count':>7}  detail")
    for name, n, detail in rows:
        print(f"{name:<22}{n:>7}  {detail[:150]}")
    print(f"{'latency ms':<22}{'p50':>7}{'p90':>8}{'p99':>8}{'n':>7}")
    for name, row in (("end to end", lat["e2e_s"]), ("TTFT (streamed)", lat["ttft_streamed_s"])):
        print(f"{name:<22}{fmt(row['p50'], 1e3):>7}{fmt(row['p90'], 1e3):>8}{fmt(row['p99'], 1e3):>8}{row['n']:>7}")
    print(f"RSS: {fmt(rss['warm_mib'])} MiB after warm-up, {fmt(rss['end_mib'])} MiB at the end, max drift "
          f"{fmt(rss['max_drift_pct'], spec='.1f')}% (limit {rss['tolerance_pct']:.0f}%)")
    print(f"idle: running {fmt(idle['running'])}, waiting {fmt(idle['waiting'])}, KV pages free "
          f"{fmt(idle['kv_pages_free'])} / total {fmt(idle['kv_pages_total'])} (free at start "
          f"{fmt(idle['kv_pages_free_at_start'])}): leaked {fmt(idle['leaked_pages'])}")
    print(f"shutdown: SIGTERM -> exit {sd['exit_code']} in {sd['seconds']:.1f} s"
          + (" (killed after the timeout)" if sd["killed_after_timeout"] else ""))
    for name, ch in out["checks"].items():
        mark = "n/a " if ch["ok"] is None else ("PASS" if ch["ok"] else "FAIL")
        print(f"  {mark} {name}{' (hard)' if ch['hard'] else ''}: {ch['detail'][:160]}")
    print("PASSED" if out["passed"] else f"FAILED: {', '.join(out['failed_checks']['hard'] or out['failed_checks']['soft'])}")


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = out["timeline"]
    t = [s["t"] for s in tl]
    series = lambda key: [math.nan if s[key] is None else s[key] for s in tl]  # noqa: E731
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, series("rss_mib"), color="tab:red")
    top.set_ylabel("server RSS (MiB)")
    if out["rss"]["warm_mib"] is not None:
        top.axhline(out["rss"]["warm_mib"], color="grey", lw=0.8, ls=":")
        for sign in (1, -1):
            top.axhline(out["rss"]["warm_mib"] * (1 + sign * out["rss"]["tolerance_pct"] / 100), color="grey", lw=0.6,
                        ls="--")
    bottom.plot(t, series("in_flight"), label="in flight (client)")
    bottom.plot(t, series("running"), label="running (server)")
    bottom.plot(t, series("waiting"), label="waiting (server)")
    bottom.set_ylabel("requests")
    bottom.set_xlabel("seconds since the probe began")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.axvline(out["soak"]["started_s"], color="black", lw=0.8)
        ax.axvline(out["soak"]["ended_s"], color="black", lw=0.8)
        if out["rss"]["warm_t"] is not None:
            ax.axvline(out["rss"]["warm_t"], color="grey", lw=0.8, ls=":")
        if out["soak"]["burst"]["at_s"] is not None:
            ax.axvline(out["soak"]["burst"]["at_s"], color="tab:purple", lw=0.8, ls="--")
    c = out["counts"]
    top.set_title(f"soak: {c['total']} requests, {c['lost']} lost, leaked pages {out['idle']['leaked_pages']}, "
                  f"exit {out['shutdown']['exit_code']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the burst holds many sockets at once
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    out = summarize(args, asyncio.run(run(args)))
    if args.json:
        write_json(args.json, out)
    if args.plot:
        plot(out, args.plot)
    print_report(out)
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
