"""Llama in Flax Linen: a pure function of (config, params, tokens). Mistral, Qwen2 / 2.5 and Qwen3 are the same
model with the config's switches (q/k/v bias, per-head q/k norm, sliding window; mft_jax.config.families).

The params pytree mirrors Hugging Face's module names, so the converter is a transpose per tensor:
`embed_tokens` [V, D], `layers_{i}/{input_layernorm,post_attention_layernorm}/scale`,
`layers_{i}/self_attn/{q,k,v,o}_proj/{kernel,bias}`, `layers_{i}/self_attn/{q,k}_norm/scale` (qk_norm),
`layers_{i}/mlp/{gate,up,down}_proj/{kernel,bias}`,
`norm/scale`, `lm_head/kernel` (absent with tied embeddings). Kernels are [in, out] (HF stores [out, in]).
Every param carries logical axis names (`param_logical_axes`); `mft_jax.sharding` maps them to mesh axes.

The model knows nothing about masks: MFT transforms the params pytree before calling `forward`.

Shape suffixes: B batch, L query length, S key length (cache size), D hidden, H query heads,
K key/value heads, G = H // K query heads per key/value head, Dh head dim, F intermediate, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mft_jax import attention as attention_lib
from mft_jax.config import REMAT_CHOICES, LlamaConfig

Params = dict[str, Any]


def _dtype(name_or_dtype) -> jnp.dtype:
    return jnp.dtype(name_or_dtype)


@dataclasses.dataclass(frozen=True)
class Adapters:
    """LoRA adapters in the params (`lora_a`, `lora_b` beside a kernel, put there by mft_jax.methods.LoRA): each
    adds scale * dropout(x) @ a @ b, as PEFT's LoRA layer; the dropout only runs when the call has a dropout rng."""

    scale: float
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Options:
    """How a forward pass computes: static under jit (hashable), the same for every call of a step.

    compute_dtype: activations and matmuls (norm statistics, softmax and the logits stay fp32);
    attention: an implementation of mft_jax.attention (`xla`, `cudnn`, `splash`, `splash_interpret`: resolved);
    remat: the decoder layers' rematerialisation policy (config.REMAT_CHOICES);
    adapters: LoRA adapters the params carry (None: the kernels alone);
    fp32_weight_grads: fp32 kernels (a method's fp32 view) get their gradients from their matmuls in fp32.
    """

    compute_dtype: Any = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    adapters: Adapters | None = None
    fp32_weight_grads: bool = False

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype))
        if self.attention not in attention_lib.NAMES:
            raise ValueError(f"Options.attention {self.attention!r}: one of {attention_lib.NAMES} "
                             f"(attention.resolve turns model.attention into one)")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"Options.remat {self.remat!r}: one of {REMAT_CHOICES}")

    @property
    def dtype(self) -> jnp.dtype:
        return self.compute_dtype


# --------------------------------------------------------------------------------------------------------
# Rotary embeddings (rotate-half layout, as Hugging Face's Llama: q/k weights need no permutation)
# --------------------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] in float32, with `linear` or Llama-3.1 (`llama3`) scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: LlamaConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, L, Dh] in float32 for integer positions."""
    freqs_BxLxDh2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
    emb_BxLxDh = jnp.concatenate([freqs_BxLxDh2, freqs_BxLxDh2], axis=-1)
    return jnp.cos(emb_BxLxDh), jnp.sin(emb_BxLxDh)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BxLxNxDh, cos_BxLxDh, sin_BxLxDh):
    # HF casts cos/sin to the activation dtype before rotating; do the same for bf16 parity.
    cos = cos_BxLxDh[:, :, None, :].astype(x_BxLxNxDh.dtype)
    sin = sin_BxLxDh[:, :, None, :].astype(x_BxLxNxDh.dtype)
    return x_BxLxNxDh * cos + _rotate_half(x_BxLxNxDh) * sin


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------

def _init(initializer, axes):
    return nn.with_logical_partitioning(initializer, axes)


@jax.custom_vjp
def _dot_fp32_grad(x, kernel_fp32):
    """x @ kernel in x's (16-bit) dtype, whose kernel gradient is the fp32 output of its matmul, not the 16-bit
    one rounded and then widened: where that gradient is summed across devices (fsdp), the sum runs in fp32."""
    return jnp.dot(x, kernel_fp32.astype(x.dtype))


