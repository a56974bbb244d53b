"""Times the exact top-k mask search on the masked matrices of a preset (random fp32 scores, no download).

Each search width (thresholds counted per pass over the scores) is timed in alternating rounds; the JSON
lines give ms per search, passes, and the read bandwidth the passes reach (bytes of |score| x passes / time),
from scratch (`warm: false`, as at the start of a run) and warm-started from the previous step's cut with
every score moved by +-lr (`warm: true`, as during training).
On a GPU, the width with the lowest ms is the one to make `masking._search_width` return.

    python bench/topk.py --preset tiny                                  # CPU
    python bench/topk.py --preset llama2-7b --layers 4 5 6 7 --widths 1 3 7 15   # GPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from mft_jax import config, masking, model, trees
from step import PRESETS  # bench/step.py, next to this file


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7])
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 3, 7])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-5, help="score move per step for the warm start")
    args = parser.parse_args()

    cfg = config.LlamaConfig(**PRESETS[args.preset])
    mask_cfg = config.MaskConfig(masked_layers=args.layers, keep_attn=args.keep, keep_mlp=args.keep)
    mask_cfg.check_against(cfg)
    shapes = trees.flatten(model.param_shapes(cfg, "float32"))
    paths = masking.masked_paths(cfg, mask_cfg)
    key = jax.random.key(0)
    scores = [jax.jit(lambda k, s=shapes[p].shape: 0.02 * jax.random.normal(k, s))(jax.random.fold_in(key, i))
              for i, p in enumerate(paths)]
    n = sum(s.size for s in scores)
    # A training step's warm start: the previous scores differ by one Adam-sized move (+-lr) per score.
    old_scores = [s - args.lr * jax.random.rademacher(jax.random.fold_in(key, 1000 + i), s.shape, s.dtype)
                  for i, s in enumerate(scores)]
    keeps = [args.keep] * len(scores)
    old_cuts = jax.jit(lambda ss: masking._topk_search(ss, keeps, 1).cuts)(old_scores)
    fns, compile_s, results = {}, {}, {}
    for w in args.widths:
        for warm in (False, True):
            def fn(ss, old, cuts, w=w, warm=warm):
                found = masking._topk_search(ss, keeps, w, (old, cuts) if warm else None)
                return found.masks, found.passes
            start = time.perf_counter()
            fns[w, warm] = jax.jit(fn).lower(scores, old_scores, old_cuts).compile()
            compile_s[w, warm] = time.perf_counter() - start
            results[w, warm] = jax.block_until_ready(fns[w, warm](scores, old_scores, old_cuts))
    first = results[args.widths[0], False][0]
    for key_, (masks, _) in results.items():  # every width, warm or cold, gives the same masks
        assert all(bool((a == b).all()) for a, b in zip(masks, first)), key_
    best = {key_: float("inf") for key_ in fns}
    for _ in range(args.rounds):
        for key_, fn in fns.items():
            start = time.perf_counter()
            for _ in range(args.iters):
                out = fn(scores, old_scores, old_cuts)
            jax.block_until_ready(out)
            best[key_] = min(best[key_], (time.perf_counter() - start) / args.iters)
    for (w, warm), seconds in best.items():
        passes = int(results[w, warm][1])  # bracket check included, final compare not
        print(json.dumps({"bench": "topk", "preset": args.preset, "backend": jax.default_backend(),
                          "device": jax.devices()[0].device_kind, "layers": args.layers, "matrices": len(scores),
                          "elements": int(n), "width": w, "warm": warm, "passes": passes,
                          "ms": round(seconds * 1e3, 3), "compile_s": round(compile_s[w, warm], 2),
                          "read_gb_per_s": round(4 * n * (passes + 1) / seconds / 1e9, 1),
                          "default": w == masking._search_width()}))


if __name__ == "__main__":
    main()
