#!/usr/bin/env bash
# Runs a gin experiment on every worker of the slice at once (tpu/worker_run.sh
# there: one `embedder train` a host, detached from ssh). The model dir is
# gs://BUCKET/embedder/runs/RUN, so a run started again with the same --run
# resumes from its latest checkpoint; each worker's log is
# ~/embedder-runs/RUN/worker-ID.log (tpu/logs.sh), copied to MODEL_DIR/logs/.
# Before anything starts, the run's mesh, batch and memory are checked against
# the slice (embedder check --check).
#
#   tpu/run.sh --name=embedder-v4-32 --accelerator=v4-32 --bucket=my-bucket --run=gecko-pre \
#       --data=gs://my-bucket/data -- \
#       --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/gecko_1b.gin \
#       --gin.TRAIN_FILES="['/tmp/embedder-data/train.jsonl']"
#
# Own flags: --mesh=FILE|none (appended after the run's gin files; default
# gin/mesh/<accelerator>.gin unless the run names a mesh file), --data=gs://...
# (copied to /tmp/embedder-data on every worker first), --foreground (wait for
# the run to end, streaming worker 0's log; exit with its status), --skip-check.
# Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

FOREGROUND=0
SKIP_CHECK=0
script_flag() {
  case $1 in
    --mesh) needs_value "$@" && MESH=$2 ;;
    --data) needs_value "$@" && DATA=$2 ;;
    --foreground) FOREGROUND=1 ;;
    --skip-check) SKIP_CHECK=1 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
require_bucket
train_args
((SKIP_CHECK)) || check_run_config "${TRAIN_ARGS[@]}"
sha=$(ALLOW_DIRTY=1 commit_to_ship 2>/dev/null)
note "run $RUN_NAME on $NAME ($SLICE, $HOSTS hosts), commit $sha, model dir $MODEL_DIR"
if ((FOREGROUND)); then
  launch_run "$sha"
else
  launch_run "$sha" --detach
  note "started; follow it with: tpu/logs.sh --name=$NAME --run=$RUN_NAME"
fi
