"""Llama forward parity with transformers, packing, bf16, and the HF round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_models import VARIANTS, hf_logits, make_hf_llama
from mft_jax import convert, losses, model
from mft_jax.config import LlamaConfig
from tolerances import BF16_EPS, assert_close, forward_length, rounding_bound, step_length, sum_bound


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_pair(request, tmp_path_factory):
    hf = make_hf_llama(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(path)
    cfg, params = convert.load_hf(path)
    return request.param, hf, path, cfg, params


def _tokens(cfg, b, l, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(b, l)).astype(np.int32)


def test_logits_match_transformers(hf_pair):
    _, hf, _, cfg, params = hf_pair
    tokens = _tokens(cfg, 2, 40)  # 40 > original_max_position_embeddings of the llama3 variant
    ours = np.asarray(model.forward(cfg, params, tokens))
    ref = hf_logits(hf, tokens)
    assert ours.dtype == np.float32
    # torch and XLA sum every matmul, norm and softmax of the forward pass in their own orders
    assert_close(ours, ref, rounding_bound(forward_length(cfg, 40), np.abs(ref).max()), "logits vs transformers")


def test_packed_documents_match_separate_runs(hf_pair):
    _, _, _, cfg, params = hf_pair
    a, b = _tokens(cfg, 1, 11, seed=1)[0], _tokens(cfg, 1, 17, seed=2)[0]
    packed = np.concatenate([a, b, np.zeros(4, np.int32)])[None]
    positions = np.concatenate([np.arange(11), np.arange(17), np.zeros(4)])[None].astype(np.int32)
    segments = np.concatenate([np.full(11, 1), np.full(17, 2), np.zeros(4)])[None].astype(np.int32)
    logits = np.asarray(model.forward(cfg, params, packed, positions, segments))
    alone_a = np.asarray(model.forward(cfg, params, a[None]))
    alone_b = np.asarray(model.forward(cfg, params, b[None]))
    # other shapes: the matmuls' blocking and the attention sums (over 32 keys, masked ones exactly 0) reorder
    bound = rounding_bound(forward_length(cfg, 32), max(np.abs(alone_a).max(), np.abs(alone_b).max()))
    assert_close(logits[0, :11], alone_a[0], bound, "first document")
    assert_close(logits[0, 11:28], alone_b[0], bound, "second document")


def test_bf16_compute_close_to_fp32(hf_pair):
    _, _, _, cfg, params = hf_pair
    tokens = _tokens(cfg, 2, 32)
    fp32 = np.asarray(model.forward(cfg, params, tokens))
    bf16 = np.asarray(model.forward(cfg, params, tokens, options=model.Options(jnp.bfloat16)))
    rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    # Normwise, and dominated by bf16's own round-to-nearest of every activation (the same on any machine; the
    # float32 differences between machines are 1e5 times smaller): measured 0.0064-0.0080, about 2 u_bf16.
    assert rel < 5 * BF16_EPS, rel


def test_save_hf_round_trip(hf_pair, tmp_path):
    _, hf, _, cfg, params = hf_pair
    out = convert.save_hf(cfg, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ref_state, new_state = hf.state_dict(), reloaded.state_dict()
    assert set(ref_state) == set(new_state)
    for name, tensor in ref_state.items():
        assert torch.equal(tensor, new_state[name]), name
    tokens = _tokens(cfg, 2, 24, seed=3)
    ref = hf_logits(hf, tokens)
    # Equal weights (above), so a config that lost a field shows here; not exact: a BLAS may sum differently
    # for other memory alignments. Against ours: torch and XLA sum the forward pass in their own orders.
    bound = rounding_bound(forward_length(cfg, 24), np.abs(ref).max())
    assert_close(hf_logits(reloaded, tokens), ref, bound, "reloaded transformers")
    assert_close(hf_logits(reloaded, tokens), np.asarray(model.forward(cfg, params, tokens)), bound, "ours")


def test_kv_cache_matches_full_forward(hf_pair):
    _, _, _, cfg, params = hf_pair
    tokens = _tokens(cfg, 2, 12, seed=4)
    full = np.asarray(model.forward(cfg, params, tokens))
    cache = model.init_cache(cfg, 2, 16)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
    seg = np.ones((2, 12), np.int32)
    last = model.forward_with_cache(cfg, params, tokens[:, :8], pos[:, :8], seg[:, :8],
                                    model.init_cache(cfg, 2, 16), 0, last_only=True)[0]
    assert last.shape == (2, 1, cfg.vocab_size)
    # other shapes (a prefill of 8, one token at a time, attention over the 16 cache slots): reordered sums
    bound = rounding_bound(forward_length(cfg, 16), np.abs(full).max())
    assert_close(last, full[:, 7:8], bound, "last-position prefill")
    prefill, cache = model.forward_with_cache(cfg, params, tokens[:, :8], pos[:, :8], seg[:, :8], cache, 0)
    assert_close(prefill, full[:, :8], bound, "prefill")
    for t in range(8, 12):
        step, cache = model.forward_with_cache(cfg, params, tokens[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1],
                                               cache, t)
        assert_close(np.asarray(step)[:, 0], full[:, t], bound, f"decode step {t}")


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_logits_loss(tied):
    """The head + cross-entropy a chunk of positions at a time (model.loss_chunk): the same loss and the same
    gradients, for every param (the head's and the tied embedding's included); 13 positions, chunk 5 pads."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    params = model.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(2)
    tokens, targets = _tokens(cfg, 3, 13, seed=3), _tokens(cfg, 3, 13, seed=4)
    weights = (rng.random((3, 13)) < 0.7).astype(np.float32) * rng.random((3, 13)).astype(np.float32)

    def full(p):
        return losses.sft_sums(model.forward(cfg, p, tokens), targets, weights)

    def chunked(p):
        hidden = model.forward(cfg, p, tokens, hidden_only=True)
        return losses.chunked_sft_sums(hidden, model.lm_head_kernel(cfg, p), targets, weights, 5)

    (num_a, den_a), grads_a = full(params), jax.grad(lambda p: full(p)[0])(params)
    (num_b, den_b), grads_b = chunked(params), jax.grad(lambda p: chunked(p)[0])(params)
    tokens_n = weights.size
    assert_close(den_b, den_a, sum_bound(tokens_n, float(den_a)), "sum(w)")  # 39 weights >= 0, another order
    # the head's dot (hidden) and log-softmax (vocab) in other shapes, and the sum over the 39 positions
    assert_close(num_b, num_a, rounding_bound(tokens_n + cfg.hidden_size + cfg.vocab_size, float(num_a)), "sum(w nll)")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_a)[0], jax.tree.leaves(grads_b)):
        # backward from the chunked head: every reduction of the step, each leaf at its own scale
        bound = rounding_bound(step_length(cfg, 13, tokens_n), np.abs(np.asarray(a)).max())
        assert_close(b, a, bound, str(path))


