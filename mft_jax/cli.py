"""`mft-jax` command line: train, export, apply-masks, eval, generate, convert, data, demo, sweep, landscape, plan.

Every user error ends the command with one line on stderr, `mft-jax COMMAND: error: MESSAGE`, naming the
input and the fix, and no traceback. Exit codes: 2 for usage errors (a bad flag, flag combination or config
key/value: `ConfigError`; argparse's own errors too), 1 for bad inputs and refused outputs (data, model
files, checkpoints, output directories, missing files, permissions, a non-finite loss), 130 on Ctrl-C.
An unexpected exception is one line as well (its type and message). MFT_JAX_DEBUG=1 shows the traceback.

Writers (`convert`, `apply-masks`, `export`, `demo`) never destroy what the user had (`mft_jax.outputs`):
--out is checked before anything loads, written as a new directory and renamed into place; an existing one is
replaced only if mft-jax wrote it or with --overwrite, and never when it is, holds or lies inside an input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from mft_jax import config, convert, distributed, export, outputs, storage, train
from mft_jax.demo import protocol as demo
from mft_jax.studies import landscape, memplan, sweep
from mft_jax.config import ConfigError
from mft_jax.data import DataError, add_data_commands
from mft_jax.evaluate import add_eval_commands

EXIT_USAGE, EXIT_INPUT, EXIT_INTERRUPTED = 2, 1, 130
_OVERWRITE_HELP = ("replace --out even if mft-jax did not write it (never an input, a directory holding one, "
                   "the current, home or root directory)")


def _convert(args):
    if bool(args.from_hf) == bool(args.to_hf):
        raise ConfigError("give exactly one of --from-hf HF_DIR or --to-hf ORBAX_DIR")
    if args.from_hf and args.tokenizer:
        raise ConfigError("--tokenizer applies to --to-hf only (an orbax params checkpoint holds no tokenizer)")
    source = args.from_hf or args.to_hf
    inputs = [source, args.tokenizer]
    outputs.check_target(args.out, inputs=inputs, overwrite=args.overwrite)
    convert.parse_size(args.max_shard_size)
    if args.tokenizer is not None and not storage.path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such directory")
    if args.from_hf:
        cfg, params = convert.load_hf(args.from_hf, dtype=args.dtype)  # headers and shapes checked first
        out = convert.save_orbax(cfg, params, args.out, overwrite=args.overwrite, inputs=inputs,
                                 command="convert --from-hf")
        print(f"wrote orbax params checkpoint {out} ({cfg.num_hidden_layers} layers)")
    else:
        cfg, params = convert.load_orbax(args.to_hf)
        out = convert.save_hf(cfg, params, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                              max_shard_size=args.max_shard_size, overwrite=args.overwrite, inputs=inputs,
                              command="convert --to-hf")
        print(f"wrote Hugging Face checkpoint {out}")


def _train(args):
    run = config.load(args.config, args.set or [])
    summary = train.train(run, extend=getattr(args, "extend", False))
    if summary.get("already_finished"):
        return
    last = summary.get("last", {})
    print(f"run {summary['run_dir']}: step {summary['final_step']}/{summary['total_steps']}, "
          f"loss {last.get('loss', float('nan')):.4f}" + (f", dev loss {summary['dev_loss']:.4f}"
                                                           if summary.get("dev_loss") is not None else ""))


def _export(args):
    if args.baseline is None and storage.path(args.run).is_file():
        raise ConfigError(f"{args.run} is a file: export takes a run directory (a run config YAML only with "
                          f"--baseline)")
    if args.baseline is not None and args.step is not None:
        raise ConfigError("--step selects a checkpoint of a trained run; a --baseline export has none")
    if args.calibration_tokens is not None and args.baseline != "wanda":
        raise ConfigError("--calibration-tokens sets the Wanda baseline's calibration data; use it with "
                          "--baseline wanda")
    result = export.export_run(args.run, args.out, step=args.step, baseline=args.baseline, seed=args.seed,
                               overwrite=args.overwrite, calibration_tokens=args.calibration_tokens)
    print(json.dumps(result, indent=2))


def _apply_masks(args):
    out = export.apply_masks_file(args.base, args.masks, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                  allow_other_base=args.allow_other_base)
    print(f"wrote masked Hugging Face checkpoint {out}")


def _demo(args):
    demo.run(args.out, seeds=args.seeds, config_path=args.config, overrides=args.set or [], overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mft-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ["float32", "bfloat16", "float16"]

    p = sub.add_parser("convert", help="Hugging Face checkpoint <-> orbax params checkpoint")
    p.add_argument("--from-hf", help="HF checkpoint directory to convert to orbax")
    p.add_argument("--to-hf", help="orbax params checkpoint (from --from-hf) to convert to HF")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier output of mft-jax)")
    p.add_argument("--dtype", default=None, choices=dtypes, help="storage dtype; default: as stored")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy into a HF output")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.set_defaults(func=_convert)

    p = sub.add_parser("train", help="train masks (MFT) or weights (FFT) from a YAML run config")
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.max_steps=10")
    p.add_argument("--extend", action="store_true",
                   help="allow raising train.max_steps / train.epochs of an existing run; the change is recorded "
                        "in metrics.jsonl")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="masks file (bit-packed) + dense masked HF model from a run")
    p.add_argument("run", help="run directory (or, with --baseline, a run config YAML)")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier output of mft-jax; it may "
                                                "lie inside the run directory, e.g. RUN/export)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--baseline", choices=["random", "magnitude", "wanda"], default=None,
                   help="export a baseline mask at the run's layers and keep ratio instead of the learned one")
    p.add_argument("--calibration-tokens", type=int, default=None,
                   help="wanda: non-padding training tokens whose input norms score the weights (default "
                        "262144 = 128 x 2048, as Wanda)")
    p.add_argument("--seed", type=int, default=42, help="seed of the random baseline (default 42, the reference's)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.set_defaults(func=_export)

    p = sub.add_parser("apply-masks", help="rebuild a masked HF model from a base checkpoint and a masks file")
    p.add_argument("--base", required=True, help="the HF checkpoint the masks were trained on")
    p.add_argument("--masks", required=True, help="masks.safetensors written by `mft-jax export`")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier output of mft-jax)")
    p.add_argument("--dtype", default=None, choices=dtypes, help="storage dtype; default: the base's")
    p.add_argument("--allow-other-base", action="store_true", help="apply masks learned on other weights of the "
                   "same shapes (the masks file records its base's fingerprint)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.set_defaults(func=_apply_masks)

    p = sub.add_parser("demo", help="the paper's protocol on a tiny model and a synthetic task, offline")
    p.add_argument("--out", default="runs/demo", help="demo directory (new, empty, or an earlier demo's)")
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1; report mean and std")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override, e.g. fft.steps=500")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.set_defaults(func=_demo)

    landscape.add_parser(sub)
    memplan.add_parser(sub)
    sweep.add_parser(sub)
    add_data_commands(sub)
    add_eval_commands(sub)
    return parser


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------

def _input_error_types() -> tuple[type, ...]:
    """ConfigError subclasses that are about inputs and outputs rather than usage (exit 1, not 2). A class
    may also say so itself with an `exit_code` attribute."""
    return outputs.OutputError, DataError


def _one_line(message: str, limit: int = 2000) -> str:
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_message(error: OSError) -> str:
    if error.filename is None or error.strerror is None:  # raised by us with a message that names the file
        return str(error)
    where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    hint = "; check its permissions (or give another path)" if isinstance(error, PermissionError) else ""
    return f"{where}: {error.strerror}{hint}"


def describe_error(error: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ends a command. An error raised while a Ctrl-C was
    being handled (a cleanup racing a writer thread) is the interruption."""
    cause = error
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return EXIT_INTERRUPTED, "interrupted"
        cause = cause.__cause__ or cause.__context__
    code = getattr(error, "exit_code", None)
    if isinstance(error, ConfigError):
        message = str(error)
        if code is None:
            code = EXIT_INPUT if isinstance(error, _input_error_types()) else EXIT_USAGE
    elif isinstance(error, (convert.CheckpointError, train.NonFiniteLossError)):
        message = str(error)
    elif isinstance(error, OSError):
        message = _os_message(error)
    elif isinstance(error, MemoryError):
        message = "out of host memory (MemoryError); use a machine with more memory or a smaller model/batch"
    else:
        first = _one_line(str(error), limit=500)
        message = f"unexpected {type(error).__name__}" + (f": {first}" if first else "") + \
            " (set MFT_JAX_DEBUG=1 for the traceback)"
    return code if code is not None else EXIT_INPUT, _one_line(message)


def _quiet_libraries() -> None:
    """Library chatter on stderr that could pass for a traceback: TF's C++ logs (errors only) and Python
    warnings, which are printed on one line each instead of with the source line below them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: (
        f"warning: {category.__name__}: {_one_line(str(message), 400)} ({filename}:{lineno})\n")


def _debug() -> bool:
    return os.environ.get("MFT_JAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv=None):
    _quiet_libraries()
    args = None
    try:
        args = build_parser().parse_args(argv)
        distributed.initialize()  # joins the other processes of a multi-host run before any JAX device use
        code = args.func(args)  # an int is an exit code (plan: 1 when a plan failed); anything else is output
    except SystemExit:
        raise
    except BaseException as error:
        if _debug():
            raise
        code, message = describe_error(error)
        sys.stdout.flush()
        print(f"mft-jax {args.command if args else ''}".rstrip() + f": error: {message}", file=sys.stderr)
        sys.exit(code)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
