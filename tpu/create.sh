#!/usr/bin/env bash
# Creates a TPU slice: a TPU VM (single host or a multi-host pod slice) or, with
# --queued, a queued resource that Cloud TPU fills when capacity frees up. Before
# anything is created it checks the accelerator type and, when the run's flags
# are given after --, that the run's mesh and global batch fit the slice's chips
# and its state fits HBM (embedder check --check).
#
#   tpu/create.sh --accelerator=v4-32 --zone=us-central2-b --spot [--queued] \
#       [-- --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/gecko_1b.gin ...]
#
# Own flags: --mesh=FILE|none (the mesh file for the check; default
# gin/mesh/<accelerator>.gin), --async (a queued resource: do not wait for it to
# become ACTIVE), --poll-seconds=N (60). Common flags and their environment
# variables: see tpu/_lib.sh (--project --zone --accelerator --runtime-version
# --name --spot --preemptible --queued --reserved --bucket --run --dry-run).
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

ASYNC=0
POLL_SECONDS=60
script_flag() {
  case $1 in
    --mesh) needs_value "$@" && MESH=$2 ;;
    --async) ASYNC=1 ;;
    --poll-seconds) needs_value "$@" && POLL_SECONDS=$2 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
if ((${#EXTRA_ARGS[@]})); then
  train_args
  check_run_config "${TRAIN_ARGS[@]}"
fi
note "creating $NAME: $SLICE ($GCLOUD_TYPE, $CHIPS chips on $HOSTS hosts, ${HBM_GIB} GiB HBM a chip), $RUNTIME_VERSION, zone $ZONE"
create_slice
if ((QUEUED && !ASYNC && !DRY_RUN)); then
  while :; do
    state=$(slice_state)
    note "queued resource $NAME: $state"
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDED | NOT_FOUND) die "queued resource $NAME is $state (see: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE)" ;;
    esac
    sleep "$POLL_SECONDS"
  done
fi
