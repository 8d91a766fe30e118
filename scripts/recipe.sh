#!/usr/bin/env bash
# The Gecko / Gemini Embedding recipe as one command, on docstring -> code pairs of
# the local Python standard library (split by module; nothing is downloaded):
#   1. data       pretrain.jsonl: every docstring sentence / summary line of the train
#                 modules against its whole function (noisy, ~3x the fine-tuning set);
#                 train / validation / test.jsonl: first paragraph -> code
#   2. pretrain   gin/runs/pretrain.gin: in-batch negatives only, the largest batch
#   3. finetune   K runs of gin/runs/finetune.gin (RECIPE, default gecko), each started
#                 from the pre-finetuned checkpoint (INIT_FROM_CHECKPOINT), seed i and
#                 the i-th of LEARNING_RATES (cycled)
#   4. soup       greedy soup of the K fine-tunes, scored on the validation split
#   5. export     the soup as a sentence-transformers folder
#   6. report     OUT/recipe.md (+ recipe.json, recipe.png): base (the starting
#                 weights), pre-finetuned, each fine-tune, the soup and its export on
#                 the test split, at the full size and the smallest Matryoshka size
#
# Usage: bash scripts/recipe.sh [--tiny]
#   --tiny   the CI setting: gin/models/tiny.gin, a handful of steps, K=2 (< 1 minute)
# Scale (environment; defaults: all-MiniLM-L6-v2 on one 2-core CPU in ~15 minutes):
#   OUT MODEL_GIN MESH_GIN K PRETRAIN_STEPS PRETRAIN_BATCH PRETRAIN_LEARNING_RATE (5e-5)
#   FINETUNE_STEPS FINETUNE_BATCH LEARNING_RATES (of the fine-tunes; '5e-5 3e-5 1e-4') RECIPE (gecko | gemini) QUERY_LEN DOC_LEN
#   GRAD_CACHE_CHUNK (pre-finetuning; 0 = off) EVAL_LIMIT (validation and test pairs)
#   PYTHON (default .venv/bin/python)
# On a pod only the mesh and the scale change (the stages, gin files and commands
# stay), e.g.:
#   MESH_GIN=gin/mesh/v4-32.gin MODEL_GIN=gin/models/gecko_1b.gin PRETRAIN_BATCH=4096 \
#   GRAD_CACHE_CHUNK=512 PRETRAIN_STEPS=10000 FINETUNE_STEPS=1000 FINETUNE_BATCH=128 \
#   bash scripts/recipe.sh
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."

die() {
  echo "recipe.sh: $*" >&2
  exit 2
}

TINY=0
for arg in "$@"; do
  case $arg in
    --tiny) TINY=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done

if [[ $TINY == 1 ]]; then
  : "${MODEL_GIN:=gin/models/tiny.gin}" "${K:=2}" "${PRETRAIN_STEPS:=4}" "${PRETRAIN_BATCH:=16}"
  : "${FINETUNE_STEPS:=3}" "${FINETUNE_BATCH:=8}" "${QUERY_LEN:=16}" "${DOC_LEN:=32}" "${EVAL_LIMIT:=32}"
else
  : "${MODEL_GIN:=gin/models/minilm_l6.gin}" "${K:=3}" "${PRETRAIN_STEPS:=40}" "${PRETRAIN_BATCH:=64}"
  : "${FINETUNE_STEPS:=25}" "${FINETUNE_BATCH:=32}" "${QUERY_LEN:=32}" "${DOC_LEN:=96}" "${EVAL_LIMIT:=300}"
fi
: "${OUT:=output/recipe}" "${MESH_GIN:=gin/mesh/cpu.gin}" "${PYTHON:=.venv/bin/python}"
: "${PRETRAIN_LEARNING_RATE:=5e-5}" "${LEARNING_RATES:=5e-5 3e-5 1e-4}" "${RECIPE:=gecko}" "${GRAD_CACHE_CHUNK:=0}"
read -r -a RATES <<<"$LEARNING_RATES"

