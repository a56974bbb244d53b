#!/usr/bin/env bash
# Runs one `mft-jax train` on a Cloud TPU VM slice, from your workstation: creates (or queues) the slice,
# puts this checkout on every worker and installs it, starts the same command on all workers, streams the
# output, re-creates the slice and resumes after a preemption until the run has written RUN_DIR/DONE, and
# deletes the slice at the end. See launch/README.md.
set -euo pipefail

PROG=tpu_pod.sh
# The helpers shared with launch/gpu.sh: log, fail, usage_error, quote, join, run (prints each command; with
# --dry-run runs none), on_signal (sets STOPPING), need_value, script_dir, jax_requirement. They run on this
# machine only: the commands sent to the workers need nothing from common.sh.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PYTHON_VERSION=3.11   # what the workers' venv is built with (the project needs >= 3.11; TPU images ship 3.10)
MOUNT_ROOT=/gcs       # gs://BUCKET is mounted at /gcs/BUCKET on every worker

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_pod.sh --config FILE --zone ZONE --run-dir DIR [options]

Creates a Cloud TPU VM slice, installs mft_jax on every worker and runs
  mft-jax train --config FILE [--set KEY=VALUE]... --set run_dir=DIR
on all of them; after a preemption it re-creates the slice and runs the same command again, which resumes
from the run's latest checkpoint. Stops when DIR/DONE exists, then deletes the slice (unless --keep).

Required:
  --config FILE            run config, a file inside this checkout (with --git: a path inside that repo)
  --zone ZONE              e.g. us-east5-a
  --run-dir DIR            where the run lives; it must outlive the slice and be shared by all workers:
                           gs://BUCKET/PATH (see --storage) or a path on shared storage that every worker
                           already mounts

Run:
  --set KEY=VALUE          config override, repeatable (e.g. --set model.path=/gcs/BUCKET/llama31-8b-fft)
  --env KEY=VALUE          environment variable for the train command on the workers, repeatable
                           (shown in the printed commands: keep secrets in files on the bucket)
  --storage direct|gcsfuse how the workers reach a gs:// run dir (default direct): direct passes the gs:// URL
                           to mft-jax, whose checkpoints orbax writes straight to the bucket (model.path and
                           data.cache_dir may be gs:// too); gcsfuse mounts the bucket at /gcs/BUCKET and passes
                           /gcs/BUCKET/PATH (directory renames on a mount are copies: slower saves)
  --bucket BUCKET          also mount gs://BUCKET at /gcs/BUCKET on every worker with gcsfuse, repeatable
  --max-restarts N         re-create / re-run at most N times after preemptions (default 20)

Slice:
  --name NAME              TPU (and queued resource) name (default mft-jax-$USER)
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE  e.g. v5p-64, v5litepod-16, v6e-32, v4-32 (default v5p-64)
  --version VERSION        TPU runtime version (default by type: v5p v2-alpha-tpuv5, v5litepod
                           v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v4 tpu-ubuntu2204-base)
  --spot | --preemptible | --reserved
                           provisioning model (default: on-demand)
  --queued                 request the slice through a queued resource and wait until it is granted
  --poll SECONDS           how often to check the slice while waiting for it (default 60)
  --keep                   do not delete the slice at the end

Code:
  --git URL                git-clone URL on the workers instead of copying this checkout
  --ref REF                with --git: branch, tag or commit to check out (default: the remote's HEAD)
  --remote-dir DIR         checkout directory on the workers, relative to the home directory (default mft-jax)

  --dry-run                print every command (prefixed with '+ ') and run nothing
  -h, --help               this text

Ctrl-C stops the run on every worker (it saves a checkpoint first), then deletes the slice unless --keep.
EOF
}

# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------

CONFIG=""
ZONE=""
RUN_DIR=""
STORAGE=direct
PROJECT=""
NAME="mft-jax-${USER:-user}"
ACCELERATOR_TYPE=v5p-64
VERSION=""
PROVISIONING=""
QUEUED=0
POLL=60
KEEP=0
GIT_URL=""
GIT_REF=HEAD
REMOTE_DIR=mft-jax
MAX_RESTARTS=20
SETS=()
ENVS=()
BUCKETS=()

need_int() { [[ $2 =~ ^[0-9]+$ ]] || usage_error "$1 must be a whole number, got '$2'"; }

set_provisioning() {
  [[ -z $PROVISIONING || $PROVISIONING == "$1" ]] || usage_error "choose one of --spot, --preemptible, --reserved"
  PROVISIONING=$1
}

parse_args() {
  while (($#)); do
    if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
    case $1 in
      --config) need_value "$@"; CONFIG=$2; shift 2 ;;
      --set) need_value "$@"; SETS+=("$2"); shift 2 ;;
      --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
      --bucket) need_value "$@"; BUCKETS+=("${2#gs://}"); shift 2 ;;
      --run-dir) need_value "$@"; RUN_DIR=${2%/}; shift 2 ;;
      --storage) need_value "$@"; STORAGE=$2; shift 2 ;;
      --zone) need_value "$@"; ZONE=$2; shift 2 ;;
      --project) need_value "$@"; PROJECT=$2; shift 2 ;;
      --name) need_value "$@"; NAME=$2; shift 2 ;;
      --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2 ;;
      --version) need_value "$@"; VERSION=$2; shift 2 ;;
      --spot) set_provisioning spot; shift ;;
      --preemptible) set_provisioning preemptible; shift ;;
      --reserved) set_provisioning reserved; shift ;;
      --queued) QUEUED=1; shift ;;
      --poll) need_value "$@"; need_int "$@"; POLL=$2; shift 2 ;;
      --keep) KEEP=1; shift ;;
      --git) need_value "$@"; GIT_URL=$2; shift 2 ;;
      --ref) need_value "$@"; GIT_REF=$2; shift 2 ;;
      --remote-dir) need_value "$@"; REMOTE_DIR=${2%/}; shift 2 ;;
      --max-restarts) need_value "$@"; need_int "$@"; MAX_RESTARTS=$2; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage_error "unknown option '$1'" ;;
    esac
  done
}

