"""A short, fixed run of each training method on the demo model, as a fingerprint for refactors.

FFT from a random init for `--steps` steps, then MFT (and LoRA, where this version has it) for `--steps`
steps from the FFT result, all through `mft-jax train` and `mft-jax export`. Prints and writes (to
OUT/fingerprint.json) every step's loss and gradient norm, MFT's mask flips, and SHA-256 digests of the
exported masks and dense weights. Two versions of the code that train identically give identical files on
the same machine (a refactor's bit-identity check: run before and after, then `cmp` the two files).

    python bench/regression.py --out /tmp/fp_before
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from mft_jax import config as config_lib
from mft_jax import convert, export, model, train
from mft_jax.demo import protocol as demo, task as demo_task
from mft_jax.data import load_tokenizer, train_bpe_tokenizer


def _digest(tensors: dict) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a {name: array} dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        x = np.ascontiguousarray(np.asarray(tensors[name]))
        h.update(f"{name}:{x.shape}:{x.dtype}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def _safetensors_digest(path: Path) -> str:
    from safetensors.numpy import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        tensors.update(load_file(str(file)))
    return _digest(tensors)


def _records(run_dir: Path) -> list[dict]:
    keys = ("step", "loss", "grad_norm", "mask_flips")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keys if k in r} for r in rows if "loss" in r]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a new directory")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--methods", default="mft", help="comma-separated methods to run from the FFT result")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"--out {out} exists; give a new directory")
    import jax

    demo_cfg = demo.load_demo_config()
    task = dict(demo_cfg["task"], train_examples=800, dev_examples=20, test_examples=20)
    out.mkdir(parents=True)
    splits = demo_task.make_task(out, 0, task)
    texts = [m["content"] for r in demo_task.read_rows(splits["train"]) for m in r["messages"]]
    tok_dir = train_bpe_tokenizer(texts, demo_cfg["model"]["vocab_size"], out / "tokenizer")
    tok = load_tokenizer(tok_dir)
    m = demo_cfg["model"]
    cfg = config_lib.LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"], max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    init_dir = convert.save_hf(cfg, model.init_params(cfg, jax.random.key(0)), out / "init", tokenizer_dir=tok_dir)
    base = {"model": {"compute_dtype": "float32"},
            "mask": {"masked_layers": [1, 2], "keep_attn": 0.9, "keep_mlp": 0.9},
            "data": {"train": {str(splits["train"]): None}, "tokenizer": str(tok_dir),
                     "max_seq_length": m["max_seq_length"], "cache_dir": str(out / "data_cache")},
            "optim": {"warmup_ratio": 0.1},
            "train": {"seed": 0, "log_every": 1, "batch_size": 16, "micro_batch_size": 8, "max_steps": args.steps},
            "ckpt": {"keep": 2, "async_save": False, "save_every": args.steps}, "mesh": {"data": -1}}
    result = {}
    runs = [("fft", init_dir, 2e-3)] + [(name, out / "fft_export" / "hf", 5e-4)
                                        for name in args.methods.split(",") if name]
    for method, start, lr in runs:
        run = demo._run_config(base, run_dir=str(out / method), model={"path": str(start)}, optim={"lr": lr},
                               train={"mode": method})
        train.train(run, verbose=False)
        exported = out / f"{method}_export"
        export.export_run(out / method, exported)
        entry = {"steps": _records(out / method), "weights_sha256": _safetensors_digest(exported / "hf")}
        if (exported / "masks.safetensors").is_file():
            entry["masks_sha256"] = _safetensors_digest(exported / "masks.safetensors")
        result[method] = entry
        last = entry["steps"][-1]
        print(f"{method}: step {last['step']} loss {last['loss']!r} weights {entry['weights_sha256'][:16]}"
              + (f" masks {entry['masks_sha256'][:16]}" if "masks_sha256" in entry else ""))
    (out / "fingerprint.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'fingerprint.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
