"""Training steps compiled for real accelerators with no device present: the TPU compiler (libtpu, a v5p-8
topology) and the CUDA compiler (the PJRT plugin, H100 targets), small shapes.

Asserted from the optimized HLO (tests/compile_worker.py compiles, mft_jax.hlo reads):
- the attention kernels are there: splash lowered by Mosaic (tpu_custom_call) on TPU, cuDNN flash attention on
  GPU, resolved from the mesh's devices with `attention: auto` on this CPU host; under `dots_attention` remat the
  forward kernel runs once per layer and micro-batch, under `dots` again in every layer the backward pass reaches;
- on fsdp meshes no collective moves a whole score, mask or Adam-moment matrix (fp32 or pred of a trained
  matrix's full shape); the weights are all-gathered in bf16 and each trained matrix's gradient is
  reduce-scattered once per micro-batch (in fp32 with train.grad_reduce: fp32);
- `mft-jax plan` (its own worker process) reports the same memory and flops as a direct compile of the step.
The compilers come from `launch/install.sh --plan` (run by --test); without them these tests skip, saying so.
MFT_JAX_BREAK=interpret or =unshard (tests/compile_worker.py) makes them fail on purpose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compile_worker import TINY

from mft_jax import targets
from mft_jax.studies import memplan

ROOT = Path(__file__).resolve().parents[1]
LAYERS, MASKED_FROM, MICRO_BATCHES, MASKED_MATRICES = 4, 1, 2, 14  # compile_worker.TINY; mask.masked_layers [1, 2]

CASES = {
    "tpu_mft": {"hardware": "v5p-8", "mesh": [1, 4, 1], "mode": "mft", "rows": 4},
    "tpu_mft_dots": {"hardware": "v5p-8", "mesh": [1, 4, 1], "mode": "mft", "rows": 4, "remat": "dots"},
    "tpu_mft_fp32": {"hardware": "v5p-8", "mesh": [1, 4, 1], "mode": "mft", "rows": 4, "grad_reduce": "fp32"},
    "tpu_fft": {"hardware": "v5p-8", "mesh": [1, 4, 1], "mode": "fft", "rows": 4},
    "tpu_lora": {"hardware": "v5p-8", "mesh": [1, 4, 1], "mode": "lora", "rows": 4},
    "gpu_mft": {"hardware": "1xH100-80GB", "mesh": [1, 1, 1], "mode": "mft", "rows": 2},
    "gpu_mft_dots": {"hardware": "1xH100-80GB", "mesh": [1, 1, 1], "mode": "mft", "rows": 2, "remat": "dots"},
    "gpu8_mft": {"hardware": "8xH100-80GB", "mesh": [1, 8, 1], "mode": "mft", "rows": 8},
    "gpu8_fft": {"hardware": "8xH100-80GB", "mesh": [1, 8, 1], "mode": "fft", "rows": 8},
    "gpu8_lora": {"hardware": "8xH100-80GB", "mesh": [1, 8, 1], "mode": "lora", "rows": 8},
    # Other families (mft_jax.config.families): Mistral's sliding window (64 of 256 positions) in the splash and
    # cuDNN kernels; Qwen3's per-head q/k norms with head_dim != hidden / heads; Qwen2's q/k/v biases.
    "tpu_mistral_window": {"hardware": "v5p-8", "mesh": [1, 4, 1], "mode": "mft", "rows": 4,
                           "model": {"model_type": "mistral", "sliding_window": 64}},
    "gpu_mistral_window": {"hardware": "1xH100-80GB", "mesh": [1, 1, 1], "mode": "mft", "rows": 2,
                           "model": {"model_type": "mistral", "sliding_window": 64}},
    "tpu_qwen3": {"hardware": "v5p-8", "mesh": [1, 4, 1], "mode": "mft", "rows": 4,
                  "model": {"model_type": "qwen3", "qk_norm": True, "head_dim": 128}},
    "gpu_qwen2": {"hardware": "1xH100-80GB", "mesh": [1, 1, 1], "mode": "mft", "rows": 2,
                  "model": {"model_type": "qwen2", "qkv_bias": True, "tie_word_embeddings": True}},
}
MISSING = {p: targets.missing_compiler_message(p) for p in ("tpu", "gpu") if not targets.compiler_available(p)}


def _platform(name: str) -> str:
    return "tpu" if CASES[name]["hardware"].startswith("v") else "gpu"


@pytest.fixture(scope="module")
def compiled():
    """Every case whose compiler is installed, compiled in one worker process."""
    cases = [dict(c, name=n) for n, c in CASES.items() if _platform(n) not in MISSING]
    if not cases:
        return {}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_worker.py"), json.dumps(cases)],
                          env=targets.compiler_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    return {c["name"]: c for c in out}


def _case(compiled, name: str) -> dict:
    platform = _platform(name)
    if platform in MISSING:
        pytest.skip(MISSING[platform])
    return compiled[name]


def _per_micro(case, kind: str) -> float:
    return case["attention_kernels"].get(kind, 0) / MICRO_BATCHES


@pytest.mark.parametrize("name", ["tpu_mft", "tpu_fft", "tpu_lora", "gpu_mft", "gpu8_mft", "gpu8_fft", "gpu8_lora",
                                  "tpu_mistral_window", "gpu_mistral_window", "tpu_qwen3", "gpu_qwen2"])
def test_the_targets_attention_kernel_is_compiled(compiled, name):
    case = _case(compiled, name)
    kernel = "tpu_custom_call" if _platform(name) == "tpu" else "__cudnn$fmhaSoftmax"
    assert case["custom_calls"].get(kernel, 0) > 0, f"{name}: no {kernel} in the program: {case['custom_calls']}"
    assert case["loops"][0] == MICRO_BATCHES  # the micro-batch scan, counted from the program
    # dots_attention keeps the kernel's output: one forward call per layer and micro-batch, none recomputed
    assert _per_micro(case, "forward") == LAYERS, case["attention_kernels"]
    reached = LAYERS - (MASKED_FROM if case["mode"] == "mft" else 0)  # layers the backward pass goes through
    backward_calls = reached * (2 if _platform(name) == "tpu" else 1)  # splash: dq and dkv kernels
    assert _per_micro(case, "backward") == backward_calls, case["attention_kernels"]


@pytest.mark.parametrize("name", ["tpu_mft_dots", "gpu_mft_dots"])
def test_dots_remat_runs_the_forward_kernel_again_where_the_backward_pass_reaches(compiled, name):
    case = _case(compiled, name)
    assert _per_micro(case, "forward") == LAYERS + (LAYERS - MASKED_FROM)


def _full_shapes(case) -> set[tuple[int, ...]]:
    return {tuple(sorted(t["shape"])) for t in case["trained"] if len(t["shape"]) == 2}


@pytest.mark.parametrize("name", ["tpu_mft", "tpu_mft_fp32", "tpu_fft", "gpu8_mft", "gpu8_fft"])
def test_fsdp_moves_no_whole_score_mask_or_moment_matrix(compiled, name):
    case = _case(compiled, name)
    full = _full_shapes(case)
    whole = [c for c in case["collectives"] if c["kind"] in ("all-gather", "all-reduce")
             and c["dtype"] in ("f32", "pred", "s8", "u8") and tuple(sorted(c["shape"])) in full]
    assert not whole, f"{name}: whole trained matrices gathered or reduced: {whole}"
    gathers = sum(c["count"] for c in case["collectives"] if c["kind"] == "all-gather" and c["dtype"] == "bf16")
    assert gathers >= LAYERS * 7, "the frozen bf16 weights are all-gathered layer by layer"
    dtype = "f32" if case.get("grad_reduce") == "fp32" else "bf16"
    scatters = [c for c in case["collectives"] if c["kind"] == "reduce-scatter" and c["dtype"] == dtype]
    matrices = MASKED_MATRICES if case["mode"] == "mft" else LAYERS * 7
    count = sum(c["count"] for c in scatters)
    assert count == MICRO_BATCHES * matrices if case["mode"] == "mft" else count >= MICRO_BATCHES * matrices, scatters
    devices = case["mesh"][1]
    for c in scatters:  # each a shard of a trained matrix
        assert any(sorted(c["shape"]) == sorted([a // devices if i == j else a for i, a in enumerate(s)])
                   for s in full for j in range(2)), c


@pytest.mark.parametrize("hardware, name", [("v5p-8", "tpu_mft"), ("1xH100-80GB", "gpu_mft")])
def test_plan_agrees_with_a_direct_compile(compiled, tmp_path, capsys, hardware, name):
    case = _case(compiled, name)
    (tmp_path / "run.yaml").write_text(
        "model: {path: '(random)', dtype: bfloat16, compute_dtype: bfloat16, attention: auto, remat: dots_attention}\n"
        "mask: {masked_layers: [1, 2]}\nlora: {rank: 8}\ndata: {max_seq_length: 256}\n"
        f"train: {{batch_size: {2 * case['rows']}, micro_batch_size: {case['rows']}}}\n")
    (tmp_path / "model").mkdir()
    parser = argparse.ArgumentParser()
    memplan.add_parser(parser.add_subparsers(dest="command"))
    cfg = dict(TINY, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    cfg.pop("dtype")
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    args = parser.parse_args(["plan", "--config", str(tmp_path / "run.yaml"), "--hardware", hardware, "--mesh",
                              ",".join(map(str, case["mesh"])), "--set", f"model.path={tmp_path / 'model'}",
                              "--compiler", "real", "--json"])
    assert memplan.run(args) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not plan["stand_in"] and plan["compiler"].startswith("TPU (libtpu 0." if hardware == "v5p-8" else
                                                                 "CUDA (XLA GPU, jax-cuda12-plugin 0.")
    assert plan["total"] == pytest.approx(case["total"], rel=0.01) and plan["compiled"]["temp"] == pytest.approx(
        case["temp"], rel=0.01)
    assert plan["work"]["flops"] == pytest.approx(case["flops"], rel=0.01)
    assert plan["work"]["attention_kernels_per_micro_batch"]["forward"] == LAYERS
