"""mft_jax.studies.memplan: the analytic breakdown against a real state's shards, the compiled memory analysis and the fit
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

from mft_jax import config, methods, model, sharding, targets
from mft_jax.studies import memplan
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


# A decode plan's small model: 4 kv heads of 16 features, so a tensor axis of 4 splits the cache's heads.
DECODE_TINY = config.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, dtype="bfloat16")


def test_decode_plan_memory_agrees_with_the_closed_form():
    """One decode step (8 rows over a 64-slot cache) on mesh (2, 1, 4), compiled here on the CPU: the inputs'
    shards, the closed form of the KV cache and the compiled arguments agree exactly; the donated cache is
    updated in place; flops are the matmuls' and attention's, counted by hand."""
    p = memplan.decode_plan(DECODE_TINY, "8xH100-80GB", (2, 1, 4), batch=8, context=64, compiler="cpu")
    a, c = p["analytic"], p["compiled"]
    # 2 (k, v) x 2 layers x 8 rows x 64 slots x 4 heads x 16 x 2 bytes, rows over data 2, heads over tensor 4
    assert a["kv_cache"] == a["kv_cache_formula"] == 2 * 2 * 8 * 64 * 4 * 16 * 2 // (2 * 4) == 32768
    # every matrix split 4 ways over tensor (embedding and head over the vocabulary), norms whole: 5 x 64 x 2 bytes
    matrices = 2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert a["params"] == matrices * 2 // 4 + 5 * 64 * 2
    assert a["segment_ids"] == 8 * 64 * 4 // 2 and a["rows"] == 2 * 8 // 2 * 4 + 4
    assert c["argument"] == a["params"] + a["kv_cache"] + a["segment_ids"] + a["rows"]  # CPU: no layout padding
    assert c["alias"] == a["kv_cache"] + a["segment_ids"]  # the donated cache comes back in place
    # no copy of the cache (the new slot is written in place): the temporaries are this process's CPU compiler's
    # fp32 copies of the 16-bit weights (2 x their bytes; a plan's worker runs it with CPU_STAND_IN_FLAGS) and
    # activations, less than half the cache besides
    assert c["temp"] < 2 * a["params"] + a["kv_cache"] // 2
    assert p["total"] == c["argument"] + c["output"] - c["alias"] + c["temp"] and p["fits"]
    # flops per device: 4 rows x 2 x (the head's 64 x 256 / 4 + the layers' matrices / 4) + attention over the
    # 64 slots (q.k and p.v: 2 x 2 x 64 x 16 per row and head, 1 head per device) in 2 layers
    head_and_layers = 64 * 256 + 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert p["work"]["flops"] == 4 * 2 * head_and_layers // 4 + 2 * 4 * 2 * 2 * 64 * 16
    r, target = p["roofline"], targets.get("8xH100-80GB")
    assert r["hbm_s"] == c["argument"] / target.hbm_bytes_per_s and r["tokens_per_s"] == 8 / r["step_s"]
    assert p["roofline_hlo_bytes"]["hbm_s"] == p["work"]["bytes"] / target.hbm_bytes_per_s


def test_decode_plan_picks_the_largest_batch_that_fits():
    """Auto batch on one device: the largest power of two whose params and cache (closed form) fit 90% of its
    memory, halved while the compiled step does not fit: with room for the params and 3 rows' cache, 2 rows fit
    the closed form (4 do not) but not the compiled step, whose temporaries (this process's CPU compiler widens
    the 16-bit cache to fp32 for attention) take more than a row; 1 row fits with them."""
    per_row = 2 * 2 * 4096 * 4 * 16 * 2  # 2 (k, v) x 2 layers x 4096 slots x 4 heads x 16 x 2 bytes: 2 MiB
    params = 2 * (2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128)) + 5 * 64 * 2
    memory = math.ceil((params + 3 * per_row) / 0.9)
    p = memplan.decode_plan(DECODE_TINY, "v5e-1", context=4096, compiler="cpu", device_memory_bytes=memory)
    assert p["analytic"]["params"] == params and p["memory_budget"] == int(0.9 * memory) >= params + 3 * per_row
    assert [t["batch"] for t in p["tried"]] == [2, 1] and p["tried"][0]["total"] > p["memory_budget"]
    assert p["batch"] == 1 and p["auto_batch"] and p["fits"] and p["total"] <= p["memory_budget"]
    assert p["mesh"] == [1, 1, 1] and p["stand_in"] and p["compiler"].startswith("CPU (jaxlib ")


def _decode_args(tmp_path, *extra):
    """`mft-jax plan --decode` on a small model with 128 features per head (a TPU lane's width: no layout padding
    of the weights or the cache), its config.json read from the run config's model.path."""
    (tmp_path / "model").mkdir(parents=True)
    hf = config.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, dtype="bfloat16").to_hf()
    (tmp_path / "model" / "config.json").write_text(json.dumps(hf))
    (tmp_path / "run.yaml").write_text(f"model: {{path: {tmp_path / 'model'}}}\nmask: {{masked_layers: [0]}}\n")
    parser = argparse.ArgumentParser()
    memplan.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", "--decode", "--config", str(tmp_path / "run.yaml"), *extra])


