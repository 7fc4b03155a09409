#!/usr/bin/env bash
# The GPU node check, in one call (under 8 minutes on one H200): installs the packages the
# node lacks from wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh fetches them), then
# runs the fast test suite, the single-GPU tests, a bf16 training run of each preset that
# fits one GPU, an async-save-and-resume run, the 3.7B MoE variant for MFU, and prints a
# table last. Each step has its own time limit; a failing step does not stop the others.
#
#   scripts/gpu_check.sh                          # on a GPU node
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh     # the same steps, shrunk, on CPU (tests the script)
#
# GPU_CHECK_LOG_DIR: where gpu_check.log (every step's output) and gpu_check.txt (the table)
# go (default: a new folder under /tmp). GPU_CHECK_TESTS: the fast suite's paths (default: tests).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG_DIR=${GPU_CHECK_LOG_DIR:-$WORK}
mkdir -p "$LOG_DIR"
LOG=$LOG_DIR/gpu_check.log
TABLE=$LOG_DIR/gpu_check.txt
: >"$LOG"
ROWS=()

if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        >>"$LOG" 2>&1 || { echo "gpu_check: installing .whl/*.whl failed (see $LOG)"; exit 1; }
    export PYTHONPATH="$ROOT:$WORK/site"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DEVICE" = cpu ] && echo 1800 || echo 460)}  # no step starts that could end past this (the call's limit is 8 minutes)

# step NAME SECONDS DETAIL_FN CMD...: run CMD under a time limit, log it, add a table row.
step() {
    local name=$1 limit=$2 detail_fn=$3
    shift 3
    local start=$SECONDS status
    if ((SECONDS + limit > BUDGET)); then
        ROWS+=("$(printf '%-22s %-7s %5ss  %s' "$name" skipped 0 "no time left in the ${BUDGET}s budget")")
        return
    fi
    echo "=== $name: $*" >>"$LOG"
    timeout -k 10 "$limit" "$@" >"$WORK/step.out" 2>&1
    status=$?
    cat "$WORK/step.out" >>"$LOG"
    local verdict=ok
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then verdict=TIMEOUT; elif [ "$status" != 0 ]; then verdict=FAIL; fi
    local detail
    detail=$("$detail_fn" "$WORK/step.out" 2>/dev/null | tail -1)
    ROWS+=("$(printf '%-22s %-7s %5ss  %s' "$name" "$verdict" "$((SECONDS - start))" "$detail")")
    echo "--- $name: $verdict (exit $status) in $((SECONDS - start))s" >>"$LOG"
}

