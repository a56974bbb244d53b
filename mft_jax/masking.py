"""MFT's masks: which kernels are masked, their scores, exact top-k masks and the straight-through gradient.

Local mode keeps exactly n - int((1 - keep) * n) weights of each masked matrix of n weights, those of largest
|score|, ties at the cut kept by higher flat index (a stable ascending sort that drops the first n - k; the
reference's GPU sort leaves the order of ties arbitrary); global mode keeps
score >= threshold. The k-th largest |score| is found by a counting search over the float bits, warm-started
from the previous step's cut, with no sort and no all-gather on a sharded matrix: docs/method.md derives it.

Public API: `masked_paths`, `init_scores`, `topk_masks`, `score_grads` / `ste_masks` (the straight-through
gradient, closed form and autodiff form), `apply_masks`, `random_masks`, `magnitude_masks`, `pack` / `unpack`,
`mask_stats`. Scores and masks mirror the params pytree restricted to the masked kernels
({"layers_4": {"self_attn": {"q_proj": {"kernel": f32[D, H*Dh]}}}}); kernels are [in, out] as in the model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mft_jax.config import ATTN_PROJ, MLP_PROJ, PROJECTIONS, LlamaConfig, MaskConfig
from mft_jax.trees import flat_index, flatten, get_path, merge, subtree, unflatten

_INF_BITS = 0x7F800000  # bit pattern of +inf in float32


# --------------------------------------------------------------------------------------------------------
# Which kernels, how many kept
# --------------------------------------------------------------------------------------------------------

def masked_paths(cfg: LlamaConfig, mask_cfg: MaskConfig) -> list[tuple[str, ...]]:
    """Param paths of the masked kernels, in layer order."""
    layers = range(cfg.num_hidden_layers) if mask_cfg.mode == "global" else sorted(mask_cfg.masked_layers)
    paths = []
    for i in layers:
        if mask_cfg.modules in ("attn", "both"):
            paths += [(f"layers_{i}", PROJECTIONS[name], name, "kernel") for name in ATTN_PROJ]
        if mask_cfg.modules in ("mlp", "both"):
            paths += [(f"layers_{i}", PROJECTIONS[name], name, "kernel") for name in MLP_PROJ]
    return paths


def is_attn(path: tuple[str, ...]) -> bool:
    return path[1] == "self_attn"


def keep_fraction(path, mask_cfg: MaskConfig) -> float:
    return mask_cfg.keep_attn if is_attn(path) else mask_cfg.keep_mlp


def num_kept(n: int, keep: float) -> int:
    """Exactly how many of n weights a local mask keeps: n - int((1 - keep) * n), as the reference."""
    return n - int((1.0 - keep) * n)


# --------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------

def init_scores(key: jax.Array, params, mask_cfg: MaskConfig, cfg: LlamaConfig) -> dict:
    """float32 scores for every masked kernel: N(0, std) (the reference) or |W| (`init: magnitude`).

    Normal scores are drawn once per distinct matrix shape (a stacked draw, then split), so the random
    number generator compiles a handful of times rather than once per matrix."""
    paths = masked_paths(cfg, mask_cfg)
    if mask_cfg.init == "magnitude":
        return unflatten({p: jnp.abs(get_path(params, p).astype(jnp.float32)) for p in paths})
    by_shape: dict[tuple, list] = {}
    for p in paths:
        by_shape.setdefault(tuple(get_path(params, p).shape), []).append(p)
    flat = {}
    for g, (shape, members) in enumerate(sorted(by_shape.items())):
        draws = mask_cfg.std * jax.random.normal(jax.random.fold_in(key, g), (len(members), *shape), jnp.float32)
        flat.update({p: draws[j] for j, p in enumerate(members)})
    return unflatten(flat)


# --------------------------------------------------------------------------------------------------------
# Masks from scores
# --------------------------------------------------------------------------------------------------------

def topk_masks(scores, mask_cfg: MaskConfig, previous=None) -> tuple[dict, jax.Array]:
    """(bool masks, cuts) for a scores pytree: local top-k of |score| per matrix, or global score >= threshold.

    cuts [matrices] int32: each matrix's k-th largest |score| as float32 bits (empty in global mode).
    previous = (old scores, old cuts), from the step before, warm-starts the local search (same masks)."""
    flat = flatten(scores)
    if mask_cfg.mode == "global":
        return unflatten({path: score >= (mask_cfg.threshold_attn if is_attn(path) else mask_cfg.threshold_mlp)
                          for path, score in flat.items()}), jnp.zeros(0, jnp.int32)
    paths = list(flat)
    if previous is not None:
        old_flat = flatten(previous[0])
        previous = ([old_flat[p] for p in paths], previous[1])
    found = _topk_search([flat[p] for p in paths], [keep_fraction(p, mask_cfg) for p in paths], previous=previous)
    return unflatten(dict(zip(paths, found.masks))), found.cuts


# --------------------------------------------------------------------------------------------------------
# The exact local top-k search (private; docs/method.md)
# --------------------------------------------------------------------------------------------------------

class _Found(NamedTuple):
    masks: list  # bool, one per matrix
    cuts: jax.Array  # [matrices] int32 float bits of each k-th largest |score| (0 where keep == 1)
    passes: jax.Array  # passes over the scores (the bracket check included; the tie search not)


def _count(x) -> jax.Array:
    return jnp.sum(x, dtype=jnp.int32)


def _search_width() -> int:
    """Thresholds counted per pass over the scores: 1 (bisection) on CPU, where each compare costs about as much
    as reading the element, 3 on accelerators, where a pass is bound by memory and 3 compares per element are
    free: 16 passes instead of 31 (measure others with `bench/topk.py`)."""
    return 1 if jax.default_backend() == "cpu" else 3


def _search(width: int, lo, hi, c_lo, c_hi, target, count_fn):
    """(width + 1)-ary search, vectorised over entries: the largest x in [lo, hi) with count(x) >= target,
    for a count that does not increase with x, given c_lo = count(lo) >= target > count(hi) = c_hi.

    Each pass counts at `width` evenly spaced points inside every bracket (one read of the data, whatever the
    width) and keeps the sub-bracket where the count crosses the target, with the counts at its ends. Passes
    run until every bracket is one integer wide: ceil(log_{width+1}(hi - lo)) of them for the widest.
    Returns (x, count(x), count(x + 1), passes).
    """
    j = jnp.arange(1, width + 1, dtype=jnp.int32)

    def one_pass(carry):
        lo, hi, c_lo, c_hi, passes = carry
        step = (hi - lo + width) // (width + 1)  # ceil((hi - lo) / (width + 1)) >= 1
        points = jnp.minimum(lo[:, None] + step[:, None] * j, hi[:, None])  # [M, W], increasing
        counts = count_fn(points)  # [M, W], non-increasing along W
        above = jnp.sum(counts >= target[:, None], axis=1)  # the first `above` points have enough
        last = jnp.maximum(above - 1, 0)[:, None]
        first = jnp.minimum(above, width - 1)[:, None]
        pick = lambda a, i: jnp.take_along_axis(a, i, axis=1)[:, 0]  # noqa: E731
        lo, c_lo = jnp.where(above > 0, pick(points, last), lo), jnp.where(above > 0, pick(counts, last), c_lo)
        hi, c_hi = (jnp.where(above < width, pick(points, first), hi),
                    jnp.where(above < width, pick(counts, first), c_hi))
        return lo, hi, c_lo, c_hi, passes + 1

    lo, _, c_lo, c_hi, passes = jax.lax.while_loop(lambda carry: jnp.any(carry[1] - carry[0] > 1), one_pass,
                                                   (lo, hi, c_lo, c_hi, jnp.zeros((), jnp.int32)))
    return lo, c_lo, c_hi, passes


def _topk_search(scores: list[jax.Array], keeps: list[float], width: int | None = None,
                 previous: tuple[list[jax.Array], jax.Array] | None = None) -> _Found:
    """Exact local top-k masks of several matrices at once, searched together: each pass is one
    compare-and-count fusion per matrix and one all-reduce of a small vector of counts, in one compiled loop.
    The counts at the ends of the final bracket give the ties at the cut for free; only when ties straddle
    the cut does a second search over the flat index run. `width`: thresholds per pass (`_search_width`).
    previous = (old_scores, old_cuts) warm-starts the search from a bracket around the old cut (an order
    statistic moves no further than the values do); where one pass confirms it, the search starts there."""
    width = _search_width() if width is None else width
    ks = [num_kept(s.size, keep) for s, keep in zip(scores, keeps)]
    for s in scores:
        if s.size >= 2**31 - 64:
            raise ValueError(f"a masked matrix of {s.size} elements exceeds the int32 index range")
    masks: list = [jnp.ones(s.shape, bool) for s in scores]
    todo = [i for i, (s, k) in enumerate(zip(scores, ks)) if k < s.size]  # keep == 1.0 masks nothing
    if not todo:
        return _Found(masks, jnp.zeros(len(scores), jnp.int32), jnp.zeros((), jnp.int32))
    bits = [jax.lax.bitcast_convert_type(jnp.abs(scores[i].astype(jnp.float32)), jnp.int32) for i in todo]
    index = {b.shape: flat_index(b.shape) for b in bits}

    def counts(predicate):  # predicate(row, bits, points [W]) -> bool [..., W]; gives counts [M, W]
        def count_fn(points):
            return jnp.stack([jnp.sum(predicate(r, b, points[r]), axis=tuple(range(b.ndim)), dtype=jnp.int32)
                              for r, b in enumerate(bits)])
        return count_fn

    count_at_least = counts(lambda r, b, pts: b[..., None] >= pts)
    k = jnp.asarray([ks[i] for i in todo], jnp.int32)
    n = jnp.asarray([scores[i].size for i in todo], jnp.int32)
    zeros = jnp.zeros(len(todo), jnp.int32)
    # The whole range: count(bits >= 0) = n; nothing reaches the pattern above +inf.
    lo, hi, c_lo, c_hi = zeros, jnp.full(len(todo), _INF_BITS + 1, jnp.int32), n, zeros
    if previous is not None:
        old_scores, old_cuts = previous
        moved = jnp.stack([jnp.max(jnp.abs(jnp.abs(scores[i].astype(jnp.float32))
                                           - jnp.abs(old_scores[i].astype(jnp.float32)))) for i in todo])
        moved = moved * (1 + 2**-20)  # covers the rounding of the differences
        old = jax.lax.bitcast_convert_type(old_cuts[jnp.asarray(todo)], jnp.float32)
        below = jnp.clip(jax.lax.bitcast_convert_type(jnp.maximum(old - moved, 0.0), jnp.int32) - 2, 0, _INF_BITS)
        above = jnp.clip(jax.lax.bitcast_convert_type(old + moved, jnp.int32) + 2, 1, _INF_BITS + 1)
        ends = count_at_least(jnp.stack([below, above], axis=1))
        ok = (ends[:, 0] >= k) & (ends[:, 1] < k)  # also false for a bracket made of NaNs
        lo, hi = jnp.where(ok, below, lo), jnp.where(ok, above, hi)
        c_lo, c_hi = jnp.where(ok, ends[:, 0], c_lo), jnp.where(ok, ends[:, 1], c_hi)
    # v: the largest bit pattern with count(bits >= v) >= k, i.e. the k-th largest |score| of each matrix.
    v, c_v, c_above, passes = _search(width, lo, hi, c_lo, c_hi, k, count_at_least)
    passes = passes + (previous is not None)
    need = k - c_above  # entries equal to v that are kept (>= 1)
    ties = c_v - c_above  # entries equal to v
    # Where more entries equal v than are kept, keep those with the highest flat index: p is the largest
    # index with count(b == v and index >= p) >= need. Skipped when no matrix has such a tie.

    def tie_cut():
        return _search(width, zeros, n, ties, zeros, need, counts(
            lambda r, b, pts: (b == v[r])[..., None] & (index[b.shape][..., None] >= pts)))[0]

    straddle = ties > need
    p = jnp.where(straddle, jax.lax.cond(jnp.any(straddle), tie_cut, lambda: zeros), 0)
    for r, (i, b) in enumerate(zip(todo, bits)):
        masks[i] = (b > v[r]) | ((b == v[r]) & (index[b.shape] >= p[r]))
    cuts = jnp.zeros(len(scores), jnp.int32).at[jnp.asarray(todo)].set(v)
    return _Found(masks, cuts, passes)


# --------------------------------------------------------------------------------------------------------
# Straight-through estimator and applying masks
# --------------------------------------------------------------------------------------------------------

def ste_masks(scores, masks, mask_cfg: MaskConfig) -> dict:
    """Float masks equal to `masks` in the forward pass, with the straight-through gradient.

    The mask's backward is the identity, then through the abs in local mode: d mask / d score = sign(score).
    `a - stop_gradient(a)` is exactly 0.0 in the forward pass, so the values are exactly 0 or 1.
    """
    def one(score, mask):
        a = score if mask_cfg.mode == "global" else jnp.abs(score)
        return mask.astype(jnp.float32) + (a - jax.lax.stop_gradient(a))
    return jax.tree.map(one, scores, masks)


def score_grads(scores, masked_weights, weight_grads, mask_cfg: MaskConfig) -> dict:
    """Straight-through gradient in closed form: dL/ds = sign(s) * W * dL/dW~ (global mode: W * dL/dW~).

    `weight_grads` are the gradients with respect to the masked kernels W~ = W * m.
    """
    def one(score, w, g):
        grad = w.astype(jnp.float32) * g.astype(jnp.float32)
        return grad if mask_cfg.mode == "global" else jnp.sign(score) * grad
    return jax.tree.map(one, scores, masked_weights, weight_grads)


def masked_kernels(params, masks) -> dict:
    """W * m for the masked kernels only (same nesting as masks), in each weight's dtype."""
    return jax.tree.map(lambda m, w: w * m.astype(w.dtype), masks, subtree(params, flatten(masks).keys()))