@pytest.mark.skipif(not (targets.compiler_available("tpu") and targets.compiler_available("gpu")),
                    reason="the TPU and CUDA compilers are not installed (launch/install.sh --plan)")
def test_decode_plan_command_with_the_real_compilers(tmp_path, capsys):
    """The command's workers compile a decode step with libtpu (v5e-8, tensor-parallel over 8 chips is the
    default; here (2, 1, 4) puts 4 kv heads over tensor) and the CUDA compiler (one H100): each input read once
    is the compiled argument size, the KV cache the closed form; the TPU pads only the row arrays and the slot
    (int32 [8, 1] x 2 and a scalar, each to at most a (8, 128) tile of 4 KiB); the HLO's flops are the matmuls'."""
    assert memplan.run(_decode_args(tmp_path / "a", "--hardware", "v5e-8", "--mesh", "2,1,4", "--batch", "16",
                                    "--context", "256", "--compiler", "real", "--json")) == 0
    assert memplan.run(_decode_args(tmp_path / "b", "--hardware", "1xH100-80GB", "--batch", "16", "--context",
                                    "256", "--compiler", "real", "--json")) == 0
    tpu, gpu = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert tpu["compiler"].startswith("TPU (libtpu ") and gpu["compiler"].startswith("CUDA (")
    assert not tpu["stand_in"] and not gpu["stand_in"] and tpu["device_kind"] == "TPU v5 lite"
    for p, shards in ((tpu, 2 * 4), (gpu, 1)):
        a = p["analytic"]
        assert a["kv_cache"] == a["kv_cache_formula"] == 2 * 2 * 16 * 256 * 4 * 128 * 2 // shards
        inputs = a["params"] + a["kv_cache"] + a["segment_ids"] + a["rows"]
        assert 0 <= p["compiled"]["argument"] - inputs <= (3 * 4096 if p is tpu else 0)
        assert p["compiled"]["alias"] >= a["kv_cache"] and p["fits"] and p["batch"] == 16
        # flops: 2 x rows per device x its matmul weights (head 512 x 1024, 2 layers of 4 x 512^2 + 3 x 512 x 1024,
        # split over tensor); one query per kv head makes attention an elementwise multiply-and-reduce, no dot
        rows, tensor = (8, 4) if p is tpu else (16, 1)
        assert p["work"]["flops"] == 2 * rows * (512 * 1024 + 2 * (4 * 512**2 + 3 * 512 * 1024)) // tensor
        r = p["roofline"]
        assert r["hbm_s"] * targets.get(p["hardware"]).hbm_bytes_per_s == pytest.approx(p["compiled"]["argument"])


@pytest.mark.skipif(not targets.compiler_available("gpu"), reason="the CUDA compiler is not installed "
                    "(launch/install.sh --plan)")
def test_gqa_decode_step_reads_the_cache_as_it_lies_on_gpu(tmp_path, capsys):
    """Grouped-query attention (2 query heads per kv head) over a cache laid out [B, K, S, Dh]: the CUDA compiler
    batches the attention dots over (rows, kv heads) without a transposed copy of k and v per step, so the
    step's temporaries stay far below one layer's cache (with [B, S, K, Dh] they held a copy of it)."""
    args = _decode_args(tmp_path, "--hardware", "1xH100-80GB", "--batch", "16", "--context", "1024",
                        "--compiler", "real", "--json")
    hf = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**hf, "num_key_value_heads": 2}))
    assert memplan.run(args) == 0
    p = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    layer_cache = 2 * 16 * 1024 * 2 * 128 * 2  # k and v of one layer: rows x slots x kv heads x head dim, bf16
    assert p["analytic"]["kv_cache"] == 2 * layer_cache
    assert p["compiled"]["temp"] < layer_cache / 8, p["compiled"]


