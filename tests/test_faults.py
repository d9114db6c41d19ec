"""Fault isolation in the step loop: faults injected into the runner, the sampler, the flows and the
detokenizer fail the requests they belong to (finish_reason "error", pages freed) while every other
request keeps the oracle's tokens; faults that do not stop end the engine with EngineBroken."""

import json
import time

import pytest
import torch

import splitreason_engine.engine as engine_module
import splitreason_engine.step_loop as step_loop_module
from split_models import PAGE_BYTES, mixed_requests, params_for
from splitreason_engine import Engine, EngineBroken
from splitreason_engine.step_loop import MAX_FAILED_STEPS
from splitreason_engine.protocol import SplitFlow
from splitreason_engine.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def engine(pair):
    return Engine(*pair, kv_cache_bytes=400 * PAGE_BYTES, max_num_batched_tokens=96, progress=False)


def run_mixed(engine, oracle, stream: bool = False):
    """The twelve mixed requests, ids in order from the next request id; returns (requests, outputs)."""
    reqs = mixed_requests(oracle)
    params = [params_for(r) for r in reqs]
    questions = [r.question for r in reqs]
    if stream:
        outs = [None] * len(reqs)
        for event in engine.generate_stream(questions, params):
            if event.output is not None:
                outs[event.index] = event.output
    else:
        outs = engine.generate(questions, params, use_tqdm=False)
    return reqs, outs


def check_isolated(engine, oracle, reqs, outs, victims: set[int], reason: str) -> None:
    """Victims (indices) failed with `reason` in their message, keeping a prefix of their tokens;
    everyone else equals the oracle; no page is left held."""
    assert victims
    for i, (r, out) in enumerate(zip(reqs, outs)):
        tokens, writers = oracle.run(r)
        if i in victims:
            assert out.finish_reason == "error", f"request {i} should have failed"
            assert reason in out.error
            assert out.token_ids == tokens[:len(out.token_ids)]
        else:
            assert out.error is None and out.finish_reason in ("stop", "length")
            assert out.token_ids == tokens and out.token_models == writers, f"request {i} changed"
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    engine.scheduler.check_invariants()
    assert not engine.has_unfinished()


def test_non_finite_logits_fail_only_their_request(engine, oracle, monkeypatch):
    runner = engine.runners[0]
    execute, victim = runner.execute, engine.intake.next_id + 2

    def poisoned(*args):
        logits = execute(*args)
        ids = runner.buffers["sample_request_ids"][:logits.shape[0]].tolist()
        req = engine._requests.get(victim)
        if victim in ids and len(req.tokens) >= 3:
            logits[ids.index(victim), 7] = float("nan")
        return logits

    monkeypatch.setattr(runner, "execute", poisoned)
    errors = engine.stats.errors
    reqs, outs = run_mixed(engine, oracle)
    check_isolated(engine, oracle, reqs, outs, {2}, "not finite")
    assert engine.stats.errors == errors + 1


def test_a_flow_that_raises_fails_only_its_request(engine, oracle, monkeypatch):
    on_token, victim = SplitFlow.on_token, engine.intake.next_id + 4

    def broken(self, model, token, word, logprob, now, probs=None):
        if self.req.id == victim and len(self.req.tokens) >= 5:
            raise RuntimeError("injected flow fault")
        return on_token(self, model, token, word, logprob, now, probs)

    monkeypatch.setattr(SplitFlow, "on_token", broken)
    reqs, outs = run_mixed(engine, oracle)
    check_isolated(engine, oracle, reqs, outs, {4}, "injected flow fault")


def test_a_detokenizer_error_fails_only_its_request(engine, oracle, monkeypatch):
    made = []

    class Flaky(IncrementalDetokenizer):
        def __init__(self, tokenizer):
            super().__init__(tokenizer)
            made.append(self)

        def step(self, tokens):
            if self is made[7] and len(tokens) >= 6:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            return super().step(tokens)

    monkeypatch.setattr(engine_module, "IncrementalDetokenizer", Flaky)
    reqs, outs = run_mixed(engine, oracle, stream=True)
    check_isolated(engine, oracle, reqs, outs, {7}, "injected")


@pytest.mark.parametrize("fault", [RuntimeError("injected runner fault"), torch.OutOfMemoryError("injected OOM")],
                         ids=["exception", "out-of-memory"])
@pytest.mark.parametrize("model", [0, 1], ids=["small", "big"])
def test_a_failed_forward_pass_fails_its_batch_and_the_engine_goes_on(engine, oracle, monkeypatch, model, fault):
    runner = engine.runners[model]
    execute, calls, batch = runner.execute, [0], []

    def once(num_seqs, *args):
        calls[0] += 1
        if calls[0] == 4:
            batch.extend(runner.buffers["seq_request_ids"][:num_seqs].tolist())
            raise fault
        return execute(num_seqs, *args)

    first = engine.intake.next_id
    monkeypatch.setattr(runner, "execute", once)
    reqs, outs = run_mixed(engine, oracle)
    check_isolated(engine, oracle, reqs, outs, {rid - first for rid in batch}, str(fault))
    assert engine.broken is None
    monkeypatch.setattr(runner, "execute", execute)
    reqs, outs = run_mixed(engine, oracle)  # nothing left behind: a clean run is the oracle's again
    assert [out.token_ids for out in outs] == [oracle.run(r)[0] for r in reqs]


