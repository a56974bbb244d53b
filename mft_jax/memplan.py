"""Memory plans: the bytes per device of a training step on a given machine, before renting it.

`plan` builds the step's inputs as abstract arrays (ShapeDtypeStructs with shardings: nothing is allocated),
compiles the jitted train step (`mft_jax.step`) for the plan's mesh and reads the program's memory analysis:
arguments (params, state, batch), outputs, the donated state aliased into them, and temporaries (activations
kept for the backward pass, gradient accumulators, transients); beside it, each input's shard per device.

Compilers: TPU plans use the TPU compiler when libtpu is installed (ahead of time for a topology: no TPU needed;
the real splash kernel). Otherwise, and for GPU plans, the CPU compiler stands in (CPU_STAND_IN_FLAGS, f16 for
bf16) with splash in Pallas interpret mode for flash attention: an estimate (launch/README.md compares the two).
`mft-jax plan` runs each plan in a fresh process (`python -m mft_jax.memplan --worker SPEC`) whose XLA_FLAGS hold
--xla_force_host_platform_device_count=N for the plan's N devices; each compile's peak RSS is measured alone.

    mft-jax plan --config configs/llama31-8b-math-mft.yaml --model llama3.1-8b --hardware 1xH100-80GB v5p-8
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from contextlib import ExitStack
from unittest import mock

import jax
import numpy as np

from mft_jax import attention as attention_lib
from mft_jax import config as config_lib
from mft_jax import model, optim, sharding, step as step_lib
from mft_jax.config import ConfigError, LlamaConfig
from mft_jax.state import StateLayout

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Hardware:
    devices: int  # JAX devices (a v5p chip is one device: its two TensorCores run as one megacore)
    memory_bytes: int  # per device
    platform: str  # gpu | tpu
    topology: str  # the TPU topology whose devices a TPU-compiled plan uses (for a GPU: a stand-in)


# H100 SXM 80 GB: 81,559 MiB as nvidia-smi reports memory.total (bench/gpu_check.sh caps an H200 at the same).
H100_80GB_BYTES = 81559 * 2**20
# TPU v5p: 95 GiB HBM per chip, 4 chips per host; v5p-N counts TensorCores, 2 per chip, so v5p-8 = 4 chips
# (topology 2x2x1). Source: cloud.google.com/tpu/docs/v5p (specifications and topology tables); JAX's
# pallas.tpu.ChipVersion table lists v5p with 2 TensorCores per chip and megacore, i.e. one JAX device per chip.
V5P_CHIP_BYTES = 95 * GiB
# JAX on GPU preallocates 75% of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION); plans above it need that raised.
GPU_DEFAULT_POOL_FRACTION = 0.75

HARDWARE = {
    "1xH100-80GB": Hardware(1, H100_80GB_BYTES, "gpu", "v5p:2x2x1"),  # topologies for --compiler tpu
    "8xH100": Hardware(8, H100_80GB_BYTES, "gpu", "v5p:2x2x2"),
    "v5p-8": Hardware(4, V5P_CHIP_BYTES, "tpu", "v5p:2x2x1"),
    "v5p-32": Hardware(16, V5P_CHIP_BYTES, "tpu", "v5p:2x2x4"),
    "v5p-128": Hardware(64, V5P_CHIP_BYTES, "tpu", "v5p:4x4x4"),
}

# Architectures by name, for plans without the checkpoint at hand (Hugging Face config.json values; rope scaling
# is left out: it changes no shape).
MODELS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, dtype="bfloat16"),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, dtype="bfloat16"),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, dtype="bfloat16"),
}

# The CPU compiler standing in for an accelerator's: no fp32 copies of 16-bit matmuls (see `_f16_for_bf16`), and
# no hoisting of loop-invariant ops out of the micro-batch loop, which keeps every layer's all-gathered weights
# alive through the whole step (the TPU compiler does not: its temp bytes for a 4-chip 8B step are below the
# 16 GB those weights take). Even so the CPU schedule keeps more alive than the TPU's (launch/README.md).
CPU_STAND_IN_FLAGS = "--xla_disable_hlo_passes=change-op-data-type,while-loop-invariant-code-motion"
BATCH_DTYPES = {"inputs": "int32", "targets": "int32", "loss_weights": "float32", "positions": "int32",
                "segment_ids": "int32"}
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
              "s64": 8, "u64": 8, "f64": 8, "c64": 8}


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


def _mesh(mesh_shape, compiler: str, num_devices: int, topology: str | None):
    if compiler == "tpu":
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=topology or "v5p:2x2x1", platform="tpu").devices
    else:
        devices = jax.devices("cpu")
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


def attention_for(run, target: str, compiler: str) -> tuple[str, str]:
    """(what the target runs, what the plan compiles): cuDNN flash attention does not compile off GPU, so its
    plans compile splash (the same saved residuals: q, k, v, out, logsumexp), in interpret mode on CPU."""
    runs = attention_lib.resolve(run.model.attention, target, run.data.packing)
    compiled = "splash" if runs in ("splash", "cudnn") else runs
    return runs, compiled if compiler == "tpu" or compiled == "xla" else f"{compiled} (interpret)"


def largest_temporaries(hlo_text: str, top: int = 5) -> list[dict]:
    """The largest arrays the optimized program materializes (per device), grouped by shape and source op:
    instructions outside fused computations, without parameters, tuples and bitcasts (views)."""
    fused = set(re.findall(r"\bcalls=%?([\w.\-]+)", hlo_text))
    groups: dict[tuple, list] = {}
    skip = False
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and " = " not in line:
            skip = head.group(1) in fused
            continue
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\(", line)
        if skip or not m or m.group(1) not in _HLO_BYTES or m.group(3) in (
                "parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
            continue
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        source = re.search(r'op_name="([^"]*)"', line)
        key = (f"{m.group(1)}{list(dims)}", m.group(3), source.group(1)[-120:] if source else "")
        groups.setdefault(key, [math.prod(dims) * _HLO_BYTES[m.group(1)], 0])[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"bytes": n, "count": c, "shape": k[0], "op": k[1], "source": k[2]} for k, (n, c) in ranked]


def _compile(run, cfg, mesh, compiler: str, out: dict):
    """The compiled step for abstract inputs; the inputs' analytic breakdown goes to out["analytic"] first."""
    layout, params, state, batch = abstract_inputs(run, cfg, mesh)  # outside the mesh: optax runs eager ops
    out["analytic"] = analytic_bytes(params, state, batch)
    with ExitStack() as stack:
        stack.enter_context(sharding.axis_rules())
        # A TPU topology's devices cannot run the eager ops of tracing (splash builds its mask arrays): the
        # abstract mesh gives the step its axes, and eager ops stay on the host.
        stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if compiler == "tpu"
                            else jax.set_mesh(mesh))
        if compiler == "tpu":  # the real kernel: splash picks interpret mode from the (CPU) default backend
            real = attention_lib.splash_attention
            stack.enter_context(mock.patch.object(attention_lib, "splash_attention",
                                                  lambda *a, **k: real(*a, **{**k, "interpret": False})))
        loss_sums = step_lib.make_loss(run, cfg, layout.method.forward_options)
        step_fn = step_lib.jit_train_step(layout, loss_sums, optim.lr_schedule(run.optim, 1000), 0, params)
        return step_fn.lower(params, state, batch).compile()


