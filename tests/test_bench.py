"""Benchmarks: the FLOP count behind the share-of-peak figure, and a CPU rehearsal of the GPU check script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mft_jax import config, model, trees

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step as step_bench  # noqa: E402


def test_necessary_flops_by_hand():
    cfg = config.LlamaConfig(**step_bench.PRESETS["llama2-7b"])
    shapes = trees.flatten(model.param_shapes(cfg))
    # matmul weights per layer and in the head, from the real param shapes (norms and embedding excluded)
    layer = sum(int(np.prod(x.shape)) for p, x in shapes.items() if p[0] == "layers_0" and p[-1] == "kernel")
    head = int(np.prod(shapes[("lm_head", "kernel")].shape))
    assert layer == 4 * 4096 * 4096 + 3 * 4096 * 11008
    seq, batch, layers = 4096, 2, [4, 5, 6, 7]
    tokens = seq * batch
    attn = 4 * batch * 32 * 128 * seq * (seq + 1) / 2  # QK^T and PV on the causal half, per layer
    forward = 32 * (2 * tokens * layer + attn) + 2 * tokens * head
    backward = 28 * (2 * tokens * layer + 2 * attn) + 2 * tokens * head + 4 * 2 * tokens * layer
    # exact: every term and partial sum is an integer below 2^53, so float64 adds them exactly in any order
    assert step_bench.necessary_flops(cfg, layers, batch, seq) == forward + backward
    # ~6.6e9 matmul weights: forward 2 FLOPs per weight and token; backward 2 for the 28 layers above layer 3
    # and the head (~1.75 per weight overall) plus 2 for the 4 masked layers' weight gradients (~0.25): ~4
    per_token = step_bench.necessary_flops(cfg, layers, 1, 1)
    assert 3.9 * 6.6e9 < per_token < 4.1 * 6.6e9
    assert step_bench.peak_tflops("NVIDIA H100 PCIe") == 756.0 and step_bench.peak_tflops("NVIDIA H200") == 989.4
    assert step_bench.peak_tflops("cpu") is None


@pytest.mark.slow
def test_gpu_check_script_rehearsal_on_cpu(tmp_path):
    """Runs every piece of bench/gpu_check.sh on tiny shapes (SMOKE=1), as a lent GPU would, reference included."""
    pytest.importorskip("torch")
    env = {**os.environ, "SMOKE": "1", "BUDGET_S": "3000", "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": ""}  # one device: the bench's batch of 1 sequence does not split 8 ways
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert not [r for r in records if "rc" in r or "skipped" in r], records
    got = {(r["piece"], r.get("variant", r.get("width"))) for r in records if "tokens_per_s" in r or "ms" in r}
    expected = {("ours_7b", "frozen"), ("ours_7b", "mft"), ("reference_7b", "frozen"), ("reference_7b", "sort"),
                ("ours_8b_fit", "mft"), ("ours_7b_micro4", "frozen"), ("ours_7b_micro4", "mft"),
                ("ours_7b_dots", "frozen"), ("ours_7b_dots", "mft")}
    expected |= {("topk_7b", w) for w in (1, 3, 7, 15)}
    assert got == expected
    ratios = [r for r in records if "mft_over_floor_throughput" in r]
    assert len(ratios) == 3 and all(r["mft_over_floor_throughput"] > 0 for r in ratios)
    mft = next(r for r in records if r["piece"] == "ours_7b_micro4" and r.get("variant") == "mft")
    assert mft["micro"] == 4 and mft["tokens_per_s"] > 0 and mft["topk_width"] == 1