def _dot_fp32_grad_fwd(x, kernel_fp32):
    kernel = kernel_fp32.astype(x.dtype)
    return jnp.dot(x, kernel), (x, kernel)


def _dot_fp32_grad_bwd(residuals, g):
    x, kernel = residuals
    dx = jnp.dot(g, kernel.T)
    dkernel = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32)
    return dx, dkernel


_dot_fp32_grad.defvjp(_dot_fp32_grad_fwd, _dot_fp32_grad_bwd)


class Dense(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axes; with `options.adapters`, plus the LoRA
    adapters beside the kernel (params `lora_a` [in, r], `lora_b` [r, out]), where the params carry them."""

    features: int
    axes: tuple[str, str]
    options: Options
    param_dtype: Any = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        dtype = self.options.dtype
        kernel = self.param("kernel", _init(nn.initializers.normal(0.02), self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        if self.options.fp32_weight_grads and kernel.dtype == jnp.float32 and dtype != jnp.float32:
            y = _dot_fp32_grad(x.astype(dtype), kernel)
        else:
            y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", _init(nn.initializers.zeros_init(), self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        if self.options.adapters is not None and self.has_variable("params", "lora_a"):
            y = y + self._adapter(x)
        return y

    def _adapter(self, x):
        dtype, scale, rate = self.options.dtype, self.options.adapters.scale, self.options.adapters.dropout
        a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
        if rate > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
        return jnp.dot(jnp.dot(x.astype(dtype), a.astype(dtype)), b.astype(dtype)) * scale


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD):
        scale = self.param("scale", _init(nn.initializers.ones_init(), ("norm",)), (x_BxLxD.shape[-1],),
                           self.param_dtype)
        x32 = x_BxLxD.astype(jnp.float32)  # statistics in fp32 whatever the compute dtype
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig
    options: Options
    param_dtype: Any
    window: int | None = None  # this layer's sliding window (cfg.window(i))

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, q_segment_BxL, q_index_BxL, cache=None, cache_index=None):
        cfg, dtype = self.cfg, self.options.dtype
        h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = functools.partial(Dense, options=self.options, param_dtype=self.param_dtype)
        qkv_bias = cfg.attention_bias or cfg.qkv_bias  # Qwen2: bias on q, k, v but not o
        b, l, _ = x_BxLxD.shape
        q = dense(h * dh, ("embed", "q_heads"), use_bias=qkv_bias, name="q_proj")(x_BxLxD).reshape(b, l, h, dh)
        k = dense(kv * dh, ("embed", "kv_heads"), use_bias=qkv_bias, name="k_proj")(x_BxLxD).reshape(b, l, kv, dh)
        v = dense(kv * dh, ("embed", "kv_heads"), use_bias=qkv_bias, name="v_proj")(x_BxLxD).reshape(b, l, kv, dh)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's Dh features, before rope
            q = RMSNorm(cfg.rms_norm_eps, dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dtype, self.param_dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:  # the training / scoring path: the implementation chosen by `model.attention`
            out = attention_lib.causal_self_attention(self.options.attention, q, k, v, q_segment_BxL, self.window)
            new_cache = None
        else:  # decoding: write this chunk into the cache at cache_index, attend over the whole cache (XLA)
            k, v = (jax.lax.dynamic_update_slice(cache[name], jnp.swapaxes(x, 1, 2).astype(cache[name].dtype),
                                                 (0, 0, cache_index, 0)) for name, x in (("k", k), ("v", v)))
            new_cache = {"k": k, "v": v}
            mask = attention_lib.attention_mask(q_segment_BxL, cache["segment_ids"], q_index_BxL,
                                                jnp.arange(k.shape[2]), self.window)
            out = attention_lib.dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask, kv_heads_major=True)
        out = dense(cfg.hidden_size, ("q_heads", "embed"), use_bias=cfg.attention_bias,
                    name="o_proj")(out.reshape(b, l, h * dh))
        return out, new_cache


class MLP(nn.Module):
    cfg: LlamaConfig
    options: Options
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dense = functools.partial(Dense, options=self.options, param_dtype=self.param_dtype, use_bias=cfg.mlp_bias)
        gate_BxLxF = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x_BxLxD)
        up_BxLxF = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x_BxLxD)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj")(nn.silu(gate_BxLxF) * up_BxLxF)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    options: Options
    param_dtype: Any
    window: int | None = None

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, q_segment_BxL, q_index_BxL, cache=None, cache_index=None):
        cfg = self.cfg
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, dtype=self.options.dtype, param_dtype=self.param_dtype)
        attn_out, new_cache = Attention(cfg, self.options, self.param_dtype, self.window, name="self_attn")(
            norm(name="input_layernorm")(x_BxLxD), cos, sin, q_segment_BxL, q_index_BxL, cache, cache_index)
        x_BxLxD = x_BxLxD + attn_out
        mlp = MLP(cfg, self.options, self.param_dtype, name="mlp")
        mlp_out = mlp(norm(name="post_attention_layernorm")(x_BxLxD))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD + mlp_out, ("batch", "length", "act_embed"))
        return x_BxLxD, new_cache


def _dots_and_attention_saveable(prim, *avals, **params) -> bool:
    """`dots` plus the outputs of the attention kernel's forward call (splash: a pallas_call; cuDNN: its fused
    attention primitive): the attention output and the softmax statistics its backward kernels take, so the
    backward pass does not run the forward kernel again. Costs [B, L, H, Dh] + [B, H, L] per layer."""
    if prim.name == "pallas_call" or prim.name.startswith("dot_product_attention_fwd"):
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # recomputes the attention kernel
    "dots_attention": _dots_and_attention_saveable,
}
assert set(_REMAT_POLICIES) | {"none"} == set(REMAT_CHOICES)


class Llama(nn.Module):
    cfg: LlamaConfig
    options: Options = Options()
    param_dtype: Any = jnp.float32  # only used by init

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache=None, cache_index=None,
                 last_only: bool = False, hidden_only: bool = False):
        cfg, options, dtype = self.cfg, self.options, self.options.dtype
        embedding_VxD = self.param("embed_tokens", _init(nn.initializers.normal(0.02), ("vocab", "embed")),
                                   (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        x_BxLxD = jnp.take(embedding_VxD, tokens_BxL, axis=0).astype(dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
        cos, sin = rope_cos_sin(cfg, positions_BxL)

        offset = 0 if cache is None else cache_index
        q_index_BxL = jnp.broadcast_to(offset + jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        if cache is not None:
            cache = dict(cache)
            cache["segment_ids"] = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxL,
                                                                (0, cache_index))
        layer_cls = DecoderLayer
        if options.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[options.remat], prevent_cse=True)
        new_layers = []
        for i in range(cfg.num_hidden_layers):
            layer_cache = None
            if cache is not None:
                layer_cache = {**cache["layers"][i], "segment_ids": cache["segment_ids"]}
            x_BxLxD, new_layer_cache = layer_cls(cfg, options, self.param_dtype, cfg.window(i),
                                                 name=f"layers_{i}")(x_BxLxD, cos, sin, segment_ids_BxL,
                                                                     q_index_BxL, layer_cache, cache_index)
            new_layers.append(new_layer_cache)
        x_BxLxD = RMSNorm(cfg.rms_norm_eps, dtype, self.param_dtype, name="norm")(x_BxLxD)
        if last_only:  # logits of the last position only (a prefill needs no more): [B, 1, V]
            x_BxLxD = x_BxLxD[:, -1:]
        if hidden_only:  # the final normed hidden states [B, L, D]; the caller applies `lm_head_kernel`
            return x_BxLxD, None
        if cfg.tie_word_embeddings:
            logits_BxLxV = jnp.dot(x_BxLxD, embedding_VxD.astype(dtype).T)
        else:  # the head is a plain matmul in the compute dtype (no adapters, no fp32 weight gradients)
            logits_BxLxV = Dense(cfg.vocab_size, ("embed", "vocab"), Options(dtype), self.param_dtype,
                                 name="lm_head")(x_BxLxD)
        logits_BxLxV = logits_BxLxV.astype(jnp.float32)
        if cache is None:
            return logits_BxLxV, None
        return logits_BxLxV, {"layers": new_layers, "segment_ids": cache["segment_ids"]}


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------

def _module(cfg: LlamaConfig, options: Options = Options(), param_dtype=None):
    return Llama(cfg, options, param_dtype=_dtype(param_dtype or cfg.dtype))


def _init_inputs():
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, jnp.ones((1, 1), jnp.int32)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=None) -> Params:
    """Random params (normal(0.02) matrices, unit norms, zero biases) as a plain dict of arrays."""
    init = jax.jit(lambda k: nn.meta.unbox(_module(cfg, param_dtype=dtype).init(k, *_init_inputs())["params"]))
    return init(key)


def param_logical_axes(cfg: LlamaConfig) -> Params:
    """A pytree like the params whose leaves are tuples of logical axis names (no allocation)."""
    boxed = jax.eval_shape(lambda: _module(cfg).init(jax.random.key(0), *_init_inputs())["params"])
    return jax.tree.map(lambda p: tuple(p.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shapes(cfg: LlamaConfig, dtype=None) -> Params:
    """A pytree of `jax.ShapeDtypeStruct` like `init_params` returns, without allocating."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))


