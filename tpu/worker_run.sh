#!/usr/bin/env bash
# Runs ON every TPU worker; tpu/run.sh and tpu/run_until_done.sh start it on all
# workers at once through `gcloud ... ssh --worker=all`. It starts one
# `embedder train` per host, detached from the ssh session (a dropped connection
# does not stop training), and by default stays attached until the run ends,
# streaming worker 0's log. Starting it again while the run is alive attaches to
# that run instead of starting a second one.
#
#   bash ~/embedder/tpu/worker_run.sh --run=R --model-dir=gs://B/embedder/runs/R
#       [--expect-commit=SHA] [--data=gs://B/data] [--detach] [--dry-run] -- EMBEDDER_TRAIN_FLAGS...
#   bash ~/embedder/tpu/worker_run.sh --run=R --stop    SIGTERM the trainer: it saves and exits
#
# --data copies a GCS folder to /tmp/embedder-data on the worker before training
# (TRAIN_FILES name files there). The log is ~/embedder-runs/R/worker-ID.log,
# copied to MODEL_DIR/logs/ every 5 minutes and at the end.
#
# Exit status: 0 trained to the end; 75 stopped by SIGTERM from outside (a
# preemption or maintenance: the current step is saved); 76 stopped by --stop;
# 3 this worker holds another commit (run tpu/setup.sh); else the trainer's own.
set -euo pipefail

PROG=worker_run.sh
RUN_NAME=
MODEL_DIR=
EXPECT_COMMIT=
DATA=
MODE=attach
DRY_RUN=0
SERVE=0
TRAIN_ARGS=()
ORIGINAL_ARGS=("$@")
while (($#)); do
  arg=$1
  shift
  case ${arg//_/-} in
    --) TRAIN_ARGS=("$@") && break ;;
    --run=*) RUN_NAME=${arg#*=} ;;
    --model-dir=*) MODEL_DIR=${arg#*=} ;;
    --expect-commit=*) EXPECT_COMMIT=${arg#*=} ;;
    --data=*) DATA=${arg#*=} ;;
    --detach) MODE=detach ;;
    --stop) MODE=stop ;;
    --serve) SERVE=1 ;; # internal: the detached process that owns the trainer
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
      exit 0
      ;;
    *)
      echo "$PROG: error: unknown argument $arg" >&2
      exit 2
      ;;
  esac
done

# die MESSAGE [STATUS]
die() {
  echo "$PROG: error: $1" >&2
  exit "${2:-2}"
}

[[ -n $RUN_NAME ]] || die "--run=NAME is required"
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${EMBEDDER_VENV:-$HOME/embedder-venv}
RUN_DIR=$HOME/embedder-runs/$RUN_NAME
DATA_DIR=/tmp/embedder-data
POLL_SECONDS=${WORKER_POLL_SECONDS:-10}
UPLOAD_SECONDS=${WORKER_UPLOAD_SECONDS:-300}

worker_id() {
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    echo "$TPU_WORKER_ID"
    return 0
  fi
  # Cloud TPU VMs publish their index in the slice as instance metadata.
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
    hostname
}
WORKER_ID=$(worker_id)
LOG=$RUN_DIR/worker-$WORKER_ID.log

run_cmd() {
  if ((DRY_RUN)); then
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
  else
    "$@"
  fi
}

# pid_alive FILE: the process whose pid FILE holds is running (and is ours, not a reused pid).
# `ps -ww`: without it ps cuts the command line at 80 columns when not on a terminal,
# and a long install path hid the word it looks for.
pid_alive() {
  local pid
  [[ -f $1 ]] || return 1
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && [[ $(ps -ww -o args= -p "$pid" 2>/dev/null) == *embedder* ]]
}

alive() {
  pid_alive "$RUN_DIR/trainer.pid"
}

# write_atomically FILE TEXT: FILE holds TEXT whole or not at all (a reader never sees it empty).
write_atomically() {
  echo "$2" >"$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"
}

upload_log() {
  [[ -n $MODEL_DIR && -f $LOG ]] || return 0
  gcloud storage cp "$LOG" "$MODEL_DIR/logs/worker-$WORKER_ID.log" >/dev/null 2>&1 || true
}

