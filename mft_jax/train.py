"""The training loop: one run directory, any method (mft_jax.methods), resumable after any kill.

The loop has no knowledge of the method: it builds the run's state layout (mft_jax.state), the jitted step
(mft_jax.step) and the checkpointer, then feeds batches, logs, evaluates on dev and saves. Everything it checks
before working is in mft_jax.preflight; the run directory's rules are in mft_jax.rundir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import yaml

from mft_jax import checkpoint as ckpt_lib
from mft_jax import config as config_lib
from mft_jax import convert, data as data_lib, model, optim, preflight, rundir, sharding, step as step_lib, tracking
from mft_jax import storage
from mft_jax.config import ConfigError, RunConfig
from mft_jax.runlog import MetricsLog
from mft_jax.state import StateLayout, TrainState


def train(run: RunConfig, *, verbose: bool = True, max_steps_this_run: int | None = None,
          dev_metrics: Callable[[int, dict], dict] | None = None, extend: bool = False) -> dict:
    """Runs (or resumes) a training run; returns a summary. Writes RUN/{config.yaml, metrics.jsonl, tb/,
    checkpoints/, DONE}. `max_steps_this_run` stops early after that many steps (tests), like a preemption.

    The run directory is a contract (mft_jax.rundir): a config that changes results is refused, a longer run
    needs `extend`, a finished run returns its summary untouched, and one process trains in it at a time.
    Every `train.eval_every` steps (and at the end) the dev loss is computed (when `data.dev` is set) and
    `dev_metrics(step, effective_params)`, if given, adds its own numbers (e.g. dev accuracy by generation)
    to that step's record. Checkpoint selection on dev reads these records from metrics.jsonl."""
    cfg = preflight.check_run(run)
    run_dir = storage.path(run.run_dir)
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
        preflight.check_disk(run_dir, run, cfg)  # before the data build and compiling
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
    if not _checkpointed(run_dir):  # it stopped before its first checkpoint: nothing trained is kept, so the
        return rundir.diff_configs(saved, run.to_dict()), {}  # error's own fix applies (recorded as a change)
    return rundir.check_config_change(saved, run.to_dict(), extend)


def _checkpointed(run_dir: Path) -> bool:
    """Whether the run has saved a checkpoint (a step it would resume from)."""
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


# What `train` itself writes into a run directory (anything else there means the directory is not a run's).
_RUN_DIR_NAMES = {rundir.CONFIG_FILE, rundir.METRICS_FILE, rundir.LOCK_FILE, "tb", "checkpoints",
                  ckpt_lib.DAMAGED_DIR, "DONE", tracking.ID_FILE, tracking.FILES_DIR}


def _train_locked(run, cfg, run_dir, verbose, max_steps_this_run, dev_metrics, extend, events) -> dict:
    session = _Session.start(run, cfg, run_dir, verbose, dev_metrics)
    with sharding.axis_rules(), jax.set_mesh(session.mesh):
        state, start = session.restore_or_init(extend)
        return session.loop(state, start, max_steps_this_run, events)


