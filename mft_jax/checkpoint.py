"""Orbax checkpoints of a run: the trainable tree, optimizer state, step and data-iterator position.

Frozen weights are not saved (they are reloaded from the base checkpoint), nor are masks (they are a
function of the scores). Orbax writes each checkpoint under a temporary name and renames it when complete,
so a run killed mid-save never leaves a half-written checkpoint as the latest one.

On several processes every process calls save and restore: orbax writes and reads each process's shards of
the state, and each process keeps its own data-iterator position (it reads its own rows) in `data/process_I.json`.

On Cloud Storage (a gs:// run directory) orbax writes straight to the bucket and marks a complete checkpoint with
a commit object (`commit_success.txt`) instead of a rename; a step without it (a kill during its write) is not a
checkpoint: the manager skips it on restore and writes the step again.

A checkpoint that cannot be read (a disk fault, a file removed by hand) does not end the run: `restore_newest`
warns, naming it, and resumes from the newest intact one; the unreadable ones are moved to
`RUN/checkpoints_damaged/` (never deleted) so that the run can save those steps again.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from mft_jax import storage
from mft_jax.convert import CheckpointError, error_summary

DAMAGED_DIR = "checkpoints_damaged"


class ProcessCountError(CheckpointError):
    """An intact checkpoint saved by another number of processes than this run has."""


class Checkpointer:
    """RUN/checkpoints/N/{state, data}: save every `save_every` steps (async), keep the last `keep`."""

    def __init__(self, directory: str | Path, keep: int = 3, save_every: int = 500, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = storage.absolute(directory)
        # orbax's JSON item is written by process 0 only by default; here every process writes its own file.
        self._data_file = f"process_{jax.process_index()}.json"
        data_handler = ocp.JsonCheckpointHandler(
            self._data_file, multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "data": data_handler})

    def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
        """Saves if `step` is on the save interval (or `force`); returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int | None, abstract_state, data: bool = True) -> tuple[object, dict | None]:
        """Restores `step` (default: latest) onto the shardings given in `abstract_state` (a pytree of
        `jax.ShapeDtypeStruct` with `.sharding`; any mesh, not only the one saved from) and, with `data`, this
        process's data-iterator state (else None)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        if data and not (self.directory / str(step) / "data" / self._data_file).is_file():
            saved_by = sorted((self.directory / str(step) / "data").glob("process_*.json"))
            if not saved_by:
                raise CheckpointError(f"{self.directory}/{step} is damaged: it holds no data-iterator state "
                                      f"(data/process_*.json)")
            raise ProcessCountError(f"{self.directory}/{step} holds no data-iterator state for process "
                                  f"{jax.process_index()} (data/{self._data_file}; it has "
                                  f"{[f.name for f in saved_by]}): it was saved by {len(saved_by)} processes; "
                                  f"resume with that process count")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["data"] if data else None

    def restore_newest(self, abstract_state, warn: Callable[[str], None] = print):
        """(step, state, data state) of the newest checkpoint that can be read, or None when there is none.

        Unreadable ones are skipped with a warning naming each and moved to RUN/checkpoints_damaged/; if none can
        be read, a `CheckpointError` lists them all. A checkpoint saved by another process count is not damaged:
        that error is raised as it is."""
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                with _quiet_read_errors():
                    state, data_state = self.restore(step, abstract_state)
            except ProcessCountError:
                raise
            except CheckpointError as e:
                failures.append((step, str(e)))
            except Exception as e:  # orbax and TensorStore raise many types for damaged files
                failures.append((step, error_summary(e, limit=200)))
            else:
                if failures:
                    self._set_aside([s for s, _ in failures])
                return step, state, data_state
            warn(f"warning: checkpoint {self.directory}/{step} cannot be read ({failures[-1][1]}); "
                 f"trying the one before it")
        if failures:
            listed = "; ".join(f"{step}: {why}" for step, why in failures)
            raise CheckpointError(f"no checkpoint in {self.directory} can be read ({listed}); move the directory "
                                  f"aside to start the run over, or copy intact checkpoints back")
        return None

    def _set_aside(self, steps: list[int]):
        """Moves unreadable checkpoints out of the manager's directory (process 0; the others wait)."""
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR
            target.mkdir(exist_ok=True)
            for step in steps:
                storage.move_tree(self.directory / str(step), target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mft_jax.checkpoint.set_aside")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """On several processes: whether all of them agreed to stop at `step` after one got SIGTERM (JAX's
        preemption sync point); always False on one process."""
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a (possibly different) mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)



@contextlib.contextmanager
def _quiet_read_errors():
    """orbax logs every failed tensor read with a long traceback, and TensorStore callbacks that finish after a
    failed restore report "Event loop is closed" as unraisable exceptions (possibly later, from other threads).
    `restore_newest` reports each failure in one line itself, so both are silenced: the log during the attempt,
    the closed-loop reports from then on (nothing else is affected)."""
    if not getattr(sys.unraisablehook, "_mft_jax_quiet", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
                return
            previous(unraisable)

        hook._mft_jax_quiet = True
        sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropUnretrieved) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropUnretrieved())
        # The abandoned reads' coroutines are reported when collected, possibly much later.
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning,
                                module=r"(orbax|jax|asyncio)\.")
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


class _DropUnretrieved(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" reports of TensorStore reads that a failed restore
    abandoned (their error is the one `restore_newest` already reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()
