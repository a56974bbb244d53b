"""Batched decoding with the KV cache: greedy or sampled (temperature, top-p), EOS and stop strings.

How a batch is decoded:
1. Prompts are sorted by length and cut into batches; each batch is LEFT-padded (segment id 0) to a prompt
   bucket Lp and a batch bucket B (powers of two), so a new prompt length or batch size reuses a compiled
   program. The cache holds S = Lp + N slots, N = the power of two >= max_new_tokens.
2. `_prefill` runs the padded prompts through the model once, filling cache slots [0, Lp), and samples the
   first new token of every row.
3. `_decode` runs a `lax.while_loop`: feed the last token at slot Lp + i - 1, sample token i, stop when
   every row has produced an EOS or `limit` tokens exist. Without stop strings the whole answer is one
   device call; with stop strings the host decodes the text every `stop_check_every` tokens (stop strings
   are text, and tokenizations of a string are ambiguous, so they are checked on the host, exactly).

Positions count from 0 at each row's first real token, so padding changes nothing a row computes.
Sampling keys derive from (seed, prompt index, step), so a prompt's sample does not depend on its batch (nor,
with `first_index`, on a split of the prompts over processes).

Text (`generate_text`): prompt encoding is explicit (`encode_prompts`): no BOS unless asked for (the olmes
harness encodes with `add_special_tokens=False`), and an optional token budget that keeps a prompt's last
tokens. New tokens become text in the context of the prompt's last tokens (as vLLM's detokenizer does), so a
continuation keeps the leading space or indentation of its first token, which SentencePiece decoders drop
when a token list starts with it; stop strings are looked for in that same text.

`recompute=True` is the slow reference: every step runs the full forward over the whole [B, S] buffer
instead of reading the cache (used by bench/decode.py to measure what the cache buys).

Shape suffixes: B batch, Lp padded prompt length, N new-token buffer, S = Lp + N, V vocab, E eos ids.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mft_jax import model as model_lib
from mft_jax import sharding
from mft_jax.config import LlamaConfig

Params = dict[str, Any]

_MIN_PROMPT_BUCKET = 16
_CONTEXT_TOKENS = 8  # prompt tokens that new text is decoded after (vLLM's detokenizer uses 6)


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------

def sample_tokens(logits_BxV: jax.Array, keys_B: jax.Array, temperature, top_p, *, greedy: bool,
                  use_top_p: bool) -> jax.Array:
    """Next token ids [B] int32 from float32 logits [B, V].

    greedy: argmax (first index on ties, as torch). Otherwise softmax(logits / temperature), restricted to
    the smallest set of most likely tokens whose probability reaches `top_p` (nucleus), one key per row.
    """
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if use_top_p:
        probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
        sorted_BxV = -jnp.sort(-probs_BxV, axis=-1)
        # A token is kept when the mass of the tokens ranked above it is still below top_p (the top one always).
        kept_BxV = (jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV) < top_p
        cutoff_B1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(probs_BxV >= cutoff_B1, logits_BxV, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


def _step_keys(keys_B, step):
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)


# --------------------------------------------------------------------------------------------------------
# Device programs
# --------------------------------------------------------------------------------------------------------

def _positions(prompt_lens_B, lp: int, width: int, start: int = 0):
    """Positions [B, width] of slots start..start+width: 0 at each row's first real token (pads clip to 0)."""
    slots = start + jnp.arange(width, dtype=jnp.int32)
    return jnp.maximum(slots[None, :] - (lp - prompt_lens_B)[:, None], 0)


def _recompute_logits(cfg, params, buffer_BxS, prompt_lens_B, lp, slot, compute_dtype):
    """Logits [B, V] at `slot` from a full forward over the whole buffer (the slow reference path)."""
    s = buffer_BxS.shape[1]
    segment_BxS = (jnp.arange(s)[None, :] >= (lp - prompt_lens_B)[:, None]).astype(jnp.int32)
    logits_BxSxV = model_lib.forward(cfg, params, buffer_BxS, _positions(prompt_lens_B, lp, s), segment_BxS,
                                     options=model_lib.Options(compute_dtype))
    return jax.lax.dynamic_index_in_dim(logits_BxSxV, slot, axis=1, keepdims=False)


@functools.partial(jax.jit, static_argnames=("cfg", "num_new", "greedy", "use_top_p", "compute_dtype",
                                             "recompute"))
