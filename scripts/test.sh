#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh test) and runs lint and the test suite.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow and not subprocess"` runs the
# fast tier; without arguments (what CI runs) every test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two worker processes (the two cores CI has; TEST_WORKERS=N to change), each test
# file on one worker so its module fixtures (a reference run, a compiled model) are
# built once. A worker that dies ends the run (--max-worker-restart=0) rather than
# leaving its file's tests unscheduled.
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --max-worker-restart=0 --durations=25 "$@"