def test_a_sampler_that_raises_fails_the_rows_it_was_sampling(engine, oracle, monkeypatch):
    sample, calls, batch = step_loop_module.sample_and_detect, [0], []

    def once(logits, params, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:
            batch.append(len(params))
            raise ValueError("injected sampler fault")
        return sample(logits, params, *args, **kwargs)

    monkeypatch.setattr(step_loop_module, "sample_and_detect", once)
    reqs, outs = run_mixed(engine, oracle)
    failed = {i for i, out in enumerate(outs) if out.finish_reason == "error"}
    assert len(failed) >= batch[0] > 0  # the sampled rows fail, with any other row of that forward pass
    check_isolated(engine, oracle, reqs, outs, failed, "injected sampler fault")


def test_a_fault_that_persists_breaks_the_engine_with_its_cause(pair, oracle, monkeypatch):
    engine = Engine(*pair, kv_cache_bytes=400 * PAGE_BYTES, max_num_batched_tokens=96, progress=False)
    runner = engine.runners[1]

    def dead(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    monkeypatch.setattr(runner, "execute", dead)
    reqs = mixed_requests(oracle)
    with pytest.raises(EngineBroken, match=f"the big model failed {MAX_FAILED_STEPS} times in a row.*illegal memory access"):
        engine.generate([r.question for r in reqs], [params_for(r) for r in reqs], use_tqdm=False)
    assert engine.scheduler.num_free_pages == engine.pool.num_pages  # failed and unfinished alike
    with pytest.raises(EngineBroken):
        engine.generate([reqs[8].question], [params_for(reqs[8])], use_tqdm=False)


@pytest.fixture
def faulty_server(pair):
    """A real server on loopback, in this process, whose small model's runner calls `fault(engine,
    logits)` on every forward pass: the test decides what breaks."""
    import socket
    import threading

    import uvicorn

    from splitreason_engine.async_engine import AsyncEngine
    from splitreason_engine.server import build_app

    hooks = {"fault": lambda engine, logits: None}

    def build():
        engine = Engine(*pair, kv_cache_bytes=400 * PAGE_BYTES, max_num_batched_tokens=96, progress=False)
        runner, execute = engine.runners[0], engine.runners[0].execute

        def hooked(*args):
            logits = execute(*args)
            hooks["fault"](engine, logits)
            return logits

        runner.execute = hooked
        return engine

    engine = AsyncEngine(build)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, "pair"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", hooks, engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


def poison_prompt(marker: int):
    """A fault that makes NaN the logits of every request whose prompt holds token `marker`."""
    def fault(engine, logits):
        ids = engine.runners[0].buffers["sample_request_ids"][:logits.shape[0]].tolist()
        for row, rid in enumerate(ids):
            req = engine._requests.get(rid)
            if req is not None and marker in req.prompt and len(req.tokens) >= 2:
                logits[row] = float("nan")
    return fault


def test_server_answers_a_failed_request_with_500_or_an_error_event_and_serves_the_rest(faulty_server):
    import httpx

    url, hooks, engine = faulty_server
    marker = 77
    hooks["fault"] = poison_prompt(marker)
    body = {"max_tokens": 12, "temperature": 0, "mode": "small", "ignore_eos": True}
    good = httpx.post(url + "/v1/completions", json={"prompt": [5, 6, 7], **body}, timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 12
    bad = httpx.post(url + "/v1/completions", json={"prompt": [5, marker, 7], **body}, timeout=60)
    assert bad.status_code == 500 and "not finite" in bad.json()["error"]["message"]
    assert bad.json()["error"]["code"] == "request_failed"
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": [marker], **body, "stream": True},
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    last = json.loads(lines[-2][6:])
    assert lines[-1] == "data: [DONE]" and last["choices"][0]["finish_reason"] == "error"
    assert "not finite" in last["error"]["message"]
    again = httpx.post(url + "/v1/completions", json={"prompt": [5, 6, 7], **body}, timeout=60)
    assert again.json()["choices"][0]["text"] == good.json()["choices"][0]["text"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert engine.engine.scheduler.num_free_pages == engine.engine.pool.num_pages


def test_a_broken_engine_reports_its_cause_and_answers_503_at_once(faulty_server):
    import httpx

    url, hooks, engine = faulty_server

    def dead(engine, logits):
        raise RuntimeError("device lost (injected)")

    hooks["fault"] = dead
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "mode": "small"}
    for _ in range(MAX_FAILED_STEPS - 1):
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 500
    last = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert last.status_code == 503  # the step that broke the engine fails its streams with it
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and "device lost (injected)" in health.json()["error"]
    start = time.perf_counter()
    refused = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert refused.status_code == 503 and "device lost" in refused.json()["error"]["message"]
    assert time.perf_counter() - start < 2


def test_a_request_whose_output_cannot_be_made_fails_alone(faulty_server, monkeypatch):
    import httpx

    url, hooks, engine = faulty_server
    make_event, marker = engine.engine._event, 77

    def broken_event(req):
        if marker in req.prompt and len(req.tokens) >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return make_event(req)

    monkeypatch.setattr(engine.engine, "_event", broken_event)
    body = {"max_tokens": 10, "temperature": 0, "mode": "small", "ignore_eos": True}
    bad = httpx.post(url + "/v1/completions", json={"prompt": [marker], **body}, timeout=60)
    assert bad.status_code == 500 and "while making its output" in bad.json()["error"]["message"]
    good = httpx.post(url + "/v1/completions", json={"prompt": [5, 6], **body}, timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 10
    assert engine.healthy and engine.engine.scheduler.num_free_pages == engine.engine.pool.num_pages