def plan(run_config, cfg: LlamaConfig, mesh_shape, num_devices: int, device_memory_bytes: int, remat: str, *,
         target: str = "gpu", compiler: str = "cpu", topology: str | None = None, top: int = 5) -> dict:
    """The memory plan of one training step (see the module docstring) on `num_devices` devices of
    `device_memory_bytes` each, laid out as `mesh_shape` (data, fsdp, tensor), with `model.remat = remat`.
    target: the platform the run will use (gpu | tpu), for its attention; compiler: cpu | tpu (a TPU topology
    name, e.g. v5p:2x2x1, for the latter). total = arguments + outputs - donated (aliased) + temporaries.
    `mft-jax plan` runs CPU plans with CPU_STAND_IN_FLAGS in XLA_FLAGS; a TPU plan over the chip's HBM does not
    compile: it comes back with `oom` (the compiler's message) and fits = False."""
    target_attention, compiled_attention = attention_for(run_config, target, compiler)
    run = _with_model(run_config, remat=remat, attention=compiled_attention.split()[0])
    if compiler == "cpu":
        run, cfg = _f16_for_bf16(run, cfg)
    micro = run.train.micro_batch_size or run.train.batch_size
    out = {"model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size},
           "mode": run.train.mode, "remat": remat, "mesh": list(mesh_shape), "devices": num_devices,
           "seq": run.data.max_seq_length, "rows_per_micro_batch": micro,
           "micro_batches": run.train.batch_size // micro, "loss_chunk": run.model.loss_chunk, "target": target,
           "compiler": compiler, "attention": {"target": target_attention, "compiled": compiled_attention},
           "device_memory": device_memory_bytes}
    start = time.perf_counter()
    try:
        compiled = _compile(run, cfg, _mesh(mesh_shape, compiler, num_devices, topology), compiler, out)
    except Exception as error:  # the TPU compiler refuses a program that does not fit its HBM
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return dict(out, oom=str(error).splitlines()[0][:400], fits=False, compiled=None, total=None,
                    compile_s=round(time.perf_counter() - start, 1))
    stats = compiled.memory_analysis()
    mem = {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
           "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}
    return dict(out, compiled=mem, **_totals(mem, device_memory_bytes),
                largest_temporaries=largest_temporaries(compiled.as_text(), top) if top else [],
                compile_s=round(time.perf_counter() - start, 1))


def _totals(mem: dict, device_memory_bytes: int) -> dict:
    total = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    return {"total": total, "fits": total <= device_memory_bytes}


def extrapolated_plan(run, cfg: LlamaConfig, layers: int, **kwargs) -> dict:
    """A plan for the full depth from compiles of `layers` and 2 * `layers` decoder layers: every compiled size
    is taken as linear in the layer count (each layer adds its weights, state and saved activations)."""
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
    return dict(large, model={**large["model"], "layers": cfg.num_hidden_layers}, compiled=mem, analytic=analytic,
                **_totals(mem, large["device_memory"]), extrapolated_from_layers=[layers, layers + span],
                compile_s=round(small["compile_s"] + large["compile_s"], 1))


# --------------------------------------------------------------------------------------------------------
# Command line: one worker process per plan
# --------------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="bytes per device of a training step on given hardware, compiled from "
                              "abstract inputs; flags plans that do not fit", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. data.max_seq_length=2048")
    p.add_argument("--model", choices=sorted(MODELS), help="architecture by name (default: model.path/config.json)")
    p.add_argument("--hardware", nargs="+", default=["1xH100-80GB", "v5p-8"], choices=list(HARDWARE))
    p.add_argument("--remat", nargs="+", default=["none", "dots", "full"], choices=["none", "dots", "full"])
    p.add_argument("--per-device-batch", type=int, default=None, metavar="ROWS",
                   help="rows per device per micro-batch: train.micro_batch_size = ROWS x the plan's data-parallel "
                        "size (default: the config's micro_batch_size, which must then suit every plan's mesh)")
    p.add_argument("--mesh", default=None, metavar="D,F,T", help="data,fsdp,tensor sizes for every plan (default: "
                   "the config's mesh where it fits the device count, else all fsdp)")
    p.add_argument("--memory-gib", type=float, default=None, help="per-device memory instead of the hardware's")
    p.add_argument("--compiler", choices=["auto", "cpu", "tpu"], default="auto",
                   help="auto: the TPU compiler for TPU plans when libtpu is installed, else the CPU one")
    p.add_argument("--layers", type=int, default=None, metavar="K", help="compile K and 2K decoder layers and "
                   "extrapolate to the full depth (a 70B step compiles slowly on CPU)")
    p.add_argument("--top", type=int, default=3, help="largest temporaries to list per plan")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per plan before its worker is stopped")
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


def _compiler(choice: str, hardware: Hardware) -> str:
    """auto: the TPU compiler for TPU plans when libtpu is installed; the CPU one otherwise (GPU plans: --compiler
    tpu compiles them with the TPU compiler instead, a bf16-native stand-in with the same flash-style attention)."""
    if choice == "auto":
        return "tpu" if hardware.platform == "tpu" and importlib.util.find_spec("libtpu") else "cpu"
    if choice == "tpu" and not importlib.util.find_spec("libtpu"):
        raise ConfigError("--compiler tpu needs libtpu (pip install libtpu, the version jax[tpu] pins)")
    return choice


def worker_main(spec_json: str) -> None:
    """One plan in this process (started by `run` with the device count set): prints one JSON line."""
    spec = json.loads(spec_json)
    run = config_lib.from_dict(spec["run"], verbose=False)
    cfg = LlamaConfig(**spec["cfg"])
    layers = spec.get("layers")
    result = extrapolated_plan(run, cfg, layers, **spec["kwargs"]) if layers else plan(run, cfg, **spec["kwargs"])
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2)
    print("PLAN " + json.dumps(result), flush=True)