default_version() {
  case $1 in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# The config's path relative to ROOT (it travels with the code), or an error.
config_in_checkout() {
  local file=$1 dir base abs
  [[ -f $file ]] || usage_error "--config: no such file '$file'"
  dir=${file%/*}
  [[ $dir != "$file" ]] || dir=.
  base=${file##*/}
  abs="$(cd "$dir" && pwd -P)/$base"
  [[ $abs == "$ROOT"/* ]] || usage_error "--config '$file' is outside this checkout ($ROOT); it is copied to the workers with the code, so put it in the checkout (e.g. configs/)"
  REPLY=${abs#"$ROOT"/}
}

check_args() {
  [[ -n $CONFIG ]] || usage_error "--config FILE is required"
  [[ -n $ZONE ]] || usage_error "--zone ZONE is required"
  [[ -n $RUN_DIR ]] || usage_error "--run-dir DIR is required (gs://BUCKET/PATH, or shared storage on every worker)"
  local s e
  for s in ${SETS[@]+"${SETS[@]}"}; do
    [[ $s == *=* ]] || usage_error "--set '$s': expected KEY=VALUE"
    [[ $s != run_dir=* ]] || usage_error "--set run_dir=...: give the run directory as --run-dir instead"
  done
  for e in ${ENVS[@]+"${ENVS[@]}"}; do
    [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$e': expected NAME=VALUE"
  done
  if [[ -z $VERSION ]]; then
    VERSION=$(default_version "$ACCELERATOR_TYPE") ||
      usage_error "no default runtime version for --accelerator-type $ACCELERATOR_TYPE; give --version"
  fi
  if ((QUEUED)) && [[ $PROVISIONING == preemptible ]]; then
    usage_error "--preemptible is not available with --queued; use --spot"
  fi
  if [[ -n $GIT_URL ]]; then
    REMOTE_CONFIG=$CONFIG
  else
    config_in_checkout "$CONFIG"
    REMOTE_CONFIG=$REPLY
  fi
  [[ $STORAGE == direct || $STORAGE == gcsfuse ]] || usage_error "--storage '$STORAGE': choose direct or gcsfuse"
  if [[ $RUN_DIR == gs://* && $STORAGE == direct ]]; then
    GCS_RUN_URL=$RUN_DIR
    WORKER_RUN_DIR=$RUN_DIR
  elif [[ $RUN_DIR == gs://* ]]; then
    local path=${RUN_DIR#gs://}
    GCS_RUN_URL=$RUN_DIR
    BUCKETS+=("${path%%/*}")
    WORKER_RUN_DIR="$MOUNT_ROOT/$path"
  else
    [[ $RUN_DIR == /* ]] || usage_error "--run-dir '$RUN_DIR' must be gs://BUCKET/PATH or an absolute path on the workers"
    GCS_RUN_URL=""
    WORKER_RUN_DIR=$RUN_DIR
  fi
}

# ---------------------------------------------------------------------------------------------------------
# The slice
# ---------------------------------------------------------------------------------------------------------

SLICE_USED=0  # set once this script may have created the slice: from then on, the exit deletes it

scope() {  # sets SCOPE: the flags that locate the slice
  SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then SCOPE+=(--project="$PROJECT"); fi
}

# Prints READY, MISSING, PENDING (being created or waiting for capacity) or the state that ended it
# (PREEMPTED, SUSPENDED, TERMINATED, FAILED, ...).
slice_state() {
  local raw
  if ((QUEUED)); then
    raw=$(run gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" \
      --format='value(state.state)' 2>/dev/null) || raw=""
  else
    raw=$(run gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}" --format='value(state)' 2>/dev/null) ||
      raw=""
  fi
  case $raw in
    "") echo MISSING ;;
    READY | ACTIVE) echo READY ;;
    CREATING | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | STARTING | RESTARTING | REPAIRING) echo PENDING ;;
    *) echo "$raw" ;;
  esac
}

create_slice() {
  log "creating $ACCELERATOR_TYPE slice $NAME in $ZONE${PROVISIONING:+ ($PROVISIONING)}"
  SLICE_USED=1
  local model=()
  if [[ -n $PROVISIONING ]]; then model=(--"$PROVISIONING"); fi
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" "${SCOPE[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION" ${model[@]+"${model[@]}"}
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" ${model[@]+"${model[@]}"}
  fi
}

delete_slice() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
  fi
}

# Makes sure the slice is up; sets FRESH=1 when it had to be (re-)created.
ensure_slice() {
  local state
  FRESH=0
  state=$(slice_state)
  case $state in
    READY) log "slice $NAME is up" ;;
    MISSING) create_slice; FRESH=1 ;;
    PENDING) SLICE_USED=1; FRESH=1 ;;
    *)
      log "slice $NAME is $state: deleting and re-creating it"
      SLICE_USED=1
      delete_slice
      create_slice
      FRESH=1
      ;;
  esac
  ((DRY_RUN)) && return 0
  while state=$(slice_state); [[ $state != READY ]]; do
    ((STOPPING)) && exit 130
    case $state in
      PENDING) log "waiting for slice $NAME ($((POLL))s)"; run sleep "$POLL" ;;
      *) fail "slice $NAME is $state while it was being created" ;;
    esac
  done
}

# ---------------------------------------------------------------------------------------------------------
# The workers
# ---------------------------------------------------------------------------------------------------------

on_workers() {  # on_workers WORKERS COMMAND_LINE
  run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --quiet --worker="$1" --command="$2"
}

TARBALL=""

put_code() {
  local dir
  quote "$REMOTE_DIR"
  dir=$REPLY
  if [[ -n $GIT_URL ]]; then
    local url ref
    quote "$GIT_URL"; url=$REPLY
    quote "$GIT_REF"; ref=$REPLY
    on_workers all "{ [ -d $dir/.git ] || git clone -q $url $dir; } && git -C $dir fetch -q origin $ref && git -C $dir checkout -q --detach FETCH_HEAD"
  else
    TARBALL="${TMPDIR:-/tmp}/mft-jax-$NAME-$$.tgz"
    run env COPYFILE_DISABLE=1 tar -czf "$TARBALL" --no-xattrs --exclude=./.git --exclude=./.venv --exclude=./runs \
      --exclude=./checkpoints --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache -C "$ROOT" .
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:mft-jax-code.tgz" "${SCOPE[@]}" --quiet --worker=all
    on_workers all "mkdir -p $dir && tar -xzf mft-jax-code.tgz -C $dir && rm -f mft-jax-code.tgz"
  fi
}

mount_buckets() {
  ((${#BUCKETS[@]})) || return 0
  local install_gcsfuse cmd="" bucket b mnt
  # gcsfuse from Google's apt repository, unless the image has it; waits for a boot-time apt run to finish.
  # shellcheck disable=SC2016  # expanded on the workers
  install_gcsfuse='command -v gcsfuse >/dev/null || { echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get -o DPkg::Lock::Timeout=600 update -q && sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse; }'
  cmd=$install_gcsfuse
  for bucket in "${BUCKETS[@]}"; do
    quote "$bucket"; b=$REPLY
    quote "$MOUNT_ROOT/$bucket"; mnt=$REPLY
    # orbax renames each checkpoint's temporary directory when it is complete: allow directory renames.
    cmd+=" && { mountpoint -q $mnt || { sudo mkdir -p $mnt && sudo chown \"\$(id -un)\" $mnt && gcsfuse --implicit-dirs --rename-dir-limit=200000 $b $mnt; }; }"
  done
  on_workers all "$cmd"
}

install_workers() {
  local dir spec
  quote "$REMOTE_DIR"; dir=$REPLY
  quote "jax[tpu]$(jax_requirement)"; spec=$REPLY
  # The TPU images' python3 is too old for the project: uv builds the venv with a newer one, then
  # install.sh (which keeps an existing .venv) installs the project, then jax's TPU runtime.
  on_workers all "cd $dir && { [ -x .venv/bin/python ] || { { python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv; } && \$HOME/.local/bin/uv venv -q --seed --python $PYTHON_VERSION .venv; }; } && bash launch/install.sh && .venv/bin/python -m pip install -q $spec"
}

setup_workers() {
  put_code
  mount_buckets
  install_workers
}

# Stops a run of this launcher still going on a worker (SIGTERM: it saves a checkpoint), and waits for it.
# shellcheck disable=SC2016  # expanded on the workers
STOP_PREVIOUS='if [ -s logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null; then echo "stopping the run still going on $(hostname)"; kill -TERM "$(cat logs/train.pid)"; while kill -0 "$(cat logs/train.pid)" 2>/dev/null; do sleep 1; done; fi'

# Starts the train command on every worker, detached from the ssh session (a dropped connection does not
# stop it), streams its output until it exits, and returns its exit status.
train_on_workers() {
  local dir train e s
  quote "$REMOTE_DIR"; dir=$REPLY
  local argv=(env MFT_JAX_AUTO_DISTRIBUTED=1 PYTHONUNBUFFERED=1)
  for e in ${ENVS[@]+"${ENVS[@]}"}; do argv+=("$e"); done
  argv+=(.venv/bin/mft-jax train --config "$REMOTE_CONFIG")
  for s in ${SETS[@]+"${SETS[@]}"}; do argv+=(--set "$s"); done
  argv+=(--set "run_dir=$WORKER_RUN_DIR")
  join "${argv[@]}"
  train=$REPLY
  # shellcheck disable=SC2016  # $! and $pid are the workers'
  on_workers all "cd $dir || exit 1; mkdir -p logs; $STOP_PREVIOUS; nohup $train >logs/train.log 2>&1 </dev/null & pid=\$!; echo \"\$pid\" >logs/train.pid; tail -n +1 -F --pid=\"\$pid\" logs/train.log 2>/dev/null; wait \"\$pid\""
}

stop_workers() {
  local dir
  quote "$REMOTE_DIR"; dir=$REPLY
  on_workers all "cd $dir 2>/dev/null || exit 0; $STOP_PREVIOUS" || true
}

run_done() {
  if [[ -n $GCS_RUN_URL ]]; then
    run gcloud storage objects describe "$GCS_RUN_URL/DONE" --format='value(name)' >/dev/null 2>&1
  else
    quote "$WORKER_RUN_DIR/DONE"
    on_workers 0 "test -f $REPLY" >/dev/null 2>&1
  fi
}

# ---------------------------------------------------------------------------------------------------------

on_exit() {
  local rc=$?
  trap - INT TERM
  if [[ -n $TARBALL ]]; then run rm -f "$TARBALL" || true; fi
  if ((SLICE_USED)) && { ((DRY_RUN)) || [[ $(slice_state) != MISSING ]]; }; then
    if ((KEEP)); then
      if ((QUEUED)); then
        log "keeping slice $NAME (--keep); delete it with: gcloud compute tpus queued-resources delete $NAME --force --zone=$ZONE"
      else
        log "keeping slice $NAME (--keep); delete it with: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE"
      fi
    else
      log "deleting slice $NAME"
      delete_slice || log "could not delete slice $NAME: delete it yourself"
    fi
  fi
  exit "$rc"
}

main() {
  ROOT=$(script_dir)
  parse_args "$@"
  check_args
  scope
  trap on_exit EXIT
  trap 'on_signal "interrupted: stopping"' INT TERM
  local attempt=0 rc state
  while :; do
    attempt=$((attempt + 1))
    ensure_slice
    if ((FRESH || attempt == 1)); then setup_workers; fi
    ((STOPPING)) && exit 130
    log "starting the run on every worker (attempt $attempt)"
    rc=0
    train_on_workers || rc=$?
    if ((STOPPING)); then
      log "stopping the run on every worker (it saves a checkpoint)"
      stop_workers
      exit 130
    fi
    if run_done; then
      ((DRY_RUN)) || log "run complete: $RUN_DIR/DONE"
      return 0
    fi
    state=$(slice_state)
    if [[ $state == READY && $rc != 0 ]]; then
      fail "the run failed (exit $rc) on a healthy slice; fix the cause and run the same command again: it resumes from the latest checkpoint" "$rc"
    fi
    if ((attempt > MAX_RESTARTS)); then
      fail "the run is not done after $MAX_RESTARTS restarts (--max-restarts); run the same command again to go on"
    fi
    log "the run stopped before the end (exit $rc, slice $state): resuming it"
  done
}

main "$@"
