#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine, at most 9 minutes, that writes its figures to one file.
#
#   bash scripts/gpu_check.sh [SUMMARY_FILE]        # default: logs/gpu_check/<date>_<time>/gpu_check_summary.md
#
# Steps, each under its own time limit (seconds on a GPU / in the CPU dry run), each one's output kept in the
# summary file and one line a step printed at the end:
#   1. install the package in the current Python (pip install -e '.[dev]')                      [120 / -]
#   2. the device (nvidia-smi, torch's view of it)                                               [15 / -]
#   3. the CUDA-only tests (pytest -k "cuda or gpu")                                             [60 / 240]
#   4. bench_adapters.py sweep: KRAdapter, LoRA and the floor, ViT-B-16, all six linears,
#      fp32 and bf16 autocast at batch 1, 8 and 32                                               [150 / 400]
#   5. bench_adapters.py: every method, bf16 autocast, batch 32                                  [90 / 400]
#   6. bench_rank_monitor.py: the monitor's cost next to a GPU training step                     [60 / 240]
#   7. the demo on the GPU (train.py experiment=demo trainer=gpu, bf16-mixed)                    [45 / 240]
#   8. bench_precision.py on the GPU, one seed: fp32 / bf16-mixed / fp16-mixed demo              [70 / 300]
# A step that fails or runs out of time is marked so and the next one runs; the exit status is 0 only when
# every step passed. Environment:
#   PYTHON=python3.11   the interpreter (default: the repository's .venv/bin/python where it exists, else python)
#   KR_VLM_GPU_CHECK_DEVICE=cpu   a dry run of steps 3-8 on the CPU at the smallest settings, under the
#                       CPU limits: checks the script itself where no GPU is (no install, no CUDA needed;
#                       its figures mean nothing)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A summary file named on the command line is relative to where the command was started; by default a new
# folder under the repository's logs/ (never a file the repository ships, nor an earlier check's).
if [[ $# -ge 1 ]]; then
    SUMMARY=$(realpath -m "$1")
else
    SUMMARY="$ROOT/logs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)/gpu_check_summary.md"
fi
mkdir -p "$(dirname "$SUMMARY")"
echo "The summary goes to $SUMMARY"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    # The README's install makes .venv; a user who has not activated it still checks that environment.
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
DEVICE=${KR_VLM_GPU_CHECK_DEVICE:-cuda}
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
STARTED=$(date +%s)
FAILED=0
RESULTS=()

if [[ $DEVICE == cuda ]]; then
    SWEEP=(--device cuda --methods kradapter lora floor --targets all --batch-sizes 1 8 32
        --precision fp32 bf16 --rounds 3 --steps 3 --warmup 2)
    EVERY_METHOD=(--device cuda --precision bf16 --batch-sizes 32 --targets all --rounds 2 --steps 3 --warmup 2)
    MONITOR=(--device cuda --batch-size 32 --repeats 3)
    DEMO=(experiment=demo trainer=gpu)
    PRECISION=(--seeds 1 -- trainer=gpu)
else  # a dry run of the script on the CPU: the smallest settings that go through every step
    SWEEP=(--device cpu --methods kradapter lora floor --targets mlp --batch-sizes 1 --precision bf16
        --rounds 1 --warmup 0)
    EVERY_METHOD=(--device cpu --model llama-tiny --batch-sizes 1 --rounds 1 --warmup 0)
    MONITOR=(--device cpu --model-name ViT-S-32 --batch-size 1 --repeats 1 --warmup 0 --window-steps 1)
    DEMO=(experiment=demo trainer.max_steps=2 data=digits)
    PRECISION=(--seeds 1 --precisions 32-true bf16-mixed -- trainer.max_steps=2 data=digits)
fi

{
    echo "# kr_vlm GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE, load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
    echo
} >"$SUMMARY"

# step NAME GPU_LIMIT CPU_LIMIT PATTERN COMMAND...: run COMMAND under the limit for this device, keep its
# output in the summary file and one result line for the end: the status and the last line of the output that
# matches the extended regular expression PATTERN (the last line of the output if PATTERN is empty).
step() {
    local name=$1 limit=$2 pattern=$4
    [[ $DEVICE == cuda ]] || limit=$3
    shift 4
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
    local line
    if [[ -n $pattern ]]; then
        line=$(grep -E -- "$pattern" "$log" | tail -n 1)
    else
        line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
    fi
    RESULTS+=("$name: $verdict (${seconds}s of ${limit}s)${line:+ | ${line:0:300}}")
    echo "   ${RESULTS[-1]}"
    {
        echo "## $name: $verdict (${seconds}s)"
        echo
        echo '```'
        echo "\$ $*"
        # Tables and summaries are at the end; the whole log of a failed step is too long to keep.
        tail -n 80 "$log"
        echo '```'
        echo
    } >>"$SUMMARY"
}

if [[ $DEVICE == cuda ]]; then
    step "install" 120 - "" "$PYTHON" -m pip install -q -e '.[dev]'
    step "device" 15 - "" bash -c "nvidia-smi; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())'"
fi
step "CUDA-only tests" 60 240 "passed|failed|skipped|error|no tests ran" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests
step "bench_adapters sweep" 150 400 "^KRAdapter (at every point|/ floor)" \
    "$PYTHON" scripts/bench_adapters.py "${SWEEP[@]}"
step "bench_adapters every method" 90 400 "^KRAdapter / floor" "$PYTHON" scripts/bench_adapters.py "${EVERY_METHOD[@]}"
step "bench_rank_monitor" 60 240 "^\| 200 \|" "$PYTHON" scripts/bench_rank_monitor.py "${MONITOR[@]}"
step "demo" 45 240 "" "$PYTHON" train.py "${DEMO[@]}" "paths.log_dir=$LOGS/demo_logs"
step "bench_precision" 70 300 "^\| (32-true|bf16-mixed|16-mixed) \|" "$PYTHON" scripts/bench_precision.py "${PRECISION[@]}"

TOTAL=$(($(date +%s) - STARTED))
{
    echo "## Results"
    echo
    printf -- '- %s\n' "${RESULTS[@]}"
    echo
    echo "Total: ${TOTAL}s; $([[ $FAILED == 0 ]] && echo 'every step passed' || echo 'some steps FAILED or timed out')."
} >>"$SUMMARY"
echo
echo "Results ($DEVICE, ${TOTAL}s; the outputs: $SUMMARY):"
printf '  %s\n' "${RESULTS[@]}"
exit $FAILED
