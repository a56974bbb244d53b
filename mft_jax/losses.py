"""The SFT loss on logits: weighted causal-LM cross-entropy.

Batches carry `loss_weights` that make one formula serve both reductions (see mft_jax.data):
per-example (the reference: each example's mean over its label tokens, then the mean over examples) gives
each label token the weight 1 / (its example's label count); per-token gives weight 1. Either way
loss = sum(w * nll) / sum(w), and gradient accumulation sums numerator and denominator separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def sft(logits_BxLxV, targets_BxL, loss_weights_BxL) -> jax.Array:
    """The SFT loss of one batch: sum(w * nll) / sum(w)."""
    num, den = sft_sums(logits_BxLxV, targets_BxL, loss_weights_BxL)
    return num / jnp.maximum(den, 1e-12)
