#!/usr/bin/env bash
# The GPU checks of the Triton backend, run from the repository root on a CUDA machine; outputs go
# to $OUT (default benchmarks/results/gpu_session), to be committed with what env.txt records.
# Several steps may share one call (a lent machine is handed back after 30 s idle, and each fresh
# start costs minutes of the budget): they run in order until SESSION_SECONDS (default 560, under the
# device tool's 600 s limit) are spent, each under `timeout`, so a step cut short still leaves its log.
#
#   GIT_COMMIT=<hash> bash benchmarks/gpu_session.sh loss pipelined kernels   # the issue-3 bar first: ~6-9 min
#   bash benchmarks/gpu_session.sh loss       # rlplus_loss fwd+bwd end to end: two-pass (fused, tma, cublas), single-pass
#   bash benchmarks/gpu_session.sh pipelined  # the same, two-pass, with the PIPELINE_TILES launch option (fused, tma)
#   bash benchmarks/gpu_session.sh kernels    # the launchers of the three logits sources vs the GEMMs, per-kernel profile
#   bash benchmarks/gpu_session.sh autotune   # the fused launchers under RLPLUS_AUTOTUNE=1 (never yet run on a GPU)
#   bash benchmarks/gpu_session.sh tests      # property/kernel/head tests on CUDA tensors (~3-8 min)
#   bash benchmarks/gpu_session.sh configs    # launch-config sweep of the fused and tma kernels (bf16)
#   bash benchmarks/gpu_session.sh sweep      # bench_loss.py sweep, bf16: naive, torch.compile, triton (both schedules)
#   bash benchmarks/gpu_session.sh static     # static check on the image's triton (also runs without a GPU)
#
# Pass GIT_COMMIT=<hash> when the tree was copied without .git; PYTHON overrides the interpreter.
# Only the loss and pipelined steps can say MEETS: the bar is rlplus_loss's step, with naive's memory beside it.
# DRY_RUN=1 runs the loss, kernels and pipelined steps on the CPU (gpu_kernel_check.py --dry-run: small shapes,
# kernels interpreted, no measurement), as tests/test_gpu_scripts.py does: that a GPU's minutes will not be lost
# to a broken script.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
STEPS=(loss kernels pipelined autotune tests configs sweep static)
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_session.sh STEP... (${STEPS[*]})" >&2; exit 2; }
DRY=()  # the scripts' flag in a dry run
[ "${DRY_RUN:-0}" = 0 ] || DRY=(--dry-run)
for step in "$@"; do
    [[ " ${STEPS[*]} " == *" $step "* ]] || { echo "unknown step '$step' (${STEPS[*]})" >&2; exit 2; }
    [[ ${#DRY[@]} -eq 0 || " loss kernels pipelined static " == *" $step "* ]] \
        || { echo "step '$step' has no dry run (DRY_RUN: loss kernels pipelined static)" >&2; exit 2; }
done

OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the GPU image's python3 is the one that holds torch
# the package is not installed there: every script imports it from this checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels on CUDA tensors, never the interpreter (a dry run's script sets it)
export TEARDOWN_CUPTI=1  # the kernels step's profiler detaches CUPTI when done: later timings run without it
DEADLINE=$((SECONDS + ${SESSION_SECONDS:-560}))

[ ${#DRY[@]} -gt 0 ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
    || { echo "no CUDA device visible to $PY" >&2; exit 3; }
DEVICE_NAME="torch.cuda.get_device_name()"
[ ${#DRY[@]} -eq 0 ] || DEVICE_NAME="'dry run on the CPU'"
{
    echo "steps: $*; $(date -u +%FT%TZ); commit ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    "$PY" -c "import platform, torch, triton; print($DEVICE_NAME, 'torch', torch.__version__,
'triton', triton.__version__, 'python', platform.python_version(), 'cuda', torch.version.cuda)"
} | tee "$OUT/env.txt"

run() {  # run LOG COMMAND...: the command under the time left, its output to the terminal and $OUT/LOG
    local log=$1 left=$((DEADLINE - SECONDS))
    shift
    if [ "$left" -lt 20 ]; then echo "skipped (no time left): $*" | tee "$OUT/$log"; return 124; fi
    echo "\$ $* (timeout ${left}s)" | tee "$OUT/$log"
    timeout "$left" "$@" 2>&1 | tee -a "$OUT/$log"
}

status=0
for step in "$@"; do
    case "$step" in
        loss)
            run gpu_loss_check.txt "$PY" benchmarks/gpu_kernel_check.py ${DRY[@]+"${DRY[@]}"} \
                --loss two-pass,single-pass --logits fused,tma,cublas --rep 500 --profile --json "$OUT/gpu_loss_check.json" ;;
        kernels)
            run gpu_kernel_check.txt "$PY" benchmarks/gpu_kernel_check.py ${DRY[@]+"${DRY[@]}"} \
                --logits fused,tma,cublas --no-naive --rep 100 --profile --json "$OUT/gpu_kernel_check.json" ;;
        pipelined)
            run gpu_loss_check_pipelined.txt "$PY" benchmarks/gpu_kernel_check.py ${DRY[@]+"${DRY[@]}"} \
                --loss two-pass --logits fused,tma --rep 500 --profile --config '{"PIPELINE_TILES": true}' \
                --json "$OUT/gpu_loss_check_pipelined.json" ;;
        autotune)
            RLPLUS_AUTOTUNE=1 run gpu_kernel_check_autotune.txt "$PY" benchmarks/gpu_kernel_check.py --logits fused \
                --no-naive --quick --rep 100 --json "$OUT/gpu_kernel_check_autotune.json" ;;
        tests)
            RLPLUS_TEST_DEVICE=cuda run pytest_cuda.txt "$PY" -m pytest -q -p no:cacheprovider --durations=15 \
                tests/test_backends.py tests/test_rlplus_head.py tests/test_triton_kernels.py ;;
        configs)
            for source in fused tma; do
                run "sweep_configs_$source.txt" "$PY" benchmarks/sweep_configs.py --time --logits "$source" --rep 100 \
                    || status=$?
            done ;;
        sweep)  # the torch backend is left out: on a GPU it is the slow fallback (about 300 s of the sweep)
            run bench_loss.txt "$PY" benchmarks/bench_loss.py --device cuda --providers naive compile triton triton-single-pass \
                --json "$OUT/bench_loss.json" ;;
        static)
            run static_check_quick.txt "$PY" scripts/check_kernels.py --quick -j "$(nproc)" \
                --json "$OUT/static_check_quick.json" ;;
    esac
    rc=$?
    [ "$rc" -eq 0 ] || { echo "step $step: exit $rc" | tee -a "$OUT/env.txt"; status=$rc; }
done
exit "$status"
