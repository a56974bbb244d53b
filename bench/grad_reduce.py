"""Gradient reduction on fsdp meshes: how close each choice's summed gradient is to the exact one, on this CPU.

The MFT step's gradient of the view (the masked kernels), summed over the micro-batches of one optimizer step
(`step.micro_batch_grads`, what the step feeds the straight-through estimator), is computed on a random model
in bf16 for each (mesh, train.grad_reduce) and compared with the same sum computed in fp32 on one device (the
reference). 8 simulated CPU devices; every run sees the same batch and weights.

    python bench/grad_reduce.py [--micro 8] [--layers 4]
Prints one JSON line per (mesh, grad_reduce): relative L2 error and max relative error against the reference.
Bytes over the interconnect and memory of the same choices come from `mft-jax plan` (launch/README.md).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mft_jax import config, model, sharding, step as step_lib  # noqa: E402
from mft_jax.state import StateLayout  # noqa: E402

CFG = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2)


def view_grads(cfg, params32, compute_dtype: str, mesh_shape, grad_reduce: str, batch, masked: list[int]):
    """The summed view gradient (fp32, gathered to the host) for one mesh and choice."""
    run = config.from_dict({
        "model": {"path": "(random)", "compute_dtype": compute_dtype, "dtype": compute_dtype, "attention": "xla"},
        "mask": {"masked_layers": masked}, "data": {"max_seq_length": batch["inputs"].shape[-1]},
        "train": {"batch_size": batch["inputs"].shape[0] * batch["inputs"].shape[1],
                  "micro_batch_size": batch["inputs"].shape[1], "grad_reduce": grad_reduce},
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape))}, verbose=False)
    cfg = config.LlamaConfig(**{**cfg.__dict__, "dtype": compute_dtype})
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(run.mesh, devices)
    shapes = model.param_shapes(cfg, compute_dtype)
    param_shardings = sharding.param_shardings(cfg, mesh, shapes)
    params = jax.device_put(jax.tree.map(lambda x: x.astype(compute_dtype), params32), param_shardings)
    layout = StateLayout.for_run(run, cfg, mesh, param_shardings, total_steps=10)
    state = layout.init(params, jax.random.key(1))
    loss_sums = step_lib.make_loss(run, cfg, layout)
    reduce = run.train.grad_reduce

    def grads(params, state, batch):
        view = step_lib.reduction_view(layout.method.view(params, state.trainable, state.derived), reduce)
        return step_lib.micro_batch_grads(layout.method, loss_sums, params, view, batch, jax.random.key(0))[0]

    with sharding.axis_rules(), jax.set_mesh(mesh):
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        out = jax.jit(grads, out_shardings=layout.shardings(shapes).trainable)(params, state, batch)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), out), reduce


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--rows", type=int, default=8, help="rows per micro-batch (global)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if args.layers < 3:
        parser.error("--layers must be >= 3 (layers 1 and 2 are masked)")
    cfg = config.LlamaConfig(**CFG, num_hidden_layers=args.layers)
    params32 = model.init_params(cfg, jax.random.key(0), "float32")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.micro, args.rows, args.seq + 1)).astype(np.int32)
    shape = (args.micro, args.rows, args.seq)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_weights": np.ones(shape, np.float32),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape),
             "segment_ids": np.ones(shape, np.int32)}
    masked = [1, 2]
    reference, _ = view_grads(cfg, params32, "float32", (1, 1, 1), "compute", batch, masked)
    ref = np.concatenate([x.ravel() for x in jax.tree.leaves(reference)])
    for mesh_shape in [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1)]:
        for choice in ("compute", "fp32"):
            got, reduce = view_grads(cfg, params32, "bfloat16", mesh_shape, choice, batch, masked)
            flat = np.concatenate([x.ravel() for x in jax.tree.leaves(got)])
            print(json.dumps({"mesh": list(mesh_shape), "grad_reduce": reduce,
                              "rel_l2_error": float(np.linalg.norm(flat - ref) / np.linalg.norm(ref)),
                              "max_abs_error_over_max": float(np.max(np.abs(flat - ref)) / np.max(np.abs(ref)))}),
                  flush=True)


if __name__ == "__main__":
    main()