def test_hlo_counts_in_place_updates_async_slices_and_padded_or_dilated_windows():
    """The decode step's HLO forms (mft_jax.hlo): a fusion updating a cache slot in place moves the slot (read,
    written) and its index, not the cache; a TPU async slice of a weight moves the slice; a per-head projection
    written as a size-4 window padded 3_3 over one input position, and a batched dot written as a size-256
    window over an input dilated by 256, multiply one real element per window."""
    text = "\n".join([
        "%fused_dus (p0: bf16[8,1024,128], p1: s32[], p2: bf16[8,1,128]) -> bf16[8,1024,128] {",
        "  %p0 = bf16[8,1024,128]{2,1,0} parameter(0)",
        "  %p1 = s32[] parameter(1)",
        "  %p2 = bf16[8,1,128]{2,1,0} parameter(2)",
        "  %z = s32[] constant(0)",
        "  ROOT %dus = bf16[8,1024,128]{2,1,0} dynamic-update-slice(%p0, %p2, %z, %p1, %z)",
        "}",
        "ENTRY %main (cache: bf16[8,1024,128], i: s32[]) -> bf16[8,1024,128] {",
        "  %cache = bf16[8,1024,128]{2,1,0} parameter(0)",
        "  %i = s32[] parameter(1)",
        "  %new = bf16[8,1,128]{2,1,0} parameter(2)",
        "  %w = bf16[4096,512]{1,0} parameter(3)",
        "  %x = bf16[64,4096,1]{1,0,2} parameter(4)",
        "  %kernel = bf16[4,128,4096]{2,1,0} parameter(5)",
        "  %q = bf16[256,4,128]{2,1,0} parameter(6)",
        "  %k = bf16[256,2048,128]{2,1,0} parameter(7)",
        "  %f = bf16[8,1024,128]{2,1,0} fusion(%cache, %i, %new), kind=kLoop, calls=%fused_dus",
        "  %s = ((bf16[4096,512]{1,0}), bf16[1024,512]{1,0}, s32[]) slice-start(%w), slice={[0:1024], [0:512]}",
        "  %sd = bf16[1024,512]{1,0} slice-done(%s)",
        "  %proj = bf16[64,4,128]{2,0,1} convolution(%x, %kernel), window={size=4 pad=3_3 rhs_reversal=1}, "
        "dim_labels=bf0_0oi->b0f",
        "  %scores = bf16[256,4,2048]{2,1,0} convolution(%q, %k), window={size=256 stride=255 lhs_dilate=256}, "
        "dim_labels=0bf_0oi->0bf",
        "  ROOT %t = (bf16[8,1024,128]{2,1,0}) tuple(%f)",
        "}"])
    s = hlo_lib.summarize(text)
    assert s.flops == 2 * 64 * 4 * 128 * 4096 + 2 * 256 * 4 * 2048 * 128
    proj = 64 * 4 * 128 * 2 + 64 * 4096 * 2 + 4 * 128 * 4096 * 2  # operands and result, counted as ever
    scores = 256 * 4 * 2048 * 2 + 256 * 4 * 128 * 2 + 256 * 2048 * 128 * 2
    assert s.bytes == (4 + 2 * 8 * 128 * 2) + 2 * 1024 * 512 * 2 + proj + scores


@pytest.mark.parametrize("extra, message", [
    (("--hardware", "v5e-8", "--mesh", "2,1,4", "--batch", "3"), "--batch 3 is not a multiple of the "
                                                                    "data-parallel size 2 of mesh (2, 1, 4)"),
    (("--hardware", "v5e-8", "--mesh", "1,1,4"), "--mesh 1,1,4: give D,F,T with D*F*T = 8"),
    (("--hardware", "v5e-8", "--context", "0"), "--batch and --context must be >= 1"),
])
def test_decode_plan_command_input_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        memplan.run(_decode_args(tmp_path, *extra))


def test_plan_needs_a_config_but_for_decode_plans_of_a_named_model():
    parser = argparse.ArgumentParser()
    memplan.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(ConfigError, match="plan: --config is required"):
        memplan.run(parser.parse_args(["plan", "--model", "llama2-7b"]))
    with pytest.raises(ConfigError, match="plan --decode: give --model NAME or --config"):
        memplan.run(parser.parse_args(["plan", "--decode"]))
