#!/usr/bin/env bash
# One prepared GPU check for issue 7 (run it on a lent H100/H200 in one call; prints JSON lines):
#   1. our MFT step vs its frozen floor, Llama-2-7B shapes, seq 4096, layers 4-7, keep 0.9 (random weights);
#   2. the reference recipe (PyTorch + transformers) on the same machine, same shapes;
#   3. Llama-3.1-8B shapes, 4 masked layers, seq 4096: does the step fit (peak memory)?
# Usage: bash bench/gpu_check.sh [OUT_DIR]     (needs jax[cuda], torch and transformers installed)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for remat in dots full; do
  python bench/step.py --preset llama2-7b --seq 4096 --batch 1 --micro 4 --layers 4 5 6 7 --keep 0.9 \
    --remat "$remat" --iters 3 --rounds 3 2>&1 | tee -a "$out/ours_llama2_7b.jsonl"
done
ref=../shared/bench/torch_reference_mft.py
[ -f "$ref" ] || ref=shared/bench/torch_reference_mft.py
python "$ref" --preset llama2-7b --seq 4096 --layers 4 5 6 7 2>&1 | tee "$out/reference_llama2_7b.jsonl"
python bench/step.py --preset llama3.1-8b --seq 4096 --batch 1 --micro 2 --layers 4 5 6 7 --remat full \
  --iters 2 --rounds 2 2>&1 | tee "$out/ours_llama31_8b.jsonl"
