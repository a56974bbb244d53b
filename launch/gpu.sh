#!/usr/bin/env bash
# Runs one `mft-jax train` on this host and all its GPUs: installs mft_jax with CUDA jax into ./.venv, sets
# XLA's GPU flags, and (with --retries N) runs the same command again when it ends before the run has
# written RUN_DIR/DONE; each run resumes from the latest checkpoint. See launch/README.md.
set -euo pipefail

PROG=gpu.sh
# The helpers shared with launch/tpu_pod.sh: log, fail, usage_error, quote, join, run (prints each command;
# with --dry-run runs none), on_signal (sets STOPPING), need_value, script_dir, jax_requirement.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# XLA GPU flags for training: overlap the FSDP all-gathers / reduce-scatters with compute.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

usage() {
  cat <<'EOF'
Usage: bash launch/gpu.sh --config FILE [--set KEY=VALUE]... [options]

Installs mft_jax and CUDA jax into this checkout's .venv, then runs
  mft-jax train --config FILE [--set KEY=VALUE]...
on this host's GPUs (all visible ones; one process). The run resumes from its latest checkpoint when the
same command is run again.

  --config FILE       run config (e.g. configs/llama31-8b-math-mft.yaml)
  --set KEY=VALUE     config override, repeatable (e.g. --set train.micro_batch_size=4)
  --run-dir DIR       the run directory (same as --set run_dir=DIR)
  --retries N         when a run ends without writing RUN_DIR/DONE (crash, SIGTERM from a scheduler),
                      run it again, at most N times (default 0)
  --gpus LIST         CUDA_VISIBLE_DEVICES for the run, e.g. 0,1,2,3 (default: all)
  --cuda 12|13        CUDA major version of the jax wheels: jax[cuda12] or jax[cuda13] (default 12)
  --xla-flags FLAGS   more XLA_FLAGS, after the script's GPU flags and any XLA_FLAGS already set
  --retry-delay S     seconds between a run's end and its retry (default 10)
  --no-install        skip the install (the .venv is already there)
  --install-only      install and exit (e.g. once on a cluster's login node, for launch/slurm.sbatch)
  --venv DIR          the environment with mft_jax installed, holding bin/python and bin/mft-jax
                      (default: this checkout's .venv; a different one is not installed into)
  --dry-run           print every command (prefixed with '+ ') and run nothing
  -h, --help          this text

Several hosts without SLURM: run this script on each host with MFT_JAX_COORDINATOR=HOST0:PORT,
MFT_JAX_NUM_PROCESSES=N and MFT_JAX_PROCESS_ID=0..N-1 in the environment.
EOF
}

# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------

CONFIG=""
RUN_DIR=""
RETRIES=0
RETRY_DELAY=10
GPUS=""
CUDA=12
EXTRA_XLA_FLAGS=""
INSTALL=1
INSTALL_ONLY=0
VENV=""
SETS=()

need_flags() { [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"; }  # a value that starts with --

parse_args() {
  while (($#)); do
    if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
    case $1 in
      --config) need_value "$@"; CONFIG=$2; shift 2 ;;
      --set) need_value "$@"; SETS+=("$2"); shift 2 ;;
      --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
      --retries) need_value "$@"; RETRIES=$2; shift 2 ;;
      --retry-delay) need_value "$@"; RETRY_DELAY=$2; shift 2 ;;
      --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
      --cuda) need_value "$@"; CUDA=$2; shift 2 ;;
      --xla-flags) need_flags "$@"; EXTRA_XLA_FLAGS=$2; shift 2 ;;
      --no-install) INSTALL=0; shift ;;
      --install-only) INSTALL_ONLY=1; shift ;;
      --venv) need_value "$@"; VENV=${2%/}; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage_error "unknown option '$1'" ;;
    esac
  done
}

check_args() {
  [[ $RETRIES =~ ^[0-9]+$ ]] || usage_error "--retries must be a whole number, got '$RETRIES'"
  [[ $RETRY_DELAY =~ ^[0-9]+$ ]] || usage_error "--retry-delay must be a whole number of seconds, got '$RETRY_DELAY'"
  [[ $CUDA == 12 || $CUDA == 13 ]] || usage_error "--cuda must be 12 or 13, got '$CUDA'"
  [[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || usage_error "--gpus must be a list like 0,1,2,3, got '$GPUS'"
  if [[ -n $VENV ]]; then INSTALL=0; else VENV="$ROOT/.venv"; fi
  PY="$VENV/bin/python"
  ((INSTALL_ONLY)) && return 0
  [[ -n $CONFIG ]] || usage_error "--config FILE is required"
  [[ -f $CONFIG ]] || usage_error "--config: no such file '$CONFIG'"
  local s
  for s in ${SETS[@]+"${SETS[@]}"}; do
    [[ $s == *=* ]] || usage_error "--set '$s': expected KEY=VALUE"
  done
  if [[ -n $RUN_DIR ]]; then SETS+=("run_dir=$RUN_DIR"); fi
}

# ---------------------------------------------------------------------------------------------------------

install() {
  run bash "$ROOT/launch/install.sh"
  run "$PY" -m pip install -q "jax[cuda$CUDA]$(jax_requirement)"
}

# Sets RUN_DIR from the config and the overrides, as `mft-jax train` will see them.
resolve_run_dir() {
  local code='import sys; sys.excepthook = lambda t, e, tb: print(f"error: {e}", file=sys.stderr); from mft_jax.config import load; print(load(sys.argv[1], sys.argv[2:], verbose=False).run_dir)'
  RUN_DIR=$(run "$PY" -c "$code" "$CONFIG" ${SETS[@]+"${SETS[@]}"}) || fail "cannot read the config $CONFIG"
}

run_done() {
  ((DRY_RUN)) || [[ -f $RUN_DIR/DONE ]]
}

train() {
  local argv=(env "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }$GPU_XLA_FLAGS${EXTRA_XLA_FLAGS:+ $EXTRA_XLA_FLAGS}")
  if [[ -n $GPUS ]]; then argv+=("CUDA_VISIBLE_DEVICES=$GPUS"); fi
  argv+=("$VENV/bin/mft-jax" train --config "$CONFIG")
  local s
  for s in ${SETS[@]+"${SETS[@]}"}; do argv+=(--set "$s"); done
  run "${argv[@]}"
}

main() {
  ROOT=$(script_dir)
  parse_args "$@"
  check_args
  trap 'on_signal "interrupted: stopping the run (it saves a checkpoint)"' INT TERM
  if ((INSTALL)); then install; fi
  if ((INSTALL_ONLY)); then return 0; fi
  [[ -x $VENV/bin/mft-jax ]] || ((DRY_RUN)) || fail "$VENV/bin/mft-jax not found: run without --no-install first, or give --venv"
  resolve_run_dir
  local attempt rc
  for ((attempt = 1; ; attempt++)); do
    rc=0
    train || rc=$?
    if run_done; then
      ((DRY_RUN)) || log "run complete: $RUN_DIR/DONE"
      return 0
    fi
    if ((STOPPING)); then
      log "stopped at a checkpoint; run the same command again to resume"
      exit 130
    fi
    if ((attempt > RETRIES)); then
      fail "the run ended (exit $rc) before the end, after $attempt attempt(s); run the same command again to resume" "$((rc ? rc : 1))"
    fi
    log "the run ended (exit $rc) before the end: resuming it (retry $attempt of $RETRIES)"
    run sleep "$RETRY_DELAY"
    if ((STOPPING)); then exit 130; fi
  done
}

main "$@"
