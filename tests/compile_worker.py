"""Compiles small training steps for real accelerator targets with no device present, in its own process.

Run by tests/test_compile_targets.py as `python tests/compile_worker.py CASES_JSON` in the environment
`mft_jax.targets.compiler_env()` gives (libtpu and the CUDA plugin on the path): each case is compiled directly
(`step.jit_train_step` on ShapeDtypeStructs built here, not through `memplan`) and summarized from the optimized
HLO (`mft_jax.hlo`). Prints one JSON line per case.

MFT_JAX_BREAK (for showing that the tests catch regressions; never set in CI):
  interpret  the splash kernel is compiled in Pallas interpret mode, as if the target's platform were not read;
  unshard    MFT's scores, masks and Adam moments are replicated instead of sharded like their kernels.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from mft_jax import attention, config, hlo, methods, model, optim, sharding, step, targets
from mft_jax.state import StateLayout

TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, dtype="bfloat16")


def _break(kind: str):
    if kind == "interpret":
        resolve = attention.resolve
        attention.resolve = lambda name, backend, packing: (
            "splash_interpret" if resolve(name, backend, packing) == "splash" else resolve(name, backend, packing))
    elif kind == "unshard":
        methods.MFT.shardings = lambda self, param_shardings, mesh: jax.tree.map(
            lambda s: NamedSharding(mesh, P()), methods.subtree(param_shardings, self.paths))


def compile_case(case: dict) -> dict:
    cfg = config.LlamaConfig(**TINY)
    run = config.from_dict({
        "model": {"path": "(random)", "dtype": "bfloat16", "compute_dtype": "bfloat16", "attention": "auto",
                  "remat": case.get("remat", "dots_attention")},
        "mask": {"masked_layers": [1, 2]}, "lora": {"rank": 8},
        "data": {"max_seq_length": 256},
        "train": {"mode": case["mode"], "batch_size": case["rows"] * 2, "micro_batch_size": case["rows"],
                  "grad_reduce": case.get("grad_reduce", "compute")}}, verbose=False)
    target = targets.get(case["hardware"])
    devices = targets.compile_devices(target)[:target.devices]
    mesh = sharding.make_mesh(config.MeshConfig(*case["mesh"]), devices)
    shapes = model.param_shapes(cfg, "bfloat16")
    param_shardings = sharding.param_shardings(cfg, mesh, shapes)
    layout = StateLayout.for_run(run, cfg, mesh, param_shardings, total_steps=10)
    abstract = lambda tree, shards: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shards)
    params = abstract(shapes, param_shardings)
    state = abstract(layout.shapes(shapes), layout.shardings(shapes))
    rows = (2, case["rows"], 256)
    batch = {k: jax.ShapeDtypeStruct(rows, d, sharding=sharding.batch_sharding(mesh))
             for k, d in (("inputs", "int32"), ("targets", "int32"), ("loss_weights", "float32"),
                          ("positions", "int32"), ("segment_ids", "int32"))}
    with sharding.axis_rules(), jax.sharding.use_abstract_mesh(mesh.abstract_mesh), (
            targets.deviceless_cudnn(devices[0]) if target.platform == "gpu" else contextlib.nullcontext()):
        loss = step.make_loss(run, cfg, layout)
        fn = step.jit_train_step(layout, loss, optim.lr_schedule(run.optim, 10), 0, params, run.train.grad_reduce)
        compiled = fn.lower(params, state, batch).compile()
    stats = compiled.memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    summary = hlo.summarize(compiled.as_text())
    trained = [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in jax.tree.leaves(layout.shapes(shapes).trainable)]
    return dict(case, device_kind=devices[0].device_kind, total=int(total), temp=int(stats.temp_size_in_bytes),
                trained=trained, **summary.to_dict())


def main():
    if os.environ.get("MFT_JAX_BREAK"):
        _break(os.environ["MFT_JAX_BREAK"])
    for case in json.loads(sys.argv[1]):
        print("CASE " + json.dumps(compile_case(case)), flush=True)


if __name__ == "__main__":
    main()
