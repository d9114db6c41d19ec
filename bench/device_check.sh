#!/usr/bin/env bash
# Everything a lent GPU machine should run for this project, in one call of under 10 minutes (one
# device command's limit; a 15-minute device budget then leaves no full second run, so steps that
# time out are recorded and the rest still run):
#   1. setup: the card and versions; build the C++ core offline (pip install -e . --no-build-isolation
#      --no-deps --no-index; if that fails, compile csrc/ directly into an overlay on PYTHONPATH);
#   2. the GPU tests (pytest -m gpu, on the test files that have GPU tests; among them
#      tests/test_gpu_compiles.py: no Triton compile after start-up);
#   3. bench/tune_kernels.py (sweeps the decode kernels' launch parameters, writes
#      splitreason_engine/kernels/configs/<card>.json, which the later steps' engines read; copied to $OUT);
#   4. bench/gpu_kernels.py (copy/matmul ceilings, decode attention per layer);
#   5. bench/gpu_decode.py (engine vs Hugging Face decode, bandwidth floor);
#   6. bench/mixed_steps.py (mixed prefill + decode steps: wall time vs kernel time, staged vs in-place inputs);
#   7. bench/split_batch.py (1.5B + 32B in one engine: small-only, big-only, random and split modes at
#      batch 1, 16 and 64 under each co-scheduling policy; JIT compiles after start-up).
# DEVICE_CHECK_STEPS picks steps (default: "pytest tune gpu_kernels gpu_decode split_batch"; mixed_steps on request);
# e.g. DEVICE_CHECK_STEPS="pytest split_batch" for the co-scheduling check alone (about 6 minutes).
# Each step runs under `timeout` inside one budget (DEVICE_CHECK_BUDGET_S, default 560 s); a failed
# or timed-out step is recorded and the later steps still run. The benchmarks' JSON, each step's
# status and the pytest summary are merged into bench/results/device_check_<card>.json (the two
# benchmark JSONs sit beside it); JSON and logs also go to $OUT when it is set. A short table
# comes last.
#
#   bash bench/device_check.sh             # on the GPU machine, from anywhere in the checkout
#   bash bench/device_check.sh --smoke     # the same steps on the CPU (tiny shapes, Triton interpreter);
#                                          # JSON under ${TMPDIR:-/tmp}/device_check_smoke, never bench/results
# Environment: PYTHON (default: $VIRTUAL_ENV/bin/python, else python3), DEVICE_CHECK_SMOKE=1 (= --smoke),
# DEVICE_CHECK_BUDGET_S, DEVICE_CHECK_BUILD=auto|pip|overlay|skip (auto: pip, falling back to overlay;
# with --smoke, no build when the package already imports).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

SMOKE=${DEVICE_CHECK_SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then PY=$VIRTUAL_ENV/bin/python
else PY=python3; fi
BUDGET=${DEVICE_CHECK_BUDGET_S:-560}
STEPS=" ${DEVICE_CHECK_STEPS:-pytest tune gpu_kernels gpu_decode split_batch} "
BUILD_MODE=${DEVICE_CHECK_BUILD:-auto}
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $SMOKE == 1 ]]; then
    RESULTS=${TMPDIR:-/tmp}/device_check_smoke
    SMOKE_FLAG=(--smoke)
else
    RESULTS=$ROOT/bench/results
    SMOKE_FLAG=()
fi
RUN=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
LOGS=${OUT:-$RUN}  # logs go straight to $OUT: they come back even if the call is cut off
mkdir -p "$RESULTS" "$LOGS"
STATUS=$RUN/steps.tsv
: > "$STATUS"

if [[ $SMOKE == 1 ]]; then
    SLUG=cpu-smoke
