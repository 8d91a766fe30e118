#!/usr/bin/env bash
# The preemption-aware loop for spot / preemptible slices: keeps the slice and
# the run alive until the run has trained to its last step.
#
#   tpu/run_until_done.sh --accelerator=v5e-256 --spot --queued --bucket=my-bucket --run=gecko-pre \
#       --data=gs://my-bucket/data -- --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/gecko_1b.gin \
#       --gin.TRAIN_FILES="['/tmp/embedder-data/train.jsonl']"
#
# Each pass asks gcloud for the slice's state:
#   missing                              create it, install the code (setup.sh), run
#   READY / ACTIVE                       run on all workers and wait (run.sh --foreground);
#                                        exit 0 once the run has trained to the end
#   PREEMPTED / TERMINATED / SUSPENDED / delete it, create it again, install, run: the run
#   FAILED                               resumes from its latest checkpoint on GCS
#   STOPPED                              start it, then run
#   anything else (CREATING, ...)        wait --poll-seconds and ask again
# A run that fails while the slice stays READY counts as a failure; after
# --max-failures of them in a row (3) the loop stops with the run's status.
# A run stopped with tpu/stop.sh (status 76) ends the loop too.
#
# Own flags: --mesh, --data (as run.sh), --poll-seconds=N (60),
# --max-preemptions=N (100), --max-failures=N (3), --no-setup (the workers
# already hold this commit), --allow-dirty (as setup.sh), --skip-check (of the
# mesh, batch and memory; as run.sh). With --dry-run: the commands of one pass
# from a missing slice. Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

POLL_SECONDS=60
MAX_PREEMPTIONS=100
MAX_FAILURES=3
NEEDS_SETUP=1
ALLOW_DIRTY=0
SKIP_CHECK=0
script_flag() {
  case $1 in
    --mesh) needs_value "$@" && MESH=$2 ;;
    --data) needs_value "$@" && DATA=$2 ;;
    --poll-seconds) needs_value "$@" && POLL_SECONDS=$2 ;;
    --max-preemptions) needs_value "$@" && MAX_PREEMPTIONS=$2 ;;
    --max-failures) needs_value "$@" && MAX_FAILURES=$2 ;;
    --no-setup) NEEDS_SETUP=0 ;;
    --allow-dirty) ALLOW_DIRTY=1 ;;
    --skip-check) SKIP_CHECK=1 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
require_bucket
for n in POLL_SECONDS MAX_PREEMPTIONS MAX_FAILURES; do
  flag=${n,,}
  [[ ${!n} =~ ^[0-9]+$ ]] || die "--${flag//_/-}=${!n}: expected a whole number"
done
train_args
((SKIP_CHECK)) || check_run_config "${TRAIN_ARGS[@]}"
sha=$(commit_to_ship)

if ((DRY_RUN)); then
  create_slice
  setup_workers "$sha"
  launch_run "$sha"
  exit 0
fi

preemptions=0
failures=0
ready_states=" READY ACTIVE "
lost_states=" PREEMPTED TERMINATED SUSPENDED SUSPENDING FAILED "
state=
while :; do
  [[ -n $state ]] || state=$(slice_state)
  note "$NAME: $state (preemptions so far: $preemptions)"
  if [[ $ready_states == *" $state "* ]]; then
    rc=0
    if ((NEEDS_SETUP)); then
      setup_workers "$sha" || rc=$?
      ((rc)) || NEEDS_SETUP=0
    fi
    ((rc)) || launch_run "$sha" || rc=$?
    case $rc in
      0)
        note "run $RUN_NAME trained to the end; model dir $MODEL_DIR"
        exit 0
        ;;
      76)
        note "run $RUN_NAME was stopped (tpu/stop.sh); its step is saved in $MODEL_DIR"
        exit 76
        ;;
    esac
    # A preempted slice takes a moment to say so.
    sleep "$POLL_SECONDS"
    state=$(slice_state)
    if [[ $ready_states == *" $state "* && $rc != 75 ]]; then
      failures=$((failures + 1))
      note "run $RUN_NAME ended with status $rc on a healthy slice ($failures of --max-failures=$MAX_FAILURES)"
      ((failures < MAX_FAILURES)) || die "run $RUN_NAME failed $failures times in a row; see tpu/logs.sh --run=$RUN_NAME"
    else
      failures=0
    fi
    continue
  fi
  if [[ $lost_states == *" $state "* ]]; then
    preemptions=$((preemptions + 1))
    ((preemptions <= MAX_PREEMPTIONS)) || die "$NAME was lost $preemptions times (--max-preemptions=$MAX_PREEMPTIONS)"
    note "$NAME is $state: deleting it and creating it again; the run resumes from its latest checkpoint"
    delete_slice --quiet || note "delete failed; trying again"
    create_slice || note "create failed (capacity?); trying again in ${POLL_SECONDS}s"
    NEEDS_SETUP=1
  elif [[ $state == NOT_FOUND ]]; then
    create_slice || note "create failed (capacity?); trying again in ${POLL_SECONDS}s"
    NEEDS_SETUP=1
  elif [[ $state == STOPPED ]]; then
    run_cmd gcloud compute tpus tpu-vm start "$NAME" "${LOCATION[@]}" || note "start failed; trying again"
  fi
  state=
  sleep "$POLL_SECONDS"
done
