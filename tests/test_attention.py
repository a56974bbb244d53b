"""Attention per backend: `auto` resolution, and the splash kernel (Pallas interpret mode on CPU) against the XLA
path: forward and gradients, packed and unpacked, MHA / GQA / MQA, one device and the 8-device mesh.

Tolerances are relative to the largest magnitude compared: 1e-5 for outputs, 1e-4 for gradients (fp32, matmuls
at full precision). The two paths compute the same softmax in another order (online softmax over 128-512 key
blocks); the errors measured are ~1e-6, and a wrong mask (one key of another document, one future key) moves
outputs by ~1e-1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mft_jax import attention, model, sharding
from mft_jax.config import LlamaConfig, MeshConfig
from tolerances import assert_close

OUT_REL, GRAD_REL = 1e-5, 1e-4


def _assert_rel(actual, expected, rel, what):
    assert_close(actual, expected, rel * float(np.abs(np.asarray(expected)).max()), what)


@pytest.mark.parametrize("name, backend, packing, expected", [
    ("auto", "tpu", False, "splash"), ("auto", "tpu", True, "splash"),
    ("auto", "gpu", False, "cudnn"), ("auto", "gpu", True, "xla"),  # cuDNN's kernel is causal only
    ("auto", "cpu", False, "xla"), ("auto", "cpu", True, "xla"),
    ("xla", "tpu", False, "xla"), ("splash", "cpu", True, "splash_interpret"), ("splash", "tpu", True, "splash"),
    ("splash", "gpu", False, "splash_interpret"), ("cudnn", "gpu", False, "cudnn"),
])
def test_resolve_by_backend(name, backend, packing, expected):
    assert attention.resolve(name, backend, packing) == expected


def test_unresolved_name_is_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="'auto'"):
        attention.causal_self_attention("auto", q, q, q, jnp.ones((1, 4), jnp.int32))


def _segments(batch: int, length: int, packed: bool, seed: int) -> np.ndarray:
    """[B, L] int32 segment ids. Unpacked: one document per row, right-padded (row 0 full). Packed: 2-4 documents
    per row of random lengths (crossing the kernel's block boundaries), then padding (segment 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in range(batch):
        if not packed:
            used = length if row == 0 else int(rng.integers(length // 2, length))
            rows.append([1] * used + [0] * (length - used))
            continue
        cuts = np.sort(rng.choice(np.arange(1, length - 8), size=int(rng.integers(2, 5)), replace=False))
        ids = np.zeros(length, np.int32)
        for doc, (start, end) in enumerate(zip(np.r_[0, cuts[:-1]], cuts), start=1):
            ids[start:end] = doc
        rows.append(ids)  # the tail after the last cut stays padding
    return np.asarray(rows, np.int32)


def _qkv(batch, length, heads, kv_heads, head_dim, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, length, heads, head_dim)),
            jax.random.normal(keys[1], (batch, length, kv_heads, head_dim)),
            jax.random.normal(keys[2], (batch, length, kv_heads, head_dim)))


def _value_and_grads(name, q, k, v, segment_ids, weights, window=None):
    """Outputs and d(sum(weights * out))/d(q, k, v) of one implementation."""
    def scalar(q, k, v):
        out = attention.causal_self_attention(name, q, k, v, segment_ids, window)
        return jnp.sum(out * weights), out
    (_, out), grads = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _compare(q, k, v, segment_ids, seed=0):
    """Splash vs XLA: outputs at every position (the masks are the same, padding rows included) and gradients."""
    weights = jax.random.normal(jax.random.key(seed + 7), q.shape)
    out_x, grads_x = _value_and_grads("xla", q, k, v, segment_ids, weights)
    out_s, grads_s = _value_and_grads("splash_interpret", q, k, v, segment_ids, weights)
    _assert_rel(out_s, out_x, OUT_REL, "outputs")
    for name, a, b in zip("qkv", grads_s, grads_x):
        _assert_rel(a, b, GRAD_REL, f"d/d{name}")
    return out_s, out_x


@pytest.mark.parametrize("length, heads, kv_heads, head_dim, packed", [
    (128, 4, 2, 64, False),  # GQA, the smallest length the kernel takes (one 128 block)
    (384, 4, 2, 64, True),  # GQA, three 128 blocks: documents cross block boundaries
    (256, 4, 4, 128, True),  # MHA, one 256 block
    (200, 4, 1, 64, True),  # MQA, a length the kernel pads to 256
])
def test_splash_equals_xla(length, heads, kv_heads, head_dim, packed):
    q, k, v = _qkv(2, length, heads, kv_heads, head_dim, seed=length)
    segment_ids = jnp.asarray(_segments(2, length, packed, seed=length))
    out_s, _ = _compare(q, k, v, segment_ids)
    # the comparison can fail: attention across documents (causal mask only) changes the packed outputs
    if packed:
        causal_only = attention.causal_self_attention("xla", q, k, v, jnp.ones_like(segment_ids))
        assert float(jnp.abs(causal_only - out_s).max()) > 1e-2


@pytest.mark.parametrize("window, packed", [(100, True), (37, False)])
def test_sliding_window_splash_equals_xla_and_a_direct_mask(window, packed):
    """Mistral's sliding window (a query sees `window` keys, itself included) in splash equals XLA's, outputs and
    gradients, across the kernel's 128 blocks; XLA's equals attention under a mask built here directly."""
    length = 256
    q, k, v = _qkv(2, length, 4, 2, 64, seed=window)
    segment_ids = jnp.asarray(_segments(2, length, packed, seed=window))
    weights = jax.random.normal(jax.random.key(window), q.shape)
    out_x, grads_x = _value_and_grads("xla", q, k, v, segment_ids, weights, window)
    out_s, grads_s = _value_and_grads("splash_interpret", q, k, v, segment_ids, weights, window)
    _assert_rel(out_s, out_x, OUT_REL, "outputs")
    for name, a, b in zip("qkv", grads_s, grads_x):
        _assert_rel(a, b, GRAD_REL, f"d/d{name}")
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    seg = np.asarray(segment_ids)
    mask = (j <= i) & (i - j < window) & (seg[:, :, None] == seg[:, None, :])
    direct = attention.dot_product_attention(q, k, v, jnp.asarray(mask)[:, None, None])
    windowed = attention.causal_self_attention("xla", q, k, v, segment_ids, window)  # eager, as `direct`
    np.testing.assert_array_equal(np.asarray(windowed), np.asarray(direct))  # the same ops on the same mask
    full = attention.causal_self_attention("xla", q, k, v, segment_ids)
    assert float(jnp.abs(full - windowed).max()) > 1e-2  # the window changed the result: the test can fail
    same = attention.causal_self_attention("xla", q, k, v, segment_ids, length)  # a window >= L is no window
    np.testing.assert_array_equal(np.asarray(same), np.asarray(full))


def test_splash_block_sizes():
    assert [attention.splash_block(n) for n in (128, 256, 384, 512, 640, 1024, 4096)] == [128, 256, 128, 512, 128,
                                                                                           512, 512]


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # the trainer's mesh, 8 CPU devices


def test_splash_shards_batch_and_heads(mesh):
    """Under the trainer's mesh and rules: rows over (data, fsdp), heads over tensor when query and key heads
    both split; else the heads stay whole on every shard (each shard holds the key heads of its queries)."""
    with sharding.axis_rules(), jax.set_mesh(mesh):
        abstract = jax.sharding.get_abstract_mesh()
        assert attention._splash_specs((4, 128, 4, 64), (4, 128, 2, 64), abstract) == (
            P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None, "tensor", None),
            P(("data", "fsdp"), None))
        assert attention._splash_specs((4, 128, 4, 64), (4, 128, 1, 64), abstract)[:2] == (
            P(("data", "fsdp"), None, None, None),) * 2
        assert attention._splash_specs((2, 128, 4, 64), (2, 128, 2, 64), abstract)[2] == P(None, None)


