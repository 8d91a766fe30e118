#!/usr/bin/env bash
# The slice's state as the preemption loop sees it (READY, PREEMPTED, ACTIVE,
# SUSPENDED, NOT_FOUND, ...), then gcloud's full description.
#
#   tpu/status.sh --name=embedder-v4-32 [--queued]
#
# Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

parse_flags "$@"
resolve_settings
if ((DRY_RUN)); then
  kind=tpu-vm
  ((QUEUED)) && kind=queued-resources
  run_cmd gcloud compute tpus "$kind" describe "$NAME" "${LOCATION[@]}"
  exit 0
fi
echo "$NAME: $(slice_state)"
if ((QUEUED)); then
  gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" || true
else
  gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" || true
fi
