"""Activation-aware mask baselines: Wanda-style masks at MFT's layers and keep ratios.

Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023) scores each
weight by |W| times the L2 norm of its input feature over calibration tokens, and drops the lowest scores.
Here, with kernels [in, out], the score of W[j, i] is |W[j, i]| * ||X_j||_2, where X_j is input feature j of
that linear layer over every calibration token.

Differences from the paper, on purpose:
- Grouping: the paper compares weights per output neuron; by default we compare them per matrix, as MFT's
  local masks and the magnitude baseline do, keeping exactly `masking.num_kept(n, keep)` weights with the same
  tie rule (`masking.topk_masks`: among equal scores the higher flat index is kept). `per_output=True`
  gives the paper's grouping: num_kept(in, keep) weights kept in every output column (ties: higher row kept).
- Calibration data: the run's own training data (`data.train`, its seeded shuffle, its chat template), not C4;
  every non-padding input token counts (prompt and response alike), padding (segment id 0) never does.
  Default budget: 128 * 2048 tokens, Wanda's 128 sequences of 2048.
- One dense forward of the unpruned model collects every norm (Wanda prunes layer by layer, feeding each
  layer the already-pruned previous layers' outputs). Masking touches a few chosen layers, like MFT.

The inputs of q/k/v are the same tensor (the attention input norm's output), so they share one norm, as do
gate/up (the MLP input norm's output); o_proj's input is the attention output, down_proj's silu(gate) * up.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mft_jax import data as data_lib
from mft_jax import masking, model, trees
from mft_jax.config import ConfigError, LlamaConfig, MaskConfig, RunConfig

DEFAULT_CALIBRATION_TOKENS = 128 * 2048  # Wanda's 128 calibration sequences of 2048 tokens
KernelPath = tuple[str, ...]


# --------------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------------

def calibration_batches(run: RunConfig, tokenizer_dir: str | None, tokens: int = DEFAULT_CALIBRATION_TOKENS,
                        batch_size: int | None = None, verbose: bool = False) -> list[dict[str, np.ndarray]]:
    """Batches ([B, L] numpy, as the trainer's) of the run's training data holding exactly `tokens` non-padding
    tokens (all of the data when it holds fewer; `calibration_tokens` counts them).

    The rows come in the order of the training's first epoch (data.seed, data.shuffle); every process reads
    the same rows (process_count=1), so on several processes every process computes the same norms. The
    last batch is cut at the budget by setting the segment id of the tokens past it (row-major) to 0, which
    changes nothing before them: attention is causal and never crosses rows. batch_size: rows per forward;
    None: 8192 tokens' worth (the XLA attention holds [B, heads, L, L] fp32 logits: 4.3 GB for a 7B at L=4096)."""
    if not (isinstance(tokens, int) and tokens > 0):
        raise ConfigError(f"--calibration-tokens must be a positive integer, got {tokens!r}")
    batch_size = batch_size or max(1, 8192 // run.data.max_seq_length)
    loader = data_lib.make_loader(run.data, tokenizer_dir, "train", batch_size, num_epochs=1, process_index=0,
                                  process_count=1, drop_remainder=False, verbose=verbose)
    batches, total = [], 0
    for batch in loader:
        valid_BxL = batch["segment_ids"] > 0
        room = tokens - total
        if valid_BxL.sum() > room:
            keep_BxL = valid_BxL & (np.cumsum(valid_BxL.reshape(-1)).reshape(valid_BxL.shape) <= room)
            batch = {**batch, "segment_ids": np.where(keep_BxL, batch["segment_ids"], 0)}
        total += int((batch["segment_ids"] > 0).sum())
        batches.append(batch)
        if total >= tokens:
            break
    if verbose and total < tokens:
        print(f"note: data.train holds {total} tokens, fewer than the {tokens} calibration tokens asked for; "
              f"calibrating on all of them")
    return batches


def calibration_tokens(batches) -> int:
    """Non-padding tokens in `batches` (what the norms are taken over)."""
    return int(sum((np.asarray(b["segment_ids"]) > 0).sum() for b in batches))


# --------------------------------------------------------------------------------------------------------
# Input norms
# --------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "paths", "compute_dtype"))
def _square_sums(cfg: LlamaConfig, params, tokens_BxL, positions_BxL, segment_ids_BxL, *, paths: tuple,
                 compute_dtype: str = "float32") -> dict:
    """{path: f32[in]}: sum over the non-padding tokens of the squared inputs of each Dense in `paths`.

    The model is not changed: a Flax method interceptor sees every `Dense.__call__` input during one forward
    (traced inside this jit, so the values it keeps are this trace's)."""
    wanted = set(paths)
    valid_BxL = (segment_ids_BxL > 0).astype(jnp.float32)
    sums = {}

    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, model.Dense) and context.method_name == "__call__":
            path = (*context.module.path, "kernel")
            if path in wanted:
                x_BxLxI = args[0].astype(jnp.float32)
                sums[path] = jnp.einsum("bli,bl->i", x_BxLxI * x_BxLxI, valid_BxL)
        return next_fun(*args, **kwargs)

    llama = model.Llama(cfg, model.Options(compute_dtype))
    with nn.intercept_methods(intercept):  # hidden_only: the LM head is not needed
        llama.apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL, hidden_only=True)
    missing = wanted - set(sums)
    if missing:
        raise ValueError(f"no Dense call seen for {sorted(missing)[:3]}; is each path a linear layer's kernel?")
    return sums


