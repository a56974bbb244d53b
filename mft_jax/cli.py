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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
