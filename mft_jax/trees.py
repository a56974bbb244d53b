"""Nested-dict pytree helpers keyed by paths: ("layers_4", "mlp", "up_proj", "kernel").

The params, scores, masks and adapters are plain nested dicts; a method works on a few of their leaves, so
it takes the sub-tree at some paths and merges updated leaves back (`subtree`, `merge`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Path = tuple[str, ...]


def flat_index(shape, offset: int = 0) -> jax.Array:
    """offset + the row-major flat index of every element of an array of `shape` (int32), built from iotas so
    each shard of a sharded array computes only its own part (the mask search's tie order, Hessian probes)."""
    index = jnp.full(shape, offset, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return index


def get_path(tree, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def flatten(tree) -> dict[Path, object]:
    """Nested dict -> {path: leaf}."""
    return {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[Path, object]) -> dict:
    """{path: leaf} -> nested dict (inverse of `flatten`)."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def subtree(tree, paths) -> dict:
    """`tree` restricted to `paths` (same nesting)."""
    return unflatten({p: get_path(tree, p) for p in paths})


def merge(tree, sub) -> dict:
    """`tree` with the leaves of `sub` replaced or added (a new dict; `tree` is not modified)."""
    def replace(node, sub_node):
        out = dict(node)
        for key, value in sub_node.items():
            out[key] = replace(node.get(key, {}), value) if isinstance(value, dict) else value
        return out
    return replace(tree, sub)
