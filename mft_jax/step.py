"""The jitted, sharded training step and the dev-loss evaluation, for any method (mft_jax.methods).

Per optimizer step:
  1. the method's view of the params is built once: what the loss is differentiated against (MFT: the masked
     kernels W~ = W * m, with masks carried in the state; FFT: the fp32 weights; LoRA: the adapters);
  2. a `lax.scan` over micro-batches accumulates d loss / d view in fp32, the frozen params closed over so XLA
     builds no gradient below the first trained leaf;
  3. the method turns those into gradients of its trainable tree (MFT: the straight-through estimator
     dL/ds = sign(s) * W * dL/dW~), which optax AdamW updates;
  4. the method derives what follows from the update (MFT: the new masks by exact top-k, and mask flips).
The loss is sum(w * nll) / sum(w) over the whole optimizer batch (mft_jax.losses). A non-finite loss or
gradient leaves the state untouched; the loop then stops with an error.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mft_jax import attention as attention_lib
from mft_jax import losses, model, sharding
from mft_jax.config import LlamaConfig, RunConfig
from mft_jax.state import StateLayout, TrainState

LossSums = Callable[..., tuple[jax.Array, jax.Array]]  # (params, batch, rng=None) -> (sum(w * nll), sum(w))


def platform(mesh) -> str:
    """The platform of a mesh's devices (tpu, gpu, cpu): the target a step is compiled for, which is not the
    host's backend when compiling ahead of time for a TPU topology or a GPU target."""
    return mesh.devices.flat[0].platform


def forward_options(run: RunConfig, layout: StateLayout) -> model.Options:
    """The run's forward pass for the layout's method and mesh: `model.attention` resolved for the platform of
    the mesh's devices, the method's adapters, fp32 weight gradients for `train.grad_reduce: fp32`."""
    return model.Options(compute_dtype=run.model.compute_dtype,
                         attention=attention_lib.resolve(run.model.attention, platform(layout.mesh), run.data.packing),
                         remat=run.model.remat, adapters=layout.method.adapters,
                         fp32_weight_grads=run.train.grad_reduce == "fp32")


def make_loss(run: RunConfig, cfg: LlamaConfig, layout: StateLayout) -> LossSums:
    """`losses.model_sft_sums` with the run's forward options: (params, batch, rng=None) ->
    (sum(w * nll), sum(w))."""
    return functools.partial(losses.model_sft_sums, cfg, options=forward_options(run, layout),
                             loss_chunk=run.model.loss_chunk)


def micro_batch_grads(method, loss_sums: LossSums, params, view, batch_MxBxL, step_key):
    """(sum over micro-batches of d sum(w * nll) / d view in fp32, sum(w * nll), sum(w), tokens): a `lax.scan`
    over the micro-batches [M, B, L], the frozen params closed over. Where the view is sharded over fsdp, each
    micro-batch's gradient is summed across the data-parallel devices (a reduce-scatter) in the view's dtype."""
    def micro_loss(v, micro, rng):
        return loss_sums(method.to_model(params, v), micro, rng)

    def accumulate(carry, micro_and_index):
        micro, index = micro_and_index
        grad_acc, num_acc, den_acc, tok_acc = carry
        (num, den), grad = jax.value_and_grad(micro_loss, has_aux=True)(view, micro,
                                                                        jax.random.fold_in(step_key, index))
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grad)
        tokens = jnp.sum(micro["segment_ids"] > 0, dtype=jnp.int32)
        return (grad_acc, num_acc + num, den_acc + den, tok_acc + tokens), None

    micro_batches = jax.tree.leaves(batch_MxBxL)[0].shape[0]
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), view)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grad_sum, num, den, tokens), _ = jax.lax.scan(accumulate, init, (batch_MxBxL, jnp.arange(micro_batches)))
    return grad_sum, num, den, tokens


def reduction_view(view, grad_reduce: str):
    """The view the gradient is taken against: an fp32 copy for `grad_reduce: fp32` (see `train_step`)."""
    return jax.tree.map(lambda v: v.astype(jnp.float32), view) if grad_reduce == "fp32" else view


def train_step(layout: StateLayout, loss_sums: LossSums, schedule: optax.Schedule, seed: int,
               grad_reduce: str = "compute"):
    """The step (params, state, batch [M, B, L]) -> (state, metrics), not yet jitted (see `jit_train_step`).

    grad_reduce: the dtype in which data-parallel devices sum each micro-batch's gradient where the trained
    matrices are sharded over fsdp (docs/architecture.md, "Gradient reduction"): `compute` (the compute dtype,
    bf16 in the shipped configs) or `fp32` (the view is an fp32 copy whose kernels take their gradients from
    their matmuls in fp32: twice the bytes, no 16-bit rounding of the partial sums). On a data mesh the trained
    matrices are whole on every device and XLA sums once per step, in fp32, either way.
    """
    method, optimizer = layout.method, layout.optimizer

    def step(params, state: TrainState, batch_MxBxL):
        view = reduction_view(method.view(params, state.trainable, state.derived), grad_reduce)
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout (unused without)
        grad_sum, num, den, tokens = micro_batch_grads(method, loss_sums, params, view, batch_MxBxL, step_key)
        den = jnp.maximum(den, 1e-12)
        loss = num / den
        grads = method.grads(params, state.trainable, state.derived, jax.tree.map(lambda g: g / den, grad_sum))

        grad_norm = optax.tree.norm(grads)
        # The check comes first, so the select fuses into the update's own pass over the state.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        keep_if_finite = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        trainable = jax.tree.map(keep_if_finite, optax.apply_updates(state.trainable, updates), state.trainable)
        opt_state = jax.tree.map(keep_if_finite, opt_state, state.opt_state)
        derived = method.derive(trainable, previous=(state.trainable, state.derived))  # unchanged if not finite
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "tokens": tokens,
                   "label_weight": den, "finite": finite, **method.step_metrics(derived, state.derived)}
        return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state, derived=derived), metrics

    return step


def jit_train_step(layout: StateLayout, loss_sums: LossSums, schedule: optax.Schedule, seed: int, params_shapes,
                   grad_reduce: str = "compute"):
    """The step, jitted with the layout's shardings; the state is donated."""
    state_shardings = layout.shardings(params_shapes)
    return jax.jit(train_step(layout, loss_sums, schedule, seed, grad_reduce),
                   in_shardings=(layout.param_shardings, state_shardings, sharding.batch_sharding(layout.mesh)),
                   out_shardings=(state_shardings, sharding.replicated(layout.mesh)), donate_argnums=(1,))


def jit_eval_sums(layout: StateLayout, loss_sums: LossSums, params_shapes):
    """(params, state, batch [B, L]) -> (sum(w * nll), sum(w)) of the trained model (`layout.dense`)."""
    def eval_sums(params, state, batch_BxL):
        return loss_sums(layout.dense(params, state), batch_BxL)

    return jax.jit(eval_sums, in_shardings=(layout.param_shardings, layout.shardings(params_shapes),
                                            sharding.batch_sharding(layout.mesh, micro_batched=False)))
