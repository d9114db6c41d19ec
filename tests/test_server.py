"""A real `splitreason serve` on a free port of 127.0.0.1, driven with raw HTTP and the openai client."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from split_models import save_pair

OPEN, CLOSE = 269, 270  # the tag tokens of the test pair
SPLIT_BIAS = {str(OPEN): 2.0, str(CLOSE): 3.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "splitreason_engine.cli", "serve", "--port", str(self.port),
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
        raise RuntimeError("server did not come up")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), special_tags=True)


@pytest.fixture(scope="module")
def server(pair):
    s = Server("--small", str(pair[0]), "--big", str(pair[1]), "--kv-cache-bytes", str(1 << 24),
               "--max-model-len", "512", "--served-model-name", "pair")
    yield s
    s.close()


def completion(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json={"model": "pair", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(server, path: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", server.url + path, json={"model": "pair", **body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunks.append(json.loads(line[6:]))
    return chunks


def test_completions_streamed_equals_not_streamed_and_usage_has_offload(server):
    body = dict(prompt="What is 2+2?", max_tokens=40, temperature=0, logit_bias=SPLIT_BIAS)
    whole = completion(server, **body)
    chunks = stream_chunks(server, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    usage = whole["usage"]
    assert usage["mode"] == "split" and usage["handoffs"] >= 1 and usage["big_tokens"] > 0
    writers = [m for c in chunks for m in c["choices"][0]["token_models"]]
    assert len(writers) == usage["completion_tokens"] and sum(writers) == usage["big_tokens"]
    assert usage["small_tokens"] + usage["big_tokens"] == usage["completion_tokens"]
    timing = "latency_per_offloaded_token_s"
    assert usage[timing] > 0
    # The second run of the prompt finds its full pages in the prefix cache: fewer tokens computed.
    cache = ("prompt_tokens_details", "small_cached_tokens", "big_cached_tokens", "prompt_tokens_computed")
    streamed = chunks[-1]["usage"]
    assert streamed["prompt_tokens_details"]["cached_tokens"] == streamed["small_cached_tokens"] > 0
    assert server.metric('splitreason_prefix_cache_hit_tokens_total{model="small"}') >= streamed["small_cached_tokens"]
    assert {k: v for k, v in streamed.items() if k not in (timing, *cache)} == {
        k: v for k, v in usage.items() if k not in (timing, *cache)}


def test_a_request_drafts_with_speculate_and_usage_and_metrics_count_it(server):
    """`speculate` in the body: the same greedy text as without, and the drafts in usage and /metrics."""
    body = dict(prompt="What is 2+2?", max_tokens=40, temperature=0, logit_bias=SPLIT_BIAS)
    plain, drafted = completion(server, **body, speculate=0), completion(server, **body, speculate=3)
    assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
    usage = drafted["usage"]
    assert usage["draft_tokens"] > 0 and 0 <= usage["accepted_draft_tokens"] <= usage["draft_tokens"]
    assert usage["acceptance_rate"] == usage["accepted_draft_tokens"] / usage["draft_tokens"]
    assert usage["big_steps_per_offloaded_token"] > 0 and plain["usage"]["draft_tokens"] == 0
    assert server.metric("splitreason_draft_tokens_total") >= usage["draft_tokens"]
    assert server.metric("splitreason_accepted_draft_tokens_total") >= usage["accepted_draft_tokens"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "pair", **body, "speculate": 12}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculate"


def test_openai_client_completions_and_chat(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["pair"]
    extra = {"mode": "small"}
    whole = client.completions.create(model="pair", prompt="Hello", max_tokens=12, temperature=0, extra_body=extra)
    streamed = client.completions.create(model="pair", prompt="Hello", max_tokens=12, temperature=0, stream=True,
                                         extra_body=extra)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage.completion_tokens == 12
    messages = [{"role": "user", "content": "Is 91 prime?"}]
    for mode in ("small", "split"):
        chat = client.chat.completions.create(model="pair", messages=messages, max_tokens=16, temperature=0,
                                              extra_body={"mode": mode, "logit_bias": SPLIT_BIAS})
        parts = client.chat.completions.create(model="pair", messages=messages, max_tokens=16, temperature=0,
                                               stream=True, extra_body={"mode": mode, "logit_bias": SPLIT_BIAS})
        text = "".join(c.choices[0].delta.content or "" for c in parts)
        assert text == chat.choices[0].message.content and chat.choices[0].message.role == "assistant"


def test_64_concurrent_streams_of_mixed_modes_each_equal_their_run_alone(server):
    modes = ["split", "small", "big", "random"]
    bodies = [dict(prompt=f"Question {i}: what is {i} + {i}?", max_tokens=10 + i % 7, temperature=0,
                   mode=modes[i % 4], seed=i, switch_chunk=3, switch_ratio=1.0, logit_bias=SPLIT_BIAS)
              for i in range(64)]
    alone = [completion(server, **b)["choices"][0]["text"] for b in bodies]

    async def one(client, body):
        text, done = "", False
        async with client.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, done

    async def all_at_once():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    results = asyncio.run(all_at_once())
    assert all(done for _, done in results)
    assert [text for text, _ in results] == alone


def test_gathering_server_reports_its_coscheduling_and_compiles(pair):
    """A server that gathers big-model work (--coschedule gather) serves concurrent split and random
    requests with the tokens each gets alone, and /metrics shows the steps of each model, the held
    steps, the rows per big step, the waits and the JIT compile count."""
    from concurrent.futures import ThreadPoolExecutor

    s = Server("--small", str(pair[0]), "--big", str(pair[1]), "--kv-cache-bytes", str(1 << 24),
               "--max-model-len", "512", "--served-model-name", "pair", "--coschedule", "gather",
               "--gather-min-share", "1.0", "--max-big-wait-steps", "6")
    try:
        bodies = [dict(prompt=f"Question {i}: what is {i} + {i}?", max_tokens=24, temperature=0,
                       mode=("split", "random")[i % 2], seed=i, switch_chunk=4, switch_ratio=1.0,
                       logit_bias=SPLIT_BIAS) for i in range(12)]
        alone = [completion(s, **b)["choices"][0]["text"] for b in bodies]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda b: completion(s, **b)["choices"][0]["text"], bodies))
        assert together == alone
        text = httpx.get(s.url + "/metrics").text
        assert re.search(r'^splitreason_model_steps_total\{model="big"\} [1-9]', text, re.M)
        assert s.metric("splitreason_big_held_steps_total") > 0
        assert s.metric("splitreason_big_rows_per_step") >= 1
        assert s.metric("splitreason_big_wait_p99_seconds") >= s.metric("splitreason_big_wait_p50_seconds") >= 0
        assert s.metric("splitreason_jit_compiles_total") == 0  # the CPU runs no Triton kernel
        assert s.metric("splitreason_jit_compiles_after_startup") == 0
    finally:
        s.close()


def test_a_client_that_disconnects_gets_its_pages_freed(server):
    total = server.metric("splitreason_kv_pages_free")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Tell a long story", "max_tokens": 400, "ignore_eos": True, "stream": True,
                            "mode": "small"}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metric("splitreason_kv_pages_free") < total  # it holds pages mid-stream
    deadline = time.time() + 1.0
    while server.metric("splitreason_kv_pages_free") < total:
        assert time.time() < deadline, "pages not back within a second of the disconnect"
        time.sleep(0.05)
    assert server.metric("splitreason_requests_running") == 0


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "mode": "medium"}, 400, "mode"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "switch_ratio": -1}, 400, "switch_ratio"),
    ("/v1/completions", {"prompt": "hi", "max_offload_tokens": 0}, 400, "max_offload_tokens"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi " * 400}, 400, "prompt"),  # longer than max_model_len 512
    ("/v1/completions", {"prompt": "hi " * 400, "stream": True}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "max_tokens": 1}, 400, "echo"),  # split mode templates it
    ("/v1/completions", {"prompt": "hi", "echo": True, "mode": "random"}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes", "mode": "small"}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": ["hi", 5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert completion(server, prompt="still here", max_tokens=3, mode="small")["choices"][0]["finish_reason"]


def test_overload_answers_503_with_retry_after_and_accepted_requests_complete(pair):
    s = Server("--small", str(pair[0]), "--kv-cache-bytes", str(1 << 22), "--max-model-len", "256",
               "--max-num-seqs", "1", "--max-waiting", "2")
    try:
        async def one(client):
            r = await client.post(s.url + "/v1/completions",
                                  json={"prompt": "x", "max_tokens": 60, "ignore_eos": True})
            return r

        async def flood():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(one(client) for _ in range(12)))

        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 60
        assert s.metric("splitreason_requests_rejected_total") == codes.count(503)
    finally:
        s.close()


def test_reference_protocol_over_two_single_model_servers_beside_native_split(pair, server, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import reference_protocol

    small = Server("--small", str(pair[0]), "--kv-cache-bytes", str(1 << 24), "--max-model-len", "512")
    big = Server("--small", str(pair[1]), "--kv-cache-bytes", str(1 << 24), "--max-model-len", "512")
    try:
        report = reference_protocol.main([
            "--small-url", small.url + "/v1", "--big-url", big.url + "/v1", "--native-url", server.url + "/v1",
            "--tokenizer", str(pair[0]), "--num-prompts", "3", "--max-tokens", "40", "--chunk", "8",
            "--small-extra", json.dumps({"logit_bias": SPLIT_BIAS}), "--json", str(tmp_path / "ref.json")])
    finally:
        small.close()
        big.close()
    assert json.loads((tmp_path / "ref.json").read_text())["config"]["chunk"] == 8
    assert report["prefix_caching"] == {"small": True, "big": True, "native": True}
    for side in ("reference", "native"):
        r = report[side]
        assert r["requests"] == 3 and len(r["rows"]) == 3 and r["total_s"] > 0 and r["mean_wall_s"] > 0
        assert r["big_tokens"] > 0 and r["latency_per_offloaded_token_s"] > 0
        for row in r["rows"]:
            assert set(row) == {"wall_s", "big_tokens", "tokens", "latency_per_offloaded_token_s"}
    assert report["native_over_reference_total"] > 0


def test_serve_bench_reports_every_figure(server, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import serve as serve_bench

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2+2?\nName a prime.\n")  # split mode takes text questions
    summary = serve_bench.main(["--base-url", server.url + "/v1", "--num-requests", "6", "--concurrency", "3",
                                "--prompts", str(prompts), "--output-len", "8", "--extra", json.dumps({"logit_bias": SPLIT_BIAS}),
                                "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert summary["completed"] == 6 and summary["status_counts"] == {"200": 6}
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert all(summary[key][s] is not None for s in ("mean", "median", "p99"))
    assert summary["output_tokens_per_s"] > 0 and "offload" in summary
    assert summary["prefix_caching"] is True  # read from the server's /metrics
    assert (tmp_path / "s.png").stat().st_size > 1000 and json.loads((tmp_path / "s.json").read_text())["completed"] == 6


def test_demo_pair_is_the_default_and_its_generation_config_makes_it_greedy():
    from splitreason_engine import Engine, SamplingParams
    from splitreason_engine.demo import pair_paths
    from splitreason_engine.demo.task import Problem

    question = Problem(347, (6, 2, 9, 4)).question
    expected = Engine(*pair_paths(), kv_cache_bytes=1 << 24, progress=False).generate(
        [question], SamplingParams(temperature=0, max_tokens=400), use_tqdm=False)[0].text
    demo = Server()
    try:
        assert [m["id"] for m in httpx.get(demo.url + "/v1/models").json()["data"]] == ["splitreason-demo"]
        for seed in (1, 2):  # no temperature in the request: the checkpoint's do_sample=false applies
            r = httpx.post(demo.url + "/v1/completions", json={"prompt": question, "max_tokens": 400, "seed": seed},
                           timeout=120).json()
            assert r["choices"][0]["text"] == expected and r["usage"]["handoffs"] == 4
        sampled = httpx.post(demo.url + "/v1/completions", timeout=120, json={
            "prompt": question, "max_tokens": 400, "seed": 3, "temperature": 5.0}).json()
        assert sampled["choices"][0]["text"] != expected  # an explicit temperature wins
    finally:
        demo.close()
