"""The timeline (`trace=`, `--trace`): a Chrome / Perfetto trace that holds every handoff a
request's metrics count, well-formed phase slices on a named track per request, one step slice per
model step whose rows and tokens add up to EngineStats, held steps, and a token counter that ends
at the engine's totals; bounded in memory; written by `generate` and by `serve` at shutdown."""

import json
import subprocess
import sys
from collections import defaultdict

import httpx
import pytest

from splitreason_engine import Engine, EngineConfig, SamplingParams
from splitreason_engine.demo import pair_paths
from splitreason_engine.demo.task import evaluation_problems
from splitreason_engine.outputs import RequestMetrics
from splitreason_engine.trace import Trace

SPLIT = SamplingParams(temperature=0, max_tokens=72, mode="split")  # one handoff and back


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The demo pair, traced; no prefix cache, so every token a step carries is one the metrics count."""
    path = tmp_path_factory.mktemp("trace") / "run.json"
    engine = Engine(*pair_paths(), kv_cache_bytes=1 << 24, max_model_len=512, prefix_caching=False,
                    coschedule="eager", trace=path, progress=False)
    yield engine
    engine.close()


def load(engine: Engine) -> list[dict]:
    with open(engine.trace.write()) as f:
        doc = json.load(f)
    assert doc["displayTimeUnit"] == "ms" and doc["otherData"]["events_dropped"] == 0
    return doc["traceEvents"]


def request_tracks(events: list[dict]) -> dict[int, list[dict]]:
    """Each request's events (metadata aside), in time order."""
    tracks = defaultdict(list)
    for e in events:
        if e["pid"] == 2 and e["ph"] != "M":
            tracks[e["tid"]].append(e)
    return {tid: sorted(evs, key=lambda e: (e["ts"], e["ph"] != "i")) for tid, evs in tracks.items()}


def assert_matches_engine_stats(events: list[dict], engine: Engine) -> None:
    """Step slices per model add up to EngineStats' steps, rows and tokens; the counter ends at its tokens."""
    stats = engine.stats
    for model, name in enumerate(("small step", "big step")):
        steps = [e for e in events if e["name"] == name]
        assert all(e["ph"] == "X" and e["pid"] == 1 and e["tid"] == model and e["dur"] >= 0 for e in steps)
        assert len(steps) == stats.steps[model]
        assert sum(e["args"]["rows"] for e in steps) == stats.rows[model]
        assert sum(e["args"]["tokens"] for e in steps) == stats.tokens_processed[model]
    held = [e for e in events if e["name"] == "big model held"]
    assert len(held) == stats.held_steps == sum(e["args"]["big_held"] for e in events if e["name"] == "small step")
    counter = max((e for e in events if e["ph"] == "C"), key=lambda e: e["ts"])
    assert counter["args"] == {"small": stats.small_tokens, "big": stats.big_tokens}


