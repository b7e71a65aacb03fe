#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine, at most 8 minutes, that writes its figures to one file.
#
#   bash scripts/gpu_check.sh [SUMMARY_FILE]        # default: gpu_check_summary.md in the repository root
#
# Steps, each under its own time limit (seconds in brackets), each one's output kept in the summary:
#   1. install the package in the current Python (pip install -e '.[dev]')          [120]
#   2. the device (nvidia-smi, torch's view of it)                                  [15]
#   3. the CUDA-only tests (pytest -k "cuda or gpu")                                 [60]
#   4. bench_adapters.py: ViT-B-16, bf16 autocast, batch 32, all six linears, every method  [100]
#   5. bench_rank_monitor.py: the monitor's cost next to a GPU training step          [60]
#   6. the demo on the GPU (train.py experiment=demo trainer=gpu, bf16-mixed)         [45]
#   7. bench_precision.py on the GPU, one seed: fp32 / bf16-mixed / fp16-mixed demo  [70]
# A step that fails or runs out of time is marked so and the next one runs. Environment:
#   PYTHON=python3.11   the interpreter (default: python)
#   KR_VLM_GPU_CHECK_DEVICE=cpu   run steps 3-7 on the CPU with tiny settings: checks the script itself where
#                       no GPU is (no install, no CUDA needed; the figures then mean nothing)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SUMMARY=$(realpath -m "${1:-gpu_check_summary.md}")
PYTHON=${PYTHON:-python}
DEVICE=${KR_VLM_GPU_CHECK_DEVICE:-cuda}
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
STARTED=$(date +%s)
FAILED=0

if [[ $DEVICE == cuda ]]; then
    BENCH_ADAPTERS=(--device cuda --precision bf16 --batch-size 32 --targets all --steps 5 --warmup 2)
    BENCH_MONITOR=(--device cuda --batch-size 32 --repeats 3)
    DEMO=(experiment=demo trainer=gpu)
    PRECISION=(--seeds 1 -- trainer=gpu)
else  # a dry run of the script on the CPU: the smallest settings that go through every step
    BENCH_ADAPTERS=(--device cpu --precision bf16 --batch-size 1 --targets mlp --steps 3 --warmup 0
        --methods kradapter lora floor)
    BENCH_MONITOR=(--device cpu --batch-size 1 --repeats 1 --warmup 0 --window-steps 1)
    DEMO=(experiment=demo trainer.max_steps=2 data=digits)
    PRECISION=(--seeds 1 --precisions 32-true bf16-mixed -- trainer.max_steps=2 data=digits)
fi

{
    echo "# kr_vlm GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE"
    echo
} >"$SUMMARY"

# step NAME LIMIT COMMAND...: run COMMAND under `timeout LIMIT`, append its status and output to the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local log="$LOGS/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log" started=$(date +%s) status
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    status=$?
    local seconds=$(($(date +%s) - started)) verdict=ok
    if ((status == 124 || status == 137)); then
        verdict="TIMED OUT after ${limit}s"
    elif ((status != 0)); then
        verdict="FAILED (exit $status)"
    fi
    [[ $verdict == ok ]] || FAILED=1
    echo "   $verdict, ${seconds}s"
    {
        echo "## $name: $verdict (${seconds}s)"
        echo
        echo '```'
        echo "\$ $*"
        # Tables and summaries are at the end; the whole log of a failed step is too long to keep.
        tail -n 60 "$log"
        echo '```'
        echo
    } >>"$SUMMARY"
}

if [[ $DEVICE == cuda ]]; then
    step "install" 120 "$PYTHON" -m pip install -q -e '.[dev]'
    step "device" 15 bash -c "nvidia-smi; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())'"
fi
step "CUDA-only tests" 60 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests
step "bench_adapters" 100 "$PYTHON" scripts/bench_adapters.py "${BENCH_ADAPTERS[@]}"
step "bench_rank_monitor" 60 "$PYTHON" scripts/bench_rank_monitor.py "${BENCH_MONITOR[@]}"
step "demo" 45 "$PYTHON" train.py "${DEMO[@]}" "paths.log_dir=$LOGS/demo_logs"
step "bench_precision" 70 "$PYTHON" scripts/bench_precision.py "${PRECISION[@]}"

TOTAL=$(($(date +%s) - STARTED))
{
    echo "Total: ${TOTAL}s; $([[ $FAILED == 0 ]] && echo 'every step passed' || echo 'some steps FAILED or timed out')."
} >>"$SUMMARY"
echo "Summary: $SUMMARY (${TOTAL}s)"
exit $FAILED
