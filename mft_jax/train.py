"""The jitted, sharded training step and the training loop (MFT and its FFT baseline).

MFT (`train.mode: mft`): the only trainable pytree is the mask scores. Per optimizer step:
  1. masks were computed from the scores once, at the end of the previous step (carried in the state);
  2. W~ = W * m for the masked kernels; a `lax.scan` over micro-batches accumulates dL/dW~ (fp32), with the
     frozen params closed over so XLA builds no gradient below the first masked layer;
  3. straight-through: dL/ds = sign(s) * W * dL/dW~; optax AdamW updates the scores;
  4. the new masks are computed (exact top-k, once) and compared with the old ones (mask flips).
FFT (`train.mode: fft`): the trainable tree is the params themselves (fp32 master copy).
The loss is sum(w * nll) / sum(w) over the whole optimizer batch (see mft_jax.losses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from mft_jax import checkpoint as ckpt_lib
from mft_jax import config as config_lib
from mft_jax import convert, losses, masking, model, rundir, sharding
from mft_jax.config import ConfigError, LlamaConfig, RunConfig

BATCH_KEYS = ("inputs", "targets", "loss_weights", "positions", "segment_ids")
DERIVED = ("masks", "mask_cuts")  # state entries recomputed from the scores, never checkpointed


# --------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------

def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up over ceil(warmup_ratio * steps) from 0, then linear decay to 0 (as HF's Trainer)."""
    warmup = math.ceil(optim_cfg.warmup_ratio * total_steps)
    if optim_cfg.schedule == "constant":
        decay = optax.constant_schedule(optim_cfg.lr)
    else:
        decay = optax.linear_schedule(optim_cfg.lr, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup), decay], [warmup])


def build_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay)
    if optim_cfg.clip_grad_norm:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_grad_norm), adamw), schedule
    return adamw, schedule


