"""Orbax checkpoints of a run: the trainable tree, optimizer state, step and data-iterator position.

Frozen weights are not saved (they are reloaded from the base checkpoint), nor are masks (they are a
function of the scores). Orbax writes each checkpoint under a temporary name and renames it when complete,
so a run killed mid-save never leaves a half-written checkpoint as the latest one.

On several processes every process calls save and restore: orbax writes and reads each process's shards of
the state, and each process keeps its own data-iterator position (it reads its own rows) in `data/process_I.json`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """RUN/checkpoints/N/{state, data}: save every `save_every` steps (async), keep the last `keep`."""

    def __init__(self, directory: str | Path, keep: int = 3, save_every: int = 500, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = Path(directory).absolute()
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
            raise FileNotFoundError(f"{self.directory}/{step} holds no data-iterator state for process "
                                    f"{jax.process_index()} (data/{self._data_file}): it was saved by fewer "
                                    f"processes; resume with the process count it was saved with")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["data"] if data else None

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
