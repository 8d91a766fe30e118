#!/usr/bin/env bash
# Device check for a machine with a GPU: does JAX see it, do the model, sharding,
# loss and gradient-cache tests pass on it, and how fast does the real MiniLM
# model train there (MFU against the card's peak)? Prints one table; exit status
# 0 when every stage passed. Each stage has a time limit; all of them together
# stay under 8 minutes.
#
#   bash scripts/device_check.sh [--platform=cuda] [--stages=gpu,jax,tests,train]
#        [--steps=30] [--batch-size=256] [--peak-tflops=N] [--work-dir=DIR] [--dry-run]
#
# Needs .venv (scripts/setup_env.sh test) with the CUDA build of jax at the
# version setup.py pins:  .venv/bin/pip install "jax[cuda12]==0.10.2"
#   gpu    nvidia-smi's name, memory and driver
#   jax    jax.devices() on --platform (JAX_PLATFORMS) lists the GPU
#   tests  tests/test_models.py, test_losses.py, test_gradcache.py on the GPU
#          backend, fp32 matmuls at full precision (no TF32, as the numpy
#          references assume); with fewer than 8 GPUs the tests that build an
#          8-device mesh are deselected (the CPU suite runs them on 8 fake devices)
#   train  `embedder train` with gin/runs/quickstart.gin (all-MiniLM-L6-v2, real
#          weights, stdlib pairs) in bf16 for --steps steps of --batch-size pairs,
#          packed as the run files pack by default (PACKING = True);
#          pairs/s, step time, MFU and token utilisation (real / computed tokens,
#          queries / documents) of the last logged window (compilation
#          excluded), MFU against embedder.hardware.CHIPS for the card
#          (or --peak-tflops for a card not listed there)
# --platform=cpu runs the same stages on the CPU, to try the script itself.
# Stage logs stay in --work-dir (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."

PLATFORM=cuda
STAGES=gpu,jax,tests,train
STEPS=30
BATCH_SIZE=256
PEAK_TFLOPS=
WORK_DIR=
DRY_RUN=0
MODEL_GIN=
PY=${PYTHON:-.venv/bin/python}
# Seconds each stage may take: 20 + 90 + 240 + 120 = 470 < 480.
LIMIT_GPU=${LIMIT_GPU:-20}
LIMIT_JAX=${LIMIT_JAX:-90}
LIMIT_TESTS=${LIMIT_TESTS:-240}
LIMIT_TRAIN=${LIMIT_TRAIN:-120}
# Tests that build an 8-device mesh (the CPU suite fakes 8 devices; one GPU is one).
EIGHT_DEVICE_TESTS=(
  tests/test_models.py::test_forward_backward_sharded_by_logical_names
  tests/test_gradcache.py::test_gradient_cache_equals_the_plain_step_on_8_devices
  tests/test_gradcache.py::test_chunks_stay_on_the_device_that_holds_the_rows
)

die() {
  echo "device_check.sh: error: $*" >&2
  exit 2
}

