#!/usr/bin/env bash
# TensorBoard for a run through an ssh tunnel: starts TensorBoard on worker 0
# (which can read the bucket) on the run's MODEL_DIR/tensorboard and forwards it
# to http://localhost:PORT here. Ctrl-C ends both.
#
#   tpu/tensorboard.sh --name=embedder-v4-32 --bucket=my-bucket --run=gecko-pre [--port=6006]
#
# Own flag: --port=N (6006). Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

PORT=6006
script_flag() {
  case $1 in
    --port) needs_value "$@" && PORT=$2 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
require_bucket
[[ $PORT =~ ^[0-9]+$ ]] || die "--port=$PORT: expected a number"
note "TensorBoard of run $RUN_NAME: open http://localhost:$PORT"
run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 --strict-host-key-checking=no \
  --ssh-flag="-L $PORT:localhost:$PORT" \
  --command="\$HOME/embedder-venv/bin/tensorboard --logdir=$MODEL_DIR/tensorboard --port=$PORT --host=localhost"
