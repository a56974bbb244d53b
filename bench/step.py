"""Times the MFT training step against its frozen floor, on random weights of a given shape (no download).

frozen floor: the same forward and backward with weight gradients for the masked kernels, and no mask or
optimizer work. MFT step: masks (carried), W * m, forward/backward, straight-through gradient, AdamW on
the fp32 scores, exact top-k of the new scores, mask-flip and kept-fraction metrics.

    python bench/step.py --preset tiny                          # CPU
    python bench/step.py --preset llama2-7b --seq 4096 --layers 4 5 6 7   # GPU
Prints one JSON line per variant (tokens/s, ms/step, peak memory) and the MFT / floor ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mft_jax import config, data, masking, model, optim, sharding, step as step_lib
from mft_jax.studies import memplan
from mft_jax.state import StateLayout
from mft_jax.trees import merge, subtree

PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2),
    # 58M parameters: the CPU shapes the issue tracker's step figures were measured on (seq 256, layers 4-7)
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        rope_theta=500000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


# Dense bf16 peak of one chip, in TFLOP/s, by device kind (spec sheets; SXM parts where both exist).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS.items():  # longest names first where one contains another
        if name.lower() in device_kind.lower():
            return peak
    return None


def _time(fn, *args, iters=5):
    """Seconds per call of one timed block (after the caller's warm-up)."""
    start = time.perf_counter()
    out = None
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def _peak_bytes(compiled) -> int | None:
    try:
        stats = compiled.memory_analysis()
        return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
                   - stats.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def frozen_floor_step(loss_sums, paths, params, batch_MxBxL):
    """The same forward and backward with weight gradients for the masked kernels, no mask or optimizer
    work: the floor the MFT step is measured against."""
    view = subtree(params, paths)

    def accumulate(grad_acc, micro):
        grad = jax.grad(lambda v: loss_sums(merge(params, v), micro)[0])(view)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grad), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), view)
    return jax.lax.scan(accumulate, zeros, batch_MxBxL)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (global)")
    parser.add_argument("--micro", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7])
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--dtype", default=None, help="weights and compute dtype (default: bf16 on accelerators, "
                                                      "fp32 on CPU)")
    parser.add_argument("--attention", default="auto", choices=config.ATTENTION_CHOICES)
    parser.add_argument("--remat", default="none", choices=config.REMAT_CHOICES)
    parser.add_argument("--loss-chunk", type=int, default=0, help="model.loss_chunk: head + loss this many "
                                                                  "positions at a time (0 = off)")
    parser.add_argument("--iters", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the best of each is kept")
    parser.add_argument("--variants", default="frozen,mft", help="comma-separated: frozen (the floor), mft")
    parser.add_argument("--topk-width", type=int, default=None, help="thresholds per pass of the mask search "
                                                                    "(default: masking._search_width())")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of one chip, if the device "
                                                                       "kind is not in PEAK_BF16_TFLOPS")
    args = parser.parse_args()

    if args.topk_width is not None:  # every mask search of the step uses this width
        masking._search_width = lambda: args.topk_width
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    cfg = config.LlamaConfig(**PRESETS[args.preset], max_position_embeddings=max(args.seq, 4096), dtype=dtype)
    run = config.from_dict({
        "model": {"path": "(random)", "compute_dtype": dtype, "attention": args.attention, "remat": args.remat,
                  "loss_chunk": args.loss_chunk},
        "mask": {"masked_layers": args.layers, "keep_attn": args.keep, "keep_mlp": args.keep},
        "train": {"batch_size": args.batch * args.micro, "micro_batch_size": args.batch},
    }, verbose=False)
    run.mask.check_against(cfg)
    mesh = sharding.make_mesh(run.mesh)
    shapes = model.param_shapes(cfg, dtype)
    param_shardings = sharding.param_shardings(cfg, mesh, shapes)
    params = jax.jit(lambda k: model.init_params(cfg, k, dtype), out_shardings=param_shardings)(jax.random.key(0))
    layout = StateLayout.for_run(run, cfg, mesh, param_shardings, total_steps=1000)
    loss_sums = step_lib.make_loss(run, cfg, layout)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.micro, args.batch, args.seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "loss_weights": np.ones((args.micro, args.batch, args.seq), np.float32),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.micro, args.batch, args.seq)),
             "segment_ids": np.ones((args.micro, args.batch, args.seq), np.int32)}
    tokens_per_step = args.micro * args.batch * args.seq
    variants = args.variants.split(",")
    if not variants or set(variants) - {"frozen", "mft"}:
        parser.error(f"--variants {args.variants!r}: give frozen, mft or frozen,mft")
    fns, peaks = {}, {}
    with sharding.axis_rules(), jax.set_mesh(mesh):
        batch = data.to_global_batch(batch, sharding.batch_sharding(mesh))
        if "frozen" in variants:
            floor = jax.jit(functools.partial(frozen_floor_step, loss_sums, masking.masked_paths(cfg, run.mask)),
                            in_shardings=(param_shardings, sharding.batch_sharding(mesh)))
            fns["frozen"] = floor.lower(params, batch).compile()
            peaks["frozen"] = _peak_bytes(fns["frozen"])
        if "mft" in variants:
            state = layout.init(params, jax.random.key(0))
            step_fn = step_lib.jit_train_step(layout, loss_sums, optim.lr_schedule(run.optim, 1000), 0, params,
                                              run.train.grad_reduce)
            step_compiled = step_fn.lower(params, state, batch).compile()
            peaks["mft"] = _peak_bytes(step_compiled)

            def run_step(params, batch):  # the state is donated, so thread it through
                nonlocal state
                state, metrics = step_compiled(params, state, batch)
                return metrics["loss"]
            fns["mft"] = run_step

        # Alternate the variants in rounds and keep each one's best round, so that load from other processes
        # (a shared CPU) hits all alike rather than whichever ran last.
        times = {name: [] for name in fns}
        for fn in fns.values():
            jax.block_until_ready(fn(params, batch))  # warm-up
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(_time(fn, params, batch, iters=args.iters))
    results = {name: (min(times[name]), peaks[name]) for name in fns}
    try:  # what the allocator really held at its peak, for the whole process (GPU and TPU report it)
        device_peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30
    except Exception:
        device_peak = None

    n_params = model.count_params(cfg)
    # the step's unavoidable work (memplan.necessary_flops, per token), for every token of the step
    per_token = memplan.necessary_flops(cfg, args.seq, layout.shapes(shapes).trainable)["per_token"]
    flops = per_token * args.batch * args.seq * args.micro
    device_kind = jax.devices()[0].device_kind
    peak_chip = args.peak_tflops or peak_tflops(device_kind)
    for name, (seconds, peak) in results.items():
        share = None if peak_chip is None else flops / seconds / (peak_chip * 1e12 * len(jax.devices()))
        print(json.dumps({
            "variant": name, "preset": args.preset, "backend": jax.default_backend(), "device": device_kind,
            "devices": len(jax.devices()), "seq": args.seq, "batch": args.batch, "micro": args.micro,
            "layers": args.layers, "dtype": dtype, "remat": args.remat, "attention": args.attention,
            "loss_chunk": args.loss_chunk,
            "topk_width": masking._search_width(), "params": n_params,
            "tokens_per_s": round(tokens_per_step / seconds, 1), "ms_per_step": round(seconds * 1e3, 2),
            "tflops_per_s": round(flops / seconds / 1e12, 2), "peak_bf16_tflops": peak_chip,
            "necessary_flops_share_of_peak": None if share is None else round(share, 4),
            "peak_memory_gb": None if peak is None else round(peak / 2**30, 3),
            "process_peak_gb": None if device_peak is None else round(device_peak, 2)}))
    if len(results) < 2:
        return
    ratio = results["frozen"][0] / results["mft"][0]
    print(json.dumps({"mft_over_floor_throughput": round(ratio, 4),
                      "mft_overhead_pct": round((results["mft"][0] / results["frozen"][0] - 1) * 100, 2)}))


if __name__ == "__main__":
    main()
