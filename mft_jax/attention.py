"""Attention per backend: one causal, segment-aware self-attention with three implementations.

- `xla`: einsums and a boolean mask; any backend, any shape, and the only one with a KV cache (decoding).
- `cudnn`: cuDNN flash attention on GPU. Causal only: no segment ids, so no packing (one document per row).
- `splash`: the Pallas splash attention kernel on TPU (causal + segment ids, so packing works), lowered by Mosaic.
  `splash_interpret` is the same kernel in Pallas interpret mode, what `splash` means off TPU: slow, for tests.

`resolve` turns `model.attention` into one of them for the platform of the devices the step runs (or is compiled)
on, never the host's: a step compiled on a CPU host for a TPU topology gets the Mosaic kernel. Attention is causal on the row index
and stays inside a document: token i sees token j when j <= i and segment_ids[i] == segment_ids[j]. Padding
(segment 0) therefore attends to earlier padding, the same in every implementation; its loss weight is zero.
With a sliding `window` (Mistral, Qwen's sliding layers) token i also needs i - j < window: it sees `window`
keys, itself included (Hugging Face's sliding-window causal mask), in every implementation and the KV cache.

Shape suffixes: B batch, L query length, S key length, H query heads, K key/value heads (H = K * G),
Dh head dim.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

NAMES = ("xla", "cudnn", "splash", "splash_interpret")
_NEG_INF = float(np.finfo(np.float32).min)
_SPLASH_ALIGN = 128  # the kernel's blocks must be multiples of the TPU lane count
_SPLASH_BLOCKS = (512, 256, 128)  # largest first: the biggest that divides the (padded) length is used


def resolve(name: str, backend: str, packing: bool) -> str:
    """The implementation `name` stands for on `backend` ("tpu", "gpu", "cpu": the platform of the mesh's
    devices): `auto` is splash on TPU, cuDNN on GPU unless the batch is packed (cuDNN's kernel is causal only),
    XLA otherwise; `splash` off TPU is its interpret mode."""
    if name == "splash" and backend != "tpu":
        return "splash_interpret"
    if name != "auto":
        return name
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and not packing:
        return "cudnn"
    return "xla"


# --------------------------------------------------------------------------------------------------------
# XLA
# --------------------------------------------------------------------------------------------------------

def attention_mask(q_segment_BxL, kv_segment_BxS, q_index_BxL, kv_index_S, window: int | None = None) -> jax.Array:
    """[B, 1, 1, L, S] bool: causal on row index, and only within the same document (and the window)."""
    causal = kv_index_S[None, None, :] <= q_index_BxL[:, :, None]
    if window is not None:
        causal &= q_index_BxL[:, :, None] - kv_index_S[None, None, :] < window
    same_doc = q_segment_BxL[:, :, None] == kv_segment_BxS[:, None, :]
    return (causal & same_doc)[:, None, None, :, :]


def dot_product_attention(q_BxLxHxDh, k, v, mask_Bx1x1xLxS, kv_heads_major: bool = False):
    """Grouped-query attention; scores and softmax in fp32, as Hugging Face's eager path. k, v are [B, S, K, Dh],
    or with `kv_heads_major` [B, K, S, Dh] (the KV cache's layout: the dots batch over (B, K) as it lies)."""
    b, l, h, dh = q_BxLxHxDh.shape
    kv_heads = k.shape[1 if kv_heads_major else 2]
    kv = "bksd" if kv_heads_major else "bskd"
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, kv_heads, h // kv_heads, dh)
    logits_BxKxGxLxS = jnp.einsum(f"blkgd,{kv}->bkgls", q_BxLxKxGxDh, k) * (dh ** -0.5)
    logits_BxKxGxLxS = jnp.where(mask_Bx1x1xLxS, logits_BxKxGxLxS.astype(jnp.float32), _NEG_INF)
    probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v.dtype)
    out_BxLxKxGxDh = jnp.einsum(f"bkgls,{kv}->blkgd", probs, v)
    return out_BxLxKxGxDh.reshape(b, l, h, dh)


# --------------------------------------------------------------------------------------------------------
# Splash (Pallas, TPU)
# --------------------------------------------------------------------------------------------------------

def splash_block(length: int) -> int:
    """The kernel's block size for a sequence of `length` (a multiple of 128): the largest of 512, 256, 128
    that divides it."""
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=16)
def _splash_kernel(num_heads: int, length: int, interpret: bool, window: int | None = None):
    """A causal (with `window`: causal and local) splash kernel for [H, L, Dh] inputs (one example; vmapped over
    the batch). The mask's block structure is computed in numpy (~0.4 s at L = 4096, H = 32), once per shape
    rather than once per layer."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU only: CPU/GPU never load Pallas

    block = splash_block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    if window is not None and window < length:
        one = splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        one = splash.CausalMask((length, length))
    mask = splash.MultiHeadMask([one] * num_heads)
    with jax.ensure_compile_time_eval():  # concrete mask arrays, not tracers of the first caller's trace
        return splash, splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                              interpret=interpret)


def _splash_local(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, *, interpret: bool,
                  window: int | None = None):
    """Splash attention on one device's shard. GQA without repeating K/V: the kernel maps query head h to key
    head h // G. Lengths that are not a multiple of 128 are padded at the end; causality keeps the padded keys
    out of every real query's view and the padded queries are dropped."""
    length = q_BxLxHxDh.shape[1]
    padded = -(-length // _SPLASH_ALIGN) * _SPLASH_ALIGN
    q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh = (
        jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
        for x in (q_BxLxHxDh * (q_BxLxHxDh.shape[-1] ** -0.5), k_BxLxKxDh, v_BxLxKxDh))  # the kernel does not scale
    segment_ids_BxL = jnp.pad(segment_ids_BxL.astype(jnp.int32), ((0, 0), (0, padded - length)))
    splash, kernel = _splash_kernel(q_BxHxLxDh.shape[1], padded, interpret, window)
    segments = splash.SegmentIds(q=segment_ids_BxL, kv=segment_ids_BxL)
    out_BxHxLxDh = jax.vmap(kernel)(q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids=segments)
    return out_BxHxLxDh.transpose(0, 2, 1, 3)[:, :length]


def _mesh_axes(logical: str, size: int, mesh):
    """The mesh axes the logical axis rules in scope (`sharding.axis_rules()`) give a dimension of `size`;
    None when there are none or they do not divide it (then every shard holds the whole dimension)."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if not names or any(a not in mesh.shape for a in names) or size % math.prod(mesh.shape[a] for a in names):
        return None
    return axes


def _splash_specs(q_shape, kv_shape, mesh) -> tuple[P, P, P]:
    """(q spec, k/v spec, segment ids spec). The length is never split (the kernel needs every key of a row);
    heads are split only when the query and key/value heads split alike, so every shard holds the key heads of
    its query heads."""
    batch = _mesh_axes("batch", q_shape[0], mesh)
    q_heads, kv_heads = _mesh_axes("q_heads", q_shape[2], mesh), _mesh_axes("kv_heads", kv_shape[2], mesh)
    heads = q_heads if q_heads == kv_heads else None
    return P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


def splash_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, *, interpret: bool | None = None,
                     window: int | None = None):
    """Causal self-attention within segments through the splash kernel; [B, L, H, Dh] in q's dtype.

    Under a mesh (`jax.set_mesh`) the kernel runs in a shard_map over the mesh axes that the logical axis rules
    give the batch (data, fsdp) and the heads (tensor): a Pallas call is opaque to XLA's partitioner.
    interpret: None = interpret mode when the host's default backend is not a TPU (`resolve` decides it from the
    mesh's devices for the training step).
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    local = functools.partial(_splash_local, interpret=interpret, window=window)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)
    q_spec, kv_spec, segment_spec = _splash_specs(q_BxLxHxDh.shape, k_BxLxKxDh.shape, mesh)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec,
                            check_vma=False)
    return sharded(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)


# --------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------

def causal_self_attention(name: str, q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL,
                          window: int | None = None) -> jax.Array:
    """Attention of a whole sequence (no cache) with implementation `name` (see `resolve`); [B, L, H, Dh].
    window: the sliding window (None or >= the length: plain causal attention)."""
    if window is not None and window >= q_BxLxHxDh.shape[1]:
        window = None  # no query reaches past it: the same as causal
    if name == "xla":
        index_L = jnp.arange(q_BxLxHxDh.shape[1])
        index_BxL = jnp.broadcast_to(index_L, segment_ids_BxL.shape)
        mask = attention_mask(segment_ids_BxL, segment_ids_BxL, index_BxL, index_L, window)
        return dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask)
    if name == "cudnn":
        # causal only: the batch must hold one right-padded document per row (padding queries produce values
        # whose loss weight is zero)
        return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, is_causal=True,
                                            local_window_size=None if window is None else (window - 1, 0),
                                            implementation="cudnn")
    if name in ("splash", "splash_interpret"):
        return splash_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL,
                                interpret=name == "splash_interpret", window=window)
    raise ValueError(f"attention: unknown implementation {name!r}; use one of {', '.join(NAMES)} "
                     f"(resolve 'auto' with attention.resolve first)")
