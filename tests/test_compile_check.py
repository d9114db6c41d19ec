"""bench/compile_check.py: the Hopper compile of the demo pair's warm-up variants (its --smoke run,
which CI also runs in full), and its barrier check on PTX written by hand."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from compile_check import barrier_before_release  # noqa: E402
from launches import KERNELS  # noqa: E402

SOURCE = {"k.py": ["    x = 1", "    tl.debug_barrier()  # partials before the release", "    y = 2"]}
HEAD = '.version 8.0\n.target sm_90a\n'
TAIL = '\t.file\t1 "/somewhere/else/k.py"\n'
STORE = "\t@%p1 st.global.b32 [ %rd1 + 0 ], { %r1 };\n"
ATOMIC = "\t@%p2 atom.global.gpu.acq_rel.add.u32 %r2, [ %rd2 + 0 ], %r3;\n"


def barrier(line: int) -> str:
    return f"\t.loc\t1 {line} 5\n\tbar.sync \t0;\n"


def test_a_barrier_from_debug_barrier_between_the_stores_and_the_release_passes():
    assert barrier_before_release(HEAD + STORE + barrier(2) + barrier(3) + ATOMIC + TAIL, SOURCE) is True


def test_a_barrier_from_another_line_does_not_count():
    # Triton's own barrier for the atomic's result slot sits on the atomic's line.
    assert barrier_before_release(HEAD + STORE + barrier(3) + ATOMIC + TAIL, SOURCE) is False


def test_no_barrier_or_one_before_the_last_store_fails():
    assert barrier_before_release(HEAD + STORE + ATOMIC + TAIL, SOURCE) is False
    assert barrier_before_release(HEAD + barrier(2) + STORE + ATOMIC + TAIL, SOURCE) is False
    # Every release atomic needs its own.
    assert barrier_before_release(HEAD + STORE + barrier(2) + ATOMIC + STORE + ATOMIC + TAIL, SOURCE) is False


def test_without_line_info_or_source_it_fails_and_without_atomics_it_has_nothing_to_say():
    assert barrier_before_release(HEAD + STORE + "\tbar.sync \t0;\n" + ATOMIC + TAIL, SOURCE) is False
    assert barrier_before_release(HEAD + STORE + barrier(2) + ATOMIC + TAIL, {}) is False
    assert barrier_before_release(HEAD + STORE + barrier(2) + TAIL, SOURCE) is None
    relaxed = ATOMIC.replace("acq_rel", "relaxed")
    assert barrier_before_release(HEAD + STORE + relaxed + TAIL, SOURCE) is None


def test_smoke_compiles_every_kernel_of_the_demo_pair_for_hopper(tmp_path):
    out = tmp_path / "compile_check.json"
    command = [sys.executable, str(BENCH / "compile_check.py"), "--smoke", "--workers", "1", "--json", str(out)]
    r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["targets"] == ["sm_90a"] and d["problems"] == [] and d["failures"] == []
    assert set(d["kernels"]) == KERNELS  # the warm-up reached every kernel, and each compiled
    assert d["variants"] == d["hot_path_variants"] >= 20
    assert not any(e["hot_path"] for e in d["spilling"])
    # The control: the merge kernels compiled without their debug_barrier() fail the check.
    assert sorted(c["kernel"] for c in d["barrier_controls"]) == ["_decode_split_kernel", "_sample_detect_kernel"]
    assert all(c["barrier_before_release"] is False for c in d["barrier_controls"])
    for per in d["kernels"].values():
        p = per["sm_90a"]
        assert p["variants"] >= 1 and 0 < p["max_registers_hot_path"] <= 255
        assert p["max_shared_bytes"] <= p["shared_limit_bytes"]
