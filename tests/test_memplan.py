"""mft_jax.memplan: the analytic breakdown against a real state's shards, the compiled memory analysis and the fit
flag on 8 simulated devices, and `mft-jax plan` (a worker process, layer extrapolation, its input errors)."""

import argparse
import collections
import dataclasses
import json
import math
import os
import re

import jax
import pytest

from mft_jax import config, memplan, methods, model, sharding, targets
from mft_jax import hlo as hlo_lib
from mft_jax.config import ConfigError

# 8 layers of small weights and 256-token rows: activations dominate, so full remat can save memory.
TINY = config.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                          num_attention_heads=4, num_key_value_heads=2)


def _run():
    return config.from_dict({
        "model": {"path": "(random)", "compute_dtype": "float32", "attention": "xla"},
        "mask": {"masked_layers": [0, 1], "keep_attn": 0.9, "keep_mlp": 0.9},
        "data": {"max_seq_length": 256},
        "train": {"batch_size": 16, "micro_batch_size": 16}}, verbose=False)


def _bytes_per_device(tree) -> dict:
    out = collections.Counter()
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def test_analytic_bytes_equal_the_shards_of_a_real_state():
    run = _run()
    mesh = sharding.make_mesh(config.MeshConfig(2, 4, 1), jax.devices()[:8])
    layout, params_a, state_a, batch_a = memplan.abstract_inputs(run, TINY, mesh)
    analytic = memplan.analytic_bytes(params_a, state_a, batch_a)
    params = jax.jit(lambda k: model.init_params(TINY, k), out_shardings=layout.param_shardings)(jax.random.key(0))
    state = layout.init(params, jax.random.key(1))
    expected = {"params": params, "trainable": state.trainable, "derived": state.derived, "step": state.step,
                "adam": state.opt_state}
    for name, tree in expected.items():
        per_device = _bytes_per_device(tree)
        assert len(per_device) == 8 and len(set(per_device.values())) == 1, name  # every device holds as much
        got = analytic["adam_mu"] + analytic["adam_nu"] + analytic["opt_other"] if name == "adam" else analytic[name]
        assert got == next(iter(per_device.values())), name
    assert analytic["adam_mu"] == analytic["adam_nu"] == analytic["trainable"] == analytic["grad_accum_fp32"]
    # fsdp = 4 splits every kernel's hidden axis: the params' shard is a quarter of theirs (norms stay whole)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert total / 4 < analytic["params"] < total / 4 * 1.05
    assert analytic["batch"] == 5 * 1 * 16 // 8 * 256 * 4  # [M=1, B=16, L=256] int32/fp32, rows over 8 devices


def test_compiled_plan_reads_memory_analysis_and_flags_the_fit():
    run = _run()
    kwargs = dict(mesh_shape=(8, 1, 1), target="8xH100-80GB", compiler="cpu", top=3)
    none = memplan.plan(run, TINY, device_memory_bytes=2**30, remat="none", **kwargs)
    full = memplan.plan(run, TINY, device_memory_bytes=2**30, remat="full", **kwargs)
    a, c = none["analytic"], none["compiled"]
    inputs = sum(v for k, v in a.items() if k != "grad_accum_fp32")
    assert c["argument"] == inputs  # the CPU program's argument buffers are exactly the inputs' shards
    assert c["alias"] == a["trainable"] + a["adam_mu"] + a["adam_nu"] + a["opt_other"] + a["derived"] + a["step"]
    assert c["temp"] > a["grad_accum_fp32"] > 0
    assert none["total"] == c["argument"] + c["output"] - c["alias"] + c["temp"] and none["fits"]
    assert full["compiled"]["temp"] <= c["temp"]
    top = none["largest_temporaries"]
    assert [t["bytes"] for t in top] == sorted((t["bytes"] for t in top), reverse=True)
    assert top[0]["bytes"] >= 2 * 2 * 2 * 256 * 256 * 4  # attention probabilities [rows, K, G, L, L] fp32 per device
    below = memplan.plan(run, TINY, device_memory_bytes=none["total"] - 1, remat="none", **kwargs)
    assert below["total"] == none["total"] and not below["fits"]


