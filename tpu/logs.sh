#!/usr/bin/env bash
# A run's logs: follow one worker's, or gather every worker's into a local folder.
#
#   tpu/logs.sh --name=embedder-v4-32 --run=gecko-pre                 follow worker 0's log
#   tpu/logs.sh --name=embedder-v4-32 --run=gecko-pre --worker=3 --lines=500
#   tpu/logs.sh --name=embedder-v4-32 --run=gecko-pre --gather        every worker's log ->
#                                                                      logs/gecko-pre/worker-ID.log
#
# Each worker writes ~/embedder-runs/RUN/worker-ID.log and copies it to
# gs://BUCKET/embedder/runs/RUN/logs/ every 5 minutes and when the run ends, so
# the logs of a preempted slice are there too (--from-gcs gathers those).
#
# Own flags: --worker=N (0), --lines=N (200), --gather[=DIR] (logs/RUN),
# --from-gcs (with --gather: copy from the bucket, not the workers), --no-follow.
# Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

WORKER=0
LINES=200
GATHER=
FROM_GCS=0
FOLLOW=1
script_flag() {
  case $1 in
    --worker) needs_value "$@" && WORKER=$2 ;;
    --lines) needs_value "$@" && LINES=$2 ;;
    --gather) GATHER=${2:-logs/__RUN__} ;;
    --from-gcs) FROM_GCS=1 ;;
    --no-follow) FOLLOW=0 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker=$WORKER: expected a worker index (use --gather for all of them)"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines=$LINES: expected a number"
remote_log="embedder-runs/$RUN_NAME/worker-*.log"
if [[ -n $GATHER ]]; then
  dest=${GATHER//__RUN__/$RUN_NAME}
  run_cmd mkdir -p "$dest"
  if ((FROM_GCS)); then
    require_bucket
    run_cmd gcloud storage cp "$MODEL_DIR/logs/*" "$dest/"
  else
    # Every worker's file has its own name, so all of them land side by side.
    run_cmd gcloud compute tpus tpu-vm scp "$NAME:$remote_log" "$dest/" "${LOCATION[@]}" --worker=all \
      --strict-host-key-checking=no
  fi
  note "logs of run $RUN_NAME in $dest/"
  exit 0
fi
follow=()
((FOLLOW)) && follow=(-F)
ssh_workers "$WORKER" "tail -n $LINES ${follow[*]} $remote_log"
