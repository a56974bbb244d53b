"""Checks before a run does any work: the model, tokenizer, data ids and disk against the run's config.

Each failure is one line naming the input and the fix (`ConfigError`, `ResourceError`), raised before the data
build and compiling where possible.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from mft_jax import convert, methods, model, storage, tracking
from mft_jax.config import ConfigError, LlamaConfig, RunConfig
from mft_jax.data import load_tokenizer


class ResourceError(ConfigError):
    """The machine cannot carry the run as configured (disk space); raised before any work."""

    exit_code = 1


def check_run(run: RunConfig) -> LlamaConfig:
    """Validates the run against its model and data before any work; returns the model's config."""
    if not run.model.path:
        raise ConfigError("model.path is empty; set it to a Hugging Face checkpoint directory "
                          "(config.json + *.safetensors) or an orbax params checkpoint from `mft-jax convert`")
    cfg = convert.load_config(run.model.path)
    methods.make(run, cfg)  # checks the method's settings against the model (e.g. mask.masked_layers)
    if not run.data.train:
        raise ConfigError("data.train is empty; give {source: rows}, e.g. {data/train.jsonl: null}")
    tokenizer = run.data.tokenizer or run.model.path
    if not storage.path(tokenizer).is_dir() or not any(storage.path(tokenizer).glob("tokenizer*")):
        raise ConfigError(f"no tokenizer in {tokenizer!r}: put the tokenizer files in the model directory or "
                          f"set data.tokenizer to a Hugging Face tokenizer directory")
    _check_vocabulary(run, cfg, tokenizer)
    tracking.check(run.log.wandb)  # wandb configured but not installed: say so before any work
    return cfg


def _check_vocabulary(run: RunConfig, cfg: LlamaConfig, tokenizer_dir: str):
    """Token ids the model has no embedding for give NaN losses after compiling: refuse them before."""
    tokenizer = load_tokenizer(tokenizer_dir)
    used = {tokenizer.eos_token_id, tokenizer.bos_token_id if run.data.add_bos else None} - {None}
    base_ids = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    largest = max(base_ids - 1, *used)
    if largest >= cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_dir!r} has token ids up to {largest} but model {run.model.path!r} "
                          f"has vocab_size {cfg.vocab_size} (config.json): use the tokenizer the model was trained "
                          f"with (data.tokenizer), or a model whose embeddings cover it")


def warn(message: str):
    """Warnings go to stderr whatever the verbosity (a damaged checkpoint, a disk about to fill)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def checkpoint_bytes(run: RunConfig, cfg: LlamaConfig) -> int:
    """Bytes of one checkpoint: the fp32 trainable tree (scores, weights or adapters) and AdamW's two moments."""
    return 12 * methods.trainable_count(methods.make(run, cfg), model.param_shapes(cfg))


def check_disk(run_dir: Path, run: RunConfig, cfg: LlamaConfig):
    """Refuses a run that cannot save one checkpoint; warns when `ckpt.keep` of them will not fit."""
    if storage.is_remote(run_dir):
        return  # a bucket has no free-space figure to check
    size = checkpoint_bytes(run, cfg)
    existing = sum(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*"))
    free = shutil.disk_usage(run_dir).free
    if free < 1.1 * size:
        raise ResourceError(f"{run_dir}: {_size(free)} free, one checkpoint needs {_size(size)}; free space or put "
                            f"run_dir on a larger disk")
    needed = max(run.ckpt.keep + 1 - existing, 1) * size
    if free < needed:
        warn(f"warning: {run_dir} has {_size(free)} free; ckpt.keep={run.ckpt.keep} checkpoints need about "
              f"{_size(needed)} more")


def _size(nbytes: float) -> str:
    """1000 -> '1000 B', 57552 -> '56.2 KiB' ..."""
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"


def check_token_ids(inputs_BxL: np.ndarray, vocab_size: int, step: int):
    """An id past the embedding table would give NaN (a host-side max over the batch costs microseconds)."""
    largest = int(inputs_BxL.max(initial=0))
    if largest >= vocab_size:
        raise ConfigError(f"the batch of step {step} holds token id {largest}, but the model's vocab_size is "
                          f"{vocab_size}: the data was tokenized with another tokenizer than the model's; set "
                          f"data.tokenizer to the model's tokenizer")
