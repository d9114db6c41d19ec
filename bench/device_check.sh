#!/usr/bin/env bash
# Everything a lent GPU machine should run for this project, in one call of under 8 minutes (a
# 15-minute device budget then leaves time for a second, shorter run). In order, most needed first:
#   1. setup: the card and versions; build the C++ core offline (pip install -e . --no-build-isolation
#      --no-deps --no-index; if that fails, compile csrc/ directly into an overlay on PYTHONPATH);
#   2. pytest: the GPU tests (pytest -m gpu, on the test files that have GPU tests), the stress checks
#      of tests/test_gpu_stress.py first (random decode batches, back-to-back launches, four layers in
#      one CUDA graph, the sampler at 64 x 152k), then tests/test_gpu_compiles.py (no Triton compile
#      after start-up) and the rest;
#   3. memcheck, initcheck: compute-sanitizer over each kernel's GPU test, when the tool is on the
#      machine (recorded as skipped otherwise);
#   4. bench/gpu_decode.py (engine vs Hugging Face decode, bandwidth floor);
#   5. bench/split_batch.py (1.5B + 32B in one engine, dummy weights: every mode at batch 1, 16 and 64
#      under each co-scheduling policy; JIT compiles after start-up);
#   6. bench/verify_costs.py (drafting's verify steps, k = 0..8 at 1-64 rows, against the cost model
#      bench/speculate.py simulates with);
#   7. bench/gpu_kernels.py (copy/matmul ceilings, decode attention per layer, sampler, GEMV);
#   8. bench/tune_kernels.py (sweeps the kernels' launch parameters in what is left of the budget and
#      writes splitreason_engine/kernels/configs/<card>.json, copied to $OUT: commit it);
#   9. bench/mixed_steps.py, only when DEVICE_CHECK_STEPS names it.
# DEVICE_CHECK_STEPS picks steps (default: "pytest memcheck initcheck gpu_decode split_batch verify_costs
# gpu_kernels tune"). Each step runs under `timeout` inside one budget (DEVICE_CHECK_BUDGET_S, default 470 s), its
# cap shortened so the later steps keep a reserve; a failed or timed-out step is recorded and the later
# steps still run. After every step bench/device_check_report.py merges what exists so far into
# bench/results/device_check_<card>.json (the benchmarks' JSON sit beside it), and copies all of it to
# $OUT when that is set: a run cut short still returns what it measured. Its last lines are a table
# against the targets of issues 12 and 13.
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
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
STEPS=" ${DEVICE_CHECK_STEPS:-pytest memcheck initcheck gpu_decode split_batch verify_costs gpu_kernels tune} "
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
VERIFY_JSON=$RESULTS/verify_costs_$SLUG.json
MERGED_JSON=$RESULTS/device_check_$SLUG.json
rm -f "$TUNE_JSON" "$KERNELS_JSON" "$DECODE_JSON" "$MIXED_JSON" "$SPLIT_JSON" "$VERIFY_JSON"  # a stale file must not pass for this run's result

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
    report
}

