"""Masks: exact counts, ties, sort-based reference, straight-through gradient, keep=1, packing, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mft_jax import losses, masking, model
from mft_jax.config import LlamaConfig, MaskConfig
from mft_jax.trees import flatten, get_path, merge, subtree
from tolerances import binomial_bound

TINY = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def sort_reference(score: np.ndarray, keep: float) -> np.ndarray:
    """Stable ascending sort of |score|; the first int((1 - keep) * n) entries are dropped."""
    flat = np.abs(score.astype(np.float32)).reshape(-1)
    drop = int((1 - keep) * flat.size)
    mask = np.ones(flat.size, bool)
    mask[np.argsort(flat, kind="stable")[:drop]] = False
    return mask.reshape(score.shape)


def topk(score, keep, width=None):
    """One matrix's exact top-k mask through the (private) search, as `topk_masks` runs it."""
    return masking._topk_search([score], [keep], width).masks[0]


def num_passes(span: int, width: int) -> int:
    """Passes a (width + 1)-ary search takes to narrow a bracket of `span` integers to one."""
    passes = 0
    while span > 1:
        span = -(-span // (width + 1))
        passes += 1
    return passes


def _inputs():
    rng = np.random.default_rng(0)
    yield "normal", rng.normal(size=(37, 53)).astype(np.float32)
    yield "ties", rng.integers(-3, 4, size=(64, 40)).astype(np.float32)  # 7 distinct values, ~50% ties at cut
    yield "all_equal", np.full((16, 24), 0.5, np.float32)
    yield "signed_zeros", np.where(rng.random((20, 30)) < 0.5, -0.0, 0.0).astype(np.float32)
    yield "tiny_and_huge", (rng.normal(size=(30, 30)) * 10.0 ** rng.integers(-40, 38, (30, 30))).astype(np.float32)
    yield "bf16_ties", rng.normal(size=(48, 64)).astype(jnp.bfloat16).astype(np.float32)


@pytest.mark.parametrize("keep", [0.9, 0.37, 0.01, 1.0])
@pytest.mark.parametrize("name, score", list(_inputs()), ids=[n for n, _ in _inputs()])
def test_topk_is_exact_and_matches_sort(name, score, keep):
    n = score.size
    for width in (1, 3, 6):  # bisection (CPU default), the accelerator default, and an even width
        mask = np.asarray(jax.jit(topk, static_argnums=(1, 2))(jnp.asarray(score), keep, width))
        assert mask.sum() == n - int((1 - keep) * n), width
        np.testing.assert_array_equal(mask, sort_reference(score, keep))


@pytest.mark.parametrize("width", [1, 3])
def test_topk_group_mixed_shapes_keeps_and_ties(width):
    """Several matrices searched together, some with ties straddling the cut and some without, one unmasked."""
    rng = np.random.default_rng(3)
    scores = [rng.normal(size=(40, 24)), rng.integers(-2, 3, size=(40, 24)), rng.normal(size=(24, 56)),
              np.full((24, 56), -1.5), rng.normal(size=(7, 9))]
    keeps = [0.9, 0.5, 0.75, 0.3, 1.0]
    masks = jax.jit(lambda ss: masking._topk_search(ss, keeps, width).masks)([jnp.asarray(s, jnp.float32)
                                                                             for s in scores])
    for s, keep, m in zip(scores, keeps, masks):
        np.testing.assert_array_equal(np.asarray(m), sort_reference(s.astype(np.float32), keep))


@pytest.mark.parametrize("width", [1, 3])
def test_warm_start_is_exact_and_narrows_the_search(width):
    """Warm-started from the previous step's cut: the same masks as from scratch, in far fewer passes; a wrong
    hint (cuts of other scores, or scores that moved further than the bracket allows) falls back, still exact."""
    rng = np.random.default_rng(7)
    shapes = [(48, 40), (40, 96), (33, 17)]
    old = [jnp.asarray(0.02 * rng.normal(size=s), jnp.float32) for s in shapes]
    new = [o + 2e-5 * jnp.asarray(rng.choice([-1.0, 1.0], size=o.shape), jnp.float32) for o in old]
    tied = jnp.asarray(rng.integers(-2, 3, size=(30, 20)), jnp.float32)  # ties straddle the cut; scores unchanged
    old, new = old + [tied], new + [tied]
    keeps = (0.9, 0.75, 0.5, 0.6)
    search = jax.jit(masking._topk_search, static_argnames=("keeps", "width"))
    _, old_cuts, cold_passes = search(old, keeps, width, None)
    assert int(cold_passes) == num_passes(masking._INF_BITS + 1, width)
    masks, cuts, warm_passes = search(new, keeps, width, (old, old_cuts))
    for s, keep, m in zip(new, keeps, masks):
        np.testing.assert_array_equal(np.asarray(m), sort_reference(np.asarray(s), keep))
    np.testing.assert_array_equal(np.asarray(cuts), np.asarray(search(new, keeps, width)[1]))
    # 2e-5 moves near a cut of ~2e-3 (|N(0, 0.02)| quantiles): a bracket of ~2^17 floats, not 2^31
    assert int(warm_passes) <= num_passes(2**18, width) + 1 < int(cold_passes)
    wrong_hints = [(new, jnp.zeros_like(old_cuts)),  # unchanged scores but cuts at +0.0
                   ([o * 3 for o in old], old_cuts)]  # the bracket misses the cut: counts disagree
    for previous in wrong_hints:
        masks = search(new, keeps, width, previous)[0]
        for s, keep, m in zip(new, keeps, masks):
            np.testing.assert_array_equal(np.asarray(m), sort_reference(np.asarray(s), keep))


def test_search_pass_counts():
    # 31 bisection passes over the float bits of |score|; 16 with 3 thresholds per pass.
    assert num_passes(masking._INF_BITS + 1, 1) == 31
    assert num_passes(masking._INF_BITS + 1, 3) == 16
    assert num_passes(1, 3) == 0 and num_passes(2, 1) == 1


def test_published_counts():
    # Llama-2-7B shapes at keep 0.9: q_proj 4096x4096 and up_proj 4096x11008.
    assert masking.num_kept(4096 * 4096, 0.9) == 16777216 - 1677721
    assert masking.num_kept(4096 * 11008, 0.9) == 45088768 - 4508876


def _params_and_cfg(modules="both", layers=(1, 2), keep_attn=0.8, keep_mlp=0.6):
    params = model.init_params(TINY, jax.random.key(0), jnp.float32)
    mask_cfg = MaskConfig(modules=modules, masked_layers=list(layers), keep_attn=keep_attn, keep_mlp=keep_mlp)
    return params, mask_cfg


@pytest.mark.parametrize("modules, count", [("attn", 8), ("mlp", 6), ("both", 14)])
def test_masked_paths(modules, count):
    _, mask_cfg = _params_and_cfg(modules)
    paths = masking.masked_paths(TINY, mask_cfg)
    assert len(paths) == count and all(p[0] in ("layers_1", "layers_2") for p in paths)


def test_masks_per_module_counts():
    params, mask_cfg = _params_and_cfg()
    scores = masking.init_scores(jax.random.key(1), params, mask_cfg, TINY)
    masks, _ = masking.topk_masks(scores, mask_cfg)
    for path, m in flatten(masks).items():
        keep = mask_cfg.keep_attn if path[1] == "self_attn" else mask_cfg.keep_mlp
        assert int(m.sum()) == m.size - int((1 - keep) * m.size), path
        assert scores_dtype_ok(get_path(scores, path))


def scores_dtype_ok(score):
    return score.dtype == jnp.float32


def _loss(params, tokens):
    logits = model.forward(TINY, params, tokens[:, :-1])
    return losses.sft(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))