def _run_worker(spec: dict, devices: int, timeout: float) -> dict:
    """Runs one plan in a fresh process with `devices` host devices (and, for the CPU compiler, its stand-in
    flags); the plan's dict, or {"error": ...}."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if spec["kwargs"]["compiler"] == "cpu":
        flags += " " + CPU_STAND_IN_FLAGS
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    try:
        proc = subprocess.run([sys.executable, "-m", "mft_jax.memplan", "--worker", json.dumps(spec)], env=env,
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


def _header(name: str, note: str, p: dict) -> list[str]:
    a = p.get("analytic", {})
    stand_in = "" if p["compiler"] == p["target"] else f" standing in for the {p['target']}'s (an estimate)"
    extra = f"; extrapolated from {p['extrapolated_from_layers']} layers" if "extrapolated_from_layers" in p else ""
    return [f"{name}: {p['devices']} x {p['device_memory'] / GiB:.2f} GiB, mesh (data, fsdp, tensor) {tuple(p['mesh'])}"
            f"{' (' + note + ')' if note else ''}; {p['compiler']} compiler{stand_in}; attention "
            f"{p['attention']['target']} (compiled: {p['attention']['compiled']}){extra}",
            f"  {p['model']['layers']} layers, {p['mode']}, seq {p['seq']}, {p['rows_per_micro_batch']} rows per "
            f"micro-batch x {p['micro_batches']}, loss_chunk {p['loss_chunk']}",
            "  inputs per device (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in a.items() if k != "step")
            + " (grad_accum: part of temp)",
            "  remat   arguments  out-aliased     temp    total  fits  compile_s  rss_gib"]


def format_plans(name: str, hardware: Hardware, note: str, plans: list[dict]) -> list[str]:
    """The table of one hardware's plans (one row per remat policy), then their largest temporaries."""
    ok = [p for p in plans if "error" not in p]
    lines = _header(name, note, ok[0]) if ok else [f"{name}:"]
    for p in plans:
        if "error" in p or p.get("oom"):
            lines.append(f"  {p['remat']:<6}  {'failed: ' + p['error'] if 'error' in p else 'NO: ' + p['oom']}")
            continue
        c = p["compiled"]
        pool = hardware.platform == "gpu" and p["total"] > GPU_DEFAULT_POOL_FRACTION * p["device_memory"]
        fits = ("yes*" if pool else "yes") if p["fits"] else "NO"
        lines.append(f"  {p['remat']:<6} {_gib(c['argument'])}      {_gib(c['output'] - c['alias'])}  "
                     f"{_gib(c['temp'])}  {_gib(p['total'])}  {fits:<5} {p['compile_s']:9.1f}  "
                     f"{p['peak_rss_gib']:7.2f}")
    for p in ok:
        for t in p.get("largest_temporaries", []):
            lines.append(f"  largest ({p['remat']}): {t['bytes'] / GiB:.2f} GiB {t['shape']} x{t['count']} {t['op']} "
                         f"{t['source'][-80:]}")
    if any("  yes* " in line for line in lines):
        lines.append("  yes*: above JAX's default GPU pool (75%): set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95")
    return lines


