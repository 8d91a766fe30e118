#!/usr/bin/env bash
# Opens a shell on one worker of the slice, or runs a command on one or all.
#
#   tpu/ssh.sh --name=embedder-v4-32                      a shell on worker 0
#   tpu/ssh.sh --name=embedder-v4-32 --worker=2           a shell on worker 2
#   tpu/ssh.sh --name=embedder-v4-32 --worker=all -- 'tail -n 3 ~/embedder-runs/*/*.log'
#
# As with ssh, the words after -- are joined with spaces into one remote command.
# Own flag: --worker=N|all (0). Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

WORKER=0
script_flag() {
  case $1 in
    --worker) needs_value "$@" && WORKER=$2 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker=$WORKER: expected a worker index or all"
if ((${#EXTRA_ARGS[@]})); then
  ssh_workers "$WORKER" "${EXTRA_ARGS[*]}"
else
  [[ $WORKER != all ]] || die "--worker=all needs a command after --"
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" --strict-host-key-checking=no
fi
