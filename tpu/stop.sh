#!/usr/bin/env bash
# Stops a run on every worker: SIGTERM to each trainer, which saves its current
# step to the model dir and exits (the run resumes from there when started
# again). tpu/run_until_done.sh sees the status (76) and ends instead of
# restarting. The slice itself keeps running: tpu/delete.sh deletes it.
#
#   tpu/stop.sh --name=embedder-v4-32 --run=gecko-pre
#
# Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

parse_flags "$@"
resolve_settings
ssh_workers all "bash $REMOTE_REPO/tpu/worker_run.sh $(quote_args --run="$RUN_NAME" --stop)"
