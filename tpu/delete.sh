#!/usr/bin/env bash
# Deletes the slice (a TPU VM, or with --queued the queued resource and its
# VMs). Checkpoints, logs and code stay in the bucket. gcloud asks to confirm
# unless --yes is given.
#
#   tpu/delete.sh --name=embedder-v4-32 [--queued] [--yes]
#
# Own flag: --yes. Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

CONFIRM=()
script_flag() {
  case $1 in
    --yes) CONFIRM=(--quiet) ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
delete_slice "${CONFIRM[@]}"
