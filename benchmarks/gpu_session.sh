#!/usr/bin/env bash
# The GPU checks of the Triton backend, one step per call (each fits the device tool's 10-minute
# limit), run from the repository root on a CUDA machine; outputs go to $OUT (default
# benchmarks/results/gpu_session), to be committed with the device and versions they record.
#
#   bash benchmarks/gpu_session.sh tests    # property/kernel/head tests on CUDA tensors (~3-5 min)
#   bash benchmarks/gpu_session.sh static   # static check on this triton (the GPU image's 3.6)
#   bash benchmarks/gpu_session.sh kernels  # issue-3 bar: the three logits sources vs the GEMMs of the same run, with a per-kernel profile
#   bash benchmarks/gpu_session.sh pipelined  # the same with the PIPELINE_TILES launch option (fused, tma)
#   bash benchmarks/gpu_session.sh sweep    # bench_loss.py sweep, all providers (bf16)
#   bash benchmarks/gpu_session.sh configs  # launch-config sweep of the fused and tma kernels (bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    tests|static|kernels|pipelined|sweep|configs) ;;
    *) echo "usage: bash benchmarks/gpu_session.sh tests|static|kernels|pipelined|sweep|configs" >&2; exit 2 ;;
esac
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
export TRITON_INTERPRET=0  # compiled kernels on CUDA tensors, never the interpreter
python -c "import platform, torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
'triton', triton.__version__, 'python', platform.python_version(), 'cuda', torch.version.cuda)" | tee "$OUT/env.txt"
git rev-parse --short HEAD 2>/dev/null >> "$OUT/env.txt"

case "${1:-}" in
    tests)
        RLPLUS_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider \
            tests/test_backends.py tests/test_rlplus_head.py tests/test_triton_kernels.py 2>&1 | tail -60 \
            | tee "$OUT/pytest_cuda.txt" ;;
    static)
        python scripts/check_kernels.py --quick -j "$(nproc)" --json "$OUT/static_check_quick.json" 2>&1 \
            | tail -80 | tee "$OUT/static_check_quick.txt" ;;
    kernels)
        python benchmarks/gpu_kernel_check.py --logits fused,tma,cublas --no-naive --rep 100 --profile \
            --json "$OUT/gpu_kernel_check.json" 2>&1 | tee "$OUT/gpu_kernel_check.txt" ;;
    pipelined)
        python benchmarks/gpu_kernel_check.py --logits fused,tma --no-naive --rep 100 --profile \
            --config '{"PIPELINE_TILES": true}' --json "$OUT/gpu_kernel_check_pipelined.json" 2>&1 \
            | tee "$OUT/gpu_kernel_check_pipelined.txt" ;;
    configs)
        for source in fused tma; do
            python benchmarks/sweep_configs.py --time --logits "$source" --rep 100 2>&1 \
                | tee "$OUT/sweep_configs_$source.txt"
        done ;;
    sweep)
        python benchmarks/bench_loss.py --device cuda --json "$OUT/bench_loss.json" 2>&1 | tail -80 \
            | tee "$OUT/bench_loss.txt" ;;
esac