@dataclasses.dataclass
class _Session:
    """One `train` command on a run directory: what is fixed while it trains."""

    run: RunConfig
    run_dir: Path
    verbose: bool
    mesh: jax.sharding.Mesh
    layout: StateLayout
    params: dict
    loader: object
    dev_loader: Callable | None
    steps: int
    micro_batches: int
    dev_metrics: Callable | None
    cfg: config_lib.LlamaConfig

    @classmethod
    def start(cls, run: RunConfig, cfg, run_dir: Path, verbose: bool, dev_metrics) -> "_Session":
        mesh = sharding.make_mesh(run.mesh)
        micro_size = run.train.micro_batch_size or run.train.batch_size
        dp = sharding.data_parallel_size(mesh)
        if micro_size % dp:
            raise ConfigError(f"train.micro_batch_size ({micro_size}) must be a multiple of the data-parallel size "
                              f"mesh.data * mesh.fsdp = {dp}")
        processes = jax.process_count()
        if run.train.batch_size % processes:
            raise ConfigError(f"train.batch_size ({run.train.batch_size}) must be a multiple of the process "
                              f"count ({processes})")
        tokenizer_dir = run.data.tokenizer or run.model.path
        show = verbose and jax.process_index() == 0
        loader = data_lib.make_loader(run.data, tokenizer_dir, "train", run.train.batch_size // processes,
                                      drop_remainder=run.train.drop_last, verbose=show)
        steps = total_steps(run, loader.batches_per_epoch)
        dev_loader = None
        if run.data.dev:  # built (and its drops checked) now, not at the first evaluation
            data_lib.build_dataset(run.data, tokenizer_dir, "dev", verbose=show)
            dev_loader = functools.partial(data_lib.make_loader, run.data, tokenizer_dir, "dev",
                                           micro_size // processes, num_epochs=1)
        param_shardings = sharding.param_shardings(cfg, mesh, model.param_shapes(cfg, run.model.dtype))
        layout = StateLayout.for_run(run, cfg, mesh, param_shardings, total_steps=steps)
        _, params = convert.load_any(run.model.path, dtype=run.model.dtype, shardings=param_shardings)
        return cls(run, run_dir, verbose, mesh, layout, params, loader, dev_loader, steps,
                   run.train.batch_size // micro_size, dev_metrics, cfg)

    def log_line(self, *args):
        if self.verbose:
            print(*args)

    def restore_or_init(self, extend: bool) -> tuple[TrainState, int]:
        """The newest intact checkpoint (its data position restored too), or a fresh state at step 0."""
        self.checkpointer = ckpt_lib.Checkpointer(self.run_dir / "checkpoints", self.run.ckpt.keep,
                                                  self.run.ckpt.save_every, self.run.ckpt.async_save)
        try:
            restored = self.checkpointer.restore_newest(self.layout.checkpoint_target(self.params),
                                                        warn=preflight.warn)
            if restored is None:
                state, start = self.layout.init(self.params, jax.random.key(self.run.train.seed)), 0
            else:
                start, saved, data_state = restored
                check_trained_config(data_state, self.run, f"{self.checkpointer.directory}/{start}", extend)
                state = self.layout.restore(saved, self.params)
                self.loader.set_state(data_state)
                self.log_line(f"resumed from {self.checkpointer.directory}/{start}")
        except BaseException:  # the loop's own `finally` closes it from here on
            self.checkpointer.close()
            raise
        if jax.process_index() == 0:
            # Records after the restored step were written by a run that died before its next checkpoint;
            # those steps are about to be trained again.
            rundir.truncate_metrics(self.run_dir, start)
        return state, start

    def loop(self, state: TrainState, start: int, max_steps_this_run: int | None, events: dict) -> dict:
        run, layout = self.run, self.layout
        loss_sums = step_lib.make_loss(run, self.cfg, layout)
        schedule = optim.lr_schedule(run.optim, self.steps)
        step_fn = step_lib.jit_train_step(layout, loss_sums, schedule, run.train.seed, self.params,
                                          run.train.grad_reduce)
        eval_fn = step_lib.jit_eval_sums(layout, loss_sums, self.params) if self.dev_loader else None
        dense_fn = jax.jit(layout.dense)
        window = _Window(layout.method.logged)
        log = MetricsLog(self.run_dir, self.steps, start, progress_bar=self.verbose, run_config=run.to_dict(),
                         wandb=run.log.wandb)
        for event, change in events.items():  # config changes and extensions, recorded where the steps are
            if change:
                log.write({"step": start, "event": event, "total_steps": self.steps,
                           "changes": {k: list(v) for k, v in change.items()}})
        summary = {"run_dir": str(self.run_dir), "total_steps": self.steps, "start_step": start}
        pending = None  # metrics of the last dispatched step, fetched one step late (keeps the device busy)
        final_step, stopped, last_saved, failed = start, None, start, True
        try:
            with _StopSignal(enabled=jax.process_count() == 1) as stop:
                for step in range(start, self.steps):
                    host_batch = next(self.loader)
                    preflight.check_token_ids(host_batch["inputs"], self.cfg.vocab_size, step + 1)
                    batch = data_lib.to_global_batch(to_micro_batches(host_batch, self.micro_batches),
                                                     sharding.batch_sharding(self.mesh))
                    state, metrics = step_fn(self.params, state, batch)
                    final_step = step + 1
                    due = final_step == self.steps or (run.train.eval_every and final_step % run.train.eval_every == 0)
                    extra = self.evaluate(final_step, state, eval_fn, dense_fn) if due else {}
                    if pending is not None:
                        self.drain(log, window, summary, *pending)
                    pending = (metrics, final_step, extra)
                    if self.checkpointer.reached_preemption(final_step):  # several processes: agreed step
                        stop.received = "SIGTERM"
                    if stop.received or (max_steps_this_run and final_step - start >= max_steps_this_run):
                        stopped = stop.received or "max_steps_this_run"
                        break
                    if self.checkpointer.save(final_step, state.saved(), _data_state(self.loader, run)):
                        last_saved = final_step
                if pending is not None:
                    self.drain(log, window, summary, *pending)
            if last_saved != final_step:
                self.checkpointer.save(final_step, state.saved(), _data_state(self.loader, run), force=True)
            self.checkpointer.wait()
            failed = False
        finally:
            self.checkpointer.close()
            log.close(exit_code=int(failed))
        return self.finish(summary, final_step, stopped)

    def evaluate(self, step_done: int, state: TrainState, eval_fn, dense_fn) -> dict:
        """Dev numbers on the state right after `step_done`: the dev loss and the caller's `dev_metrics`."""
        out = {}
        if eval_fn is not None:
            num = den = 0.0
            for batch in self.dev_loader():
                rows = {k: batch[k] for k in data_lib.BATCH_KEYS}
                n, d = eval_fn(self.params, state, data_lib.to_global_batch(
                    rows, sharding.batch_sharding(self.mesh, micro_batched=False)))
                num, den = num + float(n), den + float(d)
            out["dev_loss"] = num / max(den, 1e-12)
        if self.dev_metrics is not None:
            out.update(self.dev_metrics(step_done, dense_fn(self.params, state)))
        return out

    def drain(self, log: MetricsLog, window: "_Window", summary: dict, metrics, step_done: int, extra: dict):
        """Fetches a step's metrics, stops on a non-finite loss, and logs every `log_every` steps."""
        metrics = jax.device_get(metrics)
        if not bool(metrics["finite"]):
            raise NonFiniteLossError(
                f"loss or gradient is not finite at step {step_done} (loss={float(metrics['loss'])}, "
                f"grad_norm={float(metrics['grad_norm'])}); the state was not updated and the last "
                f"checkpoint is intact. Lower optim.lr, set optim.clip_grad_norm, or check the data.")
        window.add(metrics)
        if step_done % self.run.train.log_every == 0 or step_done == self.steps or extra:
            record = {"step": step_done, **window.record(metrics), **extra}
            log.write(record)
            log.progress(window.steps, {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
            summary["last"] = record
            window.reset()

    def finish(self, summary: dict, final_step: int, stopped: str | None) -> dict:
        summary.update(final_step=final_step, stopped=stopped)
        if stopped is None:  # the last step's record holds the final dev numbers
            summary.update({k: v for k, v in summary.get("last", {}).items() if k.startswith("dev_")})
        if stopped and self.verbose:
            print(f"stopped ({stopped}) at step {final_step}/{self.steps}; checkpoint saved. Run the same command "
                  f"again to resume.")
        if stopped is None and jax.process_index() == 0:
            rundir.write_atomic(self.run_dir / "DONE", json.dumps(summary, default=str))
        return summary


class _Window:
    """The steps since the last log record: tokens (for tokens/s) and the method's summed metrics (mask flips)."""

    def __init__(self, logged: dict):
        self.logged = logged
        self.reset()

    def reset(self):
        self.sums = {k: 0 for k, how in self.logged.items() if how == "sum"}
        self.tokens, self.steps, self.t0 = 0, 0, time.perf_counter()

    def add(self, metrics: dict):
        for k in self.sums:
            self.sums[k] += int(metrics[k])
        self.tokens += int(metrics["tokens"])
        self.steps += 1

    def record(self, metrics: dict) -> dict:
        elapsed = time.perf_counter() - self.t0
        out = {"loss": float(metrics["loss"]), "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
               "tokens_per_s": self.tokens / max(elapsed, 1e-9)}
        out.update({k: self.sums[k] if how == "sum" else float(metrics[k]) for k, how in self.logged.items()
                    if k in metrics})
        return out


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


def total_steps(run: RunConfig, batches_per_epoch: int) -> int:
    if run.train.max_steps is not None:
        return run.train.max_steps
    return max(1, math.ceil(run.train.epochs * batches_per_epoch))



def to_micro_batches(batch: dict, micro_batches: int) -> dict:
    """[B, L] host arrays -> [M, B / M, L] (the model's inputs only)."""
    return {k: np.asarray(batch[k]).reshape(micro_batches, batch[k].shape[0] // micro_batches, *batch[k].shape[1:])
            for k in data_lib.BATCH_KEYS}
