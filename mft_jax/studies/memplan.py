"""Plans: what one training step costs per device on a given machine, compiled before renting it.

`plan` builds the step's inputs as abstract arrays (ShapeDtypeStructs with shardings: nothing is allocated),
compiles the jitted train step (`mft_jax.step`) for the plan's mesh with the target's own compiler, and reads:
- memory: the program's memory analysis (arguments, outputs, the donated state aliased into them, temporaries)
  and each input's shard per device;
- work: flops and HBM bytes of one optimizer step and every collective (dtype, shape, count, bytes sent), read
  from the optimized HLO with the micro-batch loop's trip count (`mft_jax.hlo`), next to XLA's cost_analysis
  where the backend gives one (it counts a loop body once); the attention kernels actually compiled;
- the necessary flops of the method's step (`necessary_flops`) and a roofline: step time and tokens/s per device
  from the device's peak flops, HBM and interconnect bandwidth (`mft_jax.targets`).

Compilers (`--compiler auto`): the target's real compiler, ahead of time with no device present (`targets`):
libtpu for TPU topologies (splash attention lowered by Mosaic), the CUDA plugin for NVIDIA targets (cuDNN flash
attention). Installed by `launch/install.sh --plan`. Only where it is missing does a stand-in compile the plan,
and the plan says so: the CPU compiler (CPU_STAND_IN_FLAGS, f16 for bf16, splash in Pallas interpret mode for
the target's flash attention), or `--compiler tpu` for a GPU target. `mft-jax plan` runs each plan in a fresh
process (`python -m mft_jax.studies.memplan --worker SPEC`) whose environment finds the compilers.

Decode plans (`--decode`, `decode_plan`): one step of `generate`'s decode loop (`model.forward_with_cache` of one
token per row over a KV cache of `--context` slots, then argmax) compiled the same way, tensor-parallel over
every device by default: memory per device (params + KV cache, the cache's closed form beside it), work from the
optimized HLO, and a roofline tokens/s at the batch given or the largest that fits.

    mft-jax plan --config configs/llama31-8b-math-mft.yaml --model llama3.1-8b --hardware 1xH100-80GB v5p-8
    mft-jax plan --decode --model llama2-7b --hardware v5e-8 1xH100-80GB --context 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from contextlib import ExitStack

import jax
import jax.numpy as jnp
import numpy as np

from mft_jax import attention as attention_lib
from mft_jax import config as config_lib
from mft_jax import hlo, model, optim, sharding, step as step_lib, targets
from mft_jax.config import ConfigError, LlamaConfig
from mft_jax.data import BATCH_DTYPES
from mft_jax.state import StateLayout

GiB = 2**30


# JAX on GPU preallocates 75% of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION); plans above it need that raised.
GPU_DEFAULT_POOL_FRACTION = 0.75
# The hardware `mft-jax plan` plans by default.
DEFAULT_HARDWARE = ["1xH100-80GB", "v5p-8"]

# Architectures by name, for plans without the checkpoint at hand (Hugging Face config.json values; rope scaling
# is left out: it changes no shape).
MODELS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, dtype="bfloat16"),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, dtype="bfloat16"),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, dtype="bfloat16"),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6,
                       dtype="bfloat16"),  # v0.3: no sliding window
    "qwen2.5-7b": dict(model_type="qwen2", qkv_bias=True, vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                       rms_norm_eps=1e-6, dtype="bfloat16"),
    "qwen3-8b": dict(model_type="qwen3", qk_norm=True, vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rope_theta=1e6, dtype="bfloat16"),
}

# The CPU compiler standing in for an accelerator's: no fp32 copies of 16-bit matmuls (see `_f16_for_bf16`), and
# no hoisting of loop-invariant ops out of the micro-batch loop, which keeps every layer's all-gathered weights
# alive through the whole step (the TPU compiler does not: its temp bytes for a 4-chip 8B step are below the
# 16 GB those weights take). Even so the CPU schedule keeps more alive than the TPU's (launch/README.md).
CPU_STAND_IN_FLAGS = "--xla_disable_hlo_passes=change-op-data-type,while-loop-invariant-code-motion"


def shard_bytes(x) -> int:
    """Bytes of one device's shard of an abstract array (a ShapeDtypeStruct with a sharding)."""
    return math.prod(x.sharding.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize


def abstract_inputs(run, cfg: LlamaConfig, mesh):
    """(layout, params, state, batch [M, B, L]): the step's inputs as ShapeDtypeStructs with their shardings;
    B = train.micro_batch_size rows (global) per micro-batch, L = data.max_seq_length."""
    shapes = model.param_shapes(cfg, run.model.dtype)
    param_shardings = sharding.param_shardings(cfg, mesh, shapes)
    layout = StateLayout.for_run(run, cfg, mesh, param_shardings, total_steps=1000)
    as_input = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    params = jax.tree.map(as_input, shapes, param_shardings)
    state = jax.tree.map(as_input, layout.shapes(shapes), layout.shardings(shapes))
    micro = run.train.micro_batch_size or run.train.batch_size
    shape = (run.train.batch_size // micro, micro, run.data.max_seq_length)
    batch = {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding.batch_sharding(mesh)) for k, d in BATCH_DTYPES.items()}
    return layout, params, state, batch


def analytic_bytes(params, state, batch) -> dict[str, int]:
    """Per-device bytes of each input. `grad_accum_fp32` is a temporary (in the compiled temp bytes): the fp32
    gradient of the method's view that the micro-batch scan carries, shaped like the trainable tree."""
    tree_bytes = lambda tree: sum(shard_bytes(x) for x in jax.tree.leaves(tree))  # noqa: E731
    adam = {"mu": 0, "nu": 0, "other": 0}
    for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        names = {getattr(k, "name", None) for k in path}
        adam["mu" if "mu" in names else "nu" if "nu" in names else "other"] += shard_bytes(x)
    return {"params": tree_bytes(params), "trainable": tree_bytes(state.trainable), "adam_mu": adam["mu"],
            "adam_nu": adam["nu"], "opt_other": adam["other"], "derived": tree_bytes(state.derived),
            "step": shard_bytes(state.step), "batch": tree_bytes(batch),
            "grad_accum_fp32": sum(math.prod(x.sharding.shard_shape(tuple(x.shape))) * 4
                                   for x in jax.tree.leaves(state.trainable))}


def compile_devices(target: targets.Target, compiler: str) -> list:
    """Devices to compile for: the target's own (compiler "real"), the host's CPU devices (the CPU stand-in) or a
    v5p topology with as many devices (the TPU compiler standing in for a GPU target)."""
    if compiler == "real":
        return targets.compile_devices(target)
    if compiler == "tpu":
        return targets.compile_devices(targets.get(f"v5p-{max(8, 2 * target.devices)}"))
    return jax.devices("cpu")


def _mesh(mesh_shape, devices, num_devices: int):
    if len(devices) < num_devices:
        raise ConfigError(f"plan: {num_devices} devices needed, {len(devices)} present; start the process with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} (mft-jax plan does)")
    return sharding.make_mesh(config_lib.MeshConfig(*mesh_shape), devices[:num_devices])


def _with_model(run, **changes):
    return dataclasses.replace(run, model=dataclasses.replace(run.model, **changes))


def _f16_for_bf16(run, cfg: LlamaConfig):
    """The CPU compiler computes bf16 matmuls in fp32 (materialising fp32 copies of weights and activations)
    but f16 ones in f16; f16 has bf16's size, so a CPU plan compiles f16 in bf16's place."""
    swap = lambda d: "float16" if d == "bfloat16" else d  # noqa: E731
    run = _with_model(run, dtype=swap(run.model.dtype), compute_dtype=swap(run.model.compute_dtype))
    return run, dataclasses.replace(cfg, dtype=swap(cfg.dtype))


def stand_in_attention(run, platform: str) -> str:
    """What a stand-in compiles for the target's attention: its flash kernel (cuDNN or splash) as splash, which
    saves the same residuals (q, k, v, out, logsumexp); XLA attention as XLA."""
    runs = attention_lib.resolve(run.model.attention, platform, run.data.packing)
    return "xla" if runs == "xla" else "splash"


def _compiling_for(mesh, stack: ExitStack) -> str:
    """Enters, on `stack`, what tracing a program for `mesh` needs: the model's logical axis rules and the mesh.
    Compile-only devices cannot run the eager ops of tracing (splash builds its mask arrays): for them the
    abstract mesh gives the program its axes, and eager ops stay on the host. Returns the mesh's platform."""
    platform = step_lib.platform(mesh)
    stack.enter_context(sharding.axis_rules())
    stack.enter_context(jax.set_mesh(mesh) if platform == "cpu" else jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    return platform


def compile_step(run, cfg, mesh, inputs):
    """The train step of `run` compiled for `mesh` (whose devices may be compile-only ones of a TPU topology or
    a GPU target) from its abstract `inputs` (`abstract_inputs`, built outside the mesh: optax runs eager ops)."""
    layout, params, state, batch = inputs
    with ExitStack() as stack:
        if _compiling_for(mesh, stack) == "gpu":
            stack.enter_context(targets.deviceless_cudnn(mesh.devices.flat[0]))
        loss_sums = step_lib.make_loss(run, cfg, layout)
        step_fn = step_lib.jit_train_step(layout, loss_sums, optim.lr_schedule(run.optim, 1000), 0, params,
                                          run.train.grad_reduce)
        return step_fn.lower(params, state, batch).compile()


def memory(compiled) -> dict:
    """The compiled program's memory analysis per device; total = arguments + outputs - aliased + temporaries."""
    stats = compiled.memory_analysis()
    mem = {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
           "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}
    return dict(mem, total=_total(mem))


def _total(mem: dict) -> int:
    return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def _matmul_params(cfg: LlamaConfig) -> tuple[int, int, int]:
    """(weights of one decoder layer's matmuls, of those that read the layer's normed input (q, k, v, gate, up),
    the LM head's)."""
    d, dh = cfg.hidden_size, cfg.head_dim
    q, kv, o = d * dh * cfg.num_attention_heads, d * dh * cfg.num_key_value_heads, dh * cfg.num_attention_heads * d
    mlp = d * cfg.intermediate_size
    return q + 2 * kv + o + 3 * mlp, q + 2 * kv + 2 * mlp, d * cfg.vocab_size


def necessary_flops(cfg: LlamaConfig, seq: int, trainable) -> dict:
    """FLOPs per token the method's step cannot avoid (causal attention at `seq`; `trainable` is the state's
    trainable tree, or its shapes): the forward pass; activation gradients from the head down into the first
    decoder layer holding a trained matrix, less that layer's input gradient (q, k, v, gate, up: it only feeds
    the frozen layers below, unless the embedding is trained); weight gradients of the trained matrices only
    (2 per element; an embedding table's gradient is a scatter, no flops). For MFT the trained matrices are the
    masked kernels (their scores), for FFT every matrix, for LoRA the adapters. 6N is the dense figure for
    comparison (N: matmul weights, head included)."""
    layer, reads_input, head = _matmul_params(cfg)
    n_layers = cfg.num_hidden_layers
    attn_fwd = 4 * cfg.num_attention_heads * cfg.head_dim * (seq + 1) / 2  # QK^T and PV over the causal half
    trained, first, embedding = 0, n_layers, False
    for path, leaf in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        embedding |= "embed_tokens" in keys
        if len(leaf.shape) < 2 or "embed_tokens" in keys:
            continue
        trained += math.prod(leaf.shape)
        layer_index = next((int(k.split("_")[1]) for k in keys if re.fullmatch(r"layers_\d+", k)), n_layers)
        first = min(first, layer_index)
    first = 0 if embedding else first
    above = n_layers - first
    forward = 2 * (n_layers * layer + head) + n_layers * attn_fwd
    activation = 2 * (above * layer + head) + above * 2 * attn_fwd - (2 * reads_input if above and not embedding
                                                                       else 0)
    weights = 2 * trained
    return {"per_token": forward + activation + weights, "forward": forward, "activation_grads": activation,
            "weight_grads": weights, "six_n": 6 * (n_layers * layer + head), "first_trained_layer": first}


def attention_compiled(summary: hlo.Summary, attention: str) -> str:
    """The attention the compiled program runs, read from its kernels."""
    if any(k.startswith("__cudnn$fmha") for k in summary.custom_calls):
        return "cudnn (__cudnn$fmhaSoftmax custom calls)"
    if summary.attention:
        return "splash (Mosaic tpu_custom_call)"
    return {"splash_interpret": "splash in Pallas interpret mode (XLA ops)", "xla": "xla (einsums)"}.get(
        attention, attention)


def roofline(target: targets.Target, flops: float, hbm_bytes: float, link_bytes: float, tokens: int) -> dict:
    """Step time per device bound by compute, HBM traffic and interconnect, each alone (the step takes at least
    the largest: perfect overlap), and tokens/s per device at that time."""
    times = {"compute_s": flops / target.peak_flops, "hbm_s": hbm_bytes / target.hbm_bytes_per_s,
             "collective_s": link_bytes / target.link_bytes_per_s if target.devices > 1 else 0.0}
    step = max(times.values())
    return dict(times, step_s=step, bound=max(times, key=times.get)[:-2],
                tokens_per_s_per_device=tokens / target.devices / step if step else None)


def plan(run_config, cfg: LlamaConfig, mesh_shape, target: targets.Target | str, remat: str, *,
         device_memory_bytes: int | None = None, compiler: str = "real", top: int = 5,
         stand_in_reason: str = "asked for") -> dict:
    """The plan of one training step (see the module docstring) for `target` laid out as `mesh_shape` (data, fsdp,
    tensor), with `model.remat = remat`. compiler: real (the target's), cpu or tpu (stand-ins). A plan over the
    device memory does not compile on TPU: it comes back with `oom` (the compiler's message) and fits = False."""
    target = targets.get(target) if isinstance(target, str) else target
    memory_bytes = device_memory_bytes or target.memory_bytes
    run = _with_model(run_config, remat=remat)
    if compiler != "real":
        run = _with_model(run, attention=stand_in_attention(run, target.platform))
    if compiler == "cpu":
        run, cfg = _f16_for_bf16(run, cfg)
    mesh = _mesh(mesh_shape, compile_devices(target, compiler), target.devices)
    platform = step_lib.platform(mesh)
    attention = attention_lib.resolve(run.model.attention, platform, run.data.packing)
    micro = run.train.micro_batch_size or run.train.batch_size
    micro_batches = run.train.batch_size // micro
    out = {"hardware": target.name, "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                                              "vocab": cfg.vocab_size},
           "mode": run.train.mode, "remat": remat, "mesh": list(mesh_shape), "devices": target.devices,
           "seq": run.data.max_seq_length, "rows_per_micro_batch": micro, "micro_batches": micro_batches,
           "loss_chunk": run.model.loss_chunk, "target": target.platform,
           "compiler": targets.compiler_name(platform),
           "stand_in": compiler != "real" and stand_in_reason, "device_kind": mesh.devices.flat[0].device_kind,
           "attention": {"config": run_config.model.attention, "resolved": attention},
           "device_memory": memory_bytes}
    inputs = abstract_inputs(run, cfg, mesh)
    out["analytic"] = analytic_bytes(*inputs[1:])
    start = time.perf_counter()
    try:
        compiled = compile_step(run, cfg, mesh, inputs)
    except Exception as error:  # the TPU compiler refuses a program that does not fit its HBM
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return dict(out, oom=str(error).splitlines()[0][:400], fits=False, compiled=None, total=None,
                    compile_s=round(time.perf_counter() - start, 1))
    compile_s = round(time.perf_counter() - start, 1)
    mem = memory(compiled)
    text = compiled.as_text()
    summary = hlo.summarize(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    tokens = run.train.batch_size * run.data.max_seq_length
    needed = necessary_flops(cfg, run.data.max_seq_length, inputs[2].trainable)
    work = dict(summary.to_dict(), attention=attention_compiled(summary, attention),
                attention_kernels_per_micro_batch={k: v / micro_batches for k, v in summary.attention.items()},
                cost_analysis={k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost} if cost else None,
                necessary_flops=needed["per_token"] * tokens / target.devices)
    return dict(out, compiled={k: mem[k] for k in ("argument", "output", "alias", "temp")}, total=mem["total"],
                fits=mem["total"] <= memory_bytes, work=work, necessary_flops_per_token=needed,
                roofline=roofline(target, summary.flops, summary.bytes, summary.collective_bytes, tokens),
                largest_temporaries=hlo.largest_arrays(text, top) if top else [], compile_s=compile_s)


def extrapolated_plan(run, cfg: LlamaConfig, layers: int, **kwargs) -> dict:
    """A plan for the full depth from compiles of `layers` and 2 * `layers` decoder layers: every compiled size
    (memory, flops, bytes) is taken as linear in the layer count (each layer adds its weights, state, saved
    activations and work)."""
    if not 0 < layers < cfg.num_hidden_layers:
        raise ConfigError(f"--layers {layers}: give fewer layers than the model's {cfg.num_hidden_layers}")
    small, large = (plan(run, dataclasses.replace(cfg, num_hidden_layers=n), **kwargs)
                    for n in (layers, min(2 * layers, cfg.num_hidden_layers)))
    if small.get("oom") or large.get("oom"):
        return dict(large, oom=large.get("oom") or small["oom"], extrapolated_from_layers=[layers])
    span = large["model"]["layers"] - layers
    grow = lambda a, b: a + (b - a) * (cfg.num_hidden_layers - layers) // span  # noqa: E731
    mem = {k: grow(small["compiled"][k], large["compiled"][k]) for k in small["compiled"]}
    analytic = {k: grow(small["analytic"][k], large["analytic"][k]) for k in small["analytic"]}
    total = _total(mem)
    work = dict(large["work"], **{k: grow(small["work"][k], large["work"][k])
                                  for k in ("flops", "bytes", "collective_bytes", "attention_flops")})
    target = targets.get(large["hardware"])
    tokens = large["micro_batches"] * large["rows_per_micro_batch"] * large["seq"]
    return dict(large, model={**large["model"], "layers": cfg.num_hidden_layers}, compiled=mem, analytic=analytic,
                total=total, fits=total <= large["device_memory"], work=work,
                roofline=roofline(target, work["flops"], work["bytes"], work["collective_bytes"], tokens),
                extrapolated_from_layers=[layers, layers + span],
                compile_s=round(small["compile_s"] + large["compile_s"], 1))


# --------------------------------------------------------------------------------------------------------
# Decode plans: one step of `generate`'s decode loop (one new token per row over a KV cache)
# --------------------------------------------------------------------------------------------------------

# The hardware `mft-jax plan --decode` plans by default (issue 25: where the paper's evaluations would run).
DECODE_HARDWARE = ["v5e-8", "v5p-8", "1xH100-80GB", "8xH100-80GB"]
# The context (KV cache slots) a decode plan assumes by default: the eval harness's max_length.
DECODE_CONTEXT = 2048
# The largest batch an automatic decode plan picks: near the FLOP per HBM byte of the targets (H100 295, v5e
# 240, v5p 166), above which a decode step's weight reads no longer bound it and the roofline gains little.
DECODE_MAX_BATCH = 256
# The share of a device's memory an automatic batch may fill: a GPU process's JAX pool (75% unless
# XLA_PYTHON_CLIENT_MEM_FRACTION is raised); on TPU a margin for the runtime's own buffers.
DECODE_MEMORY_FRACTION = {"gpu": GPU_DEFAULT_POOL_FRACTION, "tpu": 0.9}


def decode_mesh(target: targets.Target) -> tuple[int, int, int]:
    """The default decode mesh: tensor-parallel over all the devices (as vLLM and JetStream serve), so each
    holds 1/T of every weight and of the KV cache's heads, and every row runs on every device."""
    return (1, 1, target.devices)


def _cache_axes(leaf) -> tuple:
    """Logical axes of a KV cache leaf, as `model.init_cache` constrains them."""
    return model.KV_CACHE_AXES if len(leaf.shape) == 4 else model.SEGMENT_CACHE_AXES


def abstract_decode_inputs(cfg: LlamaConfig, mesh, batch: int, context: int, dtype) -> dict:
    """One decode step's inputs as ShapeDtypeStructs with their shardings: params (the mesh's fsdp and tensor
    axes, `sharding.param_shardings`), the KV cache of `context` slots per row (`model.init_cache`: rows over the
    data axes, kv heads over tensor), the last token and position per row, and the cache slot (a scalar)."""
    shapes = model.param_shapes(cfg, dtype)
    as_input = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    params = jax.tree.map(as_input, shapes, sharding.param_shardings(cfg, mesh, shapes))
    named = lambda axes, shape: jax.sharding.NamedSharding(  # noqa: E731
        mesh, sharding.logical_to_spec(axes, shape, mesh))
    cache = jax.tree.map(lambda x: as_input(x, named(_cache_axes(x), x.shape)),
                         jax.eval_shape(lambda: model.init_cache(cfg, batch, context, dtype)))
    rows = jax.ShapeDtypeStruct((batch, 1), np.int32, sharding=named(("batch", None), (batch, 1)))
    return {"params": params, "cache": cache, "tokens": rows, "positions": rows,
            "index": jax.ShapeDtypeStruct((), np.int32, sharding=sharding.replicated(mesh))}


def decode_analytic_bytes(cfg: LlamaConfig, mesh_shape, batch: int, context: int, dtype, inputs=None) -> dict:
    """Per-device bytes of a decode step's inputs from their shapes and shardings (`inputs`, when given: the
    shards), next to the closed form of the KV cache: 2 (k, v) x layers x batch x context x kv_heads x head_dim x
    itemsize / (row shards x head shards), rows over data x fsdp where they divide, heads over tensor where
    they divide (else whole on every device, as `sharding.logical_to_spec` places them)."""
    data, fsdp, tensor = mesh_shape
    row_shards = data * fsdp if batch % (data * fsdp) == 0 else 1
    head_shards = tensor if cfg.num_key_value_heads % tensor == 0 else 1
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * cfg.head_dim \
        * np.dtype(dtype).itemsize // (row_shards * head_shards)
    out = {"kv_cache_formula": kv}
    if inputs is not None:
        tree_bytes = lambda tree: sum(shard_bytes(x) for x in jax.tree.leaves(tree))  # noqa: E731
        cache = inputs["cache"]
        out.update(params=tree_bytes(inputs["params"]), kv_cache=tree_bytes(cache["layers"]),
                   segment_ids=shard_bytes(cache["segment_ids"]),
                   rows=tree_bytes([inputs["tokens"], inputs["positions"], inputs["index"]]))
    return out


def compile_decode_step(cfg: LlamaConfig, mesh, inputs: dict, compute_dtype):
    """`generate`'s decode step (`_decode`'s loop body, greedy) compiled for `mesh`: `model.forward_with_cache`
    of one token per row at cache slot `index`, the cache donated (updated in place, as the loop carries it),
    the next token by argmax; under the model's logical axis rules, as `generate` runs on a mesh."""
    def decode_step(params, cache, tokens_Bx1, positions_Bx1, index):
        logits_Bx1xV, cache = model.forward_with_cache(cfg, params, tokens_Bx1, positions_Bx1,
                                                       jnp.ones_like(tokens_Bx1), cache, index,
                                                       compute_dtype=compute_dtype)
        return jnp.argmax(logits_Bx1xV[:, 0], axis=-1).astype(jnp.int32), cache

    args = [inputs[k] for k in ("params", "cache", "tokens", "positions", "index")]
    out_shardings = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*inputs["tokens"].sharding.spec[:1])),
                     jax.tree.map(lambda x: x.sharding, inputs["cache"]))
    with ExitStack() as stack:
        _compiling_for(mesh, stack)
        step_fn = jax.jit(decode_step, out_shardings=out_shardings, donate_argnums=(1,))
        return step_fn.lower(*args).compile()


def decode_roofline(target: targets.Target, flops: float, hbm_bytes: float, link_bytes: float, batch: int) -> dict:
    """`roofline` of one decode step (per device) making `batch` tokens: step time bound by compute, HBM and
    links, tokens/s of the whole machine (batch / step) and per device."""
    r = roofline(target, flops, hbm_bytes, link_bytes, batch)
    return dict(r, tokens_per_s=batch / r["step_s"] if r["step_s"] else None)


def _auto_decode_batch(cfg, mesh_shape, context, dtype, params_bytes: int, budget: float, cap: int) -> int:
    """The largest batch, a power of two times the data-parallel size and at most `cap`, whose params and KV
    cache per device (the closed form) fit `budget` bytes; the data-parallel size if none does."""
    dp = mesh_shape[0] * mesh_shape[1]
    batch = dp
    while 2 * batch <= max(cap, dp) and params_bytes + decode_analytic_bytes(
            cfg, mesh_shape, 2 * batch, context, dtype)["kv_cache_formula"] <= budget:
        batch *= 2
    return batch


def decode_plan(cfg: LlamaConfig, target: targets.Target | str, mesh_shape=None, *, batch: int | None = None,
                context: int = DECODE_CONTEXT, compiler: str = "real", device_memory_bytes: int | None = None,
                max_batch: int = DECODE_MAX_BATCH, stand_in_reason: str = "asked for") -> dict:
    """The plan of one decode step of `cfg` (params in cfg.dtype, compute in it too) on `target`: memory per
    device (compiled, and the inputs' bytes from their shapes, the KV cache's closed form beside them), flops,
    HBM bytes and collectives of the optimized HLO, and the roofline tokens/s at `batch` rows over a cache of
    `context` slots. mesh_shape: (data, fsdp, tensor), default `decode_mesh`. batch None: the largest power of
    two (times the data axes, <= max_batch) whose params and cache fit DECODE_MEMORY_FRACTION of the device's
    memory, halved while the compiled program does not fit."""
    target = targets.get(target) if isinstance(target, str) else target
    memory_bytes = device_memory_bytes or target.memory_bytes
    mesh_shape = tuple(mesh_shape or decode_mesh(target))
    dtype = cfg.dtype
    if compiler == "cpu":  # the CPU compiler widens bf16 matmuls to fp32; f16 has bf16's size (_f16_for_bf16)
        cfg = dataclasses.replace(cfg, dtype="float16" if cfg.dtype == "bfloat16" else cfg.dtype)
    mesh = _mesh(mesh_shape, compile_devices(target, compiler), target.devices)
    platform = step_lib.platform(mesh)
    budget = DECODE_MEMORY_FRACTION[target.platform] * memory_bytes
    params_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(
        abstract_decode_inputs(cfg, mesh, mesh_shape[0] * mesh_shape[1], 1, cfg.dtype)["params"]))
    auto = batch is None
    batch = _auto_decode_batch(cfg, mesh_shape, context, cfg.dtype, params_bytes, budget, max_batch) if auto else batch
    dp = mesh_shape[0] * mesh_shape[1]
    if batch % dp:
        raise ConfigError(f"--batch {batch} is not a multiple of the data-parallel size {dp} of mesh {mesh_shape}")
    out = {"mode": "decode", "hardware": target.name, "target": target.platform, "devices": target.devices,
           "mesh": list(mesh_shape), "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                                               "vocab": cfg.vocab_size, "kv_heads": cfg.num_key_value_heads},
           "dtype": str(dtype), "context": context, "auto_batch": auto, "memory_budget": int(budget),
           "compiler": targets.compiler_name(platform), "stand_in": compiler != "real" and stand_in_reason,
           "device_kind": mesh.devices.flat[0].device_kind, "device_memory": memory_bytes}
    compile_s, tried = 0.0, []
    while True:
        inputs = abstract_decode_inputs(cfg, mesh, batch, context, cfg.dtype)
        analytic = decode_analytic_bytes(cfg, mesh_shape, batch, context, cfg.dtype, inputs)
        start = time.perf_counter()
        try:
            compiled, oom = compile_decode_step(cfg, mesh, inputs, cfg.dtype), None
        except Exception as error:  # the TPU compiler refuses a program that does not fit its HBM
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            compiled, oom = None, str(error).splitlines()[0][:400]
        compile_s += time.perf_counter() - start
        mem = memory(compiled) if compiled is not None else None
        fits = mem is not None and mem["total"] <= (budget if auto else memory_bytes)
        tried.append({"batch": batch, "total": mem and mem["total"], "oom": oom})
        if fits or not auto or batch // 2 < dp or batch % (2 * dp):
            break
        batch //= 2
    out.update(batch=batch, tried=tried, analytic=analytic, compile_s=round(compile_s, 1))
    if compiled is None:
        return dict(out, oom=oom, fits=False, compiled=None, total=None)
    text = compiled.as_text()
    summary = hlo.summarize(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    work = dict(summary.to_dict(), cost_analysis={k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}
                if cost else None)
    # Two HBM terms: every input read once (the weights' and the cache's shards as compiled, layout padding
    # included: what any decode step must read), and the HLO's count of unfused operands and results, which
    # also counts arrays the compiler stages through on-chip memory (TPU) and fusions' re-reads.
    return dict(out, compiled={k: mem[k] for k in ("argument", "output", "alias", "temp")}, total=mem["total"],
                fits=mem["total"] <= memory_bytes, work=work,
                roofline=decode_roofline(target, summary.flops, mem["argument"], summary.collective_bytes, batch),
                roofline_hlo_bytes=decode_roofline(target, summary.flops, summary.bytes, summary.collective_bytes,
                                                   batch))


# --------------------------------------------------------------------------------------------------------
# Command line: one worker process per plan
# --------------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="memory, flops, collectives and a roofline of a training step (or with "
                              "--decode, a decode step) on given hardware, compiled ahead of time by its own "
                              "compiler; flags plans that do not fit",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (see configs/); required but with --decode --model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. data.max_seq_length=2048")
    p.add_argument("--model", choices=sorted(MODELS), help="architecture by name (default: model.path/config.json)")
    p.add_argument("--hardware", nargs="+", default=None, metavar="NAME",
                   help=f"targets: {', '.join(targets.NAMES)} (default: {' '.join(DEFAULT_HARDWARE)}; with --decode "
                        f"{' '.join(DECODE_HARDWARE)})")
    p.add_argument("--remat", nargs="+", default=None, choices=list(config_lib.REMAT_CHOICES),
                   help="remat policies to plan (default: the config's model.remat)")
    p.add_argument("--per-device-batch", type=int, default=None, metavar="ROWS",
                   help="rows per device per micro-batch: train.micro_batch_size = ROWS x the plan's data-parallel "
                        "size (default: the config's micro_batch_size, which must then suit every plan's mesh)")
    p.add_argument("--mesh", default=None, metavar="D,F,T", help="data,fsdp,tensor sizes for every plan (default: "
                   "the config's mesh where it fits the device count, else all fsdp)")
    p.add_argument("--memory-gib", type=float, default=None, help="per-device memory instead of the hardware's")
    p.add_argument("--compiler", choices=["auto", "real", "cpu", "tpu"], default="auto",
                   help="auto: the target's own compiler (TPU: libtpu; GPU: the CUDA plugin) when installed "
                        "(launch/install.sh --plan), else the CPU one standing in; real: refuse stand-ins; "
                        "cpu / tpu: that compiler standing in")
    p.add_argument("--layers", type=int, default=None, metavar="K", help="compile K and 2K decoder layers and "
                   "extrapolate to the full depth (a 70B step compiles slowly on CPU)")
    p.add_argument("--top", type=int, default=3, help="largest temporaries to list per training plan")
    p.add_argument("--collectives", type=int, default=6, help="collectives to list per plan (by bytes sent)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per plan before its worker is stopped")
    decode = p.add_argument_group("decode plans (--decode): one step of generation's decode loop")
    decode.add_argument("--decode", action="store_true", help="plan a decode step (one new token per row over "
                        "a KV cache; params in the model's dtype) instead of a training step; default mesh "
                        "tensor-parallel over all devices, (1,1,N)")
    decode.add_argument("--batch", type=int, default=None, metavar="ROWS", help="rows decoded at once (default: the "
                        f"largest power of two, at most {DECODE_MAX_BATCH}, whose params and KV cache fit "
                        "the device: 75%% of a GPU (JAX's pool), 90%% of a TPU chip; halved while the compiled "
                        "step does not)")
    decode.add_argument("--context", type=int, default=DECODE_CONTEXT, metavar="SLOTS",
                        help=f"KV cache slots per row: prompt + new tokens (default {DECODE_CONTEXT}, the eval "
                             f"harness's max_length)")
    p.add_argument("--json", action="store_true", help="one JSON object per plan instead of the table")
    p.set_defaults(func=run)
    return p


def _model_config(run, name: str | None) -> LlamaConfig:
    if name:
        return LlamaConfig(**MODELS[name])
    path = os.path.join(run.model.path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"plan: {path} not found; give --model NAME ({', '.join(sorted(MODELS))}) or a model.path "
                          f"holding a Hugging Face config.json")
    with open(path) as f:
        return LlamaConfig.from_hf(json.load(f))


def mesh_for(run, devices: int, override: str | None) -> tuple[tuple[int, int, int], str]:
    """(data, fsdp, tensor) for `devices` devices, and a note when the config's mesh had to be replaced."""
    if override:
        shape = tuple(int(x) for x in override.split(",")) if re.fullmatch(r"\d+,\d+,\d+", override) else ()
        if math.prod(shape or (0,)) != devices:
            raise ConfigError(f"--mesh {override}: give D,F,T with D*F*T = {devices} (the hardware's devices)")
        return shape, ""
    try:
        return sharding.mesh_shape(run.mesh, devices), ""
    except ConfigError:
        return (1, devices, 1), f"the config's mesh does not fit {devices} device(s): all fsdp"


def _with_batch(run, mesh_shape, per_device: int | None):
    """The run with its micro-batch set for this mesh (`--per-device-batch`) and checked against it."""
    dp = mesh_shape[0] * mesh_shape[1]
    train = run.train
    if per_device is not None:
        micro = per_device * dp
        train = dataclasses.replace(train, micro_batch_size=micro, batch_size=max(1, train.batch_size // micro) * micro)
    micro = train.micro_batch_size or train.batch_size
    if micro % dp:
        raise ConfigError(f"train.micro_batch_size ({micro}) is not a multiple of the data-parallel size {dp} of "
                          f"mesh {tuple(mesh_shape)}; give --per-device-batch ROWS")
    return dataclasses.replace(run, train=train)


def _compiler(choice: str, target: targets.Target) -> tuple[str, str]:
    """(real | cpu | tpu, why a stand-in) for `--compiler choice`: auto takes the target's own compiler when
    installed, else the CPU one, and the plan says why."""
    if choice in ("auto", "real"):
        if targets.compiler_available(target.platform):
            return "real", ""
        if choice == "real":
            raise ConfigError(f"--compiler real: {targets.missing_compiler_message(target.platform)}")
        return "cpu", targets.missing_compiler_message(target.platform)
    if choice == "tpu" and not targets.compiler_available("tpu"):
        raise ConfigError(f"--compiler tpu: {targets.missing_compiler_message('tpu')}")
    return choice, f"--compiler {choice}"


def worker_main(spec_json: str) -> None:
    """One plan in this process (started by `run` with the device count set): prints one JSON line."""
    spec = json.loads(spec_json)
    if spec.get("decode"):
        result = decode_plan(LlamaConfig(**spec["cfg"]), **spec["kwargs"])
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2)
        print("PLAN " + json.dumps(result), flush=True)
        return
    run = config_lib.from_dict(spec["run"], verbose=False)
    cfg = LlamaConfig(**spec["cfg"])
    layers = spec.get("layers")
    result = extrapolated_plan(run, cfg, layers, **spec["kwargs"]) if layers else plan(run, cfg, **spec["kwargs"])
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2)
    print("PLAN " + json.dumps(result), flush=True)


def worker_env(compiler: str, devices: int) -> dict:
    """The environment of a plan's process: the planning compilers on its path (targets.compiler_env), JAX on
    the host's CPU with `devices` devices, and for the CPU stand-in its flags."""
    env = dict(targets.compiler_env(), TF_CPP_MIN_LOG_LEVEL="3")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if compiler == "cpu":
        flags += " " + CPU_STAND_IN_FLAGS
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _run_worker(spec: dict, devices: int, timeout: float) -> dict:
    """Runs one plan in a fresh process (`worker_env`); the plan's dict, or {"error": ...}."""
    env = worker_env(spec["kwargs"]["compiler"], devices)
    try:
        proc = subprocess.run([sys.executable, "-m", "mft_jax.studies.memplan", "--worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no plan in {timeout:.0f} s (--timeout; or compile fewer layers with --layers K)"}
    lines = [line[5:] for line in proc.stdout.splitlines() if line.startswith("PLAN ")]
    if proc.returncode or not lines:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no output"]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]  # the exception's line
        return {"error": f"worker exit {proc.returncode}: {(raised or lines)[-1][:300]}"}
    return json.loads(lines[-1])


def _gib(n: int | None) -> str:
    return "      -" if n is None else f"{n / GiB:7.2f}"


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _header(name: str, note: str, p: dict) -> list[str]:
    a = p.get("analytic", {})
    stand_in = f" STANDING IN for the {p['target'].upper()}'s ({p['stand_in']}: an estimate)" if p["stand_in"] else ""
    extra = f"; extrapolated from {p['extrapolated_from_layers']} layers" if "extrapolated_from_layers" in p else ""
    return [f"{name}: {p['devices']} x {p['device_kind']}, {p['device_memory'] / GiB:.2f} GiB, mesh (data, fsdp, "
            f"tensor) {tuple(p['mesh'])}{' (' + note + ')' if note else ''}; {p['compiler']} compiler{stand_in}{extra}",
            f"  {p['model']['layers']} layers, {p['mode']}, seq {p['seq']}, {p['rows_per_micro_batch']} rows per "
            f"micro-batch x {p['micro_batches']}, loss_chunk {p['loss_chunk']}; attention {p['attention']['config']}"
            f" -> {p['attention']['resolved']}",
            "  inputs per device (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in a.items() if k != "step")
            + " (grad_accum: part of temp)",
            "  remat           arguments  out-aliased     temp    total  fits  compile_s  rss_gib"]


def _work_lines(p: dict, collectives: int) -> list[str]:
    """Per plan: the compiled attention and its kernel calls, flops and bytes per device, the roofline and the
    largest collectives."""
    w, r, n = p["work"], p["roofline"], p["necessary_flops_per_token"]
    kernels = ", ".join(f"{k} {v:g}" for k, v in sorted(w["attention_kernels_per_micro_batch"].items())) or "none"
    cost = w.get("cost_analysis") or {}
    lines = [f"  [{p['remat']}] attention compiled: {w['attention']}; kernel calls per micro-batch: {kernels}",
             f"  [{p['remat']}] per device and optimizer step: {_si(w['flops'], 'FLOP')} (necessary "
             f"{_si(w['necessary_flops'], 'FLOP')}: {n['per_token'] / 1e9:.2f} GFLOP/token vs 6N "
             f"{n['six_n'] / 1e9:.2f}), HBM {_si(w['bytes'], 'B')}, sent {_si(w['collective_bytes'], 'B')}"
             + (f"; XLA cost_analysis (loop bodies once): {_si(cost.get('flops'), 'FLOP')}, "
                f"{_si(cost.get('bytes accessed'), 'B')}" if cost else "; no XLA cost_analysis on this backend"),
             f"  [{p['remat']}] roofline: compute {r['compute_s']:.3f} s, HBM {r['hbm_s']:.3f} s, collectives "
             f"{r['collective_s']:.3f} s -> step >= {r['step_s']:.3f} s ({r['bound']}-bound), "
             f"<= {r['tokens_per_s_per_device']:,.0f} tokens/s per device"]
    return lines + [f"  [{p['remat']}]   {_collective(c)}" for c in w["collectives"][:collectives]]


def _collective(c: dict) -> str:
    """One collective of a plan's work: kind, operand, group, count and the bytes it sends."""
    return f"{c['kind']} {c['dtype']}{c['shape']} over {c['group']} x{c['count']:g}: {_si(c['bytes_sent'], 'B')} sent"


def format_plans(name: str, note: str, plans: list[dict], collectives: int = 6) -> list[str]:
    """The table of one hardware's plans (one row per remat policy), then their work and largest temporaries."""
    ok = [p for p in plans if "error" not in p]
    lines = _header(name, note, ok[0]) if ok else [f"{name}:"]
    for p in plans:
        if "error" in p or p.get("oom"):
            lines.append(f"  {p['remat']:<14}  {'failed: ' + p['error'] if 'error' in p else 'NO: ' + p['oom']}")
            continue
        c = p["compiled"]
        pool = p["target"] == "gpu" and p["total"] > GPU_DEFAULT_POOL_FRACTION * p["device_memory"]
        fits = ("yes*" if pool else "yes") if p["fits"] else "NO"
        lines.append(f"  {p['remat']:<14} {_gib(c['argument'])}      {_gib(c['output'] - c['alias'])}  "
                     f"{_gib(c['temp'])}  {_gib(p['total'])}  {fits:<5} {p['compile_s']:9.1f}  "
                     f"{p['peak_rss_gib']:7.2f}")
    for p in ok:
        if not p.get("oom"):
            lines += _work_lines(p, collectives)
        for t in p.get("largest_temporaries", []):
            lines.append(f"  largest ({p['remat']}): {t['bytes'] / GiB:.2f} GiB {t['shape']} x{t['count']} {t['op']} "
                         f"{t['source'][-80:]}")
    if any("  yes* " in line for line in lines):
        lines.append("  yes*: above JAX's default GPU pool (75%): set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95")
    return lines


def _targets(names) -> list[targets.Target]:
    try:
        return [targets.get(name) for name in names]
    except KeyError as error:
        raise ConfigError(f"--hardware: {error.args[0]}") from None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def format_decode_plan(p: dict, collectives: int = 4) -> list[str]:
    """One decode plan: memory per device (compiled, inputs and the KV cache's closed form), work per step and
    the roofline tokens/s."""
    name = p["hardware"]
    if "error" in p:
        return [f"{name} (decode): failed: {p['error']}"]
    stand_in = f" STANDING IN for the {p['target'].upper()}'s ({p['stand_in']}: an estimate)" if p["stand_in"] else ""
    a, m = p["analytic"], p["model"]
    how = (f"auto: the largest power of two <= {DECODE_MAX_BATCH} fitting {p['memory_budget'] / GiB:.2f} GiB"
           if p["auto_batch"] else "--batch")
    halved = [t["batch"] for t in p["tried"][:-1]]
    lines = [f"{name} (decode): {p['devices']} x {p['device_kind']}, {p['device_memory'] / GiB:.2f} GiB, mesh (data, "
             f"fsdp, tensor) {tuple(p['mesh'])}; {p['compiler']} compiler{stand_in}",
             f"  {m['layers']} layers, {m['kv_heads']} kv heads, {p['dtype']}; batch {p['batch']} ({how}"
             + (f"; {', '.join(map(str, halved))} did not fit compiled" if halved else "")
             + f"), context {p['context']}",
             f"  inputs per device (GiB): params {a['params'] / GiB:.2f}, KV cache {a['kv_cache'] / GiB:.2f} (closed "
             f"form 2 x layers x batch x context x kv_heads x head_dim x bytes / shards: "
             f"{a['kv_cache_formula'] / GiB:.2f}), segment ids {a['segment_ids'] / GiB:.3f}"]
    if p.get("oom"):
        return lines + [f"  NO: {p['oom']}"]
    c = p["compiled"]
    fits = "yes" if p["fits"] else "NO"
    if fits == "yes" and p["target"] == "gpu" and p["total"] > GPU_DEFAULT_POOL_FRACTION * p["device_memory"]:
        fits = "yes* (above JAX's default GPU pool, 75%: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)"
    w, r, rh = p["work"], p["roofline"], p["roofline_hlo_bytes"]
    cost = w.get("cost_analysis") or {}
    lines += [f"  compiled per device (GiB): arguments {c['argument'] / GiB:.2f}, outputs less the donated cache "
              f"{(c['output'] - c['alias']) / GiB:.3f}, temp {c['temp'] / GiB:.2f}, total {p['total'] / GiB:.2f}; "
              f"fits: {fits}; compiled in {p['compile_s']:.1f} s, {p['peak_rss_gib']:.2f} GiB RSS",
              f"  per device and step: {_si(w['flops'], 'FLOP')}, HBM {_si(c['argument'], 'B')} (every input once) / "
              f"{_si(w['bytes'], 'B')} (the HLO's count), sent {_si(w['collective_bytes'], 'B')}"
              + (f"; XLA cost_analysis: {_si(cost.get('flops'), 'FLOP')}, {_si(cost.get('bytes accessed'), 'B')}"
                 if cost else ""),
              f"  roofline: compute {_ms(r['compute_s'])}, HBM {_ms(r['hbm_s'])}, links {_ms(r['collective_s'])} -> "
              f"step >= {_ms(r['step_s'])} ({r['bound']}-bound): <= {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['tokens_per_s_per_device']:,.0f} per device); with the HLO's bytes {_ms(rh['hbm_s'])} -> "
              f"{rh['tokens_per_s']:,.0f} tokens/s"]
    return lines + [f"    {_collective(k)}" for k in w["collectives"][:collectives]]


def run_decode(args) -> int:
    """`mft-jax plan --decode`: one worker per hardware; prints each plan (or JSON). 1 if a plan failed."""
    if args.config is None and args.model is None:
        raise ConfigError("plan --decode: give --model NAME or --config (its model.path/config.json)")
    cfg = LlamaConfig(**MODELS[args.model]) if args.model else _model_config(
        config_lib.load(args.config, args.set or [], verbose=False), None)
    if args.batch is not None and args.batch < 1 or args.context < 1:
        raise ConfigError(f"plan --decode: --batch and --context must be >= 1 (got {args.batch}, {args.context})")
    failed = False
    for target in _targets(args.hardware or DECODE_HARDWARE):
        memory_bytes = int(args.memory_gib * GiB) if args.memory_gib else target.memory_bytes
        mesh_shape = mesh_for(None, target.devices, args.mesh)[0] if args.mesh else decode_mesh(target)
        if args.batch is not None and args.batch % (mesh_shape[0] * mesh_shape[1]):
            raise ConfigError(f"--batch {args.batch} is not a multiple of the data-parallel size "
                              f"{mesh_shape[0] * mesh_shape[1]} of mesh {tuple(mesh_shape)} on {target.name}")
        compiler, reason = _compiler(args.compiler, target)
        kwargs = dict(target=target.name, mesh_shape=list(mesh_shape), batch=args.batch, context=args.context,
                      compiler=compiler, device_memory_bytes=memory_bytes, stand_in_reason=reason)
        result = _run_worker({"decode": True, "cfg": dataclasses.asdict(cfg), "kwargs": kwargs},
                             target.devices if compiler == "cpu" else 1, args.timeout)
        result = dict(result, hardware=target.name)
        failed |= "error" in result
        print(json.dumps(result) if args.json else "\n".join(format_decode_plan(result, args.collectives)),
              flush=True)
    return 1 if failed else 0


def run(args) -> int:
    """`mft-jax plan`: one worker per (hardware, remat); prints the table (or JSON). 1 if a plan failed."""
    if args.decode:
        return run_decode(args)
    if args.config is None:
        raise ConfigError("plan: --config is required (a decode plan, --decode, takes --model alone)")
    run_cfg = config_lib.load(args.config, args.set or [], verbose=False)
    cfg = _model_config(run_cfg, args.model)
    chosen = _targets(args.hardware or DEFAULT_HARDWARE)
    failed = False
    for target in chosen:
        memory_bytes = int(args.memory_gib * GiB) if args.memory_gib else target.memory_bytes
        mesh_shape, note = mesh_for(run_cfg, target.devices, args.mesh)
        planned = _with_batch(run_cfg, mesh_shape, args.per_device_batch)
        compiler, reason = _compiler(args.compiler, target)
        plans = []
        for remat in args.remat or [run_cfg.model.remat]:
            kwargs = dict(mesh_shape=list(mesh_shape), target=target.name, device_memory_bytes=memory_bytes,
                          remat=remat, compiler=compiler, top=args.top, stand_in_reason=reason)
            spec = {"run": planned.to_dict(), "cfg": dataclasses.asdict(cfg), "kwargs": kwargs, "layers": args.layers}
            result = _run_worker(spec, target.devices if compiler == "cpu" else 1, args.timeout)
            plans.append(dict(result, remat=remat, hardware=target.name))
            failed |= "error" in result
            if args.json:
                print(json.dumps(plans[-1]), flush=True)
        if not args.json:
            print("\n".join(format_plans(target.name, note, plans, args.collectives)), flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    """`python -m mft_jax.studies.memplan plan ...` (what `mft-jax plan` runs), or one worker: `--worker SPEC_JSON`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m mft_jax.studies.memplan")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
