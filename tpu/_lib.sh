# shellcheck shell=bash
# Shared by the tpu/*.sh scripts (sourced, never run): settings from flags or
# the environment, the dry-run switch, slice facts, and the gcloud commands that
# more than one script runs.
#
# Every setting has an environment variable and a flag; the flag wins:
#   --project=P           TPU_PROJECT          (default: gcloud's configured project)
#   --zone=Z              TPU_ZONE             (default: one that offers the generation)
#   --accelerator=T       TPU_ACCELERATOR      v4-8 (v4-32, v5e-16 = v5litepod-16, v5p-128, ...)
#   --runtime-version=V   TPU_RUNTIME_VERSION  (default: the generation's JAX image)
#   --name=N              TPU_NAME             (default: embedder-<accelerator>)
#   --spot                TPU_SPOT=1           spot capacity (preemptible, cheaper)
#   --preemptible         TPU_PREEMPTIBLE=1    the older preemptible tier (TPU VMs only)
#   --queued              TPU_QUEUED=1         ask through a queued resource
#   --reserved            TPU_RESERVED=1       use the project's reservation
#   --bucket=B            TPU_BUCKET           GCS bucket for code, checkpoints, logs
#   --run=R               TPU_RUN              run name (default: the TPU's name); the
#                                              model dir is gs://B/embedder/runs/R
#   --dry-run             TPU_DRY_RUN=1        print the commands instead of running them
# Flags take their value after `=`; `_` and `-` are the same in flag names.

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$TPU_DIR")
PROG=$(basename "$0")

PROJECT=${TPU_PROJECT:-}
ZONE=${TPU_ZONE:-}
ACCELERATOR=${TPU_ACCELERATOR:-v4-8}
RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
NAME=${TPU_NAME:-}
SPOT=${TPU_SPOT:-0}
PREEMPTIBLE=${TPU_PREEMPTIBLE:-0}
QUEUED=${TPU_QUEUED:-0}
RESERVED=${TPU_RESERVED:-0}
BUCKET=${TPU_BUCKET:-}
RUN_NAME=${TPU_RUN:-}
DRY_RUN=${TPU_DRY_RUN:-0}
# What follows `--`: the run's `embedder train` flags (or a remote command).
EXTRA_ARGS=()

# On the workers (see setup.sh and worker_setup.sh); expanded there, not here.
# shellcheck disable=SC2016
REMOTE_REPO='$HOME/embedder'
# Where run.sh --data=gs://... lands on every worker.
REMOTE_DATA_DIR=/tmp/embedder-data

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

note() {
  echo "$PROG: $*" >&2
}

# The usage text is the script's header comment (its lines up to `set -euo`).
usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
}

# parse_flags "$@": the common flags above; a script's own flags go to its
# `script_flag FLAG VALUE HAS_VALUE` function (return 1 for an unknown flag).
parse_flags() {
  while (($#)); do
    local arg=$1 flag value has_value=0
    shift
    case $arg in
      --)
        EXTRA_ARGS=("$@")
        return 0
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --*=*)
        flag=${arg%%=*}
        value=${arg#*=}
        has_value=1
        ;;
      --*)
        flag=$arg
        value=
        ;;
      *) die "unexpected argument '$arg' (flags are --name=value; the run's own flags go after --)" ;;
    esac
    flag=${flag//_/-}
    case $flag in
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --queued) QUEUED=1 ;;
      --reserved) RESERVED=1 ;;
      --project | --zone | --accelerator | --runtime-version | --name | --bucket | --run)
        ((has_value)) || die "$flag needs a value: $flag=VALUE"
        case $flag in
          --project) PROJECT=$value ;;
          --zone) ZONE=$value ;;
          --accelerator) ACCELERATOR=$value ;;
          --runtime-version) RUNTIME_VERSION=$value ;;
          --name) NAME=$value ;;
          --bucket) BUCKET=$value ;;
          --run) RUN_NAME=$value ;;
        esac
        ;;
      *)
        if ! declare -F script_flag >/dev/null || ! script_flag "$flag" "$value" "$has_value"; then
          die "unknown flag $arg (see $PROG --help)"
        fi
        ;;
    esac
  done
}

# needs_value FLAG VALUE HAS_VALUE: for a script's own flags that take a value.
needs_value() {
  (($3)) || die "$1 needs a value: $1=VALUE"
}

# The Python that runs `embedder check` (python -m embedder check, from the
# repository root): $PYTHON, the repo's .venv, or python3.
python_bin() {
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    echo "$REPO_ROOT/.venv/bin/python"
  else
    echo python3
  fi
}