def test_largest_temporaries_skip_fused_computations_and_views():
    hlo = "\n".join([
        "%fused_computation (p: f32[64,64]) -> f32[64,64] {",
        "  %big = f32[1024,1024]{1,0} multiply(%p, %p)",
        "}",
        "ENTRY %main (a: f32[64,64]) -> f32[64,64] {",
        "  %a = f32[64,64]{1,0} parameter(0)",
        "  %f = f32[64,64]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation",
        '  %d = bf16[8,128]{1,0} dot(%a, %a), metadata={op_name="jit(step)/dot_general"}',
        "  ROOT %b = f32[4096]{0} bitcast(%f)",
        "}"])
    assert hlo_lib.largest_arrays(hlo) == [
        {"bytes": 16384, "count": 1, "shape": "f32[64, 64]", "op": "fusion", "source": ""},
        {"bytes": 2048, "count": 1, "shape": "bf16[8, 128]", "op": "dot", "source": "jit(step)/dot_general"}]


def _plan_args(tmp_path, *extra):
    (tmp_path / "model").mkdir()
    hf = dict(TINY.to_hf(), num_hidden_layers=6)
    (tmp_path / "model" / "config.json").write_text(json.dumps(hf))
    (tmp_path / "run.yaml").write_text(
        f"model: {{path: {tmp_path / 'model'}, compute_dtype: float32, attention: xla}}\n"
        "mask: {masked_layers: [0, 1]}\ndata: {max_seq_length: 128}\ntrain: {batch_size: 16, micro_batch_size: 8}\n")
    parser = argparse.ArgumentParser()
    memplan.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", "--config", str(tmp_path / "run.yaml"), *extra])


def test_plan_command_runs_a_worker_and_extrapolates_layers(tmp_path, capsys):
    args = _plan_args(tmp_path, "--hardware", "8xH100-80GB", "--remat", "none", "--layers", "2", "--memory-gib",
                      "0.001", "--compiler", "cpu", "--json")
    assert memplan.run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["extrapolated_from_layers"] == [2, 4] and result["model"]["layers"] == 6
    assert result["mesh"] == [8, 1, 1] and result["devices"] == 8 and result["compiler"].startswith("CPU (jaxlib ")
    assert result["stand_in"] and result["target"] == "gpu"
    # the worker had 8 host devices; the inputs of 6 layers, extrapolated from 2 and 4, are exact (linear in depth)
    run = config.load(args.config, verbose=False)
    mesh = sharding.make_mesh(config.MeshConfig(8, 1, 1), jax.devices()[:8])
    inputs = memplan.abstract_inputs(run, dataclasses.replace(TINY, num_hidden_layers=6), mesh)[1:]
    assert result["analytic"] == memplan.analytic_bytes(*inputs)
    assert result["compiled"]["argument"] == sum(v for k, v in result["analytic"].items() if k != "grad_accum_fp32")
    assert not result["fits"] and result["device_memory"] == int(0.001 * 2**30) and result["peak_rss_gib"] > 0


@pytest.mark.parametrize("extra, message", [
    (("--hardware", "v5p-8", "--mesh", "2,2,2"), "--mesh 2,2,2: give D,F,T with D*F*T = 4"),
    (("--hardware", "v5p-8", "--mesh", "1,4,x"), "--mesh 1,4,x"),
    (("--hardware", "8xH100-80GB", "--set", "train.micro_batch_size=4"), "micro_batch_size (4) is not a multiple "
                                                                          "of the data-parallel size 8"),
    (("--hardware", "9xH100-80GB"), "--hardware: unknown hardware '9xH100-80GB'"),
    (("--hardware", "v5p-32"), "micro_batch_size (8) is not a multiple of the data-parallel size 16"),
])
def test_plan_command_input_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        memplan.run(_plan_args(tmp_path, *extra))