[[ -x $PYTHON ]] || die "$PYTHON not found: run scripts/setup_env.sh first (or set PYTHON)"
[[ -f $MODEL_GIN && -f $MESH_GIN ]] || die "no such gin file: $MODEL_GIN or $MESH_GIN"
((K >= 1)) || die "K=$K must be >= 1"
((${#RATES[@]} >= 1)) || die "LEARNING_RATES is empty"
if [[ -e $OUT && -n "$(ls -A "$OUT")" ]]; then
  die "$OUT exists and is not empty: remove it or set OUT"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
DATA=$OUT/data
START=$SECONDS
stage() { echo "== $* ($((SECONDS - START)) s)" >&2; }

stage "data: stdlib pairs -> $DATA"
mkdir -p "$DATA"
"$PYTHON" -m embedder.data.stdlib_pairs --output_dir "$DATA" --pretrain

# Flags every training stage shares: the model, the mesh and the lengths.
COMMON=(--gin_file="$MODEL_GIN" --gin_file="$MESH_GIN" --gin.QUERY_LEN="$QUERY_LEN" --gin.DOC_LEN="$DOC_LEN")

stage "pretrain: $PRETRAIN_STEPS steps of $PRETRAIN_BATCH pairs -> $OUT/pretrain"
"$PYTHON" -m embedder train --gin_file=gin/runs/pretrain.gin "${COMMON[@]}" \
  --gin.TRAIN_FILES="['$DATA/pretrain.jsonl']" \
  --gin.TRAIN_STEPS="$PRETRAIN_STEPS" --gin.BATCH_SIZE="$PRETRAIN_BATCH" \
  --gin.WARMUP_STEPS="$((PRETRAIN_STEPS / 10))" --gin.LEARNING_RATE="$PRETRAIN_LEARNING_RATE" \
  --gin.GRAD_CACHE_CHUNK="$GRAD_CACHE_CHUNK" --gin.SAVE_EVERY="$PRETRAIN_STEPS" \
  --model_dir="$OUT/pretrain"

FINETUNES=()
for ((i = 1; i <= K; i++)); do
  rate=${RATES[$(((i - 1) % ${#RATES[@]}))]}
  stage "finetune $i/$K: seed $i, learning rate $rate, $FINETUNE_STEPS steps -> $OUT/finetune_$i"
  # The stdlib pairs have no hard negatives: the fine-tunes train on in-batch (and,
  # for gecko, same-tower) negatives; mined negatives would go in `negatives`.
  "$PYTHON" -m embedder train --gin_file=gin/runs/finetune.gin "${COMMON[@]}" \
    --gin.RECIPE="'$RECIPE'" --gin.INIT_FROM_CHECKPOINT="'$OUT/pretrain'" \
    --gin.TRAIN_FILES="['$DATA/train.jsonl']" --gin.NUM_NEGATIVES=0 \
    --gin.TRAIN_STEPS="$FINETUNE_STEPS" --gin.BATCH_SIZE="$FINETUNE_BATCH" \
    --gin.WARMUP_STEPS="$((FINETUNE_STEPS / 10))" --gin.LEARNING_RATE="$rate" --gin.SEED="$i" \
    --gin.SAVE_EVERY="$FINETUNE_STEPS" --model_dir="$OUT/finetune_$i"
  FINETUNES+=("$OUT/finetune_$i")
done

stage "soup: greedy over ${#FINETUNES[@]} fine-tunes on the validation split -> $OUT/soup"
"$PYTHON" -m embedder soup --checkpoints "${FINETUNES[@]}" --method greedy \
  --eval_task "$DATA/validation.jsonl" --eval_limit "$EVAL_LIMIT" --output "$OUT/soup"

stage "export: the soup as sentence-transformers -> $OUT/export"
"$PYTHON" -m embedder export --model "$OUT/soup" --format sentence-transformers --output "$OUT/export"

stage "report: every stage on the test split -> $OUT/recipe.md"
"$PYTHON" - "$OUT" "$DATA/test.jsonl" "$EVAL_LIMIT" "${FINETUNES[@]}" <<'PYTHON'
"""Evaluates every stage of the recipe on the test split; writes recipe.md/.json/.png."""
import json
import math
import os
import sys

import jax
import numpy as np

from embedder import checkpointing, evaluation, fileio, inference, plots, recipes
from embedder.data import eval_tasks, tokenizers
from embedder.models import spec

out, test_file, limit, finetunes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
task = eval_tasks.load_task(test_file, limit)


def base_embedder(run_dir):
    """The weights the pre-finetune started from, rebuilt as training built them."""
    meta = checkpointing.read_meta(checkpointing.resolve_step_dir(run_dir))
    origin = meta.origin
    module = spec.module_from_description(meta.model_config)
    init_from = origin.path if origin.kind == "pretrained" else None
    model = spec.ModelSpec(module, meta.vocab_dir, init_from, meta.prompts)
    init_rng, _ = jax.random.split(jax.random.key(origin.seed))  # as trainer.init_state
    # A random start compiles as one program (op by op it is ~170 small compiles);
    # it equals the eager initialisation training ran to ~1e-8.
    params = model.init_params(init_rng) if init_from else jax.jit(model.init_params)(init_rng)
    tokenizer = tokenizers.load_tokenizer(meta.vocab_dir)
    max_length = inference.default_max_length(module, meta.vocab_dir)
    return inference.Embedder(module, params, tokenizer, max_length, meta.prompts), origin


soup_record = json.load(open(os.path.join(out, "soup", "soup.json")))
base, origin = base_embedder(os.path.join(out, "pretrain"))
stages = [(f"base ({origin.kind}{', ' + os.path.basename(origin.path) if origin.path else ''})", None, base)]
stages.append(("pre-finetuned", os.path.join(out, "pretrain"), None))
stages += [(f"fine-tune {os.path.basename(f)}", f, None) for f in finetunes]
stages.append(("greedy soup", os.path.join(out, "soup"), None))
stages.append(("soup, exported (sentence-transformers)", os.path.join(out, "export"), None))

dims = recipes.matryoshka_dims(spec.ModelSpec(base.module))
small = dims[-1]
rows = []
for name, path, embedder in stages:
    embedder = embedder or inference.Embedder.load(path)
    result = evaluation.evaluate([task], evaluation.embedder_encoder(embedder, 32), dims)[task.name]
    full, least = result["metrics"][dims[0]], result["metrics"][small]
    step = None
    if path and os.path.basename(path) != "export":
        step = int(os.path.basename(checkpointing.resolve_step_dir(path)))
    rows.append({
        "stage": name,
        "model": path,
        "step": step,
        "ndcg@10": full["ndcg@10"],
        "mrr@10": full["mrr@10"],
        "recall@10": full["recall@10"],
        f"ndcg@10 dim {small}": least["ndcg@10"],
    })
    print(f"{name}: ndcg@10 {full['ndcg@10']:.4f}", file=sys.stderr)

columns = ["ndcg@10", "mrr@10", "recall@10", f"ndcg@10 dim {small}"]
lines = [
    f"Test split ({test_file}): {len(task.queries)} queries, {len(task.documents)} documents; "
    f"full size {dims[0]}, smallest Matryoshka size {small}.",
    "",
    "| stage | step | " + " | ".join(columns) + " |",
    "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |",
]
for row in rows:
    values = " | ".join(f"{row[c]:.4f}" for c in columns)
    lines.append(f"| {row['stage']} | {'' if row['step'] is None else row['step']} | {values} |")
lines.append("")
kept = [i for i in soup_record["ingredients"] if i["accepted"]]
lines.append(
    f"Greedy soup on the validation split ({soup_record['metric']}): "
    + ", ".join(
        f"{'in' if i['accepted'] else 'left out'} {os.path.basename(os.path.dirname(os.path.dirname(i['checkpoint'])))}"
        f" {i['metric']:.4f}"
        for i in soup_record["ingredients"]
    )
    + f"; soup {soup_record['soup_metric']:.4f} ({len(kept)} of {len(soup_record['ingredients'])} kept)."
)
fileio.write_text_atomically(os.path.join(out, "recipe.md"), "\n".join(lines) + "\n")
bad = [r["stage"] for r in rows if not all(math.isfinite(r[c]) for c in columns)]
report = {"task": task.name, "dims": list(dims), "rows": rows, "soup": soup_record}
fileio.write_json(os.path.join(out, "recipe.json"), report)

plt = plots._pyplot()
figure, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4), layout="constrained")
x = np.arange(len(rows))
for offset, column in zip((-0.2, 0.2), ("ndcg@10", f"ndcg@10 dim {small}")):
    ax.bar(x + offset, [r[column] for r in rows], width=0.4, label=column)
ax.set_xticks(x, [r["stage"].replace(" (", "\n(") for r in rows], rotation=30, ha="right", fontsize=8)
ax.set_ylabel(f"{task.name} (test)")
ax.set_title("recipe: base -> pre-finetuned -> fine-tunes -> soup")
ax.grid(axis="y", alpha=0.3)
ax.legend()
plots.save_figure(figure, os.path.join(out, "recipe.png"))
print("\n".join(lines))
if bad:
    sys.exit(f"non-finite metrics for {bad}")
PYTHON
stage "done: $OUT/recipe.md, $OUT/recipe.png"