def run(args) -> int:
    """`mft-jax plan`: one worker per (hardware, remat); prints the table (or JSON). 1 if a plan failed."""
    run_cfg = config_lib.load(args.config, args.set or [], verbose=False)
    cfg = _model_config(run_cfg, args.model)
    failed = False
    for name in args.hardware:
        hardware = HARDWARE[name]
        memory = int(args.memory_gib * GiB) if args.memory_gib else hardware.memory_bytes
        mesh_shape, note = mesh_for(run_cfg, hardware.devices, args.mesh)
        planned = _with_batch(run_cfg, mesh_shape, args.per_device_batch)
        compiler = _compiler(args.compiler, hardware)
        plans = []
        for remat in args.remat:
            kwargs = dict(mesh_shape=list(mesh_shape), num_devices=hardware.devices, device_memory_bytes=memory,
                          remat=remat, target=hardware.platform, compiler=compiler, topology=hardware.topology,
                          top=args.top)
            spec = {"run": planned.to_dict(), "cfg": dataclasses.asdict(cfg), "kwargs": kwargs, "layers": args.layers}
            result = _run_worker(spec, hardware.devices if compiler == "cpu" else 1, args.timeout)
            plans.append(dict(result, remat=remat, hardware=name))
            failed |= "error" in result
            if args.json:
                print(json.dumps(plans[-1]), flush=True)
        if not args.json:
            print("\n".join(format_plans(name, hardware, note, plans)), flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    """`python -m mft_jax.memplan plan ...` (what `mft-jax plan` runs), or one worker: `--worker SPEC_JSON`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m mft_jax.memplan")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
