"""Every CPU benchmark in its seconds-long --smoke mode: it runs, writes its JSON, records whether
the prefix cache was on, and its baselines mean what they say (each bench checks its own and exits
1 otherwise: a re-prefill computes its whole prompt, a no-reuse run takes nothing from the cache).
bench/soak.py has its own test (test_soak.py)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def smoke(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SANITY CHECK FAILED" not in r.stderr
    return json.loads(out.read_text())


def test_handoff_is_measured_against_an_uncached_reprefill(tmp_path):
    r = smoke("handoff", tmp_path)
    assert r["prefix_caching"] is True and r["sanity_failures"] == []
    for row in r["rows"]:
        assert row["reprefill_cached_tokens"] == 0
        assert row["big_catch_up_tokens_lazy"] >= row["segment"]
        assert row["reprefill_s"]["repeats"] >= 3 and row["reprefill_s"]["spread"] is not None
        assert row["handoff_over_reprefill"] == row["handoff_lazy_s"]["median"] / row["reprefill_s"]["median"]


def test_split_efficiency_runs_without_reuse_with_medians(tmp_path):
    r = smoke("split_efficiency", tmp_path)
    assert r["prefix_caching"] is False and r["sanity_failures"] == []
    assert {row["batch"] for row in r["rows"]} == {1, 4}
    for row in r["rows"]:
        assert row["efficiency_repeats"]["repeats"] >= 3 and row["c_small_ms"] > 0 and row["c_big_ms"] > 0
        assert row["ideal_s"] > 0 and row["measured_s"]["repeats"] >= 3


def test_prefix_cache_bench_compares_fresh_engines(tmp_path):
    r = smoke("prefix_cache", tmp_path)
    assert r["sanity_failures"] == [] and len(r["runs"]) >= 3
    for rep in r["runs"]:
        assert rep["sequential_off"]["cached_tokens"] == 0 and rep["sequential_on"]["cached_tokens"] > 0
    assert all(s["identical_tokens"] for s in r["summary"].values())


def test_cpu_decode_runs_without_the_cache(tmp_path):
    r = smoke("cpu_decode", tmp_path)
    assert r["prefix_caching"] is False and r["sanity_failures"] == []
    assert r["engine_tok_s_b1"] == r["engine_tok_s_b1_repeats"]["median"] > 0


def test_scheduler_bench_runs_as_the_engine_does(tmp_path):
    r = smoke("scheduler", tmp_path)
    assert r["prefix_caching"] is True and r["us_per_step_repeats"]["repeats"] >= 3


def test_split_batch_compares_policies_without_reuse(tmp_path):
    r = smoke("split_batch", tmp_path)
    assert r["prefix_caching"] is False and r["sanity_failures"] == []
    assert all(row["tok_s_repeats"]["repeats"] >= 3 for row in r["rows"])


def test_demo_eval_runs_without_the_cache(tmp_path):
    r = smoke("demo_eval", tmp_path)
    assert r["prefix_caching"] is False and set(r["modes"]) == {"small", "big", "split", "random"}


def test_speculate_bench_checks_greedy_tokens_and_writes_its_keys(tmp_path):
    r = smoke("speculate", tmp_path)
    assert r["prefix_caching"] is False and r["greedy_token_exact"] is True
    for mode in ("split", "big"):
        row = r["demo_cpu"][mode]
        assert row["tok_s_on"]["repeats"] >= 3 and row["big_steps_per_offloaded_token"] > 0
        assert row["latency_per_offloaded_token_ratio"] > 0
    assert {"split_b1", "split_b4", "big_b1", "latency_per_offloaded_token_b1"} <= set(r["simulated_h200"])


def test_verify_costs_times_every_shape_against_the_model(tmp_path):
    r = smoke("verify_costs", tmp_path)
    assert [(s["rows"], s["k"]) for s in r["shapes"]] == [(rows, k) for rows in (1, 4) for k in range(3)]
    assert all(s["measured_s"] > 0 and s["modelled_s"] > 0 for s in r["shapes"])


def test_pass_at_k_samples_share_their_prompt_through_a_real_server(tmp_path, monkeypatch):
    # The server it starts takes this process's intra-op threads (one under xdist): with more,
    # OpenMP spin-waits beside a busy worker made the run eight times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    r = smoke("pass_at_k", tmp_path)
    assert r["prefix_caching"] is True and r["sanity_failures"] == []
    [run] = r["runs"]
    assert run["choices"] == [4, 4] and 0 <= run["pass@1"] <= run["pass@n"] <= 1
    # Each prompt computed once, each further sample its last prompt token only (docs/evaluation.md).
    assert run["prompt_tokens_computed"] == run["prompt_tokens"] + 2 * 3
    assert run["cache_hit_tokens_small"] == 4 * run["prompt_tokens"] - run["prompt_tokens_computed"]
    assert set(r["summary"]) >= {"pass@1", "pass@n", "maj@n", "wall_s"}


def test_logprobs_cost_times_each_setting_and_returns_the_alternatives(tmp_path):
    r = smoke("logprobs_cost", tmp_path)
    assert r["sanity_failures"] == []
    figures = r["vocab_512"]
    assert all(figures[k]["median"] > 0 and figures[k]["repeats"] == 5 for k in ("none", "logprobs", "top20"))
    assert figures["top20_over_none"] > 0