def _prefill(cfg: LlamaConfig, params: Params, prompt_BxLp, prompt_lens_B, active_B, keys_B, eos_E,
             temperature, top_p, *, num_new: int, greedy: bool, use_top_p: bool, compute_dtype,
             recompute: bool) -> dict:
    """Runs the left-padded prompts [B, Lp] and samples token 0 of every row. Returns the decode state:
    tokens_BxN int32 (new tokens, 0 after a row's EOS), step int32 (tokens made so far), done_B bool,
    and cache (a KV cache of S = Lp + N slots) or buffer_BxS (prompt + new tokens, recompute path)."""
    b, lp = prompt_BxLp.shape
    if recompute:
        buffer_BxS = jnp.concatenate([prompt_BxLp, jnp.zeros((b, num_new), jnp.int32)], axis=1)
        logits_BxV = _recompute_logits(cfg, params, buffer_BxS, prompt_lens_B, lp, lp - 1, compute_dtype)
        memory = {"buffer_BxS": buffer_BxS}
    else:
        cache = model_lib.init_cache(cfg, b, lp + num_new, compute_dtype)
        segment_BxLp = (jnp.arange(lp)[None, :] >= (lp - prompt_lens_B)[:, None]).astype(jnp.int32)
        logits_Bx1xV, cache = model_lib.forward_with_cache(cfg, params, prompt_BxLp,
                                                           _positions(prompt_lens_B, lp, lp), segment_BxLp,
                                                           cache, 0, compute_dtype=compute_dtype, last_only=True)
        logits_BxV = logits_Bx1xV[:, 0]
        memory = {"cache": cache}
    token_B = sample_tokens(logits_BxV, _step_keys(keys_B, 0), temperature, top_p, greedy=greedy,
                            use_top_p=use_top_p)
    tokens_BxN = jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(token_B)
    if recompute:
        memory["buffer_BxS"] = memory["buffer_BxS"].at[:, lp].set(token_B)
    done_B = ~active_B | jnp.isin(token_B, eos_E)
    return {"tokens_BxN": tokens_BxN, "step": jnp.int32(1), "done_B": done_B, **memory}


@functools.partial(jax.jit, static_argnames=("cfg", "greedy", "use_top_p", "compute_dtype", "recompute"),
                   donate_argnames=("state",))
def _decode(cfg: LlamaConfig, params: Params, state: dict, prompt_lens_B, keys_B, eos_E, temperature, top_p,
            limit, *, greedy: bool, use_top_p: bool, compute_dtype, recompute: bool) -> dict:
    """Samples tokens step.. until `limit` tokens exist or every row is done; one device call."""
    num_new = state["tokens_BxN"].shape[1]

    def cond(st):
        return (st["step"] < limit) & ~jnp.all(st["done_B"])

    def body(st):
        i = st["step"]
        if recompute:
            lp = st["buffer_BxS"].shape[1] - num_new
            logits_BxV = _recompute_logits(cfg, params, st["buffer_BxS"], prompt_lens_B, lp, lp + i - 1,
                                           compute_dtype)
            memory = {}
        else:
            lp = st["cache"]["segment_ids"].shape[1] - num_new
            last_Bx1 = jax.lax.dynamic_slice_in_dim(st["tokens_BxN"], i - 1, 1, axis=1)
            position_Bx1 = (prompt_lens_B + i - 1)[:, None]
            logits_Bx1xV, cache = model_lib.forward_with_cache(cfg, params, last_Bx1, position_Bx1,
                                                               jnp.ones_like(last_Bx1), st["cache"], lp + i - 1,
                                                               compute_dtype=compute_dtype)
            logits_BxV = logits_Bx1xV[:, 0]
            memory = {"cache": cache}
        token_B = sample_tokens(logits_BxV, _step_keys(keys_B, i), temperature, top_p, greedy=greedy,
                                use_top_p=use_top_p)
        token_B = jnp.where(st["done_B"], 0, token_B)  # finished rows write padding
        tokens_BxN = jax.lax.dynamic_update_slice_in_dim(st["tokens_BxN"], token_B[:, None], i, axis=1)
        if recompute:
            memory["buffer_BxS"] = jax.lax.dynamic_update_slice_in_dim(st["buffer_BxS"], token_B[:, None],
                                                                       lp + i, axis=1)
        done_B = st["done_B"] | jnp.isin(token_B, eos_E)
        return {**st, **memory, "tokens_BxN": tokens_BxN, "step": i + 1, "done_B": done_B}

    return jax.lax.while_loop(cond, body, state)


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------

def _check_inputs(cfg: LlamaConfig, prompts, max_new_tokens, temperature, top_p, stop_strings, tokenizer):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to turn tokens into text; pass tokenizer=...")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")


def _batch_shards(mesh, batch_axes) -> int:
    if mesh is None:
        return 1
    missing = [a for a in batch_axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"batch_axes {missing} are not axes of the mesh {dict(mesh.shape)}")
    return int(np.prod([mesh.shape[a] for a in batch_axes]))


