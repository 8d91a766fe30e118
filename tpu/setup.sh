#!/usr/bin/env bash
# Installs this repository, at the commit checked out here, on every worker of
# the slice at once: `git archive HEAD` goes to gs://BUCKET/embedder/code/, each
# worker unpacks it into ~/embedder (recording the commit in ~/embedder/COMMIT)
# and runs tpu/worker_setup.sh (Python 3.11 venv, this package, the TPU build of
# jax at setup.py's pin, a check that JAX sees the chips).
#
#   tpu/setup.sh --name=embedder-v4-32 --bucket=my-bucket [--allow-dirty]
#
# Uncommitted changes to tracked files are an error (the workers run a commit);
# --allow-dirty ships HEAD without them. Common flags: see tpu/_lib.sh.
set -euo pipefail
# shellcheck source=tpu/_lib.sh
source "$(dirname "$0")/_lib.sh"

ALLOW_DIRTY=0
script_flag() {
  case $1 in
    --allow-dirty) ALLOW_DIRTY=1 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"
resolve_settings
require_bucket
sha=$(commit_to_ship)
note "installing commit $sha on every worker of $NAME"
setup_workers "$sha"