@pytest.mark.parametrize("kv_heads", [2, 1])  # heads split over tensor; MQA: heads whole on every shard
def test_splash_on_mesh_equals_xla(mesh, kv_heads):
    q, k, v = _qkv(4, 256, 4, kv_heads, 64, seed=3)
    segment_ids = jnp.asarray(_segments(4, 256, packed=True, seed=3))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    q, k, v, segment_ids = jax.device_put((q, k, v, segment_ids), rows)
    with sharding.axis_rules(), jax.set_mesh(mesh):
        out_s, _ = _compare(q, k, v, segment_ids, seed=3)
    assert out_s.sharding.spec[0] == sharding.BATCH_AXES


TINY = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, max_position_embeddings=256)


def test_model_forward_with_splash_on_mesh_equals_xla(mesh):
    """The full model on the 8-device mesh (params and rows sharded) with splash attention against one device
    with XLA attention: logits and the gradients of every param, on packed rows with per-document positions."""
    params = model.init_params(TINY, jax.random.key(0))
    batch, length = 4, 128
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (batch, length)).astype(np.int32)
    segment_ids = _segments(batch, length, packed=True, seed=5)
    starts = np.maximum.accumulate(np.where(np.diff(segment_ids, prepend=-1, axis=1) != 0,
                                            np.arange(length), 0), axis=1)
    positions = (np.arange(length) - starts).astype(np.int32)  # each document starts at position 0
    weights = (segment_ids > 0)[..., None] * np.random.default_rng(2).normal(size=(batch, length, TINY.vocab_size))

    def value_and_grads(p, kind, tok, pos, seg):
        def scalar(p):
            logits = model.forward(TINY, p, tok, pos, seg, options=model.Options(attention=kind))
            return jnp.sum(logits * weights), logits
        return jax.value_and_grad(scalar, has_aux=True)(p)

    (_, logits_x), grads_x = jax.jit(value_and_grads, static_argnums=1)(params, "xla", tokens, positions,
                                                                         segment_ids)
    sharded = jax.device_put(params, sharding.param_shardings(TINY, mesh))
    rows = sharding.batch_sharding(mesh, micro_batched=False)
    inputs = jax.device_put((tokens, positions, segment_ids), rows)
    with sharding.axis_rules(), jax.set_mesh(mesh):
        (_, logits_s), grads_s = jax.jit(value_and_grads, static_argnums=1)(sharded, "splash_interpret", *inputs)
    real = segment_ids > 0  # padding positions have zero weight in the loss; compared anyway below
    _assert_rel(np.asarray(logits_s)[real], np.asarray(logits_x)[real], OUT_REL, "logits")
    _assert_rel(logits_s, logits_x, OUT_REL, "logits, padding included")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_s)[0], jax.tree.leaves(grads_x)):
        _assert_rel(a, b, GRAD_REL, jax.tree_util.keystr(path))


def test_decoding_keeps_xla_attention():
    """The Pallas kernel runs on whole sequences only; a step over a KV cache uses XLA attention whatever the
    module's `attention`."""
    params = model.init_params(TINY, jax.random.key(0))
    tokens = jnp.zeros((1, 128), jnp.int32)
    ones = jnp.ones((1, 128), jnp.int32)
    splash = model._module(TINY, model.Options(attention="splash"))
    full = jax.make_jaxpr(lambda p: splash.apply({"params": p}, tokens, ones, ones))(params)
    cache = model.init_cache(TINY, 1, 256)
    step = jax.make_jaxpr(lambda p, c: splash.apply({"params": p}, tokens, ones, ones, c, 0))(params, cache)
    assert "pallas_call" in str(full) and "pallas_call" not in str(step)