def test_hf_config_formats_agree():
    v4 = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192},
          "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
          "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    v5["dtype"] = "bfloat16"
    a, b = LlamaConfig.from_hf(v4), LlamaConfig.from_hf(v5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3" and a.dtype == "bfloat16"
    assert LlamaConfig.from_hf(a.to_hf()) == a
    # transformers 5 reads what we write.
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in a.to_hf().items() if k != "architectures"})
    assert hf_cfg.rope_parameters["rope_theta"] == 500000.0
    assert hf_cfg.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("bad, field", [
    ({"model_type": "gemma"}, "model_type"),  # families other than Llama's: tests/test_families.py
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(bad, field):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_hf({**base, **bad})


@pytest.mark.parametrize("name, hf_config, expected", [
    ("llama2-7b", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 4096, "torch_dtype": "float16"}, 6_738_415_616),
    ("llama3.1-8b", {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     8_030_261_248),
])
def test_real_model_param_counts_without_allocation(name, hf_config, expected):
    cfg = LlamaConfig.from_hf({"model_type": "llama", **hf_config})
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
    assert model.count_params(cfg) == expected


def test_param_logical_axes_cover_every_param():
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    axes = model.param_logical_axes(cfg)
    shapes = model.param_shapes(cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for a, s in zip(flat_axes, flat_shapes):
        assert len(a) == len(s.shape)
    assert axes["layers_1"]["self_attn"]["k_proj"]["kernel"] == ("embed", "kv_heads")
    assert axes["embed_tokens"] == ("vocab", "embed")


def test_fp32_weight_grads_keep_the_matmul_output_in_fp32():
    """train.grad_reduce fp32: a bf16 matmul whose fp32 kernel gets the weight gradient straight from the
    matmul in fp32 (not rounded to bf16 first); the forward pass and the input gradient are the plain path's."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (4, 16, 64), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (64, 32), jnp.float32) * 0.1
    g = jax.random.normal(kg, (4, 16, 32), jnp.float32).astype(jnp.bfloat16)

    def plain(x, w):
        return jnp.dot(x, w.astype(jnp.bfloat16))

    y, vjp = jax.vjp(model._dot_fp32_grad, x, w)
    y_plain, vjp_plain = jax.vjp(plain, x, w)
    assert y.dtype == jnp.bfloat16 and np.array_equal(np.asarray(y, np.float32), np.asarray(y_plain, np.float32))
    dx, dw = vjp(g)
    dx_plain, dw_plain = vjp_plain(g)
    assert np.array_equal(np.asarray(dx, np.float32), np.asarray(dx_plain, np.float32))
    exact = np.einsum("bli,blo->io", np.asarray(x, np.float64), np.asarray(g, np.float64))
    assert dw.dtype == jnp.float32 and dw_plain.dtype == jnp.float32
    err, err_plain = (np.max(np.abs(np.asarray(d, np.float64) - exact)) / np.max(np.abs(exact)) for d in (dw, dw_plain))
    # fp32 accumulation of 64 bf16 products: ~1e-7 relative; the plain path rounds the result to bf16 (2^-9)
    assert err < 1e-5 < err_plain < 2**-8, (err, err_plain)
