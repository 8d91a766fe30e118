#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh), derives real training data from the
# local Python standard library (docstring -> code pairs, split by module), and
# fine-tunes the real all-MiniLM-L6-v2 on it with Matryoshka dims 384/128/64
# (gin/runs/quickstart.gin). Extra arguments go to `embedder train`, e.g.
#   bash scripts/quickstart.sh --gin.TRAIN_STEPS=20
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
OUT=${OUT:-output/quickstart}
mkdir -p "$OUT/data"
.venv/bin/python -m embedder.data.stdlib_pairs --output_dir "$OUT/data"
.venv/bin/embedder train \
  --gin_file=gin/runs/quickstart.gin \
  --gin.TRAIN_FILES="['$OUT/data/train.jsonl']" \
  --model_dir="$OUT/model" "$@"
