# shellcheck shell=bash
# What launch/gpu.sh and launch/tpu_pod.sh share: messages, printing and running commands (--dry-run),
# stopping on a signal, option values, the checkout's root and jax's version range. Sourced by them, not run:
# sourcing it defines these functions, sets DRY_RUN=0, CHILD="" and STOPPING=0, and opens fd 3 on stdout.
# The sourcing script sets PROG (its name, for messages) before it calls any of them, and ROOT (from
# script_dir) before jax_requirement. Used on the launching machine only: the command lines tpu_pod.sh sends
# to its workers are built with quote and join here, but need nothing from this file there.
# launch/slurm.sbatch keeps its own copy of these functions: SLURM runs a copy of the batch script from its
# spool directory, where this file is not.

# ---------------------------------------------------------------------------------------------------------
# Printing and running commands
# ---------------------------------------------------------------------------------------------------------

exec 3>&1  # run() prints to the script's stdout, also from inside $(...)
DRY_RUN=0
CHILD=""

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
fail() { log "error: $1"; exit "${2:-1}"; }
usage_error() { printf '%s: error: %s\nRun "bash launch/%s --help" for the options.\n' "$PROG" "$1" "$PROG" >&2; exit 2; }

# quote WORD: sets REPLY to WORD as one shell word, in single quotes only when it needs them
# (--flag='value' for an option whose value needs them).
quote() {
  local q="'" word=$1 flag=""
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then REPLY=$word; return; fi
  if [[ $word =~ ^--[A-Za-z0-9-]+= ]]; then flag=${BASH_REMATCH[0]}; word=${word#"$flag"}; fi
  REPLY="$flag$q${word//$q/$q\\$q$q}$q"
}

# join WORD...: sets REPLY to the words as one shell command line.
join() {
  local out="" w
  for w in "$@"; do quote "$w"; out+="${out:+ }$REPLY"; done
  REPLY=$out
}

# run CMD...: prints the command; unless --dry-run, runs it (in the background, so that a signal to this
# script is handled at once: on_signal passes it on to the command) and returns its exit status.
run() {
  local rc=0
  join "$@"
  printf '+ %s\n' "$REPLY" >&3
  if ((DRY_RUN)); then return 0; fi
  "$@" <&0 &
  CHILD=$!
  wait "$CHILD" || rc=$?
  while kill -0 "$CHILD" 2>/dev/null; do  # a trapped signal interrupted wait: wait for the command itself
    rc=0
    wait "$CHILD" || rc=$?
  done
  CHILD=""
  return "$rc"
}

# on_signal MESSAGE (the script traps INT and TERM with it): logs MESSAGE, sets STOPPING=1 and passes SIGTERM
# on to the command run() is running.
# shellcheck disable=SC2034  # STOPPING: read by the sourcing script
STOPPING=0
# shellcheck disable=SC2034  # the same
on_signal() {
  STOPPING=1
  log "$1"
  if [[ -n $CHILD ]]; then kill -TERM "$CHILD" 2>/dev/null || true; fi
}

# ---------------------------------------------------------------------------------------------------------
# Arguments and the checkout
# ---------------------------------------------------------------------------------------------------------

need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || usage_error "$1 needs a value"; }

# The checkout's root: the parent of launch/, this file's directory (and the sourcing script's).
script_dir() {
  local dir=${BASH_SOURCE[0]%/*}
  [[ $dir != "${BASH_SOURCE[0]}" ]] || dir=.
  (cd "$dir/.." && pwd -P)
}

# The version range of jax in requirements.txt (e.g. ">=0.10,<0.12"), so that jax[cuda12] or jax[tpu]
# keeps the same jax.
jax_requirement() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    if [[ $line =~ ^jax([<>=!~].*)$ ]]; then
      printf '%s' "${BASH_REMATCH[1]}"
      return 0
    fi
  done <"$ROOT/requirements.txt"
}