def decode_new(tokenizer, context: Sequence[int], tokens: Sequence[int], **kwargs) -> str:
    """The text of `tokens` as it continues `context` (a prompt's last tokens): text(context + tokens) minus
    text(context), so a first token's leading space survives; falls back to decoding `tokens` alone when the
    context's text is not a prefix (never with the decoders of Llama's tokenizers)."""
    if not context:
        return tokenizer.decode(list(tokens), **kwargs)
    prefix = tokenizer.decode(list(context), **kwargs)
    text = tokenizer.decode(list(context) + list(tokens), **kwargs)
    return text[len(prefix):] if text.startswith(prefix) else tokenizer.decode(list(tokens), **kwargs)


def _first_stop(tokens: list[int], stop_strings, tokenizer, context: Sequence[int] = ()) -> int | None:
    """Length of the shortest prefix of `tokens` whose text contains a stop string, or None."""
    def stopped(k):
        text = decode_new(tokenizer, context, tokens[:k])
        return any(s in text for s in stop_strings)

    if not stopped(len(tokens)):
        return None
    lo, hi = 1, len(tokens)  # a prefix's text grows with k, so bisect for the first k that holds a stop
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stopped(mid) else (mid + 1, hi)
    return lo


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[:k]
    return tokens


def _left_pad(rows: list[list[int]], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (prompt_BxLp int32 left-padded with 0, prompt_lens_B int32); rows past len(rows) are empty."""
    lp = bucket(max(len(r) for r in rows), _MIN_PROMPT_BUCKET)
    prompt_BxLp = np.zeros((batch, lp), np.int32)
    prompt_lens_B = np.zeros((batch,), np.int32)
    for r, tokens in enumerate(rows):
        prompt_BxLp[r, lp - len(tokens):] = tokens
        prompt_lens_B[r] = len(tokens)
    return prompt_BxLp, prompt_lens_B


def _run_batch(cfg, params, prompt_BxLp, prompt_lens_B, active_B, keys_B, eos_E, temperature, top_p, *,
               max_new_tokens, stop_strings, tokenizer, stop_check_every, static,
               contexts: Sequence[Sequence[int]] = ()) -> tuple[np.ndarray, int]:
    """Prefill, then decode until done; returns (tokens_BxN, number of tokens made). `contexts[r]` is row r's
    prompt tail, the context its stop strings are checked in."""
    state = _prefill(cfg, params, prompt_BxLp, prompt_lens_B, active_B, keys_B, eos_E, temperature, top_p,
                     num_new=bucket(max_new_tokens), **static)
    limit = max_new_tokens if not stop_strings else min(max_new_tokens, stop_check_every)
    while True:
        state = _decode(cfg, params, state, prompt_lens_B, keys_B, eos_E, temperature, top_p, np.int32(limit),
                        **static)
        step, done_B = int(state["step"]), np.array(state["done_B"])  # a writable copy
        if stop_strings:  # rows whose text already holds a stop string are finished
            tokens_BxN = np.asarray(state["tokens_BxN"])
            for r in np.flatnonzero(~done_B):
                context = contexts[r] if r < len(contexts) else ()
                text = decode_new(tokenizer, context, tokens_BxN[r, :step].tolist())
                done_B[r] = any(s in text for s in stop_strings)
            state["done_B"] = jax.device_put(done_B, state["done_B"].sharding)
        if step >= max_new_tokens or done_B.all():
            return np.asarray(state["tokens_BxN"]), step
        limit = min(max_new_tokens, step + stop_check_every)


def generate(cfg: LlamaConfig, params: Params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_ids: Sequence[int] | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             compute_dtype=jnp.float32, stop_strings: Sequence[str] | None = None, tokenizer=None,
             batch_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
             batch_axes: Sequence[str] | None = None, stop_check_every: int = 32,
             recompute: bool = False, progress: str | None = None, first_index: int = 0) -> list[list[int]]:
    """Continues each prompt (a list of token ids) with up to `max_new_tokens` new tokens.

    Returns the new tokens only, per prompt in input order, cut before the first EOS (EOS excluded) and,
    with `stop_strings` (needs `tokenizer`), after the first token whose text completes a stop string (the
    stop string's tokens are kept; `generate_text` cuts the text before it).
    eos_ids: None = cfg.eos_token_ids; () = never stop early.
    temperature: 0 = greedy; > 0 samples softmax(logits / temperature), restricted by `top_p` (nucleus).
    batch_size: prompts per device batch (None: all at once). Batches are padded to powers of two.
    mesh / batch_axes: split the batch over those mesh axes (default: the mesh's data axes, "data" and
    "fsdp"); place params on the same mesh (e.g. `sharding.param_shardings`), XLA propagates the rest.
    progress: a label for a progress bar on stderr (prompts done, new tokens/s, ETA); None: no bar.
    first_index: the place of prompts[0] in a longer list split over processes; prompt i samples with the key of
    first_index + i, so a sample does not depend on how the list was split.
    """
    prompts = [list(map(int, p)) for p in prompts]
    stop_strings = [s for s in stop_strings or () if s] or None  # an empty stop string never matches
    _check_inputs(cfg, prompts, max_new_tokens, temperature, top_p, stop_strings, tokenizer)
    if not prompts:
        return []
    eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    eos_E = np.asarray(eos if eos else (-1,), np.int32)  # -1 never matches a token
    if mesh is not None and batch_axes is None:
        batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.shape)
    shards = _batch_shards(mesh, batch_axes or ())
    static = dict(greedy=temperature == 0.0, use_top_p=top_p < 1.0, compute_dtype=jnp.dtype(compute_dtype),
                  recompute=recompute)
    base_key = jax.random.key(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a bucket
    batch_size = batch_size or len(prompts)
    results: list[list[int]] = [[] for _ in prompts]
    bar = None if progress is None else tqdm(total=len(prompts), desc=progress, unit="prompt", dynamic_ncols=True,
                                             mininterval=1.0)
    started, made = time.perf_counter(), 0
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        b = -(-bucket(len(rows)) // shards) * shards  # a power of two, a whole number of rows per shard
        prompt_BxLp, prompt_lens_B = _left_pad([prompts[i] for i in rows], b)
        active_B = np.arange(b) < len(rows)
        ids_B = first_index + np.asarray(rows + [len(prompts)] * (b - len(rows)), np.uint32)
        keys_B = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(ids_B)  # per prompt, not per slot
        batch = [prompt_BxLp, prompt_lens_B, active_B, keys_B]
        if mesh is not None:
            rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(batch_axes)))
            batch = [jax.device_put(x, rows_sharding) for x in batch]
        contexts = [prompts[i][-_CONTEXT_TOKENS:] for i in rows]
        # On a mesh the model's logical constraints apply: activations and the KV cache keep their rows on the
        # data axes and their heads on the tensor axis, as the params' shardings imply.
        with contextlib.ExitStack() as scope:
            if mesh is not None:
                scope.enter_context(sharding.axis_rules())
                scope.enter_context(jax.set_mesh(mesh))
            tokens_BxN, step = _run_batch(cfg, params, *batch, eos_E, temperature, top_p,
                                          max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                                          tokenizer=tokenizer, stop_check_every=stop_check_every, static=static,
                                          contexts=contexts)
        for r, i in enumerate(rows):
            out = _cut_at_eos(tokens_BxN[r, :step].tolist(), set(eos))
            cut = _first_stop(out, stop_strings, tokenizer, contexts[r]) if stop_strings else None
            results[i] = out if cut is None else out[:cut]
        if bar is not None:
            made += sum(len(results[i]) for i in rows)
            bar.set_postfix({"tok/s": f"{made / max(time.perf_counter() - started, 1e-9):.0f}"}, refresh=False)
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return results


def cut_at_stop(text: str, stop_strings: Sequence[str] | None) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string (empty ones never match)."""
    cut = min((text.find(s) for s in stop_strings or () if s and s in text), default=len(text))
    return text[:cut]


def encode_prompts(tokenizer, prompts: Sequence[str], *, add_bos: bool = False,
                   max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of text prompts: the text's own tokens (never the tokenizer's automatic special tokens),
    after BOS when `add_bos`, and, with `max_tokens`, only the last `max_tokens` of them (as olmes cuts a
    context to the window left after the new tokens)."""
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos is set but the tokenizer has no bos_token")
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    if add_bos:
        encoded = [[tokenizer.bos_token_id] + list(ids) for ids in encoded]
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        encoded = [list(ids)[-max_tokens:] for ids in encoded]
    return [list(ids) for ids in encoded]


def generate_text(cfg: LlamaConfig, params: Params, tokenizer, prompts: Sequence[str], *, add_bos: bool = False,
                  max_prompt_tokens: int | None = None, **kwargs) -> list[str]:
    """`generate` on strings: encodes with `encode_prompts` (no BOS unless `add_bos`; the last
    `max_prompt_tokens` tokens), returns the new text (special tokens skipped, decoded after the prompt's last
    tokens), cut before the first stop string. kwargs: as `generate`."""
    encoded = encode_prompts(tokenizer, prompts, add_bos=add_bos, max_tokens=max_prompt_tokens)
    kwargs.setdefault("tokenizer", tokenizer)
    outputs = generate(cfg, params, encoded, **kwargs)
    texts = [decode_new(tokenizer, ids[-_CONTEXT_TOKENS:], o, skip_special_tokens=True,
                        clean_up_tokenization_spaces=False) for ids, o in zip(encoded, outputs)]
    return [cut_at_stop(text, kwargs.get("stop_strings")) for text in texts]
