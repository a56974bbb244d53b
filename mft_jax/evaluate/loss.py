"""Held-out SFT loss and perplexity through the data pipeline (`mft_jax.data`).

loss = sum(w * nll) / sum(w) over every target of the split, with the batches' `loss_weights` w: with
loss_reduction "example" each document's weights sum to 1, so this is the mean of per-example mean losses
(the training loss); with "token" it is the mean over supervised tokens. perplexity = exp(loss).
token_loss is always the plain mean over supervised tokens (w > 0).
The sums are taken per row on the devices and added on the host in float64, in row order. Several processes:
each runs a contiguous share of the batches on its own mesh; the per-row sums are gathered and added in that same
order, so the metrics equal one process's with the same per-process mesh exactly (on a data-parallel mesh no sum
crosses devices; with fsdp or tensor axes the devices' partial sums are reduced by the collectives of each
backend, which may round differently between one process and several).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mft_jax import losses, sharding
from mft_jax import model as model_lib
from mft_jax.config import DataConfig, LlamaConfig
from mft_jax.data import make_loader
from mft_jax.distributed import process_share
from mft_jax.evaluate.base import EvalModel, Task, check_local_mesh
from mft_jax.generate import bucket


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def loss_sums(cfg: LlamaConfig, params, batch: dict, *, compute_dtype=jnp.float32) -> jax.Array:
    """[4] float32: sum(w * nll), sum(w), sum(nll over w > 0), count(w > 0) for one batch of [B, L] arrays."""
    return jnp.sum(row_loss_sums(cfg, params, batch, compute_dtype=compute_dtype), axis=0)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def row_loss_sums(cfg: LlamaConfig, params, batch: dict, *, compute_dtype=jnp.float32) -> jax.Array:
    """[B, 4] float32: each row's sum(w * nll), sum(w), sum(nll over w > 0), count(w > 0). On a mesh whose rows
    are split over the data axes, no sum crosses devices: the host adds the rows (in float64, in order)."""
    logits_BxLxV = model_lib.forward(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                     options=model_lib.Options(compute_dtype))
    nll_BxL = losses.token_nll(logits_BxLxV, batch["targets"])
    w_BxL = batch["loss_weights"].astype(jnp.float32)
    supervised_BxL = w_BxL > 0
    return jnp.stack([jnp.sum(jnp.where(supervised_BxL, w_BxL * nll_BxL, 0.0), axis=1), jnp.sum(w_BxL, axis=1),
                      jnp.sum(jnp.where(supervised_BxL, nll_BxL, 0.0), axis=1),
                      jnp.sum(supervised_BxL, axis=1, dtype=jnp.float32)], axis=1)


def _trim(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the all-padding tail columns (to a power-of-two width, so few shapes compile)."""
    used = np.flatnonzero(batch["segment_ids"].any(axis=0))
    width = min(bucket(int(used[-1]) + 1 if used.size else 1, 16), batch["inputs"].shape[1])
    return {k: v[:, :width] for k, v in batch.items()}


class Loss(Task):
    """`data_cfg`'s `split` ("dev" by default) through `make_loader`, in order, one pass."""

    name = "loss"

    def __init__(self, data_cfg: DataConfig, tokenizer_dir: str | None = None, split: str = "dev"):
        super().__init__()
        if not getattr(data_cfg, split):
            raise ValueError(f"loss task: data.{split} lists no sources; give held-out data (--loss-data FILE)")
        self.data_cfg, self.tokenizer_dir, self.split = data_cfg, tokenizer_dir, split
        self.limit: int | None = None

    def load(self, limit: int | None = None) -> "Loss":
        self.limit = limit  # examples; the data itself is read (and cached) when run
        return self

    def __len__(self) -> int:
        return self.limit or 0

    def run(self, model: EvalModel) -> dict[str, float]:
        tokenizer_dir = self.tokenizer_dir or self.data_cfg.tokenizer or model.tokenizer_dir
        loader = make_loader(self.data_cfg, tokenizer_dir, self.split, model.batch_size, shuffle=False,
                             num_epochs=1, process_index=0, process_count=1, drop_remainder=False,
                             num_workers=0)
        max_batches = loader.num_batches
        # rows are examples unless data.packing: then exactly `limit` of them count, whatever the batch size
        rows_left = None if self.data_cfg.packing else self.limit
        if self.limit is not None:
            max_batches = min(max_batches, -(-self.limit // model.batch_size))
        # on a mesh each batch's rows are split over the data axes, as generation's prompts
        rows = None if model.mesh is None else sharding.batch_sharding(model.mesh, micro_batched=False)
        check_local_mesh(model.mesh)
        # several processes: each runs a contiguous share of the batches (on its own mesh), the per-row sums are
        # gathered and added in row order as one process adds them, so the metrics are the same bit for bit
        mine = process_share(max_batches)
        sums_KxBx4 = np.zeros((max_batches, model.batch_size, 4), np.float32)  # a short last batch: zero rows
        for k, batch in zip(range(max_batches), loader):
            batch = _trim(batch)
            if rows_left is not None:
                if rows_left < len(batch["loss_weights"]):  # the rows past the limit weigh nothing
                    batch["loss_weights"] = np.where(np.arange(len(batch["loss_weights"]))[:, None] < rows_left,
                                                     batch["loss_weights"], 0)
                rows_left = max(0, rows_left - len(batch["loss_weights"]))
            if not mine.start <= k < mine.stop:
                continue
            if rows is not None and len(batch["inputs"]) % sharding.data_parallel_size(model.mesh) == 0:
                batch = jax.device_put(batch, rows)
            sums_Bx4 = np.asarray(row_loss_sums(model.cfg, model.params, batch, compute_dtype=model.compute_dtype))
            sums_KxBx4[k, :len(sums_Bx4)] = sums_Bx4
        if jax.process_count() > 1:  # a batch's rows are nonzero on its one process: the sum over processes is them
            sums_KxBx4 = np.asarray(multihost_utils.process_allgather(sums_KxBx4)).sum(axis=0, dtype=np.float32)
        totals = np.zeros(4, np.float64)
        for sums in sums_KxBx4.reshape(-1, 4):  # one order whatever the process count (zero rows add nothing)
            totals += sums.astype(np.float64)
        weighted, weight, token_nll, tokens = totals
        if tokens == 0:
            raise ValueError(f"loss task: data.{self.split} has no supervised tokens")
        loss = weighted / weight
        return {"loss": loss, "perplexity": math.exp(loss), "token_loss": token_nll / tokens,
                "tokens": int(tokens), "batches": max_batches}