else
    CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-cuda')" 2>/dev/null)
    SLUG=$(printf '%s' "${CARD:-unknown}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
fi
TUNE_JSON=$RESULTS/tune_kernels_$SLUG.json
KERNELS_JSON=$RESULTS/gpu_kernels_$SLUG.json
DECODE_JSON=$RESULTS/gpu_decode_$SLUG.json
MIXED_JSON=$RESULTS/mixed_steps_$SLUG.json
SPLIT_JSON=$RESULTS/split_batch_$SLUG.json
MERGED_JSON=$RESULTS/device_check_$SLUG.json
rm -f "$TUNE_JSON" "$KERNELS_JSON" "$DECODE_JSON" "$MIXED_JSON" "$SPLIT_JSON"  # a stale file must not pass for this run's result

# Seconds a step may take: its cap, or less so the later steps keep `reserve` seconds of the budget.
step_timeout() {
    local cap=$1 reserve=$2 left
    left=$(( BUDGET - ($(date +%s) - START) - reserve ))
    (( left < 15 )) && left=15
    (( left < cap )) && echo "$left" || echo "$cap"
}

record() {  # name rc seconds timeout
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS"
}

run_step() {  # name cap reserve command...
    local name=$1 cap=$2 reserve=$3 t s rc
    shift 3
    [[ $STEPS == *" $name "* ]] || { echo "=== $name: not selected (DEVICE_CHECK_STEPS)"; return 0; }
    t=$(step_timeout "$cap" "$reserve")
    echo "=== $name (timeout ${t}s): $*"
    s=$(date +%s)
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $(( $(date +%s) - s )) "$t"
    echo "=== $name: exit $rc after $(( $(date +%s) - s )) s"
}

importable() {  # from a neutral folder, as the benchmarks see the package (not the checkout's folder)
    (cd / && "$PY" -c "import splitreason_engine._C, splitreason_engine.kernels.ops") 2>&1
}

# The C++ core without setuptools: csrc/*.cpp -> an overlay package (links to the sources
# and the new _C) put first on PYTHONPATH. Touches nothing in the checkout.
build_overlay() {
    local site=$RUN/site pkg=$RUN/site/splitreason_engine flags suffix f
    mkdir -p "$pkg"
    for f in "$ROOT"/splitreason_engine/*; do ln -sfn "$f" "$pkg/"; done
    rm -f "$pkg"/_C.*
    flags=$("$PY" -c "import pybind11, sysconfig; print('-I' + pybind11.get_include(), '-I' + sysconfig.get_paths()['include'])") || return 1
    suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))") || return 1
    # shellcheck disable=SC2086  # $flags holds two -I options
    timeout "$(step_timeout 240 210)" "${CXX:-c++}" -O3 -std=c++17 -fPIC -shared -fvisibility=hidden $flags -I"$ROOT/csrc" \
        "$ROOT"/csrc/*.cpp -o "$pkg/_C$suffix" || return 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    OVERLAY_SITE=$site
    echo "built $pkg/_C$suffix; PYTHONPATH=$PYTHONPATH"
}

setup() {
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
    "$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "pybind11", "setuptools", "ninja", "pytest"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # report, do not fail: the later steps say what is missing
        print(f"{name}: {type(e).__name__}: {e}")
EOF
    if command -v nvidia-smi > /dev/null; then timeout 20 nvidia-smi; else echo "nvidia-smi: not found"; fi
    local mode=$BUILD_MODE
    if [[ $mode == auto ]]; then
        # On the GPU machine always build (ninja is incremental): a _C left by an earlier call on a
        # warm machine may predate the C++ sources sent with this one.
        if [[ $SMOKE == 1 ]] && importable > /dev/null; then echo "splitreason_engine._C is importable: no build"; return 0; fi
        mode=pip
    fi
    case $mode in
        skip) echo "build skipped (DEVICE_CHECK_BUILD=skip)"; importable; return ;;
        pip)
            echo "building: pip install -e . --no-build-isolation --no-deps --no-index"
            if timeout "$(step_timeout 200 240)" "$PY" -m pip install -q -e . --no-build-isolation --no-deps --no-index && importable; then
                return 0
            fi
            echo "pip install failed: compiling csrc/ directly instead" ;;
    esac
    build_overlay || {
        echo "BUILD FAILED: the C++ core needs a C++17 compiler (c++ or \$CXX) and pybind11 for $PY;"
        echo "without it splitreason_engine cannot be imported and every later step will fail."
        return 1
    }
    importable
}

echo "=== device check: $([[ $SMOKE == 1 ]] && echo 'SMOKE (CPU)' || echo GPU), python $PY, budget ${BUDGET}s"
s=$(date +%s)
setup > "$LOGS/setup.log" 2>&1
rc=$?
cat "$LOGS/setup.log"
record setup "$rc" $(( $(date +%s) - s )) 0
echo "=== setup: exit $rc"

# Only files with GPU tests: the others may import what this machine lacks (fastapi, openai).
mapfile -t GPU_TESTS < <(grep -lE 'pytest\.mark\.gpu|pytestmark *=.*gpu' tests/test_*.py 2>/dev/null)
(( ${#GPU_TESTS[@]} )) || GPU_TESTS=(tests/)
# `python -m pytest` puts its working folder first on sys.path: the checkout normally, $RUN after an
# overlay build (so that the overlay's splitreason_engine, with its _C, is the one imported).
PYTEST_DIR=$ROOT
[[ -n "${OVERLAY_SITE:-}" ]] && PYTEST_DIR=$RUN
run_step pytest 140 340 env --chdir="$PYTEST_DIR" "$PY" -m pytest -q -m gpu -rfE -p no:cacheprovider \
    --rootdir="$ROOT" -c "$ROOT/pyproject.toml" "${GPU_TESTS[@]/#/$ROOT/}"
if [[ $SMOKE == 1 ]]; then TUNE_ARGS=(--smoke --out "$RESULTS/kernel_config_smoke.json"); else TUNE_ARGS=(--budget-s 90); fi
run_step tune 110 230 "$PY" bench/tune_kernels.py "${TUNE_ARGS[@]}" --json "$TUNE_JSON"
run_step gpu_kernels 80 150 "$PY" bench/gpu_kernels.py "${SMOKE_FLAG[@]}" --json "$KERNELS_JSON"
run_step gpu_decode 150 40 "$PY" bench/gpu_decode.py "${SMOKE_FLAG[@]}" --json "$DECODE_JSON"
run_step mixed_steps 60 0 "$PY" bench/mixed_steps.py "${SMOKE_FLAG[@]}" --json "$MIXED_JSON"
if [[ $SMOKE == 1 ]]; then SPLIT_ARGS=(--device cpu --batches 1 2 --tokens 32 --hidden 128 --big-layers 2); else SPLIT_ARGS=(); fi
run_step split_batch 240 0 "$PY" bench/split_batch.py "${SPLIT_ARGS[@]}" --json "$SPLIT_JSON"

export DC_STATUS=$STATUS DC_KERNELS=$KERNELS_JSON DC_DECODE=$DECODE_JSON DC_MIXED=$MIXED_JSON DC_SPLIT=$SPLIT_JSON \
    DC_MERGED=$MERGED_JSON DC_STEPS="$STEPS" \
    DC_PYTEST_LOG=$LOGS/pytest.log DC_LOGS=$LOGS DC_SMOKE=$SMOKE DC_START=$START DC_SLUG=$SLUG
MERGE_PY=$PY
"$MERGE_PY" -c "pass" 2> /dev/null || MERGE_PY=python3
if [[ -n "${OUT:-}" ]]; then
    for f in "$TUNE_JSON" "$KERNELS_JSON" "$DECODE_JSON" "$MIXED_JSON" "$SPLIT_JSON"; do [[ -f $f ]] && cp "$f" "$OUT/"; done
    [[ $SMOKE == 0 && -f splitreason_engine/kernels/configs/$SLUG.json ]] && cp "splitreason_engine/kernels/configs/$SLUG.json" "$OUT/kernel_config_$SLUG.json"
fi
"$MERGE_PY" - <<'EOF'
"""Merges the step statuses, the pytest summary and both benchmarks' JSON; prints the final table."""
import json
import os
import re
import shutil
import time
from pathlib import Path

env = os.environ


def load(path: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


steps = []
for line in Path(env["DC_STATUS"]).read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    rc = int(rc)
    state = "ok" if rc == 0 else ("TIMEOUT" if rc in (124, 137) else f"FAILED (exit {rc})")
    steps.append({"step": name, "exit": rc, "seconds": int(seconds), "timeout_s": int(limit), "status": state})

summary = None
try:
    lines = Path(env["DC_PYTEST_LOG"]).read_text().splitlines()
    summary = next((l.strip("= ") for l in reversed(lines)
                    if re.search(r"\b(passed|failed|errors?|skipped|deselected|no tests ran)\b", l)), None)
except OSError:
    pass
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary or "")}

kernels, decode, mixed = load(env["DC_KERNELS"]), load(env["DC_DECODE"]), load(env["DC_MIXED"])
split = load(env["DC_SPLIT"])
info = kernels or decode or {}
merged = {
    "card": info.get("card"), "driver": info.get("driver"), "torch": info.get("torch"), "triton": info.get("triton"),
    "cuda": info.get("cuda"), "smoke": env["DC_SMOKE"] == "1", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "total_s": int(time.time()) - int(env["DC_START"]), "steps": steps,
    "pytest": {"summary": summary, "counts": counts}, "gpu_kernels": kernels, "gpu_decode": decode,
    "mixed_steps": mixed, "split_batch": split,
    "targets": (kernels or {}).get("targets", []) + (decode or {}).get("targets", []),
}
out = Path(env["DC_MERGED"])
out.write_text(json.dumps(merged, indent=2) + "\n")
if env.get("OUT"):
    shutil.copy(out, Path(env["OUT"]) / out.name)

# ---- the final table -----------------------------------------------------------------------
print()
print("=" * 100)
print(f"DEVICE CHECK{' (SMOKE: CPU, not a measurement)' if merged['smoke'] else ''} | card {merged['card']} | "
      f"driver {merged['driver']} | torch {merged['torch']} | triton {merged['triton']} | {merged['total_s']} s")
for s in steps:
    extra = f"  {summary}" if s["step"] == "pytest" and summary else ""
    print(f"  {s['step']:<12} {s['status']:<18} {s['seconds']:>4} s{extra}")
if kernels:
    mm = kernels["matmul"]
    print(f"  ceilings: copy {kernels['copy_bandwidth_gb_s']:.0f} GB/s (read+write) | {mm['n']}^3 {mm['dtype']} matmul "
          f"{mm['best_tflops']:.0f} TFLOP/s")
    print(f"  {'decode attention':<22} {'us':>8} {'of copy':>8} {'ref/krn':>8} {'rel err':>8}")
    for r in kernels["decode_attention"]:
        if "error" in r:
            print(f"  {r['case']:<22} ERROR {r['error'][:70]}")
            continue
        ratio = f"{r['ref_over_kernel']:.1f}" if "ref_over_kernel" in r else "-"
        print(f"  {r['case']:<22} {r['us_best']:>8.1f} {r['copy_fraction']:>8.1%} {ratio:>8} "
              f"{r['rel_err_vs_fp32']:>8.1e}{'' if r['correct'] else '  WRONG'}")
if decode:
    print(f"  {'decode e2e (tok/s)':<22} {'engine':>8} {'HF':>8} {'floor':>8} {'eng/fl':>7} {'eng/HF':>7}")
    for name, r in decode["models"].items():
        e, h = r.get("engine", {}).get("tok_s"), r.get("hf", {}).get("tok_s")
        f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        print(f"  {name:<22} {f(e, '.1f'):>8} {f(h, '.1f'):>8} {r['floor_tok_s']:>8.1f} "
              f"{f(r.get('engine_over_floor'), '.1%'):>7} {f(r.get('engine_over_hf'), '.2f'):>7}"
              + "".join(f"  {who} error: {r[who]['error'][:60]}" for who in ("engine", "hf")
                        if "error" in r.get(who, {})))
if mixed:
    print(f"  {'mixed step (ms)':<26} {'staged':>8} {'in place':>9} {'kernels':>8} {'compiles':>8}   "
          f"(kernel warm-up {mixed.get('warmup_s', 0):.1f} s)")
    for r in mixed["cases"]:
        g = r.get("gpu") or {}
        k = "-" if g.get("kernels_ms") is None else f"{g['kernels_ms']:.2f}"
        c = r["staged"]["compiles_while_timed"] + r["in_place"]["compiles_while_timed"]
        print(f"  {r['case']:<26} {r['staged']['wall_ms_median']:>8.2f} {r['in_place']['wall_ms_median']:>9.2f} "
              f"{k:>8} {c:>8}")
if split:
    print(f"  split / big-only ({split['headline_policy']}): "
          + ", ".join(f"b{b} random {split.get(f'speedup_b{b}') or 0:.2f}x split {split.get(f'speedup_split_b{b}') or 0:.2f}x"
                      for b in split["config"]["batches"])
          + f" | JIT compiles after start-up: {split.get('jit_compiles_after_startup')}")
for name, data in (("gpu_kernels", kernels), ("gpu_decode", decode), ("mixed_steps", mixed), ("split_batch", split)):
    if data is None and f" {name} " in env["DC_STEPS"]:
        print(f"  {name}: no JSON (the step failed or timed out: see its log)")
print("  targets:")
for t in merged["targets"]:
    v = t.get("value")
    value = "-" if v is None else (f"{v:.1f} us" if t["unit"] == "us" else f"{v:.1f} tok/s" if t["unit"] == "tok/s"
                                   else f"{v:.1%}")
    note = f"  ({t['note']})" if t.get("note") else ""
    print(f"    {t['name']:<44} {value:>11}  {t['target']:<34} {'meets' if t['meets'] else 'MISSES'}{note}")
failed = [s["step"] for s in steps if s["exit"] != 0]
print(f"  JSON: {out}" + (" (and $OUT)" if env.get("OUT") else "") + f" | logs: {env['DC_LOGS']}"
      + (f" | failed steps: {', '.join(failed)}" if failed else ""))
EOF
