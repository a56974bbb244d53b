"""Compiles small training steps for real accelerator targets with no device present, in its own process.

Run by tests/test_compile_targets.py as `python tests/compile_worker.py CASES_JSON` in the environment
`mft_jax.targets.compiler_env()` gives (libtpu and the CUDA plugin on the path): each case is compiled directly
(`bench/plan_check.direct_compile`: `step.jit_train_step` on ShapeDtypeStructs built there, not through
`memplan`) and summarized from the optimized HLO (`mft_jax.hlo`). Prints one JSON line per case.

MFT_JAX_BREAK (for showing that the tests catch regressions; never set in CI):
  interpret  the splash kernel is compiled in Pallas interpret mode, as if the target's platform were not read;
  unshard    MFT's scores, masks and Adam moments are replicated instead of sharded like their kernels.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from mft_jax import attention, config, methods

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import plan_check  # noqa: E402  (bench/plan_check.py: the direct compile)

TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, dtype="bfloat16")


def _break(kind: str):
    if kind == "interpret":
        resolve = attention.resolve
        attention.resolve = lambda name, backend, packing: (
            "splash_interpret" if resolve(name, backend, packing) == "splash" else resolve(name, backend, packing))
    elif kind == "unshard":
        methods.MFT.shardings = lambda self, param_shardings, mesh: jax.tree.map(
            lambda s: NamedSharding(mesh, P()), methods.subtree(param_shardings, self.paths))


def compile_case(case: dict) -> dict:
    cfg = config.LlamaConfig(**{**TINY, **case.get("model", {})})  # "model": another family's switches
    run = config.from_dict({
        "model": {"path": "(random)", "dtype": "bfloat16", "compute_dtype": "bfloat16", "attention": "auto",
                  "remat": case.get("remat", "dots_attention")},
        "mask": {"masked_layers": [1, 2]}, "lora": {"rank": 8},
        "data": {"max_seq_length": 256},
        "train": {"mode": case["mode"], "batch_size": case["rows"] * 2, "micro_batch_size": case["rows"],
                  "grad_reduce": case.get("grad_reduce", "compute")}}, verbose=False)
    return dict(case, **plan_check.direct_compile(run, cfg, case["hardware"], case["mesh"]))


def main():
    if os.environ.get("MFT_JAX_BREAK"):
        _break(os.environ["MFT_JAX_BREAK"])
    for case in json.loads(sys.argv[1]):
        print("CASE " + json.dumps(compile_case(case)), flush=True)


if __name__ == "__main__":
    main()
