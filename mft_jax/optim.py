"""The optimizer: AdamW with linear warm-up and decay and global-norm clipping, as the reference's HF Trainer."""

from __future__ import annotations

import math

import optax


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up over ceil(warmup_ratio * steps) from 0, then linear decay to 0 (as HF's Trainer)."""
    warmup = math.ceil(optim_cfg.warmup_ratio * total_steps)
    if optim_cfg.schedule == "constant":
        decay = optax.constant_schedule(optim_cfg.lr)
    else:
        decay = optax.linear_schedule(optim_cfg.lr, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup), decay], [warmup])


def build(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) for a run of `total_steps` optimizer steps."""
    schedule = lr_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay)
    if optim_cfg.clip_grad_norm:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_grad_norm), adamw), schedule
    return adamw, schedule
