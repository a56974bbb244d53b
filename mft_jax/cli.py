"""`mft-jax` command line: train, export, apply-masks, eval, generate, convert, data, demo."""

from __future__ import annotations

import argparse
import sys


def _convert(args):
    from mft_jax import convert

    if bool(args.from_hf) == bool(args.to_hf):
        sys.exit("mft-jax convert: give exactly one of --from-hf HF_DIR or --to-hf ORBAX_DIR")
    if args.from_hf:
        cfg, params = convert.load_hf(args.from_hf, dtype=args.dtype)
        out = convert.save_orbax(cfg, params, args.out)
        print(f"wrote orbax params checkpoint {out} ({cfg.num_hidden_layers} layers)")
    else:
        cfg, params = convert.load_orbax(args.to_hf)
        out = convert.save_hf(cfg, params, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                              max_shard_size=args.max_shard_size)
        print(f"wrote Hugging Face checkpoint {out}")


def _train(args):
    from mft_jax import config, train

    run = config.load(args.config, args.set or [])
    summary = train.train(run)
    last = summary.get("last", {})
    print(f"run {summary['run_dir']}: step {summary['final_step']}/{summary['total_steps']}, "
          f"loss {last.get('loss', float('nan')):.4f}" + (f", dev loss {summary['dev_loss']:.4f}"
                                                           if summary.get("dev_loss") is not None else ""))


def _export(args):
    import json

    from mft_jax import export

    result = export.export_run(args.run, args.out, step=args.step, baseline=args.baseline, seed=args.seed)
    print(json.dumps(result, indent=2))


def _apply_masks(args):
    from mft_jax import export

    out = export.apply_masks_file(args.base, args.masks, args.out, dtype=args.dtype)
    print(f"wrote masked Hugging Face checkpoint {out}")


def _demo(args):
    from mft_jax import demo

    demo.run(args.out, seeds=args.seeds, config_path=args.config, overrides=args.set or [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mft-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="Hugging Face checkpoint <-> orbax params checkpoint")
    p.add_argument("--from-hf", help="HF checkpoint directory to convert to orbax")
    p.add_argument("--to-hf", help="orbax params checkpoint (from --from-hf) to convert to HF")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default=None, help="storage dtype (float32, bfloat16, float16); default: as stored")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy into a HF output")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=_convert)

    p = sub.add_parser("train", help="train masks (MFT) or weights (FFT) from a YAML run config")
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.max_steps=10")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="masks file (bit-packed) + dense masked HF model from a run")
    p.add_argument("run", help="run directory (or, with --baseline, a run config YAML)")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--baseline", choices=["random", "magnitude"], default=None,
                   help="export a baseline mask at the run's layers and keep ratio instead of the learned one")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.set_defaults(func=_export)

    p = sub.add_parser("apply-masks", help="rebuild a masked HF model from a base checkpoint and a masks file")
    p.add_argument("--base", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=_apply_masks)

    p = sub.add_parser("demo", help="the paper's protocol on a tiny model and a synthetic task, offline")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1; report mean and std")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override, e.g. fft.steps=500")
    p.set_defaults(func=_demo)

    from mft_jax.data import add_data_commands

    add_data_commands(sub)
    from mft_jax.evaluate import add_eval_commands

    add_eval_commands(sub)
    return parser


def main(argv=None):
    from mft_jax import distributed
    from mft_jax.config import ConfigError
    from mft_jax.convert import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        distributed.initialize()  # joins the other processes of a multi-host run before any JAX device use
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"mft-jax {args.command}: error: {e}")


if __name__ == "__main__":
    main()
