"""Times the exact top-k mask search on the masked matrices of a preset (random fp32 scores, no download).

Each search width (thresholds counted per pass over the scores) is timed in alternating rounds; the JSON
lines give ms per search, passes, and the read bandwidth the passes reach (bytes of |score| x passes / time).
On a GPU, the width with the lowest ms is the one to make `masking.default_search_width` return.

    python bench/topk.py --preset tiny                                  # CPU
    python bench/topk.py --preset llama2-7b --layers 4 5 6 7 --widths 1 3 7 15   # GPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from mft_jax import config, masking, model
from step import PRESETS  # bench/step.py, next to this file


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7])
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 3, 7])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    cfg = config.LlamaConfig(**PRESETS[args.preset])
    mask_cfg = config.MaskConfig(masked_layers=args.layers, keep_attn=args.keep, keep_mlp=args.keep)
    mask_cfg.check_against(cfg)
    shapes = masking.flatten(model.param_shapes(cfg, "float32"))
    paths = masking.masked_paths(cfg, mask_cfg)
    key = jax.random.key(0)
    scores = [jax.jit(lambda k, s=shapes[p].shape: 0.02 * jax.random.normal(k, s))(jax.random.fold_in(key, i))
              for i, p in enumerate(paths)]
    n = sum(s.size for s in scores)
    fns, compile_s, results = {}, {}, {}
    for w in args.widths:
        start = time.perf_counter()
        fns[w] = jax.jit(lambda ss, w=w: masking.topk_mask_group(ss, [args.keep] * len(ss), w)).lower(scores).compile()
        compile_s[w] = time.perf_counter() - start
        results[w] = jax.block_until_ready(fns[w](scores))
    for w in args.widths[1:]:  # every width gives the same masks
        assert all(bool((a == b).all()) for a, b in zip(results[w], results[args.widths[0]])), w
    best = {w: float("inf") for w in args.widths}
    for _ in range(args.rounds):
        for w in args.widths:
            start = time.perf_counter()
            for _ in range(args.iters):
                out = fns[w](scores)
            jax.block_until_ready(out)
            best[w] = min(best[w], (time.perf_counter() - start) / args.iters)
    for w in args.widths:
        passes = masking._num_passes(masking._INF_BITS + 1, w)
        print(json.dumps({"bench": "topk", "preset": args.preset, "backend": jax.default_backend(),
                          "device": jax.devices()[0].device_kind, "layers": args.layers, "matrices": len(scores),
                          "elements": int(n), "width": w, "passes": passes, "ms": round(best[w] * 1e3, 3),
                          "compile_s": round(compile_s[w], 2),
                          "read_gb_per_s": round(4 * n * (passes + 1) / best[w] / 1e9, 1),
                          "default": w == masking.default_search_width()}))


if __name__ == "__main__":
    main()
