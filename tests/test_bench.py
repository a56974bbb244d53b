"""Benchmarks: the peak figures behind the share-of-peak figure (its FLOP count is memplan.necessary_flops,
tested in tests/test_memplan.py), and a CPU rehearsal of the GPU check script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step as step_bench  # noqa: E402


def test_peak_by_device_kind():
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
                ("ours_7b_dots", "frozen"), ("ours_7b_dots", "mft"), ("ours_7b_dots_attention", "frozen"),
                ("ours_7b_dots_attention", "mft")}
    expected |= {("topk_7b", w) for w in (1, 3, 7, 15)}
    assert got == expected
    ratios = [r for r in records if "mft_over_floor_throughput" in r]
    assert len(ratios) == 4 and all(r["mft_over_floor_throughput"] > 0 for r in ratios)
    mft = next(r for r in records if r["piece"] == "ours_7b_micro4" and r.get("variant") == "mft")
    assert mft["micro"] == 4 and mft["tokens_per_s"] > 0 and mft["topk_width"] == 1