report() {  # the merged JSON of what has run so far (and $OUT); with --table, the final table too
    "$MERGE_PY" "$ROOT/bench/device_check_report.py" "$@" || echo "report: exit $? (the steps' own JSON and logs are in $LOGS)"
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

MERGE_PY=$PY
"$MERGE_PY" -c "pass" 2> /dev/null || MERGE_PY=python3
export DC_STATUS=$STATUS DC_KERNELS=$KERNELS_JSON DC_DECODE=$DECODE_JSON DC_SPLIT=$SPLIT_JSON DC_TUNE=$TUNE_JSON \
    DC_VERIFY=$VERIFY_JSON \
    DC_MERGED=$MERGED_JSON DC_STEPS="$STEPS" DC_PYTEST_LOG=$LOGS/pytest.log DC_LOGS=$LOGS DC_SMOKE=$SMOKE \
    DC_START=$START DC_SLUG=$SLUG

echo "=== device check: $([[ $SMOKE == 1 ]] && echo 'SMOKE (CPU)' || echo GPU), python $PY, budget ${BUDGET}s"
s=$(date +%s)
setup > "$LOGS/setup.log" 2>&1
rc=$?
cat "$LOGS/setup.log"
record setup "$rc" $(( $(date +%s) - s )) 0
echo "=== setup: exit $rc"
report

# Only files with GPU tests: the others may import what this machine lacks (fastapi, openai). The
# stress checks and the no-compile test first: a run cut short has those.
mapfile -t FOUND < <(grep -lE 'pytest\.mark\.gpu|pytestmark *=.*gpu' tests/test_*.py 2>/dev/null)
GPU_TESTS=()
for f in tests/test_gpu_stress.py tests/test_gpu_compiles.py "${FOUND[@]}"; do
    [[ " ${FOUND[*]} " == *" $f "* && " ${GPU_TESTS[*]} " != *" $f "* ]] && GPU_TESTS+=("$f")
done
(( ${#GPU_TESTS[@]} )) || GPU_TESTS=(tests/)
# `python -m pytest` puts its working folder first on sys.path: the checkout normally, $RUN after an
# overlay build (so that the overlay's splitreason_engine, with its _C, is the one imported).
PYTEST_DIR=$ROOT
[[ -n "${OVERLAY_SITE:-}" ]] && PYTEST_DIR=$RUN
PYTEST=(env --chdir="$PYTEST_DIR" "$PY" -m pytest -q -m gpu -rfE -p no:cacheprovider --rootdir="$ROOT"
        -c "$ROOT/pyproject.toml")
run_step pytest 130 300 "${PYTEST[@]}" "${GPU_TESTS[@]/#/$ROOT/}"

# compute-sanitizer over each kernel's plain GPU tests (the CUDA-graph tests only replay the same kernels).
KERNEL_TESTS=(tests/test_kernels_attention.py tests/test_kernels_elementwise.py tests/test_kernels_linear.py
              tests/test_kernels_sample.py)
SANITIZE_K="decode_cuda_bf16 or extend_cuda_bf16 or rope_store_kv_gpu or norms_gpu or silu_and_mul_gpu"
SANITIZE_K+=" or (qwen_1_5b and gate_up) or reference_on_gpu"
for tool in memcheck initcheck; do
    if command -v compute-sanitizer > /dev/null && [[ $SMOKE == 0 ]]; then
        run_step "$tool" 50 230 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
            "${PYTEST[@]}" -k "$SANITIZE_K" "${KERNEL_TESTS[@]/#/$ROOT/}"
    elif [[ $STEPS == *" $tool "* ]]; then
        echo "=== $tool: skipped (no compute-sanitizer on this machine$([[ $SMOKE == 1 ]] && echo ', or --smoke'))"
        record "$tool" 200 0 0
        report
    fi
done

run_step gpu_decode 120 170 "$PY" bench/gpu_decode.py "${SMOKE_FLAG[@]}" --json "$DECODE_JSON"
if [[ $SMOKE == 1 ]]; then SPLIT_ARGS=(--device cpu --batches 1 2 --tokens 32 --hidden 128 --big-layers 2); else SPLIT_ARGS=(); fi
run_step split_batch 150 60 "$PY" bench/split_batch.py "${SPLIT_ARGS[@]}" --json "$SPLIT_JSON"
run_step verify_costs 90 30 "$PY" bench/verify_costs.py "${SMOKE_FLAG[@]}" --json "$VERIFY_JSON"
run_step gpu_kernels 60 30 "$PY" bench/gpu_kernels.py "${SMOKE_FLAG[@]}" --json "$KERNELS_JSON"
run_step mixed_steps 60 30 "$PY" bench/mixed_steps.py "${SMOKE_FLAG[@]}" --json "$MIXED_JSON"
# The sweep gets what is left of the budget: its own --budget-s is its timeout less 15 s.
if [[ $SMOKE == 1 ]]; then TUNE_ARGS=(--smoke --out "$RESULTS/kernel_config_smoke.json")
else TUNE_BUDGET=$(( $(step_timeout 120 0) - 15 )); TUNE_ARGS=(--budget-s $(( TUNE_BUDGET < 10 ? 10 : TUNE_BUDGET ))); fi
run_step tune 120 0 "$PY" bench/tune_kernels.py "${TUNE_ARGS[@]}" --json "$TUNE_JSON"
if [[ -n "${OUT:-}" && $SMOKE == 0 && -f splitreason_engine/kernels/configs/$SLUG.json ]]; then
    cp "splitreason_engine/kernels/configs/$SLUG.json" "$OUT/kernel_config_$SLUG.json"
fi
report --table
