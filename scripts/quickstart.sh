#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the quickstart: embed a few
# sentences with the real all-MiniLM-L6-v2 weights and print their similarities.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-output/quickstart}
mkdir -p "$OUT"
cat > "$OUT/texts.txt" <<'TEXTS'
How do I read a file line by line in Python?
with open(path) as f:\n    for line in f: print(line)
The cat sat on the mat.
A kitten is resting on a rug.
JAX compiles numerical Python programs with XLA.
TEXTS
.venv/bin/embedder encode --gin_file=gin/models/minilm_l6.gin \
  --input="$OUT/texts.txt" --output="$OUT/embeddings.npy"
.venv/bin/python - "$OUT" <<'PY'
import sys
import numpy as np
out = sys.argv[1]
texts = open(f"{out}/texts.txt", encoding="utf-8").read().splitlines()
emb = np.load(f"{out}/embeddings.npy")
sim = emb @ emb.T
for i, t in enumerate(texts):
    j = max((k for k in range(len(texts)) if k != i), key=lambda k: sim[i, k])
    print(f"{sim[i, j]:.3f}  {t[:45]!r:50} ~ {texts[j][:45]!r}")
print(f"embeddings: {out}/embeddings.npy {emb.shape}")
PY
