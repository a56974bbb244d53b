"""Training methods as transformations of the frozen params pytree: MFT, FFT and LoRA.

A method (`Trainable`) answers, in one place, everything the step and the loop need to know about it:
  init(params, key)                 the pytree optax trains (scores, fp32 weights, adapters);
  derive(trainable, previous)       what follows from it after an update (MFT: masks and search cuts);
  view(params, trainable, derived)  the pytree the loss is differentiated against (MFT: W * m);
  to_model(params, view)            the params the forward pass sees, built from that view;
  grads(params, trainable, derived, view_grads)   gradients of the trainable tree (MFT: straight-through);
  dense(params, trainable, derived) the trained model as plain params (evaluation and export).
Checkpoints hold the trainable tree and the optimizer state; derived values are recomputed on restore.

`METHODS` is the one list of methods: `train.mode` is checked against it, and `make` builds from it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from mft_jax import masking, sharding
from mft_jax.config import PROJECTIONS, ConfigError, LlamaConfig, RunConfig
from mft_jax.model import Adapters
from mft_jax.trees import get_path, merge, subtree, unflatten


class Trainable:
    """The interface (see the module docstring); the defaults suit methods with nothing derived."""

    name = ""
    adapters: Adapters | None = None  # adapters the model applies beside its kernels (LoRA's scale and dropout)
    logged: dict = {}  # step metrics the log carries: name -> "sum" (over the steps since the last record) or "last"

    def init(self, params, key):
        raise NotImplementedError

    def derive(self, trainable, previous=None) -> dict:
        """previous = (old trainable, old derived), when an update was made from them."""
        return {}

    def view(self, params, trainable, derived):
        return trainable

    def to_model(self, params, view):
        raise NotImplementedError

    def grads(self, params, trainable, derived, view_grads):
        return view_grads

    def dense(self, params, trainable, derived):
        raise NotImplementedError

    def shardings(self, param_shardings, mesh):
        """The trainable tree's shardings, from the params' (so it is sharded like the weights it belongs to)."""
        raise NotImplementedError

    def derived_shardings(self, trainable_shardings, mesh) -> dict:
        return {}

    def step_metrics(self, new_derived, old_derived) -> dict:
        return {}

    def masks(self, derived):
        """The bool masks an export writes (None: the method has none)."""
        return None


@dataclasses.dataclass(frozen=True)
class MFT(Trainable):
    """Scores -> exact top-k masks -> W * m at the masked kernels; straight-through gradient to the scores."""

    cfg: LlamaConfig
    mask_cfg: Any
    name = "mft"
    logged = {"mask_flips": "sum", "kept": "last", "kept_attn": "last", "kept_mlp": "last"}

    @property
    def paths(self):
        return masking.masked_paths(self.cfg, self.mask_cfg)

    def init(self, params, key):
        return masking.init_scores(key, params, self.mask_cfg, self.cfg)

    def derive(self, trainable, previous=None):
        """The masks and their cuts (each matrix's k-th largest |score|, which warm-starts the next search)."""
        if previous is not None:
            previous = (previous[0], previous[1]["mask_cuts"])
        masks, cuts = masking.topk_masks(trainable, self.mask_cfg, previous)
        return {"masks": masks, "mask_cuts": cuts}

    def view(self, params, trainable, derived):
        return jax.tree.map(lambda w, m: w * m.astype(w.dtype), subtree(params, self.paths), derived["masks"])

    def to_model(self, params, view):
        return merge(params, view)

    def grads(self, params, trainable, derived, view_grads):
        return masking.score_grads(trainable, subtree(params, self.paths), view_grads, self.mask_cfg)

    def dense(self, params, trainable, derived):
        return masking.apply_masks(params, derived["masks"])

    def shardings(self, param_shardings, mesh):
        return subtree(param_shardings, self.paths)

    def derived_shardings(self, trainable_shardings, mesh):
        return {"masks": trainable_shardings, "mask_cuts": sharding.replicated(mesh)}

    def step_metrics(self, new_derived, old_derived):
        new, old = jax.tree.leaves(new_derived["masks"]), jax.tree.leaves(old_derived["masks"])
        flips = sum(jnp.sum(a != b, dtype=jnp.int32) for a, b in zip(new, old))
        return {"mask_flips": flips, **masking.mask_stats(new_derived["masks"])}

    def masks(self, derived):
        return derived["masks"]


@dataclasses.dataclass(frozen=True)
class FFT(Trainable):
    """The params themselves, trained through an fp32 master copy (the paper's full fine-tuning baseline)."""

    name = "fft"

    def init(self, params, key):
        return jax.tree.map(lambda w: w.astype(jnp.float32), params)

    def to_model(self, params, view):
        return view

    def dense(self, params, trainable, derived):
        return jax.tree.map(lambda t, p: t.astype(p.dtype), trainable, params)

    def shardings(self, param_shardings, mesh):
        return param_shardings


@dataclasses.dataclass(frozen=True)
class LoRA(Trainable):
    """Low-rank adapters beside the frozen kernels, as PEFT (the reference's LoRA baseline): W x + s B A d(x)
    with s = alpha / rank and d a dropout on the adapter's input. A [in, r] starts uniform in +-1/sqrt(in)
    (PEFT's kaiming-uniform with a = sqrt(5)), B [r, out] at zero, so training starts from the base model.
    The adapters sit next to each kernel in the params the model sees (`lora_a`, `lora_b`); exported merged."""

    cfg: LlamaConfig
    lora_cfg: Any
    seed: int
    name = "lora"

    @property
    def paths(self):
        """The adapted modules, e.g. ("layers_0", "self_attn", "q_proj")."""
        return [(f"layers_{i}", PROJECTIONS[t], t) for i in range(self.cfg.num_hidden_layers)
                for t in PROJECTIONS if t in self.lora_cfg.targets]

    @property
    def adapters(self) -> Adapters:
        return Adapters(scale=self.lora_cfg.alpha / self.lora_cfg.rank, dropout=self.lora_cfg.dropout)

    def init(self, params, key):
        r = self.lora_cfg.rank
        out = {}
        for i, path in enumerate(self.paths):
            d_in, d_out = get_path(params, path + ("kernel",)).shape
            bound = 1.0 / math.sqrt(d_in)
            out[path + ("lora_a",)] = jax.random.uniform(jax.random.fold_in(key, i), (d_in, r), jnp.float32,
                                                         -bound, bound)
            out[path + ("lora_b",)] = jnp.zeros((r, d_out), jnp.float32)
        return unflatten(out)

    def to_model(self, params, view):
        return merge(params, view)

    def dense(self, params, trainable, derived):
        scale = self.lora_cfg.alpha / self.lora_cfg.rank
        merged = {}
        for path in self.paths:
            w = get_path(params, path + ("kernel",))
            a, b = get_path(trainable, path + ("lora_a",)), get_path(trainable, path + ("lora_b",))
            delta = jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST) * scale
            merged[path + ("kernel",)] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        return merge(params, unflatten(merged))

    def shardings(self, param_shardings, mesh):
        """A splits the kernel's input axis and B its output axis, the rank stays whole."""
        out = {}
        for path in self.paths:
            spec = get_path(param_shardings, path + ("kernel",)).spec
            spec_in, spec_out = (tuple(spec) + (None, None))[:2]
            out[path + ("lora_a",)] = NamedSharding(mesh, P(spec_in, None))
            out[path + ("lora_b",)] = NamedSharding(mesh, P(None, spec_out))
        return unflatten(out)


def _mft(run: RunConfig, cfg: LlamaConfig) -> MFT:
    run.mask.check_against(cfg)
    return MFT(cfg, run.mask)


# train.mode -> the method a run trains (built from the run and the model config)
METHODS = {
    "mft": _mft,
    "fft": lambda run, cfg: FFT(),
    "lora": lambda run, cfg: LoRA(cfg, run.lora, run.train.seed),
}


def make(run: RunConfig, cfg: LlamaConfig) -> Trainable:
    """The run's method (`train.mode`), checked against the model."""
    if run.train.mode not in METHODS:
        raise ConfigError(f"train.mode {run.train.mode!r} is not a method; choose one of {list(METHODS)}")
    return METHODS[run.train.mode](run, cfg)


def trainable_count(method: Trainable, params_shapes) -> int:
    """Elements of the trainable tree (no allocation)."""
    shapes = jax.eval_shape(method.init, params_shapes, jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