def assert_well_formed(events: list[dict]) -> None:
    """Slices have a duration and never overlap on one track; every track is named."""
    by_track = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] >= 0
            by_track[e["pid"], e["tid"]].append(e)
        assert e["ph"] in "XiCM"
    for evs in by_track.values():
        evs.sort(key=lambda e: e["ts"])
        for a, b in zip(evs, evs[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-2, (a, b)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[1, 0] == "small model" and names[1, 1] == "big model"
    for pid, tid in by_track:
        if pid == 2:
            assert names[pid, tid] == f"request {tid}"


def test_a_demo_split_request_shows_each_handoff_in_order(engine):
    seen = set(request_tracks(load(engine)))
    question = evaluation_problems(1, seed=11)[0].question
    out, = engine.generate([question], SPLIT, use_tqdm=False)
    m = out.metrics
    events = load(engine)
    assert_well_formed(events)
    assert_matches_engine_stats(events, engine)
    (rid, track), = [(tid, evs) for tid, evs in request_tracks(events).items() if tid not in seen]
    assert m.handoffs >= 1
    names = [e["name"] for e in track]
    assert names.count("handoff") == m.handoffs
    # small segment -> handoff -> catch-up -> big segment -> small segment ..., each starting where the last ended
    cycle = ["small segment"] + ["handoff", "catch-up", "big segment", "small segment"] * m.handoffs
    assert names == cycle[:len(names)] and len(names) >= len(cycle) - 2  # it may end in a big segment
    slices = [e for e in track if e["ph"] == "X"]
    for a, b in zip(slices, slices[1:]):
        assert b["ts"] == pytest.approx(a["ts"] + a["dur"], abs=1e-2)
    for e in track:
        if e["name"] == "handoff":
            assert e["ph"] == "i" and e["s"] == "t"
    assert slices[0]["ts"] == pytest.approx(m.arrival_time * 1e6, abs=1e-2)
    assert slices[-1]["ts"] + slices[-1]["dur"] == pytest.approx(m.finished_time * 1e6, abs=1e-2)
    for phase, seconds in (("catch-up", m.catch_up_time), ("big segment", m.big_time), ("small segment", m.small_time)):
        assert sum(e["dur"] for e in slices if e["name"] == phase) == pytest.approx(seconds * 1e6, rel=1e-6)
    assert sum(e["args"]["big_tokens"] for e in slices) == m.big_tokens
    assert sum(e["args"]["small_tokens"] for e in slices) == m.small_tokens
    assert sum(e["args"]["catch_up_tokens"] for e in slices) == m.catch_up_tokens[1]
    assert all(e["args"]["big_tokens"] == 0 for e in slices if e["name"] != "big segment")


def test_held_steps_show_on_the_big_models_track(engine):
    """A handoff while another request writes waits for the big model (gather, min_share 1): the
    steps it waits are instants on the big model's track, and big_held on the small model's step.
    (The demo's first handoff comes about 56 tokens in; a small-mode request writes meanwhile.)"""
    held_before = engine.stats.held_steps
    engine.use_policy("gather", min_share=1.0, max_wait_steps=3)
    try:
        first, second = (p.question for p in evaluation_problems(2, seed=11))
        engine.add_request(first, SamplingParams(temperature=0, max_tokens=64, mode="split"))
        for _ in range(45):
            engine.step()
        engine.add_request(second, SamplingParams(temperature=0, max_tokens=24, mode="small"))
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.use_policy("eager")
    assert engine.stats.held_steps > held_before
    engine.close()  # writes the file; the engine goes on
    with open(engine.trace.path) as f:
        events = json.load(f)["traceEvents"]
    assert_well_formed(events)
    assert_matches_engine_stats(events, engine)
    big_steps = {e["ts"] for e in events if e["name"] == "big step"}
    assert not big_steps & {e["ts"] for e in events if e["name"] == "big model held"}


def test_the_trace_keeps_the_newest_events_and_counts_the_dropped(tmp_path):
    trace = Trace(tmp_path / "t.json", max_events=10)
    metrics = RequestMetrics(arrival_time=0.0)
    for i in range(25):
        trace.model_step(0, float(i), i + 0.5, rows=1, tokens=1)
    metrics.small_tokens = 3
    trace.phase(7, "small", 0.0, 30.0, "catch_up", metrics)
    doc = json.loads(trace.write().read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    assert len(events) == 10 and doc["otherData"]["events_dropped"] == 25 + 2 - 10
    assert [e["name"] for e in events[-2:]] == ["small segment", "handoff"]
    assert events[0]["ts"] == 17e6  # the oldest kept step
    with pytest.raises(ValueError, match="trace_max_events"):
        EngineConfig.from_options(trace_max_events=0)


def test_generate_writes_the_trace_file(tmp_path):
    """The CLI's default models are the demo pair."""
    path = tmp_path / "out" / "trace.json"
    question = evaluation_problems(1, seed=11)[0].question
    r = subprocess.run([sys.executable, "-m", "splitreason_engine.cli", "generate", question, "--max-tokens", "72",
                        "--coschedule", "eager", "--json", "--stats", "--trace", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    assert stats["handoffs"] >= 1
    assert sum(e["name"] == "handoff" for e in events) == stats["handoffs"]
    assert sum(e["name"] == "big step" for e in events) == stats["steps_big"]
    counter = max((e for e in events if e["ph"] == "C"), key=lambda e: e["ts"])
    assert counter["args"] == {"small": stats["small_tokens"], "big": stats["big_tokens"]}


def test_serve_writes_the_trace_at_shutdown(tmp_path):
    """`serve --trace` on the demo pair (the CLI's default models): a split request over HTTP, then
    a graceful shutdown writes the file, whose handoffs and token counter are the ones `usage` reports."""
    from test_server import Server

    path = tmp_path / "serve-trace.json"
    server = Server("--trace", str(path), "--coschedule", "eager")
    try:
        question = evaluation_problems(1, seed=11)[0].question
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"prompt": question, "max_tokens": 72, "temperature": 0, "mode": "split"})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert not path.exists()  # written when the engine closes
    finally:
        server.close()
    assert server.proc.returncode == 0
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    assert_well_formed(events)
    assert usage["handoffs"] >= 1
    assert sum(e["name"] == "handoff" for e in events) == usage["handoffs"]
    counter = max((e for e in events if e["ph"] == "C"), key=lambda e: e["ts"])
    assert counter["args"] == {"small": usage["small_tokens"], "big": usage["big_tokens"]}
