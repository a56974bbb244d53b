"""Decode throughput on one device against the same decode on a mesh of 8 simulated CPU devices, side by side.

Each side runs in its own process (the device count is fixed when JAX starts): the same random model, prompts
and greedy `generate` (KV cache, EOS off), the params placed by the sharding rules on the mesh and the prompts
split over its data axes (what `mft-jax eval --mesh` does), timed after a warm-up call that compiles. Prints one
line per side and checks that both produced the same tokens. On a CPU the 8 "devices" share its cores, so the
figure shows the cost of the sharded program (collectives, smaller matmuls), not a speed-up; on 8 chips each
computes its own part.

    python bench/decode_mesh.py [--config small] [--mesh 2,2,2] [--batch 32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import CONFIGS  # bench/decode.py, next to this file
    from mft_jax import model as model_lib
    from mft_jax import sharding
    from mft_jax.config import MeshConfig
    from mft_jax.generate import generate

    cfg = CONFIGS[spec["config"]]
    params = model_lib.init_params(cfg, jax.random.key(0), jnp.float32)
    mesh = None
    if spec["mesh"]:
        mesh = sharding.make_mesh(MeshConfig(*spec["mesh"]))
        params = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(spec["batch"], spec["prompt_len"])).tolist()
    kw = dict(max_new_tokens=spec["new_tokens"], eos_ids=(), compute_dtype=jnp.float32, mesh=mesh)
    generate(cfg, params, prompts, **kw)  # compile
    start = time.perf_counter()
    out = generate(cfg, params, prompts, **kw)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in out)
    return {"devices": jax.device_count(), "mesh": spec["mesh"], "seconds": round(seconds, 3),
            "new_tokens_per_s": round(tokens / seconds, 1),
            "tokens_sha256": hashlib.sha256(json.dumps(out).encode()).hexdigest()[:16]}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=["small", "medium"])
    parser.add_argument("--mesh", default="2,2,2", help="D,F,T of the 8-device side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    mesh = [int(x) for x in args.mesh.split(",")]
    rows = []
    for devices, side_mesh in ((1, None), (8, mesh)):
        spec = {"config": args.config, "mesh": side_mesh, "batch": args.batch, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens}
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                              text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.config}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, fp32, "
          f"{os.cpu_count()} CPU cores")
    for row in rows:
        label = "1 device" if row["mesh"] is None else f"8 devices, mesh {tuple(row['mesh'])}"
        print(f"  {label:<26} {row['seconds']:8.3f} s  {row['new_tokens_per_s']:10.1f} new tokens/s")
    same = rows[0]["tokens_sha256"] == rows[1]["tokens_sha256"]
    print(f"  same tokens: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