def input_norms(cfg: LlamaConfig, params, batches, paths,
                compute_dtype: str = "float32") -> dict[KernelPath, np.ndarray]:
    """{kernel path: f32[in]}: ||X_j||_2 over every non-padding token (segment_ids > 0) of `batches`, for
    each input feature j of each masked linear layer (`paths`, e.g. `masking.masked_paths`).

    One forward per batch (the unmasked model, `compute_dtype` activations); the squares are summed in fp32 per
    batch and in float64 across batches. Batches are dicts with `inputs`, `positions`, `segment_ids` [B, L]."""
    paths = tuple(tuple(p) for p in paths)
    totals = {p: np.zeros(trees.get_path(params, p).shape[0], np.float64) for p in paths}
    for batch in batches:
        sums = _square_sums(cfg, params, jnp.asarray(batch["inputs"], jnp.int32),
                            jnp.asarray(batch["positions"], jnp.int32), jnp.asarray(batch["segment_ids"], jnp.int32),
                            paths=paths, compute_dtype=compute_dtype)
        for p, s in jax.device_get(sums).items():
            totals[p] += np.asarray(s, np.float64)
    return {p: np.sqrt(t).astype(np.float32) for p, t in totals.items()}


# --------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------

def wanda_scores(params, norms: dict[KernelPath, np.ndarray]) -> dict:
    """{kernel: f32[in, out]} pytree: |W[j, i]| * norm[j] (one float32 multiply, so any implementation that
    rounds the same inputs the same way gets the same scores)."""
    return trees.unflatten({p: jnp.abs(jnp.asarray(trees.get_path(params, p), jnp.float32))
                              * jnp.asarray(n, jnp.float32)[:, None] for p, n in norms.items()})


def _per_output_masks(scores, mask_cfg: MaskConfig) -> dict:
    """Per output column: num_kept(in, keep) largest scores kept; among equal, the higher row (a stable
    ascending sort that drops its first int((1 - keep) * in) rows)."""
    out = {}
    for path, s_IxO in trees.flatten(scores).items():
        drop = s_IxO.shape[0] - masking.num_kept(s_IxO.shape[0], masking.keep_fraction(path, mask_cfg))
        rank_IxO = jnp.argsort(jnp.argsort(s_IxO, axis=0, stable=True), axis=0, stable=True)
        out[path] = rank_IxO >= drop
    return trees.unflatten(out)


def wanda_masks(params, norms: dict[KernelPath, np.ndarray], mask_cfg: MaskConfig, cfg: LlamaConfig,
                per_output: bool = False) -> dict:
    """bool masks (pytree like `masking.topk_masks`) keeping the largest |W| * ||X_j|| at the run's masked
    layers and keep ratios: exactly `masking.num_kept(n, keep)` per matrix, MFT's tie rule (per_output=False,
    our default); or num_kept(in, keep) per output column (per_output=True, the Wanda paper's grouping)."""
    if mask_cfg.mode != "local":
        raise ConfigError("baseline wanda keeps a fraction of each matrix; it needs mask.mode: local "
                          f"(got {mask_cfg.mode!r})")
    paths = masking.masked_paths(cfg, mask_cfg)
    missing = [p for p in paths if p not in norms]
    if missing:
        raise ValueError(f"no input norms for {missing[:3]}; compute them with input_norms(..., paths)")
    scores = wanda_scores(params, {p: norms[p] for p in paths})
    if per_output:
        return _per_output_masks(scores, mask_cfg)
    masks, _ = masking.topk_masks(scores, mask_cfg)  # (masks, cuts): the cuts are not needed here
    return masks


def wanda_baseline(run: RunConfig, cfg: LlamaConfig, params, tokenizer_dir: str | None,
                   tokens: int = DEFAULT_CALIBRATION_TOKENS, per_output: bool = False,
                   verbose: bool = False) -> tuple[dict, dict]:
    """(masks, metadata) of the Wanda baseline for a run config: calibration batches from data.train, input
    norms of the masked layers, masks. metadata: {"baseline": "wanda", "calibration_tokens": N, "grouping"}."""
    run.mask.check_against(cfg)
    batches = calibration_batches(run, tokenizer_dir, tokens, verbose=verbose)
    norms = input_norms(cfg, params, batches, masking.masked_paths(cfg, run.mask), run.model.compute_dtype)
    masks = wanda_masks(params, norms, run.mask, cfg, per_output)
    return masks, {"baseline": "wanda", "calibration_tokens": calibration_tokens(batches),
                   "grouping": "output" if per_output else "matrix"}