def test_targets_by_name():
    v5p = targets.get("v5p-8")  # v5p-N counts TensorCores: 4 chips, one JAX device each (megacore)
    assert (v5p.devices, v5p.topology, v5p.memory_bytes, v5p.platform) == (4, "v5p:2x2x1", 95 * 2**30, "tpu")
    assert targets.get("v5p-128").topology == "v5p:4x4x4" and targets.get("v5e-16").topology == "v5e:4x4"
    assert targets.get("v6e-8").devices == 8 and targets.get("v6e-8").topology == "v6e:2x4"
    h100 = targets.get("8xH100-80GB")
    assert (h100.devices, h100.memory_bytes, h100.topology, h100.platform) == (8, 85_520_809_984, "1x1x8", "gpu")
    assert targets.get("1xH200").memory_bytes == 143771 * 2**20 and targets.get("1xB200").gpu.compute_capability == (10, 0)
    for name in targets.NAMES:
        t = targets.get(name)
        assert t.peak_flops > 0 and t.hbm_bytes_per_s > 0 and t.link_bytes_per_s > 0, name
        if t.platform == "tpu":
            assert math.prod(int(n) for n in t.topology.split(":")[1].split("x")) == t.devices, name
    with pytest.raises(KeyError, match="unknown hardware 'v5p-7'"):
        targets.get("v5p-7")


def test_gpu_target_config_is_written_from_the_figures():
    t = targets.get("1xH100-80GB")
    text = targets.gpu_target_config(t.gpu, t.memory_bytes, t.hbm_bytes_per_s, (9, 8, 0))
    assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert f"device_memory_size: {85_520_809_984}" in text and "memory_bandwidth: 3350000000000" in text
    assert "dnn_version_info { major: 9 minor: 8 patch: 0 }" in text and 'platform_name: "CUDA"' in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text


def test_compiler_env_puts_the_compilers_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MFT_JAX_COMPILERS", str(tmp_path))
    env = targets.compiler_env({"PYTHONPATH": "/somewhere"})
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/somewhere" and env["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("MFT_JAX_COMPILERS", str(tmp_path / "missing"))
    assert "PYTHONPATH" not in targets.compiler_env({})


def test_necessary_flops_of_llama2_7b_mft_and_fft():
    """By hand: per layer 4 * 4096^2 + 3 * 4096 * 11008 = 202.4M matmul weights, head 131.1M; MFT at layers 4-7:
    forward 2(32 x 202.4M + 131.1M) + 32 causal attentions 4 x 4096 x 2048.5; activation gradients through
    layers 4-31 and the head, attention backward twice its forward, less layer 4's q, k, v, gate, up input
    gradient; weight gradients 2 x 4 x 202.4M."""
    cfg = config.LlamaConfig(**memplan.MODELS["llama2-7b"])
    shapes = model.param_shapes(cfg)
    run = config.from_dict({"model": {"path": "(random)"}, "mask": {"masked_layers": [4, 5, 6, 7]}}, verbose=False)
    scores = jax.eval_shape(methods.make(run, cfg).init, shapes, jax.random.key(0))
    layer, head, attn = 4 * 4096**2 + 3 * 4096 * 11008, 4096 * 32000, 4 * 4096 * 4097 / 2
    reads_input = 3 * 4096**2 + 2 * 4096 * 11008
    n = memplan.necessary_flops(cfg, 4096, scores)
    expected = (2 * (32 * layer + head) + 32 * attn) + (2 * (28 * layer + head) + 28 * 2 * attn - 2 * reads_input) \
        + 2 * 4 * layer
    assert n["per_token"] == pytest.approx(expected, rel=1e-12) and n["first_trained_layer"] == 4
    assert round(n["per_token"] / 1e9, 2) == 29.10 and round(n["six_n"] / 1e9, 2) == 39.64
    fft = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, "float32"), shapes)  # every matrix and the embedding
    assert memplan.necessary_flops(cfg, 4096, fft)["per_token"] == pytest.approx(
        6 * (32 * layer + head) + 3 * 32 * attn, rel=1e-12)
