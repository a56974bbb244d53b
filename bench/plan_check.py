"""Checks `mft-jax plan` against a direct compile of the same training step, for a real compiler target.

The direct compile builds the step's inputs here (ShapeDtypeStructs from the model's shapes and the run's state
layout, not memplan's) and compiles `step.jit_train_step` for the target's compile-only devices; the plan runs
as a user runs it, in its own worker process. Prints one JSON line: both totals, temporaries and HLO flops, and
their relative differences.

    python bench/plan_check.py --config configs/llama31-8b-math-mft.yaml --model llama3.1-8b \
        --hardware 1xH100-80GB --per-device-batch 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

import jax

from mft_jax import config, hlo, model, optim, sharding, step, targets
from mft_jax.studies import memplan
from mft_jax.state import StateLayout


def direct_compile(run, cfg: config.LlamaConfig, hardware: str, mesh_shape) -> dict:
    """The step of `run` compiled for `hardware` (its real compiler) on `mesh_shape`: memory and HLO summary."""
    target = targets.get(hardware)
    devices = targets.compile_devices(target)[:target.devices]
    mesh = sharding.make_mesh(config.MeshConfig(*mesh_shape), devices)
    shapes = model.param_shapes(cfg, run.model.dtype)
    param_shardings = sharding.param_shardings(cfg, mesh, shapes)
    layout = StateLayout.for_run(run, cfg, mesh, param_shardings, total_steps=10)
    abstract = lambda tree, shards: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shards)
    params = abstract(shapes, param_shardings)
    state = abstract(layout.shapes(shapes), layout.shardings(shapes))
    micro = run.train.micro_batch_size or run.train.batch_size
    rows = (run.train.batch_size // micro, micro, run.data.max_seq_length)
    batch = {k: jax.ShapeDtypeStruct(rows, d, sharding=sharding.batch_sharding(mesh))
             for k, d in (("inputs", "int32"), ("targets", "int32"), ("loss_weights", "float32"),
                          ("positions", "int32"), ("segment_ids", "int32"))}
    cudnn = targets.deviceless_cudnn(devices[0]) if target.platform == "gpu" else contextlib.nullcontext()
    with sharding.axis_rules(), jax.sharding.use_abstract_mesh(mesh.abstract_mesh), cudnn:
        loss = step.make_loss(run, cfg, layout)
        fn = step.jit_train_step(layout, loss, optim.lr_schedule(run.optim, 10), 0, params, run.train.grad_reduce)
        compiled = fn.lower(params, state, batch).compile()
    mem = memplan.memory(compiled)
    return dict(total=mem["total"], temp=mem["temp"], device_kind=devices[0].device_kind,
                trained=[{"shape": list(x.shape), "dtype": str(x.dtype)}
                         for x in jax.tree.leaves(layout.shapes(shapes).trainable)],
                **hlo.summarize(compiled.as_text()).to_dict())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", required=True, choices=sorted(memplan.MODELS))
    parser.add_argument("--hardware", required=True)
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--mesh", default=None, metavar="D,F,T")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    if "MFT_JAX_PLAN_CHECK" not in os.environ:  # this process must find the compilers: start it again so
        env = dict(targets.compiler_env(), MFT_JAX_PLAN_CHECK="1")
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    target = targets.get(args.hardware)
    run = config.load(args.config, args.set, verbose=False)
    mesh_shape, _ = memplan.mesh_for(run, target.devices, args.mesh)
    run = memplan._with_batch(run, mesh_shape, args.per_device_batch)
    cfg = config.LlamaConfig(**memplan.MODELS[args.model])
    direct = direct_compile(run, cfg, args.hardware, mesh_shape)
    command = [sys.executable, "-m", "mft_jax.studies.memplan", "plan", "--json", "--config", args.config, "--model",
               args.model, "--hardware", args.hardware, "--per-device-batch", str(args.per_device_batch),
               "--mesh", ",".join(map(str, mesh_shape)), "--compiler", "real", "--remat", run.model.remat,
               *[f"--set={s}" for s in args.set]]
    plan = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    rel = lambda a, b: abs(a - b) / max(abs(b), 1)  # noqa: E731
    print(json.dumps({
        "hardware": args.hardware, "compiler": plan["compiler"], "device_kind": direct["device_kind"],
        "plan_total_gib": plan["total"] / 2**30, "direct_total_gib": direct["total"] / 2**30,
        "total_rel_diff": rel(plan["total"], direct["total"]), "temp_rel_diff": rel(plan["compiled"]["temp"],
                                                                                       direct["temp"]),
        "plan_flops": plan["work"]["flops"], "direct_flops": direct["flops"],
        "flops_rel_diff": rel(plan["work"]["flops"], direct["flops"]),
        "attention": plan["work"]["attention"], "kernels_per_micro_batch": plan["work"][
            "attention_kernels_per_micro_batch"]}))


if __name__ == "__main__":
    main()
