"""The HTTP surface under hostile or careless clients, on a real `splitreason serve` over loopback:
API keys, request limits (refused before any engine work), sandboxed chat templates with a time
bound, and a graceful drain on SIGTERM."""

import asyncio
import json
import signal
import time

import httpx
import pytest

from split_models import save_pair
from test_server import Server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    small, big = save_pair(tmp_path_factory.mktemp("pair"), special_tags=True)
    # A chat template that loops or raises on request, and renders the messages otherwise.
    config = json.loads((small / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if messages[0].content == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}"
        "{% if messages[0].content == 'raise' %}{{ raise_exception('no raising allowed') }}{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    (small / "tokenizer_config.json").write_text(json.dumps(config))
    return small, big


def engine_args(pair) -> list[str]:
    return ["--small", str(pair[0]), "--big", str(pair[1]), "--kv-cache-bytes", str(1 << 24), "--max-model-len", "512"]


@pytest.fixture(scope="module")
def guarded(pair):
    s = Server(*engine_args(pair), "--api-key", KEY, "--max-body-bytes", "4096", "--max-prompt-tokens", "100",
               "--max-completion-tokens", "200", "--max-stop-strings", "4", "--max-stop-length", "8",
               "--max-logit-bias", "5", "--max-messages", "3", "--chat-template-timeout", "0.5", "--max-n", "2",
               "--max-logprobs", "3", "--max-prompts", "2")
    yield s
    s.close()


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path: str, body, headers=AUTH, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **headers},
                      timeout=60, **kwargs)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["none", "wrong", "no-scheme", "basic"])
@pytest.mark.parametrize("method, path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models")])
def test_v1_routes_need_the_api_key(guarded, headers, method, path):
    r = httpx.request(method, guarded.url + path, json={"prompt": "hi", "max_tokens": 2}, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"


def test_the_key_opens_v1_and_health_and_metrics_stay_open(guarded):
    assert httpx.get(guarded.url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(guarded.url + "/health").json() == {"status": "ok"}
    assert "splitreason_kv_pages_total" in httpx.get(guarded.url + "/metrics").text
    from openai import OpenAI

    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY)
    out = client.completions.create(model=client.models.list().data[0].id, prompt="hi", max_tokens=3,
                                    extra_body={"mode": "small"})
    assert out.usage.completion_tokens == 3


def test_the_key_comes_from_the_environment(pair, monkeypatch):
    monkeypatch.setenv("SPLITREASON_API_KEY", "from-env")
    s = Server("--small", str(pair[0]), "--kv-cache-bytes", str(1 << 22), "--max-model-len", "256")
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    finally:
        s.close()


OVERSIZED = [
    ("/v1/completions", b'{"prompt": "' + b"a" * 5000 + b'"}', 413, "body"),
    ("/v1/completions", {"prompt": "Hello " * 60}, 400, "prompt"),  # 120+ tokens, over 100
    ("/v1/completions", {"prompt": list(range(101))}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 201}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "far too long"}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(6)}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 4}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello " * 60}], "mode": "small"}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 500}, 400,
     "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 4, "mode": "small"}, 400, "logprobs"),
    ("/v1/completions", {"prompt": ["a", "b", "c"]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 4},
     400, "top_logprobs"),
]


@pytest.mark.parametrize("path, body, status, param", OVERSIZED,
                         ids=["body", "prompt-text", "prompt-ids", "max_tokens", "stop-count", "stop-length",
                              "logit_bias", "messages", "chat-prompt", "max_completion_tokens", "n", "logprobs",
                              "prompt-count", "top_logprobs"])
def test_oversized_requests_are_refused_naming_the_field_before_engine_work(guarded, path, body, status, param):
    before = guarded.metric("splitreason_requests_finished_total")
    r = post(guarded, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert guarded.metric("splitreason_requests_finished_total") == before  # the engine never saw it
    assert post(guarded, "/v1/completions", {"prompt": "ok", "max_tokens": 2, "mode": "small"}).status_code == 200


def test_a_chunked_body_past_the_limit_is_refused_without_a_length_header(guarded):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = httpx.post(guarded.url + "/v1/completions", content=chunks(), headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"


@pytest.mark.parametrize("content, message", [("loop", "longer than 0.5 s"), ("raise", "no raising allowed")])
def test_a_chat_template_that_loops_or_raises_gets_a_400_and_hangs_nothing(guarded, content, message):
    start = time.perf_counter()
    r = post(guarded, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "mode": "small",
                                                "max_tokens": 2})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"
    assert time.perf_counter() - start < 5
    ok = post(guarded, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "mode": "small",
                                                 "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def start_long_requests(server, n: int, max_tokens: int):
    """n streamed small-mode requests of max_tokens tokens each, on their own thread's event loop;
    returns (thread, results) with per-request (status, chunks) once the thread ends."""
    import threading

    results = []

    async def one(client):
        chunks = []
        async with client.stream("POST", server.url + "/v1/completions",
                                 json={"prompt": "Tell a long story", "max_tokens": max_tokens, "ignore_eos": True,
                                       "stream": True, "mode": "small"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
            return r.status_code, chunks

    async def all_of_them():
        async with httpx.AsyncClient(timeout=120) as client:
            results.extend(await asyncio.gather(*(one(client) for _ in range(n))))

    thread = threading.Thread(target=lambda: asyncio.run(all_of_them()))
    thread.start()
    return thread, results


def wait_running(server, n: int) -> None:
    deadline = time.time() + 30
    while server.metric("splitreason_requests_running") < n:
        assert time.time() < deadline
        time.sleep(0.02)


def test_sigterm_drains_accepted_requests_refuses_new_ones_and_exits_0(pair):
    s = Server(*engine_args(pair), "--shutdown-timeout", "60")
    thread, results = start_long_requests(s, 3, 300)
    wait_running(s, 3)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert httpx.get(s.url + "/health").json() == {"status": "draining"}
    thread.join(timeout=120)
    assert s.proc.wait(timeout=60) == 0
    assert len(results) == 3
    for status, chunks in results:
        assert status == 200
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 300


def test_requests_past_the_shutdown_timeout_end_with_an_error_event(pair):
    s = Server(*engine_args(pair), "--shutdown-timeout", "0.5")
    thread, results = start_long_requests(s, 2, 500)
    wait_running(s, 2)
    start = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert s.proc.wait(timeout=30) == 0
    assert time.perf_counter() - start < 15
    for status, chunks in results:
        last = chunks[-1]
        assert status == 200 and last["choices"][0]["finish_reason"] == "error"
        assert "shut down" in last["error"]["message"]
        assert last["usage"]["completion_tokens"] < 500


def test_the_server_binds_loopback_by_default():
    from splitreason_engine.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
