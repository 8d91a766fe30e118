#!/usr/bin/env bash
# Smaller models that keep the quality (issue 19), measured on the stdlib docstring
# -> code pairs (train split for training, test split scored by `embedder eval`):
#   distillation  a 3-layer student started from layers 0, 2, 4 of all-MiniLM-L6-v2
#                 (gin/models/minilm_l3.gin), trained at equal steps and data
#                 (a) with the contrastive loss alone (gin/runs/finetune.gin) and
#                 (b) with the teacher's terms added (gin/runs/distill.gin, TEACHER
#                 'all-MiniLM-L6-v2'); the teacher scored beside them
#   quantisation  student (a) is the fp32 model; QAT_STEPS more steps of
#                 quantisation-aware fine-tuning from it (gin/runs/qat.gin) at int8
#                 and at int4, each exported as a quantised bundle (`embedder export
#                 --format=bundle --quantize=int8|int4`); the fp32 model exported
#                 with --quantize but no QAT (post-training quantisation) beside
#                 them, and a control: the same steps from (a) without QAT; and the fp32 model's embeddings searched as float32 / int8 /
#                 binary indexes with float32 rescoring (`embedder eval
#                 --embedding_precision ... --rescore_multiplier`)
# Every score: nDCG@10 at the full size (384) and at 128 dimensions. Ends with
# OUT/small_models.md (the tables). A run whose last checkpoint exists is not
# trained again.
#
# Usage: bash scripts/bench_small_models.sh [students] [qat] [eval] [report]   (default: all)
# Environment (defaults sized for one 2-core CPU):
#   OUT (/tmp/bench_small_models) STEPS (60) QAT_STEPS (20) BATCH (32) LEARNING_RATE (1e-4)
#   QAT_LEARNING_RATE (2e-5) QUERY_LEN (32) DOC_LEN (96) RESCORE_MULTIPLIER (4)
#   DISTILL_FLAGS (extra --gin.NAME=VALUE flags of the distilled run, e.g.
#   "--gin.SCORE_DISTILLATION_WEIGHT=2.0 --gin.TEACHER_TEMPERATURE=0.1")
#   DISTILL_NAME (its folder name, student_distill) PYTHON (.venv/bin/python)
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."