# --------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """Everything the step needs that is fixed for a run."""

    run: RunConfig
    cfg: LlamaConfig
    mesh: jax.sharding.Mesh
    param_shardings: Any
    total_steps: int
    micro_batches: int

    def __post_init__(self):
        self.mode = self.run.train.mode
        self.mask_cfg = self.run.mask
        self.paths = masking.masked_paths(self.cfg, self.mask_cfg) if self.mode == "mft" else []
        self.optimizer, self.schedule = build_optimizer(self.run.optim, self.total_steps)
        self.compute_dtype = jnp.dtype(self.run.model.compute_dtype)
        self._state_cache = {}  # see _state_abstract

    def loss_sums(self, params, batch):
        """(sum(w * nll), sum(w)) of one batch [B, L] (see mft_jax.losses); with `model.loss_chunk`, the head
        and cross-entropy run a chunk of positions at a time."""
        attention = self.run.model.attention
        if attention == "auto":
            attention = "cudnn" if jax.default_backend() == "gpu" and not self.run.data.packing else "xla"
        chunk = self.run.model.loss_chunk
        out = model.forward(self.cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                            compute_dtype=self.compute_dtype, attention=attention, remat=self.run.model.remat,
                            hidden_only=chunk > 0)
        if chunk > 0:
            return losses.chunked_sft_sums(out, model.lm_head_kernel(self.cfg, params), batch["targets"],
                                           batch["loss_weights"], chunk)
        return losses.sft_sums(out, batch["targets"], batch["loss_weights"])

    # Shardings of the state ------------------------------------------------------------------------------
    def trainable_shardings(self):
        if self.mode == "fft":
            return self.param_shardings
        return masking.subtree(self.param_shardings, self.paths)

    def _state_abstract(self, params_shapes):
        """(state shapes, state shardings), computed once per params structure, shapes and dtypes: the
        `jax.eval_shape` of the whole state init is not free, and jit_step, jit_eval and init_state all ask.
        `params_shapes` may be concrete arrays or ShapeDtypeStructs (their shardings do not enter: the state's
        shardings come from `param_shardings`)."""
        leaves, treedef = jax.tree.flatten(params_shapes)
        key = (treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype), bool(getattr(x, "weak_type", False)))
                              for x in leaves))
        cached = self._state_cache.get(key)
        if cached is None:
            abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in key[1]])
            shapes = jax.eval_shape(lambda p: self._init_state(p, jax.random.key(0)), abstract)
            trainable = self.trainable_shardings()
            shardings = {"step": sharding.replicated(self.mesh), "trainable": trainable,
                         "opt_state": sharding.opt_state_shardings(self.optimizer, shapes["opt_state"], trainable,
                                                                   self.mesh)}
            if "masks" in shapes:
                shardings.update(masks=trainable, mask_cuts=sharding.replicated(self.mesh))
            cached = self._state_cache[key] = (shapes, shardings)
        return cached

    def state_shapes(self, params_shapes):
        """The state's ShapeDtypeStructs (a fresh top-level dict: callers may pop from it)."""
        return dict(self._state_abstract(params_shapes)[0])

    def state_shardings(self, params_shapes):
        """The state's shardings (a fresh top-level dict: callers may pop from it)."""
        return dict(self._state_abstract(params_shapes)[1])

    def checkpoint_target(self, params_shapes):
        """The abstract state a checkpoint restores onto: ShapeDtypeStructs carrying this Setup's shardings,
        without the masks and their cuts (derived from the scores, never saved; `with_masks` adds them back)."""
        shapes, shardings = self._state_abstract(params_shapes)
        return ckpt_lib.abstract_like(_saved(shapes), _saved(shardings))

    # State ---------------------------------------------------------------------------------------------------
    def _init_state(self, params, key):
        if self.mode == "fft":
            trainable = jax.tree.map(lambda w: w.astype(jnp.float32), params)
        else:
            trainable = masking.init_scores(key, params, self.mask_cfg, self.cfg)
        state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
                 "opt_state": self.optimizer.init(trainable)}
        if self.mode == "mft":
            state.update(self._derived(trainable))
        return state

    def _derived(self, trainable, previous=None):
        """The masks and their cuts (each matrix's k-th largest |score|, which warm-starts the next step's
        search), computed from the scores; previous = (old scores, old cuts)."""
        masks, cuts = masking.masks_and_cuts(trainable, self.mask_cfg, previous)
        return {"masks": masks, "mask_cuts": cuts}

    def init_state(self, params, key):
        shardings = self.state_shardings(params)
        return jax.jit(self._init_state, out_shardings=shardings)(params, key)

    def with_masks(self, state):
        """Adds the (derived) masks and cuts to a restored state."""
        if self.mode != "mft":
            return state
        shardings = {"masks": self.trainable_shardings(), "mask_cuts": sharding.replicated(self.mesh)}
        return {**state, **jax.jit(self._derived, out_shardings=shardings)(state["trainable"])}

    # The training step ---------------------------------------------------------------------------------------
    def _step(self, params, state, batch_MxBxL):
        trainable = state["trainable"]
        if self.mode == "fft":
            diff = trainable
            to_model = lambda d: d  # noqa: E731
        else:
            masked_w = masking.subtree(params, self.paths)
            diff = jax.tree.map(lambda w, m: w * m.astype(w.dtype), masked_w, state["masks"])  # W~ = W * m
            to_model = lambda d: masking.merge(params, d)  # noqa: E731

        def micro_loss(d, micro):
            return self.loss_sums(to_model(d), micro)

        def accumulate(carry, micro):
            grad_acc, num_acc, den_acc, tok_acc = carry
            (num, den), grad = jax.value_and_grad(micro_loss, has_aux=True)(diff, micro)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grad)
            tokens = jnp.sum(micro["segment_ids"] > 0, dtype=jnp.int32)
            return (grad_acc, num_acc + num, den_acc + den, tok_acc + tokens), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), diff)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grad_sum, num, den, tokens), _ = jax.lax.scan(accumulate, init, batch_MxBxL)
        den = jnp.maximum(den, 1e-12)
        loss = num / den
        diff_grads = jax.tree.map(lambda g: g / den, grad_sum)
        if self.mode == "fft":
            grads = diff_grads
        else:
            grads = masking.score_grads(trainable, masked_w, diff_grads, self.mask_cfg)

        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient leaves the scores and optimizer state untouched (the loop then stops
        # with an error). The check comes first, so the select fuses into the update's own pass over them.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], trainable)
        keep_if_finite = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_trainable = jax.tree.map(keep_if_finite, optax.apply_updates(trainable, updates), trainable)
        opt_state = jax.tree.map(keep_if_finite, opt_state, state["opt_state"])
        new_state = {"step": state["step"] + 1, "trainable": new_trainable, "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state["step"]),
                   "tokens": tokens, "label_weight": den, "finite": finite}
        if self.mode == "mft":  # (unchanged scores give back the same masks)
            new_state.update(self._derived(new_trainable, previous=(trainable, state["mask_cuts"])))
            metrics["mask_flips"] = sum(jnp.sum(a != b, dtype=jnp.int32) for a, b in
                                        zip(jax.tree.leaves(new_state["masks"]), jax.tree.leaves(state["masks"])))
            metrics.update(masking.mask_stats(new_state["masks"]))
        return new_state, metrics

    def jit_step(self, params_shapes):
        state_shardings = self.state_shardings(params_shapes)
        step = jax.jit(self._step,
                       in_shardings=(self.param_shardings, state_shardings, sharding.batch_sharding(self.mesh)),
                       out_shardings=(state_shardings, sharding.replicated(self.mesh)),
                       donate_argnums=(1,))
        return step

    # Evaluation ------------------------------------------------------------------------------------------
    def effective_params(self, params, state):
        """The params the model runs with: W * m for MFT, the trained weights (base dtype) for FFT."""
        if self.mode == "fft":
            return jax.tree.map(lambda t, p: t.astype(p.dtype), state["trainable"], params)
        return masking.apply_masks(params, state["masks"])

    def _eval_sums(self, params, state, batch_BxL):
        return self.loss_sums(self.effective_params(params, state), batch_BxL)

    def jit_eval(self, params_shapes):
        return jax.jit(self._eval_sums, in_shardings=(self.param_shardings, self.state_shardings(params_shapes),
                                                      sharding.batch_sharding(self.mesh, micro_batched=False)))

    def frozen_floor_step(self, params, batch_MxBxL):
        """The same forward and backward with weight gradients for the masked kernels, no mask or optimizer
        work: the floor the MFT step is measured against (bench/step.py)."""
        diff = masking.subtree(params, self.paths)

        def accumulate(grad_acc, micro):
            def micro_loss(d):
                return self.loss_sums(masking.merge(params, d), micro)[0]
            grad = jax.grad(micro_loss)(diff)
            return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grad), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), diff)
        return jax.lax.scan(accumulate, zeros, batch_MxBxL)[0]


