"""Times a run's checkpoint written to and read from gs:// with the training code path (`mft_jax.checkpoint`), on
the Cloud Storage API server of the tests (fake-gcs-server on localhost, its filesystem backend), for the saved
state of a shipped config (default: Llama-2-7B MFT of configs/llama2-7b-math-mft.yaml: scores and Adam moments of
the masked layers). The state's shapes come from the config (abstract); `--layers N` keeps the first N masked
layers so that a smaller machine can write a part of it (the figure is per GB either way). The arrays are
random (a compressor gains nothing, as with real scores); the restored state is checked against the written
one (checksums). Prints one JSON line.

    python bench/gcs_checkpoint.py                 # the whole 7B MFT state (9.71 GB; needs ~20 GB of RAM + the save)
    python bench/gcs_checkpoint.py --layers 2      # two masked layers of it (4.86 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the emulator of the tests


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "llama2-7b-math-mft.yaml"))
    parser.add_argument("--model", default="llama2-7b", help="a model of `mft-jax plan --model`")
    parser.add_argument("--layers", type=int, default=None, help="first N masked layers only")
    args = parser.parse_args()

    from gcs_emulator import Emulator

    with tempfile.TemporaryDirectory(prefix="mft_jax_gcs_bench_") as root, \
            Emulator(backend="filesystem", root=os.path.join(root, "server")) as gcs:
        os.environ.update(gcs.env())
        bucket = gcs.create_bucket("bench")
        import jax
        import numpy as np

        from mft_jax import checkpoint, config, sharding
        from mft_jax.studies import memplan

        run = config.load(args.config, verbose=False)
        if args.layers is not None:
            run = config.from_dict({**run.to_dict(), "mask": {**run.to_dict()["mask"],
                                    "masked_layers": run.mask.masked_layers[: args.layers]}}, verbose=False)
        cfg = memplan._model_config(run, args.model)
        mesh = sharding.make_mesh(config.MeshConfig(data=-1))
        layout, params, _, _ = memplan.abstract_inputs(run, cfg, mesh)
        target = layout.checkpoint_target(params)
        rng = np.random.default_rng(0)

        def fill(x):
            if not x.shape:
                return jax.device_put(np.zeros((), x.dtype), x.sharding)
            return jax.device_put(rng.standard_normal(x.shape, np.float32).astype(x.dtype), x.sharding)

        state = jax.tree.map(fill, target)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        ckpt = checkpoint.Checkpointer(f"{bucket}/run/checkpoints", keep=2, save_every=1, async_save=False)
        start = time.perf_counter()
        ckpt.save(1, state, {"step": 1}, force=True)
        ckpt.wait()
        write_s = time.perf_counter() - start
        written = [_crc(x) for x in jax.tree.leaves(state)]  # checksums, so that one copy is in memory at a time
        del state
        start = time.perf_counter()
        restored, _ = ckpt.restore(1, target)
        jax.block_until_ready(restored)
        read_s = time.perf_counter() - start
        ckpt.close()
        assert [_crc(x) for x in jax.tree.leaves(restored)] == written, "the restored state differs"
        gb = nbytes / 1e9
        print(json.dumps({"config": Path(args.config).name, "model": args.model,
                          "masked_layers": list(run.mask.masked_layers), "state_gb": round(gb, 3),
                          "write_s": round(write_s, 1), "read_s": round(read_s, 1),
                          "write_s_per_gb": round(write_s / gb, 2), "read_s_per_gb": round(read_s / gb, 2),
                          "write_gb_per_s": round(gb / write_s, 3), "read_gb_per_s": round(gb / read_s, 3),
                          "server": "fake-gcs-server (filesystem backend) on localhost", "cpus": os.cpu_count()}))


def _crc(x) -> int:
    import numpy as np

    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8).reshape(-1))


if __name__ == "__main__":
    main()
