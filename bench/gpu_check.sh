#!/usr/bin/env bash
# The prepared GPU check for issue 7: one call on a lent H100/H200, pieces in order of importance, each with
# its own time limit, skipped when the overall budget is spent. Every JSON line lands in OUT/results.jsonl.
#   ours_7b        our MFT step and its frozen floor: Llama-2-7B shapes, seq 4096, layers 4-7, keep 0.9
#   reference_7b   the reference recipe (PyTorch + transformers, ../shared/bench) on the same shapes
#   topk_7b        the mask search alone, per search width (bench/topk.py)
#   ours_7b_xla    fallback when ours_7b failed: XLA attention with remat dots
#   ours_8b_fit    Llama-3.1-8B shapes, 4 masked layers, seq 4096, memory capped at an H100's 80 GB
#   ours_7b_micro4 the same step with 4 micro-batches of gradient accumulation
#   ours_7b_dots   the same step with remat dots
#   ours_7b_dots_attention  and with remat dots_attention (the shipped configs' default)
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (jax[cuda], torch and transformers installed)
#        SMOKE=1 bash bench/gpu_check.sh DIR (tiny shapes on CPU: the test suite runs the script this way)
#        BUDGET_S=480 (default): no piece starts once its limit would pass this many seconds.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
: >"$out/results.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python}
budget=${BUDGET_S:-480}
if [ "${SMOKE:-0}" = 1 ]; then
  big=tiny; big8=tiny; seq=64; timing=(--iters 1 --rounds 1)
else
  big=llama2-7b; big8=llama3.1-8b; seq=4096; timing=(--iters 3 --rounds 3)
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
fi
ref=../shared/bench/torch_reference_mft.py
[ -f "$ref" ] || ref=shared/bench/torch_reference_mft.py

# piece NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs to OUT/NAME.log, collects JSON lines.
piece() {
  local name=$1 limit=$2 rc
  shift 2
  if ((SECONDS + limit > budget)); then
    echo "{\"piece\": \"$name\", \"skipped\": \"budget: ${SECONDS}s used of ${budget}s\"}" | tee -a "$out/results.jsonl"
    return 0
  fi
  echo "== $name (limit ${limit}s, ${SECONDS}s used)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  grep '^{' "$out/$name.log" | sed "s/^{/{\"piece\": \"$name\", /" | tee -a "$out/results.jsonl"
  [ "$rc" = 0 ] || { tail -n 15 "$out/$name.log"; echo "{\"piece\": \"$name\", \"rc\": $rc}" | tee -a "$out/results.jsonl"; }
  return "$rc"
}

$py -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$out/devices.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
step=(bench/step.py --seq "$seq" --batch 1 --layers 4 5 6 7 --keep 0.9 "${timing[@]}")

piece ours_7b 200 "$py" "${step[@]}" --preset "$big" --micro 1 --remat none
ours_rc=$?
piece reference_7b 150 "$py" "$ref" --preset "$big" --seq "$seq" --layers 4 5 6 7 --variants frozen,sort
piece topk_7b 90 "$py" bench/topk.py --preset "$big" --layers 4 5 6 7 --widths 1 3 7 15
if [ "$ours_rc" != 0 ]; then
  piece ours_7b_xla 200 "$py" "${step[@]}" --preset "$big" --micro 1 --remat dots --attention xla
fi
# An H200 has 141 GB: cap JAX's allocator at an H100's 80 GB (81,559 MiB) so that "fits" means fits there.
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
fraction=$(awk -v t="${total_mib:-0}" 'BEGIN { if (t > 81559) printf "%.3f", 81559 / t; else print "" }')
XLA_PYTHON_CLIENT_MEM_FRACTION=${fraction:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75}} \
  piece ours_8b_fit 200 "$py" "${step[@]}" --preset "$big8" --micro 1 --remat none --variants mft
piece ours_7b_micro4 200 "$py" "${step[@]}" --preset "$big" --micro 4 --remat none
piece ours_7b_dots 200 "$py" "${step[@]}" --preset "$big" --micro 1 --remat dots
piece ours_7b_dots_attention 200 "$py" "${step[@]}" --preset "$big" --micro 1 --remat dots_attention
echo "done in ${SECONDS}s; results: $out/results.jsonl"