def test_straight_through_gradient_closed_form():
    params, mask_cfg = _params_and_cfg()
    scores = masking.init_scores(jax.random.key(1), params, mask_cfg, TINY)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, TINY.vocab_size)
    masks, _ = masking.topk_masks(scores, mask_cfg)

    # Route 1: jax.grad through the straight-through float masks.
    def through_ste(s):
        return _loss(masking.apply_masks(params, masking.ste_masks(s, masks, mask_cfg)), tokens)

    grad_ste = jax.grad(through_ste)(scores)
    # Route 2, independent: dL/dW~ at W~ = W * m, then sign(s) * W * dL/dW~ by hand in numpy.
    w_tilde = masking.masked_kernels(params, masks)
    g_w = jax.grad(lambda wt: _loss(merge(params, wt), tokens))(w_tilde)
    # Exact: the STE masks are exactly 0/1, so both routes run the same forward and backward ops on the same
    # values; W * dL/dW~ rounds once either way and the sign multiplies exactly.
    for path, g in flatten(grad_ste).items():
        s = np.asarray(get_path(scores, path))
        w = np.asarray(get_path(params, path))
        expected = np.sign(s) * w * np.asarray(get_path(g_w, path))
        np.testing.assert_array_equal(np.asarray(g), expected, err_msg=str(path))
        assert np.count_nonzero(expected) > 0.95 * expected.size  # dense: dropped weights get gradients too
    closed = masking.score_grads(scores, subtree(params, flatten(scores)), g_w, mask_cfg)
    for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(grad_ste)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keep_one_reproduces_unmasked_logits_exactly():
    params, mask_cfg = _params_and_cfg(keep_attn=1.0, keep_mlp=1.0)
    scores = masking.init_scores(jax.random.key(1), params, mask_cfg, TINY)
    masks, _ = masking.topk_masks(scores, mask_cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, TINY.vocab_size)
    plain = np.asarray(model.forward(TINY, params, tokens))
    for masked in (masking.apply_masks(params, masks),
                   masking.apply_masks(params, masking.ste_masks(scores, masks, mask_cfg))):
        np.testing.assert_array_equal(np.asarray(model.forward(TINY, masked, tokens)), plain)


