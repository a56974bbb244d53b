"""`mft-jax data build` and `mft-jax data inspect`: build the tokenized cache and look inside it."""

from __future__ import annotations

import argparse

import numpy as np

from mft_jax import config
from mft_jax.data import formatting, store
from mft_jax.data.loader import plan_rows

MARK_OPEN, MARK_CLOSE = "[[", "]]"


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Registers `data {build, inspect}` on an argparse subparsers object; each sets `func=` (call args.func(args))."""
    data = subparsers.add_parser("data", help="build or inspect the tokenized SFT dataset cache")
    commands = data.add_subparsers(dest="data_command", metavar="{build,inspect}")
    commands.required = True

    def common(parser):
        parser.add_argument("--config", required=True, help="run config (YAML)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config key, e.g. --set data.max_seq_length=2048 (repeatable)")

    build = commands.add_parser("build", help="tokenize data.train and data.dev into the TFDS cache (or reuse it)")
    common(build)
    build.set_defaults(func=cmd_build)
    inspect = commands.add_parser("inspect", help="counts, token-length stats and one decoded example")
    common(inspect)
    inspect.add_argument("--split", default="train", choices=["train", "dev"])
    inspect.add_argument("--index", type=int, default=0, help="which example to decode")
    inspect.set_defaults(func=cmd_inspect)
    return data


def _load(args):
    cfg = config.load(args.config, args.set)
    return cfg.data, (cfg.model.path or None)


def cmd_build(args) -> int:
    data_cfg, model_path = _load(args)
    splits = [split for split in ("train", "dev") if getattr(data_cfg, split)]
    for split in splits:
        store.build_dataset(data_cfg, model_path, split, verbose=True)
    return 0


def cmd_inspect(args) -> int:
    data_cfg, model_path = _load(args)
    info = store.build_dataset(data_cfg, model_path, args.split)
    tokenizer = formatting.load_tokenizer(info.settings["tokenizer"])
    print(inspect_report(info, tokenizer, args.index, packing=data_cfg.packing))
    return 0


def length_stats(lengths_E: np.ndarray) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max of example lengths in tokens."""
    quantiles = np.percentile(lengths_E, [50, 90, 99])
    return {"min": int(lengths_E.min()), "mean": float(lengths_E.mean()), "p50": float(quantiles[0]),
            "p90": float(quantiles[1]), "p99": float(quantiles[2]), "max": int(lengths_E.max())}


def mark_supervised(ids_N: np.ndarray, labels_N: np.ndarray, tokenizer) -> str:
    """Decodes an example with each run of supervised tokens wrapped in [[ ]]."""
    pieces, start = [], 0
    for t in range(1, len(ids_N) + 1):
        if t == len(ids_N) or labels_N[t] != labels_N[start]:
            text = tokenizer.decode(ids_N[start:t].tolist(), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            pieces.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if labels_N[start] else text)
            start = t
    return "".join(pieces)


def inspect_report(info: store.DatasetInfo, tokenizer, index: int = 0, packing: bool = False) -> str:
    seq_len = info.settings["max_seq_length"]
    stats = length_stats(info.lengths)
    packed_rows = len(plan_rows(info.lengths, seq_len, True, 0, True)[0]) - 1
    lines = [
        info.summary(),
        info.table(),
        f"settings: template {info.settings['template']}, max_seq_length {seq_len}, add_bos "
        f"{info.settings['add_bos']}, tokenizer {info.settings['tokenizer']}",
        "tokens per example: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in stats.items()),
        f"supervised: {info.num_label_tokens / max(info.num_tokens, 1):.1%} of tokens, "
        f"{info.num_label_tokens / max(info.num_examples, 1):.1f} per example",
        f"rows of {seq_len}: padded {info.num_examples} ({info.num_tokens / (info.num_examples * seq_len):.1%} "
        f"filled), packed {packed_rows} ({info.num_tokens / (packed_rows * seq_len):.1%} filled)"
        + (" <- data.packing" if packing else ""),
    ]
    if not 0 <= index < info.num_examples:
        lines.append(f"(no example {index}: the split has {info.num_examples})")
        return "\n".join(lines)
    record = info.data_source()[index]
    lines += [f"example {index} ({len(record['ids'])} tokens, {int(record['labels'].sum())} supervised, "
              f"supervised tokens between {MARK_OPEN} and {MARK_CLOSE}):",
              mark_supervised(record["ids"], record["labels"], tokenizer)]
    return "\n".join(lines)