def count_params(cfg: LlamaConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(cfg)))


def lm_head_kernel(cfg: LlamaConfig, params: Params) -> jax.Array:
    """The output projection [D, V]: `lm_head/kernel`, or the transposed embedding when tied."""
    return params["embed_tokens"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]


@functools.partial(jax.jit, static_argnames=("cfg", "options", "hidden_only"))
def forward(cfg: LlamaConfig, params: Params, tokens, positions=None, segment_ids=None, *,
            options: Options = Options(), hidden_only: bool = False, dropout_rng=None) -> jax.Array:
    """Logits [B, L, V] in float32 for int tokens [B, L].

    positions [B, L]: position of each token in its document (default 0..L-1).
    segment_ids [B, L]: document id per token (0 = padding); attention never crosses documents.
    options: how it computes (`Options`: compute dtype, attention, remat, adapters, fp32 weight gradients).
    hidden_only: return the final normed hidden states [B, L, D] (compute dtype) instead of the logits.
    dropout_rng: turns the adapters' dropout on (training).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    out, _ = _module(cfg, options).apply({"params": params}, tokens, positions, segment_ids,
                                         hidden_only=hidden_only, rngs=rngs)
    return out


# Logical axes of the KV cache: per layer k, v [B, K, S, Dh] (kv heads before slots, so a decode step's attention
# dots batch over (B, K) with the cache as it lies: no transposed copy of it per step), segment_ids [B, S].
KV_CACHE_AXES = ("batch", "kv_heads", "length", None)
SEGMENT_CACHE_AXES = ("batch", "length")


def init_cache(cfg: LlamaConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `max_len` positions: per layer k, v [B, K, S, Dh]; segment_ids [B, S] (0 = empty).
    Rows on the data axes, kv heads on the tensor axis (under sharding.axis_rules)."""
    shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)

    def zeros(shape, dtype, axes):
        return nn.with_logical_constraint(jnp.zeros(shape, dtype), axes)

    layers = [{"k": zeros(shape, dtype, KV_CACHE_AXES), "v": zeros(shape, dtype, KV_CACHE_AXES)}
              for _ in range(cfg.num_hidden_layers)]
    return {"layers": layers, "segment_ids": zeros((batch_size, max_len), jnp.int32, SEGMENT_CACHE_AXES)}


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "last_only"), donate_argnames=("cache",))
def forward_with_cache(cfg: LlamaConfig, params: Params, tokens, positions, segment_ids, cache: dict,
                       cache_index, *, compute_dtype=jnp.float32, last_only: bool = False) -> tuple[jax.Array, dict]:
    """Runs tokens [B, T] that occupy cache slots [cache_index, cache_index + T); returns (logits, cache).

    Rows are left-padded with segment id 0, so every row's next token goes to the same slot.
    last_only: logits [B, 1, V] of the last position only (a prefill's: [B, T, V] fp32 logits of a 128k
    vocabulary are 4 GB at B=8, T=1024).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    return _module(cfg, Options(compute_dtype)).apply({"params": params}, tokens, positions, segment_ids, cache,
                                                      cache_index, last_only)
