"""Device mesh and shardings: one table maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism: params replicated), `fsdp` (data parallelism with params, scores
and optimizer state sharded along the hidden dimension), `tensor` (heads / MLP / vocab split).

Axis types: we build the mesh with `AxisType.Auto` on purpose. `jax.make_mesh` defaults to Explicit axes
in current JAX ("sharding in types"), which makes every op with ambiguous operand shardings an error; the
step here is written in the GSPMD style proven on TPU pods (MaxText): shardings are fixed at the jit
boundary (`in_shardings` / `out_shardings`) plus a few activation constraints, and XLA propagates the rest.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mft_jax import model
from mft_jax.config import ConfigError, LlamaConfig, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or axes). Changing the parallelism is editing this table, not the model.
RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices cannot be split with fixed axes of size {known} "
                              f"(data={mesh_cfg.data}, fsdp={mesh_cfg.fsdp}, tensor={mesh_cfg.tensor})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are present; "
                          f"set one axis to -1 to fill")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg or MeshConfig(), len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for an array; a dimension its mesh axes do not divide is replicated instead."""
    rules = dict(RULES)
    spec = []
    for name, size in zip(logical_axes, shape):
        mesh_axes = rules.get(name)
        if mesh_axes is not None:
            axes = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
            if size % math.prod(mesh.shape[a] for a in axes):
                mesh_axes = None
        spec.append(mesh_axes)
    return P(*spec)


def param_shardings(cfg: LlamaConfig, mesh: Mesh, shapes=None):
    """NamedSharding for every param (a pytree like the params)."""
    shapes = model.param_shapes(cfg) if shapes is None else shapes
    axes = model.param_logical_axes(cfg)
    return jax.tree.map(lambda a, s: NamedSharding(mesh, logical_to_spec(a, s.shape, mesh)), axes, shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, micro_batched: bool = True) -> NamedSharding:
    """Batches are [M, B, L] (micro-batch, rows, length): rows split over the data axes."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None) if micro_batched else P(BATCH_AXES, None))


def opt_state_shardings(optimizer, opt_state_shapes, trainable_shardings, mesh: Mesh):
    """Optimizer state shaped like the trainable tree gets its shardings; scalars (counts) are replicated."""
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state_shapes, trainable_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def axis_rules():
    """Context manager that binds the logical axis names of activations to mesh axes."""
    return nn.logical_axis_rules(RULES)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
