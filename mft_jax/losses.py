"""The SFT loss: weighted causal-LM cross-entropy, on logits and through the model (`model_sft_sums`).

Batches carry `loss_weights` that make one formula serve both reductions (see mft_jax.data):
per-example (the reference: each example's mean over its label tokens, then the mean over examples) gives
each label token the weight 1 / (its example's label count); per-token gives weight 1. Either way
loss = sum(w * nll) / sum(w), and gradient accumulation sums numerator and denominator separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mft_jax import model
from mft_jax.config import LlamaConfig


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Negative log-likelihood [B, L] (float32) of each target token."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL


def sft_sums(logits_BxLxV, targets_BxL, loss_weights_BxL) -> tuple[jax.Array, jax.Array]:
    """(sum(w * nll), sum(w)): the numerator and denominator of the SFT loss for one micro-batch."""
    w_BxL = loss_weights_BxL.astype(jnp.float32)
    nll_BxL = token_nll(logits_BxLxV, targets_BxL)
    return jnp.sum(jnp.where(w_BxL > 0, nll_BxL * w_BxL, 0.0)), jnp.sum(w_BxL)


def chunked_sft_sums(hidden_BxLxD, head_DxV, targets_BxL, loss_weights_BxL, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`sft_sums` of logits = hidden @ head, computed `chunk` positions at a time.

    A scan over position chunks, each checkpointed: the backward pass recomputes one chunk's logits at a
    time, so at most [B, chunk, V] fp32 logits exist rather than [B, L, V]. The matmul runs in the hidden
    states' dtype, as the model's own head. Positions past L (padding up to a multiple of `chunk`) weigh 0.
    """
    b, length, d = hidden_BxLxD.shape
    n = -(-length // chunk)
    pad = n * chunk - length
    w_BxL = loss_weights_BxL.astype(jnp.float32)
    if pad:
        hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL, w_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad))), jnp.pad(w_BxL, ((0, 0), (0, pad)))
    chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731  [n, B, chunk, ...]
    head = head_DxV.astype(hidden_BxLxD.dtype)

    @jax.checkpoint
    def one(h_BxCxD, t_BxC, w_BxC):
        return sft_sums(jnp.dot(h_BxCxD, head).astype(jnp.float32), t_BxC, w_BxC)

    def body(carry, xs):
        num, den = one(*xs)
        return (carry[0] + num, carry[1] + den), None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero), (chunks(hidden_BxLxD), chunks(targets_BxL), chunks(w_BxL)))[0]


def sft(logits_BxLxV, targets_BxL, loss_weights_BxL) -> jax.Array:
    """The SFT loss of one batch: sum(w * nll) / sum(w)."""
    num, den = sft_sums(logits_BxLxV, targets_BxL, loss_weights_BxL)
    return num / jnp.maximum(den, 1e-12)


def model_sft_sums(cfg: LlamaConfig, params, batch, rng=None, *, options: model.Options = model.Options(),
                   loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum(w * nll), sum(w)) of one batch [B, L] through the model; with `loss_chunk`, the head and
    cross-entropy run that many positions at a time. `rng` turns on the adapters' dropout (LoRA), if any.
    The one SFT loss of training (mft_jax.step), dev evaluation, the landscape and the Hessian studies."""
    out = model.forward(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"], options=options,
                        hidden_only=loss_chunk > 0, dropout_rng=rng)
    if loss_chunk > 0:
        return chunked_sft_sums(out, model.lm_head_kernel(cfg, params), batch["targets"], batch["loss_weights"],
                                loss_chunk)
    return sft_sums(out, batch["targets"], batch["loss_weights"])