def apply_masks(params, masks) -> dict:
    """params with every masked kernel multiplied by its mask (bool or float 0/1)."""
    return merge(params, masked_kernels(params, masks))


# --------------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------------

def random_masks(key: jax.Array, params, mask_cfg: MaskConfig, cfg: LlamaConfig) -> dict:
    """Bernoulli(keep) masks on the same matrices (the paper's random baseline)."""
    out = {}
    for i, path in enumerate(masked_paths(cfg, mask_cfg)):
        shape = get_path(params, path).shape
        out[path] = jax.random.bernoulli(jax.random.fold_in(key, i), keep_fraction(path, mask_cfg), shape)
    return unflatten(out)


def magnitude_masks(params, mask_cfg: MaskConfig, cfg: LlamaConfig) -> dict:
    """Drop the smallest |W| per matrix at the same ratio (the paper's L1 / magnitude baseline)."""
    paths = masked_paths(cfg, mask_cfg)
    found = _topk_search([get_path(params, p) for p in paths], [keep_fraction(p, mask_cfg) for p in paths])
    return unflatten(dict(zip(paths, found.masks)))


# --------------------------------------------------------------------------------------------------------
# Bit packing: 1 bit per weight
# --------------------------------------------------------------------------------------------------------

def pack(masks) -> dict:
    """bool masks -> {path: (uint8 bits [ceil(n / 8)], shape)}; row-major, most significant bit first."""
    return {path: (np.packbits(np.asarray(m, dtype=bool).reshape(-1)), tuple(m.shape))
            for path, m in flatten(masks).items()}


def unpack(packed) -> dict:
    """Inverse of `pack`."""
    return unflatten({path: np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
                      for path, (bits, shape) in packed.items()})


def mask_stats(masks) -> dict:
    """Kept fraction per module type (attn, mlp) and in total. Counts are exact int32 per matrix and summed in
    float32 (a 70B model's masked MLP weights pass 2^31), exact while the sums stay below 2^24."""
    kept = {"attn": 0, "mlp": 0}
    total = {"attn": 0, "mlp": 0}
    for path, m in flatten(masks).items():
        kind = "attn" if is_attn(path) else "mlp"
        kept[kind] += _count(m).astype(jnp.float32)
        total[kind] += float(m.size)
    out = {f"kept_{kind}": kept[kind] / total[kind] for kind in kept if total[kind]}
    out["kept"] = sum(kept.values()) / max(sum(total.values()), 1)
    return out
