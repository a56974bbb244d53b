"""Peak host memory (RSS) of checkpoint conversion, on a random Llama-3.2-1B-shaped bf16 checkpoint.

Writes the checkpoint (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 128256, tied
embeddings: 2.47 GB) tensor by tensor into a temporary directory, then runs, each in a fresh process:
  from-hf  `mft-jax convert --from-hf HF --out ORBAX`
  to-hf    `mft-jax convert --to-hf ORBAX --out BACK`
  export   `convert.save_hf` of a loaded params tree (the masked HF export path of mft_jax.export)
and prints each one's peak RSS (the kernel's high-water mark, `wait4`, file-backed pages included) against the
bound checkpoint size + largest tensor + 0.5 GB, and whether BACK and the export equal HF bit for bit.
This driver imports no JAX (a child's peak also counts the parent pages it was forked from); a `baseline`
process that only imports jax and orbax shows the fixed part of each peak.

  .venv/bin/python bench/convert_memory.py [--size 1b|tiny] [--layers N] [--dir DIR] [--keep]
It needs ~10 GB of disk under DIR (default: the system temp directory) and exits 1 if a bound or the bit
identity fails. Measured (2 CPUs, 25 GB RAM; bound 3.50 GB, baseline 0.24 GB), peak RSS in GB:
  from-hf 2.78 (4.63 before the one-tensor-in-flight loaders), to-hf 2.91 (4.41), export 2.74 (3.18);
  all bit-identical; 24-31 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 10**9
SIZES = {  # Llama-3.2-1B, and a tiny one to try the script in seconds
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, head_dim=64),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, head_dim=16),
}
ROOT = Path(__file__).resolve().parents[1]


def hf_config(size: str, layers: int | None = None) -> dict:
    shape = {**SIZES[size], **({"num_hidden_layers": layers} if layers else {})}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001}


# --------------------------------------------------------------------------------------------------------
# Children (each run as `python bench/convert_memory.py --child ROLE ...`)
# --------------------------------------------------------------------------------------------------------

def make_checkpoint(out: Path, size: str, layers: int | None) -> None:
    """A random bf16 HF checkpoint, each tensor generated in 16M-element chunks right before it is written."""
    import ml_dtypes
    import numpy as np

    from mft_jax import convert, model
    from mft_jax.config import LlamaConfig

    config = hf_config(size, layers)
    cfg = LlamaConfig.from_hf(config)
    rng = np.random.default_rng(0)

    def produce(shape, norm):
        array = np.empty(shape, ml_dtypes.bfloat16)
        flat = array.reshape(-1)
        for start in range(0, flat.size, 2**24):
            chunk = rng.standard_normal(min(2**24, flat.size - start), dtype=np.float32)
            flat[start:start + chunk.size] = 1.0 + 0.1 * chunk if norm else 0.02 * chunk
        return array

    tensors = []
    for path, leaf in convert.named_leaves(model.param_shapes(cfg)):
        shape = tuple(reversed(leaf.shape)) if path[-1] == "kernel" else tuple(leaf.shape)
        tensors.append((convert.hf_name(path), shape, ml_dtypes.bfloat16,
                        lambda shape=shape, norm=path[-1] == "scale": produce(shape, norm)))
    out.mkdir(parents=True)
    convert.write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def export_hf(src: Path, out: Path) -> None:
    """What `mft-jax export` does after its masks are applied: `convert.save_hf` of a params tree."""
    from mft_jax import convert

    cfg, params = convert.load_hf(src)
    convert.save_hf(cfg, params, out, command="bench export")


def baseline() -> None:
    import jax.numpy as jnp
    import orbax.checkpoint  # noqa: F401

    jnp.zeros(8).block_until_ready()  # the backend, started


def run_child(role: str, args: list[str]) -> None:
    if role == "make":
        make_checkpoint(Path(args[0]), args[1], int(args[2]) or None)
    elif role == "export":
        export_hf(Path(args[0]), Path(args[1]))
    elif role == "baseline":
        baseline()
    else:
        raise SystemExit(f"unknown child role {role!r}")


# --------------------------------------------------------------------------------------------------------
# The driver: stdlib only
# --------------------------------------------------------------------------------------------------------

def measure(command: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of one child process; its output is shown only if it fails."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            sys.stdout.write(log.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def safetensors_tensors(directory: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, absolute start, end) for every tensor of a HF directory (headers only)."""
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        with open(directory / name, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            tensors[key] = (directory / name, entry["dtype"], entry["shape"], 8 + length + begin, 8 + length + end)
    return tensors


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of tensors whose dtype, shape or bytes differ between two HF directories (read in 64 MB pieces)."""
    ta, tb = safetensors_tensors(a), safetensors_tensors(b)
    differ = sorted(set(ta) ^ set(tb))
    for name in sorted(set(ta) & set(tb)):
        (fa, da, sa, ba, ea), (fb, db, sb, bb, _) = ta[name], tb[name]
        if (da, sa) != (db, sb):
            differ.append(name)
            continue
        with open(fa, "rb") as x, open(fb, "rb") as y:
            x.seek(ba)
            y.seek(bb)
            left = ea - ba
            while left > 0:
                n = min(left, 64 * 2**20)
                if x.read(n) != y.read(n):
                    differ.append(name)
                    break
                left -= n
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers of the same shapes (to try it)")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1:])
        return 0

    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.dir))
    try:
        return drive(work, args.size, args.layers)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def drive(work: Path, size: str, layers: int) -> int:
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    cli = [sys.executable, "-m", "mft_jax", "convert"]
    disk = shutil.disk_usage(work)
    memory = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    print(f"machine: {os.cpu_count()} CPUs, {memory / GB:.1f} GB RAM; work dir {work}: {disk.free / GB:.1f} GB free "
          f"of {disk.total / GB:.1f} GB")
    measure([*me, "make", str(work / "hf"), size, str(layers)])
    tensors = safetensors_tensors(work / "hf")
    total = sum(end - begin for *_, begin, end in tensors.values())
    largest = max(end - begin for *_, begin, end in tensors.values())
    bound = (work / "hf" / "model.safetensors").stat().st_size + largest + GB // 2
    print(f"checkpoint: {len(tensors)} tensors, {total / GB:.3f} GB, largest {largest / GB:.3f} GB; "
          f"bound = file + largest + 0.5 GB = {bound / GB:.3f} GB")
    runs = {
        "baseline": [*me, "baseline"],
        "from-hf": [*cli, "--from-hf", str(work / "hf"), "--out", str(work / "orbax")],
        "to-hf": [*cli, "--to-hf", str(work / "orbax"), "--out", str(work / "back")],
        "export": [*me, "export", str(work / "hf"), str(work / "export")],
    }
    ok = True
    print(f"{'direction':<10} {'peak RSS GB':>12} {'bound GB':>9} {'within':>7} {'wall s':>7}")
    for name, command in runs.items():
        peak, wall = measure(command)
        within = peak <= bound
        ok &= within or name == "baseline"
        print(f"{name:<10} {peak / GB:>12.3f} {bound / GB:>9.3f} {str(within):>7} {wall:>7.1f}", flush=True)
    for name in ("back", "export"):
        differ = same_tensors(work / "hf", work / name)
        ok &= not differ
        print(f"{name} vs hf: " + ("bit-identical" if not differ else f"{len(differ)} tensors differ: {differ[:5]}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