for arg in "$@"; do
  case ${arg%%=*} in
    --platform) PLATFORM=${arg#*=} ;;
    --stages) STAGES=${arg#*=} ;;
    --steps) STEPS=${arg#*=} ;;
    --batch-size | --batch_size) BATCH_SIZE=${arg#*=} ;;
    --peak-tflops | --peak_tflops) PEAK_TFLOPS=${arg#*=} ;;
    --work-dir | --work_dir) WORK_DIR=${arg#*=} ;;
    --model-gin | --model_gin) MODEL_GIN=${arg#*=} ;; # e.g. gin/models/tiny.gin, to try the script
    --dry-run | --dry_run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
      exit 0
      ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done
[[ $STEPS =~ ^[0-9]+$ && $STEPS -ge 3 ]] || die "--steps=$STEPS: at least 3"
[[ $BATCH_SIZE =~ ^[0-9]+$ && $BATCH_SIZE -gt 0 ]] || die "--batch-size=$BATCH_SIZE: a positive number"
[[ -z $PEAK_TFLOPS || $PEAK_TFLOPS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--peak-tflops=$PEAK_TFLOPS: a number"
for stage in ${STAGES//,/ }; do
  case $stage in
    gpu | jax | tests | train) ;;
    *) die "--stages: unknown stage $stage (gpu, jax, tests, train)" ;;
  esac
done
[[ -x $PY || $DRY_RUN == 1 ]] || die "$PY not found: run scripts/setup_env.sh test first (or set PYTHON)"
if ((DRY_RUN)); then
  WORK_DIR=${WORK_DIR:-/tmp/device-check}
else
  WORK_DIR=${WORK_DIR:-$(mktemp -d -t device-check.XXXXXX)}
  mkdir -p "$WORK_DIR"
fi
# TensorFlow (imported for TensorBoard summaries) would otherwise reserve the GPU's memory up front.
export JAX_PLATFORMS=$PLATFORM TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_FORCE_GPU_ALLOW_GROWTH=true

wants() { [[ ,$STAGES, == *,$1,* ]]; }

# run_stage NAME LIMIT CMD...: CMD under `timeout`, output in WORK_DIR/NAME.log;
# sets STAGE_RC and STAGE_SECONDS. Under --dry-run only prints CMD.
run_stage() {
  local name=$1 limit=$2 start
  shift 2
  if ((DRY_RUN)); then
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
    STAGE_RC=0
    STAGE_SECONDS=0
    return 0
  fi
  start=$(date +%s.%N)
  STAGE_RC=0
  timeout "$limit" "$@" >"$WORK_DIR/$name.log" 2>&1 || STAGE_RC=$?
  STAGE_SECONDS=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
}

ROWS=()
FAILED=0
# row STAGE RESULT SECONDS DETAIL
row() {
  ROWS+=("$(printf '%-6s %-7s %8s  %s' "$1" "$2" "$3" "$4")")
  [[ $2 == ok || $2 == skipped ]] || FAILED=1
}

result_of() {
  case $1 in
    0) echo ok ;;
    124) echo TIMEOUT ;;
    *) echo FAIL ;;
  esac
}

last_error() {
  grep -E 'Error|error|FAILED|Traceback' "$WORK_DIR/$1.log" | tail -n 1 | cut -c1-160
}

TOTAL_START=$(date +%s)

if wants gpu; then
  if command -v nvidia-smi >/dev/null 2>&1 || ((DRY_RUN)); then
    run_stage gpu "$LIMIT_GPU" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ((DRY_RUN)) || row gpu "$(result_of "$STAGE_RC")" "$STAGE_SECONDS" "$(head -n 1 "$WORK_DIR/gpu.log")"
  else
    row gpu skipped 0 "no nvidia-smi on this machine"
  fi
fi

NUM_DEVICES=0
if wants jax || wants tests; then
  run_stage jax "$LIMIT_JAX" "$PY" -c "import jax; d = jax.devices(); \
print(len(d), d[0].platform, d[0].device_kind, 'jax', jax.__version__, sep='|')"
  if ((!DRY_RUN)); then
    if ((STAGE_RC == 0)); then
      IFS='|' read -r NUM_DEVICES platform kind _ version <<<"$(tail -n 1 "$WORK_DIR/jax.log")"
      row jax ok "$STAGE_SECONDS" "$NUM_DEVICES $platform device(s): $kind, jax $version"
    else
      row jax "$(result_of "$STAGE_RC")" "$STAGE_SECONDS" "JAX_PLATFORMS=$PLATFORM: $(last_error jax)"
    fi
  fi
fi