# --------------------------------------------------------------------------------------------------------
# Run setup helpers (checks before anything compiles)
# --------------------------------------------------------------------------------------------------------

def check_run(run: RunConfig) -> LlamaConfig:
    """Validates the run against its model and data before any work; returns the model's config."""
    if not run.model.path:
        raise ConfigError("model.path is empty; set it to a Hugging Face checkpoint directory "
                          "(config.json + *.safetensors) or an orbax params checkpoint from `mft-jax convert`")
    cfg = convert.load_config(run.model.path)
    if run.train.mode == "mft":
        run.mask.check_against(cfg)
    if not run.data.train:
        raise ConfigError("data.train is empty; give {source: rows}, e.g. {data/train.jsonl: null}")
    tokenizer = run.data.tokenizer or run.model.path
    if not Path(tokenizer).is_dir() or not any(Path(tokenizer).glob("tokenizer*")):
        raise ConfigError(f"no tokenizer in {tokenizer!r}: put the tokenizer files in the model directory or "
                          f"set data.tokenizer to a Hugging Face tokenizer directory")
    _check_vocabulary(run, cfg, tokenizer)
    return cfg


def _check_vocabulary(run: RunConfig, cfg: LlamaConfig, tokenizer_dir: str):
    """Token ids the model has no embedding for give NaN losses after compiling: refuse them before."""
    from mft_jax.data import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    used = {tokenizer.eos_token_id, tokenizer.bos_token_id if run.data.add_bos else None} - {None}
    base_ids = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    largest = max(base_ids - 1, *used)
    if largest >= cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_dir!r} has token ids up to {largest} but model {run.model.path!r} "
                          f"has vocab_size {cfg.vocab_size} (config.json): use the tokenizer the model was trained "
                          f"with (data.tokenizer), or a model whose embeddings cover it")