pytest_summary() { grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$1" | sed 's/=//g' | tail -1; }
first_error() { grep -m1 -E 'moe-launch: |Error|error:' "$1" | cut -c1-110; }
# The last logged training record of RUN_DIR: tokens/s, mfu, loss (first -> last).
run_metrics() {
    "$PY" - "$1" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
train = [r for r in rows if "tokens_per_s" in r]
if train:
    last = train[-1]
    print(f"step {last['step']}: {last['tokens_per_s']:,.0f} tokens/s, mfu {100 * last['mfu']:.1f}%, "
          f"loss {train[0]['loss']:.3f} -> {last['loss']:.3f}")
EOF
}
train_detail() { run_metrics "$CURRENT_RUN" || first_error "$1"; }
profile_detail() { grep -A3 '^# where the' "$1" | tail -3 | tr -s ' ' | paste -sd ';' || first_error "$1"; }
resume_detail() { grep -m1 -o 'resumed from .*' "$1" | sed "s|$WORK/||" || first_error "$1"; }

COMMON=(data=synthetic logging.wandb.mode=disabled "train.device=$DEVICE" launcher.nproc_per_node=1
    train.precision=bf16 train.eval_every=100000 train.eval_batches=1)
if [ "$DEVICE" = cpu ]; then  # shrink every run to seconds; the steps and their checks stay
    SMALL=(model.dim=64 model.n_layers=2 model.n_heads=4 model.n_kv_heads=4 model.seq_len=64 model.num_experts=8
        model.expert_dim=32 model.top_k=2 model.n_groups=2 model.topk_groups=1 model.ffn_dim=128
        train.global_batch_size=4 train.micro_batch_size=2)
    BIG=("${SMALL[@]}")
    STEPS=6 LOG_EVERY=3 FAST_LIMIT=300 TRAIN_LIMIT=300 BIG_LIMIT=300
else
    SMALL=()
    # The 3.7B-parameter variant of issue 10: dim 2048, 6 layers, 64 experts of 1408, top-6,
    # 2 shared, seq 2048, micro-batch 4.
    BIG=(model.dim=2048 model.n_layers=6 model.n_heads=16 model.n_kv_heads=16 model.num_experts=64
        model.expert_dim=1408 model.top_k=6 model.num_shared_experts=2 model.seq_len=2048
        train.micro_batch_size=4 train.global_batch_size=16)
    STEPS=20 LOG_EVERY=10 FAST_LIMIT=150 TRAIN_LIMIT=100 BIG_LIMIT=150  # the 3.7B model initialises on the host
fi
TRAIN=("$PY" -m launcher.cli train)

step environment 60 cat "$PY" -c "import torch; print(f'torch {torch.__version__}, ' + (torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no CUDA device'))"

XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
# shellcheck disable=SC2086
step "fast suite" "$FAST_LIMIT" pytest_summary "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not gpu" \
    "${XDIST[@]}" ${GPU_CHECK_TESTS:-tests}
step "single-GPU tests" 180 pytest_summary "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests

CURRENT_RUN=$WORK/tiny
step "bf16 tiny" "$TRAIN_LIMIT" train_detail "${TRAIN[@]}" config=tiny "${COMMON[@]}" "${SMALL[@]}" \
    "train.steps=$((STEPS * 2))" "train.log_every=$LOG_EVERY" "run_dir=$CURRENT_RUN"
CURRENT_RUN=$WORK/small
step "bf16 deepseek_small" "$TRAIN_LIMIT" train_detail "${TRAIN[@]}" config=deepseek_small "${COMMON[@]}" \
    "${SMALL[@]}" "train.steps=$STEPS" "train.log_every=$LOG_EVERY" "run_dir=$CURRENT_RUN"
CURRENT_RUN=$WORK/async
ASYNC=("${TRAIN[@]}" config=tiny "${COMMON[@]}" "${SMALL[@]}" checkpoint.async=true checkpoint.interval=5
    train.log_every=5 "run_dir=$CURRENT_RUN")
step "async save" 60 train_detail "${ASYNC[@]}" train.steps=10
step "  resume from it" 60 resume_detail "${ASYNC[@]}" train.steps=15

CURRENT_RUN=$WORK/big
step "bf16 3.7B (MFU)" "$BIG_LIMIT" train_detail "${TRAIN[@]}" config=deepseek_small "${COMMON[@]}" \
    "${BIG[@]}" "train.steps=$STEPS" "train.log_every=$LOG_EVERY" "run_dir=$CURRENT_RUN"
CURRENT_RUN=$WORK/small_compiled
step "small, compiled" "$TRAIN_LIMIT" train_detail "${TRAIN[@]}" config=deepseek_small "${COMMON[@]}" \
    "${SMALL[@]}" "train.steps=$STEPS" "train.log_every=$LOG_EVERY" train.compile=true "run_dir=$CURRENT_RUN"

step "matmul peak" 60 cat "$PY" -c "import torch; from framework.flops import PEAK_MATMUL_SIZE as N, \
measure_peak_flops as m; d = torch.device('$DEVICE'); n = N[d.type]; \
print(f'{n}^3 bf16: {m(d, torch.bfloat16) / 1e12:.3g} TFLOP/s')"

# Where a deepseek_small step's time goes (the op table is in the log).
step "profile a step" 90 profile_detail "$PY" scripts/profile_step.py config=deepseek_small "${COMMON[@]}" \
    "${SMALL[@]}" --warmup 2 --steps 2

{
    printf '%-22s %-7s %6s  %s\n' check result time detail
    printf '%s\n' "${ROWS[@]}"
    echo "(full output: $LOG)"
} | tee "$TABLE"
! grep -q -E '^.{23}(FAIL|TIMEOUT)' "$TABLE"