# The detached process: stage data, run the trainer, record its exit status.
serve() {
  mkdir -p "$RUN_DIR"
  write_atomically "$RUN_DIR/runner.pid" $$
  echo "=== $(date -u +%FT%TZ) worker $WORKER_ID commit $(cat "$REPO/COMMIT" 2>/dev/null || echo unknown)" >>"$LOG"
  if [[ -n $DATA ]]; then
    gcloud storage rsync --recursive "$DATA" "$DATA_DIR" >>"$LOG" 2>&1 || {
      write_atomically "$RUN_DIR/exit-status" 1
      return 0
    }
  fi
  (while sleep "$UPLOAD_SECONDS"; do upload_log; done) &
  local uploader=$! pid rc=0
  cd "$REPO"
  "$VENV/bin/embedder" train "${TRAIN_ARGS[@]}" --model_dir="$MODEL_DIR" >>"$LOG" 2>&1 &
  pid=$!
  write_atomically "$RUN_DIR/trainer.pid" "$pid"
  # A SIGTERM to this process (the VM shutting down) reaches the trainer, which saves.
  trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT HUP
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do
    rc=0
    wait "$pid" || rc=$?
  done
  kill "$uploader" 2>/dev/null || true
  if ((rc == 0)) && tail -n 20 "$LOG" | grep -q '^stopped by SIGTERM'; then
    rc=75
    [[ -f $RUN_DIR/stop-requested ]] && rc=76
  fi
  upload_log
  write_atomically "$RUN_DIR/exit-status" "$rc"
}

start() {
  if alive; then
    echo "$PROG: worker $WORKER_ID: run $RUN_NAME is already running (pid $(cat "$RUN_DIR/trainer.pid")); attaching" >&2
    return 0
  fi
  [[ -n $MODEL_DIR ]] || die "--model-dir=gs://... is required"
  ((${#TRAIN_ARGS[@]})) || die "no training flags after --"
  if [[ -n $EXPECT_COMMIT ]]; then
    local have
    have=$(cat "$REPO/COMMIT" 2>/dev/null || echo none)
    [[ $have == "$EXPECT_COMMIT" ]] ||
      die "worker $WORKER_ID holds commit $have, not $EXPECT_COMMIT: run tpu/setup.sh" 3
  fi
  if ((DRY_RUN)); then
    [[ -n $DATA ]] && run_cmd gcloud storage rsync --recursive "$DATA" "$DATA_DIR"
    run_cmd "$VENV/bin/embedder" train "${TRAIN_ARGS[@]}" --model_dir="$MODEL_DIR"
    return 0
  fi
  mkdir -p "$RUN_DIR"
  rm -f "$RUN_DIR/exit-status" "$RUN_DIR/stop-requested" "$RUN_DIR/trainer.pid" "$RUN_DIR/runner.pid"
  # Worker 0 streams this run's part of the log from here.
  LOG_OFFSET=$(($(stat -c %s "$LOG" 2>/dev/null || echo 0) + 1))
  setsid nohup bash "$0" --serve "${ORIGINAL_ARGS[@]}" >/dev/null 2>&1 </dev/null &
  # The trainer's pid appears once the detached process has started it.
  local i
  for ((i = 0; i < 600; i++)); do
    [[ -f $RUN_DIR/runner.pid || -f $RUN_DIR/exit-status ]] && break
    sleep 0.1
  done
  echo "$PROG: worker $WORKER_ID: started run $RUN_NAME; log $LOG" >&2
}

# Waits for the run to end (worker 0 streams its log) and exits with its status.
attach() {
  ((DRY_RUN)) && return 0
  local tail_pid="" from=(-n 20)
  [[ -n ${LOG_OFFSET:-} ]] && from=(-c "+$LOG_OFFSET")
  while alive || [[ ! -f $RUN_DIR/exit-status ]]; do
    if [[ $WORKER_ID == 0 && -z $tail_pid ]] && alive; then
      tail "${from[@]}" -F --pid="$(cat "$RUN_DIR/trainer.pid")" "$LOG" 2>/dev/null &
      tail_pid=$!
    fi
    # The runner writes the status before it exits: look at the status after the runner.
    if ! alive && ! pid_alive "$RUN_DIR/runner.pid" && [[ ! -f $RUN_DIR/exit-status ]]; then
      die "worker $WORKER_ID: the trainer of run $RUN_NAME is gone without an exit status (see $LOG)" 1
    fi
    sleep "$POLL_SECONDS"
  done
  if [[ -n $tail_pid ]]; then
    wait "$tail_pid" 2>/dev/null || true
  elif [[ $WORKER_ID == 0 && -n ${LOG_OFFSET:-} ]]; then
    tail -c "+$LOG_OFFSET" "$LOG" # the run ended before streaming began
  fi
  local rc
  rc=$(cat "$RUN_DIR/exit-status")
  echo "$PROG: worker $WORKER_ID: run $RUN_NAME ended with status $rc" >&2
  exit "$rc"
}

if ((SERVE)); then
  serve
  exit 0
fi
case $MODE in
  stop)
    if alive; then
      run_cmd touch "$RUN_DIR/stop-requested"
      run_cmd kill -TERM "$(cat "$RUN_DIR/trainer.pid")"
      echo "$PROG: worker $WORKER_ID: sent SIGTERM to run $RUN_NAME (it saves its step and exits)" >&2
    else
      echo "$PROG: worker $WORKER_ID: run $RUN_NAME is not running" >&2
    fi
    ;;
  detach) start ;;
  attach)
    start
    attach
    ;;
esac
