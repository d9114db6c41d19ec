"""bench/soak.py, very briefly: a real server on the demo pair under the chaos mix, every request
classified, none lost, no KV page leaked."""

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).parent.parent / "bench" / "soak.py"


def test_brief_soak_loses_nothing_and_leaks_no_pages(tmp_path):
    out = tmp_path / "soak.json"
    # Short requests so that a 4 s probe completes some; a small queue limit so that the burst
    # (2 x 16 + 64 requests at once) meets 503s.
    cmd = [sys.executable, str(SOAK), "--probe-s", "4", "--duration", "12", "--min-tokens", "4", "--max-tokens", "24",
           "--sample-s", "1", "--cover-spacing", "0.2", "--seed", "3", "--json", str(out),
           "--plot", str(tmp_path / "soak.png"), "--server-arg=--max-waiting=16"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.is_file(), run.stdout + run.stderr
    r = json.loads(out.read_text())
    report = run.stdout[-4000:]

    counts = r["counts"]
    assert counts["lost"] == 0, (r["causes"]["lost"], r["failed_requests"], report)
    assert counts["error"] == 0, (r["causes"]["error"], r["failed_requests"], report)
    # Every request lands in exactly one class.
    classes = ("completed", "disconnected", "aborted", "rejected", "overload", "error", "lost")
    assert counts["unclassified"] == 0 and sum(counts[c] for c in classes) == counts["total"], counts
    assert counts["accepted"] >= counts["completed"] > 0
    # Every kind was sent, and each intended class came from where it should: completions,
    # our disconnects and aborts, 4xx for malformed bodies, 503s (with Retry-After) in the burst.
    assert r["checks"]["every_class_counted"]["ok"], r["checks"]["every_class_counted"]
    assert set(r["by_kind"]) == {"valid", "disconnect", "abort", "malformed", "oversized", "auth", "burst"}
    for name in ("malformed_refused_4xx", "oversized_refused_4xx", "wrong_key_refused_401", "exact_refusal_statuses",
                 "kv_pages_total_metric", "clean_exit"):
        assert r["checks"][name]["ok"], (name, r["checks"][name])
    assert r["overload"]["with_retry_after"] == r["overload"]["count"] > 0

    idle = r["idle"]
    assert idle["reached"] and idle["running"] == 0 and idle["waiting"] == 0, idle
    assert idle["leaked_pages"] == 0 and idle["kv_pages_used"] == 0, idle
    assert r["checks"]["no_leaked_pages"]["ok"] and r["checks"]["no_lost_requests"]["ok"]

    # Measured and recorded, whatever the verdict: RSS after warm-up and at the end, the shutdown,
    # latency percentiles, the machine and the server's arguments.
    assert r["rss"]["warm_mib"] and r["rss"]["end_mib"] and r["rss"]["max_drift_pct"] is not None
    assert r["shutdown"]["exit_code"] is not None and not r["shutdown"]["killed_after_timeout"]
    assert r["latency"]["e2e_s"]["p50"] is not None and r["latency"]["ttft_streamed_s"]["p50"] is not None
    assert r["machine"]["cores"] and "--max-waiting=16" in r["server"]["argv"]
    assert r["prefix_caching"] is True  # the server's default, read from its /metrics
    assert (tmp_path / "soak.png").is_file()
    assert "LOST" in report and "leaked" in report
    # Its exit status follows its hard checks.
    hard_ok = all(c["ok"] for c in r["checks"].values() if c["hard"])
    assert (run.returncode == 0) == hard_ok, (run.returncode, r["failed_checks"], run.stderr[-2000:])