# resolve_settings: validates the flags and fills in the defaults. Sets SLICE
# (canonical name, e.g. v5e-16), GCLOUD_TYPE (v5litepod-16), CHIPS, HOSTS,
# HBM_GIB, LOCATION (the gcloud --zone/--project flags), MODEL_DIR.
resolve_settings() {
  local info default_runtime default_zone
  info=$(cd "$REPO_ROOT" && "$(python_bin)" -m embedder check --slice_info "$ACCELERATOR" 2>&1) || die "${info#*error: }"
  # shellcheck disable=SC2034  # CHIPS, HOSTS, HBM_GIB: for the scripts that source this file
  read -r SLICE GCLOUD_TYPE CHIPS HOSTS HBM_GIB default_runtime default_zone <<<"$info"
  ZONE=${ZONE:-$default_zone}
  RUNTIME_VERSION=${RUNTIME_VERSION:-$default_runtime}
  NAME=${NAME:-embedder-$SLICE}
  RUN_NAME=${RUN_NAME:-$NAME}
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name=$NAME: a TPU name is lowercase letters, digits and hyphens, starts with a letter, at most 63 characters"
  [[ $RUN_NAME =~ ^[A-Za-z0-9][-_.A-Za-z0-9]*$ ]] || die "--run=$RUN_NAME: use letters, digits, '-', '_' and '.'"
  for flag in SPOT PREEMPTIBLE QUEUED RESERVED DRY_RUN; do
    [[ ${!flag} == 0 || ${!flag} == 1 ]] || die "$flag=${!flag}: expected 0 or 1"
  done
  ((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible exclude each other (spot is the newer tier)"
  ((QUEUED && PREEMPTIBLE)) && die "a queued resource takes --spot, not --preemptible"
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  LOCATION=(--zone="$ZONE")
  [[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")
  MODEL_DIR=${BUCKET:+gs://$BUCKET/embedder/runs/$RUN_NAME}
  return 0
}

require_bucket() {
  [[ -n $BUCKET ]] || die "no bucket: give --bucket=BUCKET or set TPU_BUCKET (code, checkpoints and logs live there)"
}

# run_cmd CMD...: runs it, or under --dry-run prints it shell-quoted, one line.
run_cmd() {
  if ((DRY_RUN)); then
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
  else
    "$@"
  fi
}

# ssh_workers WORKER COMMAND: COMMAND on one worker (0, 1, ...) or on all of them.
# Host keys change whenever a slice is recreated, so they are not pinned.
ssh_workers() {
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" \
    --strict-host-key-checking=no --command="$2"
}

# quote_args ARGS...: one string that a remote bash splits back into ARGS.
quote_args() {
  local quoted
  printf -v quoted '%q ' "$@"
  echo "${quoted% }"
}

# ------------------------------------------------------------- slice lifecycle

create_slice() {
  local tier=()
  ((SPOT)) && tier+=(--spot)
  ((PREEMPTIBLE)) && tier+=(--preemptible)
  ((RESERVED)) && tier+=(--reserved)
  if ((QUEUED)); then
    run_cmd gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --node-id="$NAME" \
      --accelerator-type="$GCLOUD_TYPE" --runtime-version="$RUNTIME_VERSION" "${tier[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
      --accelerator-type="$GCLOUD_TYPE" --version="$RUNTIME_VERSION" "${tier[@]}"
  fi
}

delete_slice() {
  local confirm=("$@")
  if ((QUEUED)); then
    # --force also deletes the TPU VMs the queued resource holds.
    run_cmd gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force "${confirm[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" "${confirm[@]}"
  fi
}

# slice_state: the state gcloud reports (READY, PREEMPTED, ACTIVE, SUSPENDED, ...),
# NOT_FOUND when there is no such slice, UNKNOWN when gcloud itself failed.
slice_state() {
  local out err rc=0
  err=$(mktemp)
  if ((QUEUED)); then
    out=$(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" --format='value(state.state)' 2>"$err") || rc=$?
  else
    out=$(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)' 2>"$err") || rc=$?
  fi
  if ((rc == 0)); then
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found|was not found' "$err"; then
    echo NOT_FOUND
  else
    sed "s/^/$PROG: gcloud: /" "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

# --------------------------------------------------------------- run settings

# gin_args_of ARGS...: the --gin_file / --gin.X / --gin_search_paths flags in ARGS, one a line.
gin_args_of() {
  while (($#)); do
    case $1 in
      --gin_file | --gin_search_paths)
        (($# >= 2)) || die "$1 needs a value"
        echo "$1=$2"
        shift
        ;;
      --gin_file=* | --gin_search_paths=* | --gin.*=*) echo "$1" ;;
    esac
    shift
  done
}

# mesh_file_for_run: the mesh file to append to the run's gin files: --mesh, or
# gin/mesh/<slice>.gin when the run names none itself; empty for none.
mesh_file_for_run() {
  if [[ -n ${MESH:-} ]]; then
    [[ $MESH == none ]] || echo "$MESH"
    return 0
  fi
  local arg
  for arg in "${EXTRA_ARGS[@]}"; do
    [[ $arg == *mesh/*.gin ]] && return 0
  done
  if [[ -f $REPO_ROOT/gin/mesh/$SLICE.gin ]]; then
    echo "gin/mesh/$SLICE.gin"
  fi
}

# train_args: EXTRA_ARGS plus the mesh file, checked; sets TRAIN_ARGS.
train_args() {
  local arg mesh
  ((${#EXTRA_ARGS[@]})) || die "no training flags: give them after --, e.g. -- --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/gecko_1b.gin --gin.TRAIN_FILES=\"['$REMOTE_DATA_DIR/train.jsonl']\""
  for arg in "${EXTRA_ARGS[@]}"; do
    case $arg in
      --model_dir | --model_dir=*) die "the model dir is gs://BUCKET/embedder/runs/RUN: give --run=RUN (and --bucket), not --model_dir" ;;
      --coordinator_address* | --num_processes* | --process_id*) die "$arg: leave the multi-host flags out on a TPU slice (JAX finds its peers)" ;;
    esac
  done
  [[ -z ${DATA:-} || $DATA == gs://* ]] || die "--data=$DATA: a gs:// folder (every worker copies it to $REMOTE_DATA_DIR)"
  TRAIN_ARGS=("${EXTRA_ARGS[@]}")
  mesh=$(mesh_file_for_run)
  if [[ -n $mesh ]]; then
    [[ -f $REPO_ROOT/$mesh || -f $mesh ]] || die "--mesh=$mesh: no such file"
    TRAIN_ARGS+=(--gin_file="$mesh")
  fi
}

# check_run_config: the run's mesh, batch and state against the slice, before
# anything is created or started (embedder check --check). Runs in
# dry-run mode too: it only reads the gin files.
check_run_config() {
  local gin_args=() line out err
  while IFS= read -r line; do
    gin_args+=("$line")
  done < <(gin_args_of "$@")
  if ((${#gin_args[@]} == 0)); then
    return 0
  fi
  err=$(mktemp)
  if ! out=$(cd "$REPO_ROOT" && "$(python_bin)" -m embedder check --check --accelerator="$SLICE" "${gin_args[@]}" 2>"$err"); then
    line=$(grep -m1 'error: ' "$err" || tail -n 3 "$err")
    rm -f "$err"
    die "the run does not fit $SLICE: ${line#*error: }"
  fi
  rm -f "$err"
  note "$out"
}

# ------------------------------------------------------------- code on workers

# commit_to_ship: HEAD, refusing uncommitted changes to tracked files unless
# ALLOW_DIRTY=1 (then HEAD is shipped without them, and a warning says so).
commit_to_ship() {
  local sha
  sha=$(git -C "$REPO_ROOT" rev-parse HEAD) || die "$REPO_ROOT is not a git checkout"
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    if ((${ALLOW_DIRTY:-0})); then
      note "warning: uncommitted changes are not shipped; the workers get commit $sha"
    else
      die "uncommitted changes: the workers run a commit, so commit first (or --allow-dirty to ship HEAD $sha without them)"
    fi
  fi
  echo "$sha"
}

# setup_workers SHA: uploads `git archive SHA` to the bucket and installs it on
# every worker (tpu/worker_setup.sh there: Python 3.11 venv, the package, jax[tpu]).
setup_workers() {
  local sha=$1 tarball code_uri remote
  tarball=${TMPDIR:-/tmp}/embedder-$sha.tar.gz
  code_uri=gs://$BUCKET/embedder/code/embedder-$sha.tar.gz
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" "$sha"
  run_cmd gcloud storage cp "$tarball" "$code_uri"
  remote="set -euo pipefail; gcloud storage cp $code_uri /tmp/embedder.tar.gz"
  remote+="; rm -rf $REMOTE_REPO.new; mkdir -p $REMOTE_REPO.new; tar -xzf /tmp/embedder.tar.gz -C $REMOTE_REPO.new"
  remote+="; echo $sha > $REMOTE_REPO.new/COMMIT; rm -rf $REMOTE_REPO; mv $REMOTE_REPO.new $REMOTE_REPO"
  remote+="; bash $REMOTE_REPO/tpu/worker_setup.sh"
  ssh_workers all "$remote"
}

# launch_run SHA [--detach]: tpu/worker_run.sh on every worker at once.
launch_run() {
  local sha=$1
  shift
  local args=(--run="$RUN_NAME" --model-dir="$MODEL_DIR" --expect-commit="$sha")
  [[ -n ${DATA:-} ]] && args+=(--data="$DATA")
  args+=("$@" -- "${TRAIN_ARGS[@]}")
  ssh_workers all "bash $REMOTE_REPO/tpu/worker_run.sh $(quote_args "${args[@]}")"
}