if wants tests; then
  deselect=()
  if ((!DRY_RUN && NUM_DEVICES < 8)) && [[ $PLATFORM != cpu ]]; then
    for t in "${EIGHT_DEVICE_TESTS[@]}"; do
      deselect+=(--deselect "$t")
    done
  fi
  if ((!DRY_RUN && NUM_DEVICES == 0)); then
    row tests skipped 0 "JAX sees no $PLATFORM device"
  else
    run_stage tests "$LIMIT_TESTS" env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_models.py tests/test_losses.py tests/test_gradcache.py "${deselect[@]}"
    if ((!DRY_RUN)); then
      summary=$(grep -E '(passed|failed|error)' "$WORK_DIR/tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//')
      ((${#deselect[@]})) && summary+=" (the ${#EIGHT_DEVICE_TESTS[@]} tests of an 8-device mesh deselected: $NUM_DEVICES device(s))"
      row tests "$(result_of "$STAGE_RC")" "$STAGE_SECONDS" "${summary:-no pytest summary; see $WORK_DIR/tests.log}"
    fi
  fi
fi

if wants train; then
  log_every=$((STEPS / 3))
  model_args=(--gin_file=gin/runs/quickstart.gin)
  # Another model (to try the script quickly): the quickstart's run settings without its
  # MiniLM file (whose weights folder that model would not read), and no Matryoshka
  # dims (its width may be under 384).
  [[ -n $MODEL_GIN ]] && model_args=(--gin_file=gin/runs/finetune.gin --gin_file=gin/mesh/cpu.gin
    --gin_file="$MODEL_GIN" --gin.QUERY_LEN=32 --gin.DOC_LEN=128 --gin.NUM_NEGATIVES=0 "--gin.MRL_DIMS=[]")
  peak_args=()
  [[ -n $PEAK_TFLOPS ]] && peak_args+=("--gin.train_loop.train.peak_flops_per_device=${PEAK_TFLOPS}e12")
  rm -rf "$WORK_DIR/model"
  start=$(date +%s)
  run_stage data "$LIMIT_TRAIN" "$PY" -m embedder.data.stdlib_pairs --output_dir "$WORK_DIR/data"
  data_rc=$STAGE_RC
  left=$((LIMIT_TRAIN - $(date +%s) + start))
  ((data_rc == 0)) || cp "$WORK_DIR/data.log" "$WORK_DIR/train.log"
  ((data_rc == 0)) && run_stage train "$left" "$PY" -m embedder train "${model_args[@]}" \
    --gin.TRAIN_FILES="['$WORK_DIR/data/train.jsonl']" --gin.TRAIN_STEPS="$STEPS" --gin.BATCH_SIZE="$BATCH_SIZE" \
    --gin.WARMUP_STEPS=1 --gin.SAVE_EVERY=$((STEPS * 10)) --gin.train_loop.train.log_every="$log_every" \
    --gin.transformer.TransformerConfig.dtype="'bfloat16'" "${peak_args[@]}" --model_dir="$WORK_DIR/model"
  if ((!DRY_RUN)); then
    STAGE_SECONDS=$(($(date +%s) - start))
    ((data_rc == 0)) || STAGE_RC=$data_rc
    if ((STAGE_RC == 0)) && [[ -s $WORK_DIR/model/metrics.jsonl ]]; then
      detail=$("$PY" - "$WORK_DIR/model/metrics.jsonl" "$BATCH_SIZE" "$PEAK_TFLOPS" <<'EOF'
import json, sys

records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last, batch = records[-1], int(sys.argv[2])
step_s = batch / last["pairs_per_sec"]
mfu = f"MFU {100 * last['mfu']:.1f}%" if "mfu" in last else "no MFU (unknown peak: give --peak-tflops)"
if sys.argv[3]:
    peak = f" of {float(sys.argv[3]):g} TFLOP/s (--peak-tflops)"
else:
    import jax
    from embedder import summaries

    kind = jax.devices()[0].device_kind
    flops = summaries.peak_flops_per_device(measure_cpu=False)
    peak = f" of {flops / 1e12:g} TFLOP/s ({kind} bf16)" if flops else " of the measured fp32 matmul peak"
util = last.get("token_utilisation/query"), last.get("token_utilisation/document")
packed = f", packed: tokens used {util[0]:.0%} / {util[1]:.0%}" if None not in util else ", not packed"
print(
    f"step {last['step']}: {last['pairs_per_sec']:.1f} pairs/s, {last['tokens_per_sec']:.0f} tokens/s, "
    f"{step_s:.3f} s/step, {mfu}{peak if 'mfu' in last else ''}, loss {last['loss']:.3f}{packed}"
)
EOF
      ) || detail="metrics.jsonl unreadable"
      row train ok "$STAGE_SECONDS" "bf16, $BATCH_SIZE pairs x (32 + 128) tokens: $detail"
    else
      row train "$(result_of "$STAGE_RC")" "$STAGE_SECONDS" "$(last_error train) (log: $WORK_DIR/train.log)"
    fi
  fi
fi

((DRY_RUN)) && exit 0
echo
echo "device check ($PLATFORM), logs in $WORK_DIR"
printf '%-6s %-7s %8s  %s\n' stage result seconds detail
printf '%s\n' "${ROWS[@]}"
printf '%-6s %-7s %8s  %s\n' total "" "$(($(date +%s) - TOTAL_START))" "(limit 480 s)"
exit "$FAILED"
