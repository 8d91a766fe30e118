#!/usr/bin/env bash
# Runs ON each TPU worker; tpu/setup.sh unpacks the code into ~/embedder and
# then calls this on every worker at once. It makes a Python 3.11 virtualenv at
# ~/embedder-venv (the TPU images ship an older Python; uv fetches 3.11), installs
# this package with the TPU build of jax at the version setup.py pins, and
# checks that JAX sees the chips on every host.
#
#   bash ~/embedder/tpu/worker_setup.sh [--dry-run]
#
# Environment: EMBEDDER_VENV (default ~/embedder-venv), PYTHON_VERSION (3.11).
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run | --dry_run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
      exit 0
      ;;
    *)
      echo "worker_setup.sh: error: unknown argument $arg" >&2
      exit 2
      ;;
  esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${EMBEDDER_VENV:-$HOME/embedder-venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
LIBTPU_RELEASES=https://storage.googleapis.com/jax-releases/libtpu_releases.html
# The jax every host runs: the version the suite is tested with (constraints.txt).
JAX_VERSION=$(sed -n 's/^jax==\([^ ]*\) *$/\1/p' "$REPO/constraints.txt")
[[ -n $JAX_VERSION ]] || {
  echo "worker_setup.sh: error: no jax==VERSION pin in $REPO/constraints.txt" >&2
  exit 2
}
UV=$HOME/.local/bin/uv

run_cmd() {
  if ((DRY_RUN)); then
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
  else
    "$@"
  fi
}

if [[ ! -x $UV ]] || ((DRY_RUN)); then
  run_cmd python3 -m pip install --user --quiet --upgrade uv
fi
if [[ ! -x $VENV/bin/python ]] || ((DRY_RUN)); then
  run_cmd "$UV" venv --python "$PYTHON_VERSION" "$VENV"
fi
run_cmd "$UV" pip install --python "$VENV/bin/python" --quiet --find-links "$LIBTPU_RELEASES" \
  -c "$REPO/constraints.txt" -e "$REPO" "jax[tpu]==$JAX_VERSION"
# Every host at once, as in training: the pod's runtime needs all of them.
run_cmd "$VENV/bin/python" -c "from embedder import partitioning; partitioning.initialize_distributed(); import jax; \
print(f'host {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} of {jax.device_count()} \
devices, {jax.devices()[0].device_kind}, jax {jax.__version__}, commit $(cat "$REPO/COMMIT" 2>/dev/null || echo unknown)')"
