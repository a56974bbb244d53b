"""Wanda baseline: input norms against a plain NumPy forward, exact counts and members against a NumPy sort."""

import jax.numpy as jnp
import numpy as np
import pytest

from mft_jax import baselines, convert, masking, trees
from mft_jax import config
from mft_jax.config import ConfigError, LlamaConfig, MaskConfig
from run_fixtures import make_model_dir, make_run

# n - int((1 - keep) * n) for the tiny model's kernels (hidden 32, intermediate 64, 4 heads, 2 kv heads),
# keep_attn 0.9 and keep_mlp 0.8: q/o 32x32, k/v 32x16, gate/up 32x64, down 64x32.
EXPECTED_KEPT = {"q_proj": 922, "k_proj": 461, "v_proj": 461, "o_proj": 922, "gate_proj": 1639, "up_proj": 1639,
                 "down_proj": 1639}


# --------------------------------------------------------------------------------------------------------
# NumPy references (float64, written from the Llama equations, sharing no code with mft_jax.model)
# --------------------------------------------------------------------------------------------------------

def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_LxNxDh, positions_L, theta):
    half = x_LxNxDh.shape[-1] // 2
    freq = theta ** (-np.arange(half) / half)
    angle = positions_L[:, None] * freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x_LxNxDh[..., :half], x_LxNxDh[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def reference_layer_inputs(cfg: LlamaConfig, params, tokens_L, positions_L, segment_L) -> dict:
    """{(layer, proj): [L, in]}: what each projection of each layer multiplies, for one row."""
    p = {k: np.asarray(v, np.float64) for k, v in trees.flatten(params).items()}
    h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    length = len(tokens_L)
    causal_LxS = np.arange(length)[None, :] <= np.arange(length)[:, None]
    allowed_LxS = causal_LxS & (segment_L[:, None] == segment_L[None, :])
    x = p[("embed_tokens",)][tokens_L]
    out = {}
    for i in range(cfg.num_hidden_layers):
        w = {k[2]: v for k, v in p.items() if k[0] == f"layers_{i}" and k[-1] == "kernel"}
        a = _rms(x, p[(f"layers_{i}", "input_layernorm", "scale")], cfg.rms_norm_eps)
        q = _rope((a @ w["q_proj"]).reshape(length, h, dh), positions_L, cfg.rope_theta)
        k = _rope((a @ w["k_proj"]).reshape(length, kv, dh), positions_L, cfg.rope_theta)
        v = (a @ w["v_proj"]).reshape(length, kv, dh)
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
        logits_NxLxS = np.einsum("lnd,snd->nls", q, k) / np.sqrt(dh)
        logits_NxLxS = np.where(allowed_LxS[None], logits_NxLxS, -np.inf)
        probs = np.exp(logits_NxLxS - logits_NxLxS.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("nls,snd->lnd", probs, v).reshape(length, h * dh)
        x = x + attn @ w["o_proj"]
        m = _rms(x, p[(f"layers_{i}", "post_attention_layernorm", "scale")], cfg.rms_norm_eps)
        gate, up = m @ w["gate_proj"], m @ w["up_proj"]
        act = gate / (1 + np.exp(-gate)) * up
        x = x + act @ w["down_proj"]
        out.update({(i, "q_proj"): a, (i, "k_proj"): a, (i, "v_proj"): a, (i, "o_proj"): attn,
                    (i, "gate_proj"): m, (i, "up_proj"): m, (i, "down_proj"): act})
    return out


def reference_norms(cfg, params, batches, include_padding=False) -> dict:
    squares = {}
    for batch in batches:
        for r in range(batch["inputs"].shape[0]):
            segment = batch["segment_ids"][r]
            inputs = reference_layer_inputs(cfg, params, batch["inputs"][r], batch["positions"][r], segment)
            valid = np.ones_like(segment, bool) if include_padding else segment > 0
            for key, x in inputs.items():
                squares[key] = squares.get(key, 0.0) + (x[valid] ** 2).sum(axis=0)
    return {(f"layers_{i}", config.PROJECTIONS[name], name, "kernel"): np.sqrt(s)
            for (i, name), s in squares.items()}


def reference_mask(weight, norm, keep, per_output=False) -> np.ndarray:
    """Stable ascending sort of |W| * norm (float32, as the spec); the first int((1 - keep) * n) are dropped,
    per matrix (flat, row-major) or per output column."""
    score = np.abs(np.asarray(weight, np.float32)) * np.asarray(norm, np.float32)[:, None]
    if per_output:
        return np.stack([reference_mask(score[:, [c]], np.ones(len(score), np.float32), keep)[:, 0]
                         for c in range(score.shape[1])], axis=1)
    flat = score.reshape(-1)
    mask = np.ones(flat.size, bool)
    mask[np.argsort(flat, kind="stable")[:int((1 - keep) * flat.size)]] = False
    return mask.reshape(score.shape)


# --------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wanda")
    model_dir = make_model_dir(root / "model", num_layers=2, hidden=32)
    run = make_run(root, model_dir, n_train=48, mask={"masked_layers": [0, 1]},
                   data={"packing": True, "max_seq_length": 96})
    cfg, params = convert.load_hf(model_dir)
    return run, cfg, params, str(model_dir)


def test_wanda_masks_match_numpy_reference(tiny):
    run, cfg, params, tok_dir = tiny
    batches = baselines.calibration_batches(run, tok_dir, tokens=700, batch_size=4)
    assert baselines.calibration_tokens(batches) == 700  # the last batch is cut at the budget
    # Packed rows of two documents with padding after them: positions restart and padding must be skipped.
    assert len(batches) == 3 and batches[0]["segment_ids"].max() == 2 and (batches[0]["segment_ids"] == 0).any()
    paths = masking.masked_paths(cfg, run.mask)
    norms = baselines.input_norms(cfg, params, batches, paths)
    ref = reference_norms(cfg, params, batches)
    with_padding = reference_norms(cfg, params, batches, include_padding=True)
    for p in paths:  # fp32 forward at "highest" matmul precision against float64: measured 3e-7 (a few ulps)
        np.testing.assert_allclose(norms[p], ref[p], rtol=5e-6, err_msg=str(p))
        assert np.max(np.abs(with_padding[p] / ref[p] - 1)) > 1e-3  # padding would have shown
    for i in (0, 1):  # shared inputs: one tensor feeds q/k/v, one feeds gate/up
        attn, mlp = (f"layers_{i}", "self_attn"), (f"layers_{i}", "mlp")
        np.testing.assert_array_equal(norms[(*attn, "q_proj", "kernel")], norms[(*attn, "v_proj", "kernel")])
        np.testing.assert_array_equal(norms[(*mlp, "gate_proj", "kernel")], norms[(*mlp, "up_proj", "kernel")])

    masks = trees.flatten(baselines.wanda_masks(params, norms, run.mask, cfg))
    assert sorted(masks) == sorted(paths)
    for p in paths:
        weight, keep = trees.get_path(params, p), masking.keep_fraction(p, run.mask)
        mask = np.asarray(masks[p])
        assert mask.sum() == EXPECTED_KEPT[p[2]], p
        # Same selection rule on the same norms: identical by construction.
        np.testing.assert_array_equal(mask, reference_mask(weight, norms[p], keep), err_msg=str(p))
        # End to end with the NumPy norms: the two scores around the cut are further apart than the norms'
        # tolerance, so the independent reference must select the same members.
        score = np.sort(np.abs(np.asarray(weight, np.float32)).reshape(-1) * np.repeat(ref[p], weight.shape[1]))
        cut = int((1 - keep) * weight.size)
        assert (score[cut] - score[cut - 1]) / score[cut] > 2 * 5e-6, p
        np.testing.assert_array_equal(mask, reference_mask(weight, ref[p], keep), err_msg=str(p))


def _tied_inputs():
    """Kernels rounded to 5 levels and norms with 3 values: many equal scores, some straddling the cut."""
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    mask_cfg = MaskConfig(masked_layers=[1], keep_attn=0.7, keep_mlp=0.45)
    rng = np.random.default_rng(0)
    params, norms = {}, {}
    for p in masking.masked_paths(cfg, mask_cfg):
        shape = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
                 "gate_proj": (16, 24), "up_proj": (16, 24), "down_proj": (24, 16)}[p[2]]
        params[p] = jnp.asarray(rng.integers(-2, 3, size=shape) * 0.25, jnp.float32)
        norms[p] = np.asarray([1.0, 2.0, 0.5])[rng.integers(0, 3, size=shape[0])].astype(np.float32)
    return cfg, mask_cfg, trees.unflatten(params), norms


@pytest.mark.parametrize("per_output", [False, True])
def test_wanda_tie_rule_and_grouping_match_numpy_sort(per_output):
    cfg, mask_cfg, params, norms = _tied_inputs()
    masks = trees.flatten(baselines.wanda_masks(params, norms, mask_cfg, cfg, per_output=per_output))
    straddling = 0
    for p, mask in masks.items():
        weight, keep = trees.get_path(params, p), masking.keep_fraction(p, mask_cfg)
        mask, rows = np.asarray(mask), weight.shape[0]
        expected = reference_mask(weight, norms[p], keep, per_output)
        if per_output:
            np.testing.assert_array_equal(mask.sum(axis=0), rows - int((1 - keep) * rows))
        else:
            assert mask.sum() == weight.size - int((1 - keep) * weight.size)
        np.testing.assert_array_equal(mask, expected, err_msg=str(p))
        score = np.abs(np.asarray(weight)) * norms[p][:, None]
        groups = [(score[:, c], mask[:, c]) for c in range(score.shape[1])] if per_output else [(score, mask)]
        straddling += sum(bool(((s == s[m].min()) & ~m).any()) for s, m in groups)
    assert straddling >= 3  # equal scores on both sides of the cut: the tie rule decided members


def test_wanda_refuses_global_mode():
    cfg, _, params, norms = _tied_inputs()
    with pytest.raises(ConfigError, match="mask.mode: local"):
        baselines.wanda_masks(params, norms, MaskConfig(mode="global"), cfg)


def test_wanda_baseline_from_a_run_config(tiny):
    """What `export --baseline wanda` calls: the same 700 tokens in one batch of 85 rows (the default 8192 tokens
    per forward) give the masks of 4-row batches (the rows' order does not depend on the batch size)."""
    run, cfg, params, tok_dir = tiny
    paths = masking.masked_paths(cfg, run.mask)
    small = baselines.input_norms(cfg, params, baselines.calibration_batches(run, tok_dir, 700, batch_size=4), paths)
    masks, meta = baselines.wanda_baseline(run, cfg, params, tok_dir, tokens=700)
    assert meta == {"baseline": "wanda", "calibration_tokens": 700, "grouping": "matrix"}
    expected = trees.flatten(baselines.wanda_masks(params, small, run.mask, cfg))
    for p, mask in trees.flatten(masks).items():
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(expected[p]), err_msg=str(p))
    _, meta = baselines.wanda_baseline(run, cfg, params, tok_dir)  # the default budget: more than the data
    assert meta["calibration_tokens"] < baselines.DEFAULT_CALIBRATION_TOKENS
