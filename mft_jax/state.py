"""The typed train state and its layout: shapes, shardings and the checkpoint target of a run's state.

`TrainState` holds the step, the trainable tree, the optimizer state and the method's derived values (MFT's
masks and search cuts). Derived fields are marked by their field metadata, so saving and restoring need no
list of names: `saved()` is what a checkpoint holds, `StateLayout.restore` recomputes the rest.

`StateLayout` is the part of a run that export and evaluation need to read a checkpoint back: it knows the
method, the optimizer's state structure and the mesh, and nothing about batches or the step function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mft_jax import checkpoint as ckpt_lib
from mft_jax import methods, optim, sharding
from mft_jax.config import LlamaConfig, RunConfig


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps done
    trainable: Any  # what optax trains (methods.Trainable.init)
    opt_state: Any
    derived: Any = struct.field(default_factory=dict, metadata={"derived": True})  # recomputed, never saved

    def saved(self) -> dict:
        """The checkpointed fields, by name (the checkpoint layout: {"step", "trainable", "opt_state"})."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("derived")}


class StateLayout:
    """Shapes and shardings of a run's `TrainState`, its checkpoint target, init and restore."""

    def __init__(self, method: methods.Trainable, optimizer: optax.GradientTransformation, mesh,
                 param_shardings):
        self.method, self.optimizer, self.mesh, self.param_shardings = method, optimizer, mesh, param_shardings
        self._cache = {}

    @classmethod
    def for_run(cls, run: RunConfig, cfg: LlamaConfig, mesh, param_shardings, total_steps: int = 1):
        """The layout of a run's state. The optimizer state's structure does not depend on the schedule's
        length, so readers of a checkpoint (export, evaluation) may leave `total_steps` at 1."""
        return cls(methods.make(run, cfg), optim.build(run.optim, total_steps)[0], mesh, param_shardings)

    def _init(self, params, key) -> TrainState:
        trainable = self.method.init(params, key)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                          opt_state=self.optimizer.init(trainable), derived=self.method.derive(trainable))

    def _abstract(self, params_shapes) -> tuple[TrainState, TrainState]:
        """(state shapes, state shardings), computed once per params structure, shapes and dtypes (the
        eval_shape of the whole init is not free). `params_shapes` may be arrays or ShapeDtypeStructs."""
        leaves, treedef = jax.tree.flatten(params_shapes)
        key = (treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype), bool(getattr(x, "weak_type", False)))
                              for x in leaves))
        if key not in self._cache:
            abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in key[1]])
            shapes = jax.eval_shape(lambda p: self._init(p, jax.random.key(0)), abstract)
            trainable = self.method.shardings(self.param_shardings, self.mesh)
            shardings = TrainState(
                step=sharding.replicated(self.mesh), trainable=trainable,
                opt_state=sharding.opt_state_shardings(self.optimizer, shapes.opt_state, trainable, self.mesh),
                derived=self.method.derived_shardings(trainable, self.mesh))
            self._cache[key] = (shapes, shardings)
        return self._cache[key]

    def shapes(self, params_shapes) -> TrainState:
        return self._abstract(params_shapes)[0]

    def shardings(self, params_shapes) -> TrainState:
        return self._abstract(params_shapes)[1]

    def checkpoint_target(self, params_shapes) -> dict:
        """The abstract saved state a checkpoint restores onto: ShapeDtypeStructs with this layout's shardings."""
        shapes, shardings = self._abstract(params_shapes)
        return ckpt_lib.abstract_like(shapes.saved(), shardings.saved())

    def init(self, params, key) -> TrainState:
        return jax.jit(self._init, out_shardings=self.shardings(params))(params, key)

    def restore(self, saved: dict, params_shapes) -> TrainState:
        """A `TrainState` from a checkpoint's saved fields, with the derived values recomputed."""
        derive = jax.jit(self.method.derive, out_shardings=self.shardings(params_shapes).derived)
        return TrainState(**saved, derived=derive(saved["trainable"]))

    def dense(self, params, state: TrainState):
        """The trained model as plain params (what evaluation runs and export writes)."""
        return self.method.dense(params, state.trainable, state.derived)