def test_masked_weights_are_zero_and_others_untouched():
    params, mask_cfg = _params_and_cfg()
    masks, _ = masking.topk_masks(masking.init_scores(jax.random.key(1), params, mask_cfg, TINY), mask_cfg)
    masked = masking.apply_masks(params, masks)
    flat_masks = flatten(masks)
    for path, w in flatten(params).items():
        new = np.asarray(get_path(masked, path))
        if path in flat_masks:
            m = np.asarray(flat_masks[path])
            np.testing.assert_array_equal(new, np.where(m, np.asarray(w), 0))
        else:
            np.testing.assert_array_equal(new, np.asarray(w))


def test_global_mode_threshold_and_gradient():
    params, _ = _params_and_cfg()
    mask_cfg = MaskConfig(mode="global", modules="attn", masked_layers=[], threshold_attn=0.01)
    scores = masking.init_scores(jax.random.key(3), params, mask_cfg, TINY)
    assert len(flatten(scores)) == 4 * TINY.num_hidden_layers  # every layer
    masks, _ = masking.topk_masks(scores, mask_cfg)
    for s, m in zip(jax.tree.leaves(scores), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(s) >= 0.01)
    g = jax.grad(lambda s: jnp.sum(jax.tree.leaves(masking.ste_masks(s, masks, mask_cfg))[0] * 3.0))(scores)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(g)[0]), 3.0)  # identity, no sign


def test_baselines():
    params, mask_cfg = _params_and_cfg()
    mag = masking.magnitude_masks(params, mask_cfg, TINY)
    for path, m in flatten(mag).items():
        w = np.asarray(get_path(params, path))
        np.testing.assert_array_equal(np.asarray(m), sort_reference(w, masking.keep_fraction(path, mask_cfg)))
    rand = masking.random_masks(jax.random.key(4), params, mask_cfg, TINY)
    stats = masking.mask_stats(rand)
    for kind, keep in (("attn", 0.8), ("mlp", 0.6)):  # Bernoulli(keep) draws: within 5 binomial sigmas
        draws = sum(m.size for p, m in flatten(rand).items() if masking.is_attn(p) == (kind == "attn"))
        assert abs(float(stats[f"kept_{kind}"]) - keep) < binomial_bound(keep, draws), kind


def test_pack_unpack_one_bit_per_weight():
    params, mask_cfg = _params_and_cfg()
    masks, _ = masking.topk_masks(masking.init_scores(jax.random.key(1), params, mask_cfg, TINY), mask_cfg)
    packed = masking.pack(masks)
    for path, (bits, shape) in packed.items():
        assert bits.dtype == np.uint8 and bits.size == -(-int(np.prod(shape)) // 8)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(masking.unpack(packed))):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_sharded_topk_equals_unsharded_without_gathers():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    score = jnp.asarray(np.random.default_rng(5).integers(-5, 6, size=(64, 96)).astype(np.float32))
    sharding = NamedSharding(mesh, P("fsdp", "data"))
    fn = jax.jit(lambda s: topk(s, 0.7), in_shardings=sharding, out_shardings=sharding)
    sharded = fn(jax.device_put(score, sharding))
    np.testing.assert_array_equal(np.asarray(sharded), sort_reference(np.asarray(score), 0.7))
    hlo = fn.lower(jax.ShapeDtypeStruct(score.shape, score.dtype, sharding=sharding)).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert "all-reduce" in hlo  # only scalar counts cross devices