def _warn(message: str):
    """Warnings go to stderr whatever the verbosity (a damaged checkpoint, a disk about to fill)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def checkpoint_bytes(run: RunConfig, cfg: LlamaConfig) -> int:
    """Bytes of one checkpoint: the fp32 trainable tree (scores, or the params for FFT) and AdamW's two moments."""
    shapes = model.param_shapes(cfg)
    if run.train.mode == "mft":
        shapes = [masking.get_path(shapes, p) for p in masking.masked_paths(cfg, run.mask)]
    return 12 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _check_disk(run_dir: Path, run: RunConfig, cfg: LlamaConfig):
    """Refuses a run that cannot save one checkpoint; warns when `ckpt.keep` of them will not fit."""
    size = checkpoint_bytes(run, cfg)
    existing = sum(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*"))
    free = shutil.disk_usage(run_dir).free
    if free < 1.1 * size:
        raise ResourceError(f"{run_dir}: {_size(free)} free, one checkpoint needs {_size(size)}; free space or put "
                            f"run_dir on a larger disk")
    needed = max(run.ckpt.keep + 1 - existing, 1) * size
    if free < needed:
        _warn(f"warning: {run_dir} has {_size(free)} free; ckpt.keep={run.ckpt.keep} checkpoints need about "
              f"{_size(needed)} more")


def _size(nbytes: float) -> str:
    """1000 -> '1000 B', 57552 -> '56.2 KiB' ..."""
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"


def _check_token_ids(inputs_BxL: np.ndarray, vocab_size: int, step: int):
    """An id past the embedding table would give NaN (a host-side max over the batch costs microseconds)."""
    largest = int(inputs_BxL.max(initial=0))
    if largest >= vocab_size:
        raise ConfigError(f"the batch of step {step} holds token id {largest}, but the model's vocab_size is "
                          f"{vocab_size}: the data was tokenized with another tokenizer than the model's; set "
                          f"data.tokenizer to the model's tokenizer")


def total_steps(run: RunConfig, batches_per_epoch: int) -> int:
    if run.train.max_steps is not None:
        return run.train.max_steps
    return max(1, math.ceil(run.train.epochs * batches_per_epoch))


def to_micro_batches(batch: dict, micro_batches: int) -> dict:
    """[B, L] host arrays -> [M, B / M, L]."""
    return {k: v.reshape(micro_batches, v.shape[0] // micro_batches, *v.shape[1:]) for k, v in batch.items()}


def global_batch(batch: dict, mesh, micro_batched=True) -> dict:
    target = sharding.batch_sharding(mesh, micro_batched)
    return {k: jax.make_array_from_process_local_data(target, np.asarray(batch[k])) for k in BATCH_KEYS}


# --------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl, TensorBoard and a progress bar; only process 0 writes."""

    def __init__(self, run_dir: Path, total: int, start: int, progress_bar: bool = True):
        self.enabled = jax.process_index() == 0
        self.file = self.tb = self.bar = None
        if not self.enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the events of steps a resumed run trains again.
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start or None)
        except ImportError:  # TensorBoard logging is optional
            self.tb = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def write(self, record: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def progress(self, steps: int, postfix: dict):
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class _StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step.

    Not on several processes: one process stopping alone would leave the others waiting in a collective, so
    there SIGTERM is left to JAX's preemption notifier, which agrees on a step for all of them."""

    def __init__(self, enabled: bool = True):
        self.received = None
        self.enabled = enabled
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT) if self.enabled else ():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLossError(RuntimeError):
    pass


class ResourceError(ConfigError):
    """The machine cannot carry the run as configured (disk space); raised before any work."""

    exit_code = 1


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------

def _dev_loss(setup, eval_fn, params, state, loader_factory) -> float | None:
    if loader_factory is None:
        return None
    num = den = 0.0
    for batch in loader_factory():
        n, d = eval_fn(params, state, global_batch(batch, setup.mesh, micro_batched=False))
        num, den = num + float(n), den + float(d)
    return num / max(den, 1e-12)


def train(run: RunConfig, *, verbose: bool = True, max_steps_this_run: int | None = None,
          dev_metrics: Callable[[int, dict], dict] | None = None, extend: bool = False) -> dict:
    """Runs (or resumes) a training run; returns a summary. Writes RUN/{config.yaml, metrics.jsonl, tb/,
    checkpoints/, DONE}. `max_steps_this_run` stops early after that many steps (tests), like a preemption.

    The run directory is a contract (mft_jax.rundir): a config that changes results is refused, a longer run
    needs `extend`, a finished run returns its summary untouched, and one process trains in it at a time.
    Every `train.eval_every` steps (and at the end) the dev loss is computed (when `data.dev` is set) and
    `dev_metrics(step, effective_params)`, if given, adds its own numbers (e.g. dev accuracy by generation)
    to that step's record. Checkpoint selection on dev reads these records from metrics.jsonl."""
    cfg = check_run(run)
    run_dir = Path(run.run_dir)
    changes, length_change = _check_run_dir(run, run_dir, extend)
    done = run_dir / "DONE"
    if done.is_file() and not length_change:
        summary = {**json.loads(done.read_text() or "{}"), "already_finished": True}
        if verbose:
            print(f"run {run_dir} is already finished (step {summary.get('final_step')}/"
                  f"{summary.get('total_steps')}); nothing to do (to train longer: raise train.max_steps and "
                  f"pass --extend)")
        return summary
    writer = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    with rundir.RunLock(run_dir) if writer else contextlib.nullcontext():
        _check_disk(run_dir, run, cfg)  # before the data build and compiling
        if writer:
            saved = run_dir / rundir.CONFIG_FILE
            if not saved.is_file() or yaml.safe_load(saved.read_text()) != run.to_dict():
                rundir.write_atomic(saved, yaml.safe_dump(run.to_dict(), sort_keys=False))
            done.unlink(missing_ok=True)
        return _train_locked(run, cfg, run_dir, verbose, max_steps_this_run, dev_metrics, extend,
                             events={"config_change": changes, "extend": length_change})


def _check_run_dir(run: RunConfig, run_dir: Path, extend: bool) -> tuple[dict, dict]:
    """(allowed changes, run-length changes) against the config the run directory was started with."""
    saved_file = run_dir / rundir.CONFIG_FILE
    if not saved_file.is_file():
        if run_dir.is_dir() and any(p.name not in _RUN_DIR_NAMES for p in run_dir.iterdir()):
            raise rundir.RunDirError(f"run_dir {str(run_dir)!r} holds files that are not a run's "
                                     f"({sorted(p.name for p in run_dir.iterdir())[:5]}); train writes into its "
                                     f"run_dir, so give it a new or empty directory")
        return {}, {}
    try:
        saved = config_lib.load(saved_file, verbose=False).to_dict()
    except ConfigError as e:
        raise rundir.RunDirError(f"the config this run was started with cannot be read ({e}); use a new "
                                 f"run_dir") from None
    return rundir.check_config_change(saved, run.to_dict(), extend)


# What `train` itself writes into a run directory (anything else there means the directory is not a run's).
_RUN_DIR_NAMES = {rundir.CONFIG_FILE, rundir.METRICS_FILE, rundir.LOCK_FILE, "tb", "checkpoints",
                  ckpt_lib.DAMAGED_DIR, "DONE"}


def _train_locked(run, cfg, run_dir, verbose, max_steps_this_run, dev_metrics, extend, events) -> dict:
    from mft_jax import data as data_lib

    log_line = print if verbose else (lambda *a, **k: None)
    mesh = sharding.make_mesh(run.mesh)
    micro_size = run.train.micro_batch_size or run.train.batch_size
    dp = sharding.data_parallel_size(mesh)
    if micro_size % dp:
        raise ConfigError(f"train.micro_batch_size ({micro_size}) must be a multiple of the data-parallel size "
                          f"mesh.data * mesh.fsdp = {dp}")
    processes = jax.process_count()
    if run.train.batch_size % processes:
        raise ConfigError(f"train.batch_size ({run.train.batch_size}) must be a multiple of the process count "
                          f"({processes})")
    tokenizer_dir = run.data.tokenizer or run.model.path
    loader = data_lib.make_loader(run.data, tokenizer_dir, "train", run.train.batch_size // processes,
                                  drop_remainder=run.train.drop_last, verbose=verbose and jax.process_index() == 0)
    steps = total_steps(run, loader.batches_per_epoch)
    dev_loader = None
    if run.data.dev:  # built (and its drops checked) now, not at the first evaluation
        data_lib.build_dataset(run.data, tokenizer_dir, "dev", verbose=verbose and jax.process_index() == 0)
        dev_loader = functools.partial(data_lib.make_loader, run.data, tokenizer_dir, "dev", micro_size // processes,
                                       num_epochs=1)

    param_shardings = sharding.param_shardings(cfg, mesh, model.param_shapes(cfg, run.model.dtype))
    setup = Setup(run, cfg, mesh, param_shardings, steps, run.train.batch_size // micro_size)
    _, params = convert.load_any(run.model.path, dtype=run.model.dtype, shardings=param_shardings)
    with sharding.axis_rules(), jax.set_mesh(mesh):
        step_fn = setup.jit_step(params)
        eval_fn = setup.jit_eval(params) if dev_loader else None
        effective_fn = jax.jit(setup.effective_params)
        checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints", run.ckpt.keep, run.ckpt.save_every,
                                             run.ckpt.async_save)
        try:
            restored = checkpointer.restore_newest(setup.checkpoint_target(params), warn=_warn)
            if restored is None:
                state = setup.init_state(params, jax.random.key(run.train.seed))
                start = 0
            else:
                start, state, data_state = restored
                check_trained_config(data_state, run, f"{checkpointer.directory}/{start}", extend)
                state = setup.with_masks(state)
                loader.set_state(data_state)
                log_line(f"resumed from {checkpointer.directory}/{start}")
        except BaseException:  # the loop's own `finally` closes it from here on
            checkpointer.close()
            raise
        if jax.process_index() == 0:
            # Records after the restored step were written by a run that died before its next checkpoint;
            # those steps are about to be trained again.
            rundir.truncate_metrics(run_dir, start)
            for event, change in events.items():
                if change:
                    rundir.append_metrics(run_dir, {"step": start, "event": event, "total_steps": steps,
                                                    "changes": {k: list(v) for k, v in change.items()}})

        log = MetricsLog(run_dir, steps, start, progress_bar=verbose)
        summary = {"run_dir": str(run_dir), "total_steps": steps, "start_step": start}
        pending = None  # metrics of the last dispatched step, fetched one step late (keeps the device busy)
        window = {"flips": 0, "tokens": 0, "t0": time.perf_counter(), "steps": 0}
        final_step, stopped, last_saved = start, None, start

        def evaluate(step_done) -> dict:
            out = {}
            if eval_fn is not None:
                out["dev_loss"] = _dev_loss(setup, eval_fn, params, state, dev_loader)
            if dev_metrics is not None:
                out.update(dev_metrics(step_done, effective_fn(params, state)))
            return out

        def drain(metrics, step_done, extra):
            metrics = jax.device_get(metrics)
            if not bool(metrics["finite"]):
                raise NonFiniteLossError(
                    f"loss or gradient is not finite at step {step_done} (loss={float(metrics['loss'])}, "
                    f"grad_norm={float(metrics['grad_norm'])}); the state was not updated and the last "
                    f"checkpoint is intact. Lower optim.lr, set optim.clip_grad_norm, or check the data.")
            window["flips"] += int(metrics.get("mask_flips", 0))
            window["tokens"] += int(metrics["tokens"])
            window["steps"] += 1
            if step_done % run.train.log_every == 0 or step_done == steps or extra:
                elapsed = time.perf_counter() - window["t0"]
                record = {"step": step_done, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                          "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": window["tokens"] / max(elapsed, 1e-9)}
                if "mask_flips" in metrics:
                    record["mask_flips"] = window["flips"]
                    record.update({k: float(metrics[k]) for k in ("kept", "kept_attn", "kept_mlp") if k in metrics})
                record.update(extra)
                log.write(record)
                log.progress(window["steps"], {"loss": f"{record['loss']:.4f}",
                                               "tok/s": f"{record['tokens_per_s']:.0f}"})
                summary["last"] = record
                window.update(flips=0, tokens=0, t0=time.perf_counter(), steps=0)

        try:
            with _StopSignal(enabled=jax.process_count() == 1) as stop:
                for step in range(start, steps):
                    host_batch = next(loader)
                    _check_token_ids(host_batch["inputs"], cfg.vocab_size, step + 1)
                    batch = global_batch(to_micro_batches(host_batch, setup.micro_batches), mesh)
                    state, metrics = step_fn(params, state, batch)
                    final_step = step + 1
                    due = final_step == steps or (run.train.eval_every and final_step % run.train.eval_every == 0)
                    extra = evaluate(final_step) if due else {}  # on the state right after this step
                    if pending is not None:
                        drain(*pending)
                    pending = (metrics, final_step, extra)
                    if checkpointer.reached_preemption(final_step):  # several processes: SIGTERM, agreed step
                        stop.received = "SIGTERM"
                    if stop.received or (max_steps_this_run and final_step - start >= max_steps_this_run):
                        stopped = stop.received or "max_steps_this_run"
                        break
                    if checkpointer.save(final_step, _saved(state), _data_state(loader, run)):
                        last_saved = final_step
                if pending is not None:
                    drain(*pending)
            if last_saved != final_step:
                checkpointer.save(final_step, _saved(state), _data_state(loader, run), force=True)
            checkpointer.wait()
        finally:
            checkpointer.close()
            log.close()

        summary.update(final_step=final_step, stopped=stopped)
        if stopped is None:  # the last step's record holds the final dev numbers
            summary.update({k: v for k, v in summary.get("last", {}).items() if k.startswith("dev_")})
        if stopped and verbose:
            print(f"stopped ({stopped}) at step {final_step}/{steps}; checkpoint saved. Run the same command "
                  f"again to resume.")
        if stopped is None and jax.process_index() == 0:
            rundir.write_atomic(run_dir / "DONE", json.dumps(summary, default=str))
    return summary


def _data_state(loader, run: RunConfig) -> dict:
    """What a checkpoint holds beside the state: the data-iterator position and the config it was trained with
    (so that a hand-edited config.yaml cannot silently change what a resume or an export does)."""
    return {**loader.get_state(), "run_config": run.to_dict()}


def check_trained_config(data_state: dict | None, run: RunConfig, where: str, extend: bool = False):
    """Refuses a run config that differs, in a key that changes results, from the one checkpoint `where` was
    trained with (a no-op for checkpoints that predate this record)."""
    trained = (data_state or {}).get("run_config")
    if not trained:
        return
    try:
        rundir.check_config_change(config_lib.from_dict(trained, verbose=False).to_dict(), run.to_dict(), extend)
    except rundir.RunDirError as e:
        raise rundir.RunDirError(f"checkpoint {where} was trained with another config than this command's "
                                 f"(was {rundir.CONFIG_FILE} edited?): {e}") from None


def _saved(state: dict) -> dict:
    """What a checkpoint holds: masks and cuts are derived from the scores, so they are not saved."""
    return {k: v for k, v in state.items() if k not in DERIVED}
