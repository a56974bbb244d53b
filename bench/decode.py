"""Decode throughput: the KV cache against recomputing the whole prefix every step.

Prints new tokens/s (prefill included, EOS disabled so every row makes all `--new-tokens`) for each batch
size, with the cache (`generate`) and with `recompute=True` (a full forward over the [B, prompt + new]
buffer per step), after one warm-up call that compiles. Random weights: speed does not depend on them.
`.venv/bin/python bench/decode.py [--config small] [--batch-sizes 1,32] [--new-tokens 256]`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mft_jax import model as model_lib
from mft_jax.config import LlamaConfig
from mft_jax.generate import generate

CONFIGS = {
    # ~0.7M params: small enough that the recompute path finishes in about a minute on 2 CPU cores.
    "small": LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    # ~25M params, Llama proportions (for an accelerator).
    "medium": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096),
}


def time_generate(cfg, params, prompts, new_tokens, dtype, recompute):
    kw = dict(max_new_tokens=new_tokens, eos_ids=(), compute_dtype=dtype, recompute=recompute)
    generate(cfg, params, prompts, **kw)  # compile
    start = time.perf_counter()
    out = generate(cfg, params, prompts, **kw)
    seconds = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in out)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    cfg = CONFIGS[args.config]
    dtype = jnp.dtype(args.compute_dtype)
    params = model_lib.init_params(cfg, jax.random.key(0), dtype)
    print(f"{args.config}: {model_lib.count_params(cfg) / 1e6:.2f}M params, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, {args.compute_dtype}, {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}")
    print(f"{'batch':>5}  {'path':<10} {'seconds':>8} {'new tok/s':>10} {'speedup':>8}")
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = rng.integers(3, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
        cached = time_generate(cfg, params, prompts, args.new_tokens, dtype, recompute=False)
        full = time_generate(cfg, params, prompts, args.new_tokens, dtype, recompute=True)
        tokens = batch * args.new_tokens
        print(f"{batch:>5}  {'kv cache':<10} {cached:>8.3f} {tokens / cached:>10.1f} {full / cached:>7.1f}x")
        print(f"{batch:>5}  {'recompute':<10} {full:>8.3f} {tokens / full:>10.1f} {'':>8}", flush=True)


if __name__ == "__main__":
    main()