: "${OUT:=/tmp/bench_small_models}" "${STEPS:=60}" "${QAT_STEPS:=20}" "${BATCH:=32}"
: "${LEARNING_RATE:=1e-4}" "${QAT_LEARNING_RATE:=2e-5}" "${QUERY_LEN:=32}" "${DOC_LEN:=96}"
: "${RESCORE_MULTIPLIER:=4}" "${DISTILL_FLAGS:=}" "${DISTILL_NAME:=student_distill}"
: "${PYTHON:=.venv/bin/python}"
PHASES=("$@")
((${#PHASES[@]})) || PHASES=(students qat eval report)
for phase in "${PHASES[@]}"; do
  case $phase in
    students | qat | eval | report) ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "bench_small_models.sh: unknown phase $phase (students, qat, eval, report)" >&2
      exit 2
      ;;
  esac
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
DATA=$OUT/data
TEST=$DATA/test.jsonl
START=$SECONDS
stage() { echo "== $* ($((SECONDS - START)) s)" >&2; }
wants() { [[ " ${PHASES[*]} " == *" $1 "* ]]; }
embedder() { "$PYTHON" -m embedder "$@"; }

# Flags every training run shares: the mesh, the data, the lengths, the schedule.
COMMON=(--gin_file=gin/mesh/cpu.gin --gin.TRAIN_FILES="['$DATA/train.jsonl']" --gin.NUM_NEGATIVES=0
  --gin.QUERY_LEN="$QUERY_LEN" --gin.DOC_LEN="$DOC_LEN" --gin.BATCH_SIZE="$BATCH" --gin.SEED=1)
schedule() { echo --gin.TRAIN_STEPS="$1" --gin.WARMUP_STEPS="$(($1 / 10))" --gin.SAVE_EVERY="$1"; }

trained() { [[ -d $OUT/$1/checkpoints/$2 ]]; } # RUN STEP: its last checkpoint exists

if wants students || wants qat; then
  if [[ ! -f $DATA/train.jsonl ]]; then
    stage "data: stdlib pairs -> $DATA"
    "$PYTHON" -m embedder.data.stdlib_pairs --output_dir "$DATA"
  fi
fi
if wants students; then
  if ! trained student_contrastive "$STEPS"; then
    stage "student (a): contrastive only, $STEPS steps -> $OUT/student_contrastive"
    # shellcheck disable=SC2046
    embedder train --gin_file=gin/runs/finetune.gin --gin_file=gin/models/minilm_l3.gin "${COMMON[@]}" \
      $(schedule "$STEPS") --gin.LEARNING_RATE="$LEARNING_RATE" --model_dir="$OUT/student_contrastive"
  fi
  if ! trained "$DISTILL_NAME" "$STEPS"; then
    stage "student (b): contrastive + distillation from all-MiniLM-L6-v2 -> $OUT/$DISTILL_NAME"
    # shellcheck disable=SC2046,SC2086
    embedder train --gin_file=gin/runs/distill.gin --gin_file=gin/models/minilm_l3.gin "${COMMON[@]}" \
      $(schedule "$STEPS") --gin.LEARNING_RATE="$LEARNING_RATE" --gin.TEACHER="'all-MiniLM-L6-v2'" \
      $DISTILL_FLAGS --model_dir="$OUT/$DISTILL_NAME"
  fi
fi
if wants qat; then
  for bits in 8 4; do
    trained "qat_int$bits" "$QAT_STEPS" && continue
    stage "QAT int$bits: $QAT_STEPS steps from student (a) -> $OUT/qat_int$bits"
    # shellcheck disable=SC2046
    embedder train --gin_file=gin/runs/qat.gin --gin_file=gin/models/minilm_l3.gin "${COMMON[@]}" \
      $(schedule "$QAT_STEPS") --gin.LEARNING_RATE="$QAT_LEARNING_RATE" --gin.QAT_BITS="$bits" \
      --gin.INIT_FROM_CHECKPOINT="'$OUT/student_contrastive'" --model_dir="$OUT/qat_int$bits"
  done
  if ! trained fp32_control "$QAT_STEPS"; then
    stage "control: the same $QAT_STEPS steps from student (a) in fp32 -> $OUT/fp32_control"
    # shellcheck disable=SC2046
    embedder train --gin_file=gin/runs/finetune.gin --gin_file=gin/models/minilm_l3.gin "${COMMON[@]}" \
      $(schedule "$QAT_STEPS") --gin.LEARNING_RATE="$QAT_LEARNING_RATE" \
      --gin.INIT_FROM_CHECKPOINT="'$OUT/student_contrastive'" --model_dir="$OUT/fp32_control"
  fi
fi

score() { # NAME MODEL [eval flags]: the test split at 384 and 128 dims -> OUT/eval/NAME
  local name=$1 model=$2
  shift 2
  stage "eval $name"
  embedder eval --model "$model" --tasks "$TEST" --dims 384 128 --k 10 --output "$OUT/eval/$name" "$@" >/dev/null
}

if wants eval; then
  score teacher all-MiniLM-L6-v2
  score student_contrastive "$OUT/student_contrastive" --embedding_precision float32 int8 binary \
    --rescore_multiplier "$RESCORE_MULTIPLIER"
  score "$DISTILL_NAME" "$OUT/$DISTILL_NAME"
  score fp32_control "$OUT/fp32_control"
  for bits in 8 4; do
    for source in student_contrastive "qat_int$bits"; do
      stage "export $source --quantize=int$bits"
      rm -rf "$OUT/export/${source}_as_int$bits"
      embedder export --model "$OUT/$source" --format bundle --quantize "int$bits" \
        --output "$OUT/export/${source}_as_int$bits" >/dev/null
      score "${source}_as_int$bits" "$OUT/export/${source}_as_int$bits"
    done
  done
fi

if wants report; then
  stage "report -> $OUT/small_models.md"
  "$PYTHON" - "$OUT" "$DISTILL_NAME" <<'PYTHON'
"""The two tables of the README's "Smaller models" section, from OUT/eval/*/results.json."""
import json
import os
import sys

out, distill_name = sys.argv[1], sys.argv[2]


def results(name):
    with open(os.path.join(out, "eval", name, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def ndcg(record, dim, precision=None):
    (task,) = record["tasks"].values()
    metrics = task["metrics"] if precision in (None, "float32") else task["precisions"][precision]["metrics"]
    return metrics[str(dim)]["ndcg@10"]


lines = ["| model | layers | nDCG@10 (384) | nDCG@10 (128) |", "| --- | ---: | ---: | ---: |"]
for label, name, layers in [
    ("teacher: all-MiniLM-L6-v2", "teacher", 6),
    ("student (a): contrastive only", "student_contrastive", 3),
    ("student (b): contrastive + distillation", distill_name, 3),
]:
    record = results(name)
    lines.append(f"| {label} | {layers} | {ndcg(record, 384):.4f} | {ndcg(record, 128):.4f} |")
lines += ["", "| weights | nDCG@10 (384) | % of fp32 | nDCG@10 (128) | % of fp32 |", "| --- | ---: | ---: | ---: | ---: |"]
fp32 = results("student_contrastive")
base = {dim: ndcg(fp32, dim) for dim in (384, 128)}
rows = [("fp32: student (a)", fp32), ("fp32: student (a) + the QAT runs' steps without QAT", results("fp32_control"))]
for bits in (8, 4):
    rows += [
        (f"int{bits}, no QAT (fp32 weights quantised)", results(f"student_contrastive_as_int{bits}")),
        (f"int{bits}, QAT fine-tune", results(f"qat_int{bits}_as_int{bits}")),
    ]
for label, record in rows:
    a, b = ndcg(record, 384), ndcg(record, 128)
    lines.append(f"| {label} | {a:.4f} | {100 * a / base[384]:.1f} | {b:.4f} | {100 * b / base[128]:.1f} |")
lines += [
    "",
    "| embedding index (student (a)) | nDCG@10 (384) | index bytes (384) | nDCG@10 (128) | index bytes (128) |",
    "| --- | ---: | ---: | ---: | ---: |",
]
(task,) = fp32["tasks"].values()
for precision, record in task["precisions"].items():
    m = record["metrics"]
    label = precision if precision == "float32" else f"{precision}, rescored x{record['rescore_multiplier']}"
    lines.append(
        f"| {label} | {m['384']['ndcg@10']:.4f} | {record['index_bytes']['384']} | "
        f"{m['128']['ndcg@10']:.4f} | {record['index_bytes']['128']} |"
    )
text = "\n".join(lines) + "\n"
with open(os.path.join(out, "small_models.md"), "w", encoding="utf-8") as f:
    f.write(text)
print(text)
PYTHON
fi
stage "done"
