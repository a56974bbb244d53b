"""Hugging Face Llama checkpoints <-> (LlamaConfig, params), without torch.

Safetensors files are read tensor by tensor through memory maps (a checkpoint never needs two full copies
in host memory; with target shardings each device reads only its own slice) and written the same way.
Our params mirror HF's module names (see mft_jax.model); the whole name mapping is `hf_name` below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from mft_jax import model as model_lib
from mft_jax.config import ConfigError, LlamaConfig

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")
# Tensors some HF checkpoints carry that are not parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint does not match its config, or is missing files; the message names what and where."""


# --------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------

def hf_name(path: tuple[str, ...]) -> str:
    """Our param path -> HF tensor name, e.g. ('layers_4', 'mlp', 'up_proj', 'kernel') ->
    'model.layers.4.mlp.up_proj.weight'. Kernels are transposed on the way (HF stores [out, in])."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path]
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(parts[-1])
    if leaf is None:  # embed_tokens is a bare array
        parts.append("weight")
    else:
        parts[-1] = leaf
    prefix = "" if path[0] == "lm_head" else "model."
    return prefix + ".".join(parts)


def _is_kernel(path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel"


def _path_keys(path) -> tuple[str, ...]:
    return tuple(k.key for k in path)


def named_leaves(tree) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs of a params-like pytree in HF order (embeddings, layers in order, norm, head)."""
    leaves = [(_path_keys(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def order(item):
        path = item[0]
        layer = re.match(r"layers_(\d+)$", path[0])
        top = {"embed_tokens": 0, "norm": 2, "lm_head": 3}.get(path[0], 1)
        return (top, int(layer.group(1)) if layer else -1, path)

    return iter(sorted(leaves, key=order))


# --------------------------------------------------------------------------------------------------------
# Safetensors, read and written by hand: a u64 header length, a JSON header, then raw little-endian bytes.
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TensorRef:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    def load(self) -> np.ndarray:
        if not self.shape or 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_safetensors_index(path: Path) -> dict[str, _TensorRef]:
    """Tensor name -> where its bytes are, for one .safetensors file (reads only the header)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (truncated header)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    refs = {}
    for name, entry in header.items():
        if entry["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        refs[name] = _TensorRef(path, np.dtype(_ST_DTYPES[entry["dtype"]]), tuple(entry["shape"]),
                                8 + header_len + entry["data_offsets"][0])
    return refs


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict | None = None) -> None:
    """Writes (name, shape, dtype, produce) tensors; each array is produced and written one at a time."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape, dtype, produce in tensors:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {array.shape}, declared {shape}")
            f.write(array.tobytes())


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

def load_config(path: str | Path) -> LlamaConfig:
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist; give a Hugging Face checkpoint "
                              f"directory (config.json + *.safetensors)")
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint directory has config.json "
                              f"and *.safetensors")
    try:
        return LlamaConfig.from_hf(json.loads(config_file.read_text()))
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e}") from None


def tensor_index(path: str | Path) -> dict[str, _TensorRef]:
    """Every tensor of a HF checkpoint directory (single file or sharded with an index)."""
    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index_file} lists shard files that are missing: {missing}")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = (f" (found {bins}: re-save with transformers' save_pretrained(..., safe_serialization=True))"
                    if bins else "")
            raise CheckpointError(f"{path}: no *.safetensors files{hint}")
    refs: dict[str, _TensorRef] = {}
    for file in files:
        refs.update(read_safetensors_index(path / file))
    return refs


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if _is_kernel(path) else tuple(shape)


def load_hf(path: str | Path, dtype=None, shardings=None) -> tuple[LlamaConfig, dict]:
    """Reads a HF Llama checkpoint directory into (LlamaConfig, params).

    dtype: storage dtype of the returned params (default: the config's `torch_dtype` / `dtype`).
    shardings: optional pytree of `jax.sharding.Sharding` like the params; each device then reads only its
      slice of each tensor (host memory holds at most one tensor at a time either way).
    Missing, unexpected or mis-shaped tensors fail with their names before any tensor is read.
    """
    path = Path(path)
    cfg = load_config(path)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=np.dtype(dtype).name)
    refs = tensor_index(path)
    expected = model_lib.param_shapes(cfg)

    problems, consumed = [], set()
    plan = []
    for p, leaf in named_leaves(expected):
        name = hf_name(p)
        ref = refs.get(name)
        if ref is None:
            problems.append(f"missing tensor {name} (expected shape {list(_hf_shape(p, leaf.shape))})")
            continue
        consumed.add(name)
        if ref.shape != _hf_shape(p, leaf.shape):
            problems.append(f"tensor {name} has shape {list(ref.shape)}, but config.json implies "
                            f"{list(_hf_shape(p, leaf.shape))}")
            continue
        plan.append((p, leaf, ref))
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in refs  # some tied checkpoints store it anyway
    unexpected = [n for n in refs if n not in consumed and not _IGNORED.match(n)
                  and not (tied_head and n == "lm_head.weight")]
    if unexpected:
        problems.append(f"unexpected tensors (not part of a {cfg.num_hidden_layers}-layer Llama with this "
                        f"config): {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems))

    flat_shardings = None
    if shardings is not None:
        flat_shardings = {_path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    loaded = {}
    for p, leaf, ref in plan:
        loaded[p] = _load_tensor(ref, p, leaf.dtype, None if flat_shardings is None else flat_shardings[p])
    params = jax.tree_util.tree_map_with_path(lambda p, _: loaded[_path_keys(p)], expected)
    return cfg, params


def _load_tensor(ref: _TensorRef, path, dtype, sharding):
    array = ref.load()
    if _is_kernel(path):
        array = array.T
    if sharding is None:
        return jax.device_put(np.asarray(array, dtype=dtype))
    return jax.make_array_from_callback(array.shape, sharding,
                                        lambda index: np.asarray(array[index], dtype=dtype))


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """5_000_000_000, "5GB", "500MB", "2GiB" -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: write bytes or a size like '5GB' or '500MB'")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[(match.group(2) or "B").upper()])


def save_hf(cfg: LlamaConfig, params: dict, path: str | Path, dtype=None, tokenizer_dir: str | Path | None = None,
            max_shard_size: int | str = "5GB") -> Path:
    """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json, safetensors (sharded with model.safetensors.index.json when larger than max_shard_size)
    and, when tokenizer_dir is given, its tokenizer files. Tensors are fetched and written one at a time.
    The directory is written under a temporary name and renamed at the end, so a killed export never
    leaves a half-written model at `path`.
    """
    path = Path(path)
    out_dtype = np.dtype(dtype or cfg.dtype)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"tokenizer directory {str(tokenizer_dir)!r} does not exist")
    limit = parse_size(max_shard_size)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    tensors = []
    for p, leaf in named_leaves(params):
        shape = _hf_shape(p, leaf.shape)

        def produce(leaf=leaf, p=p):
            array = np.asarray(jax.device_get(leaf))
            return array.T if _is_kernel(p) else array

        tensors.append((hf_name(p), shape, out_dtype, produce))
    shards: list[list] = [[]]
    shard_bytes = 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * out_dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(t)
        shard_bytes += nbytes

    if len(shards) == 1:
        write_safetensors(tmp / "model.safetensors", shards[0])
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / file, shard)
            for name, shape, _, _ in shard:
                weight_map[name] = file
                total += int(np.prod(shape)) * out_dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    hf_config = dataclasses.replace(cfg, dtype=out_dtype.name).to_hf()
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files of a HF directory; returns the names copied."""
    copied = []
    for name in _TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------------
# Orbax params checkpoints (`mft-jax convert`)
# --------------------------------------------------------------------------------------------------------

def save_orbax(cfg: LlamaConfig, params: dict, path: str | Path) -> Path:
    """Params as an orbax checkpoint at PATH/params, with the HF config.json beside it."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "params", params, force=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return path


def load_orbax(path: str | Path, shardings=None) -> tuple[LlamaConfig, dict]:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    cfg = load_config(path)
    target = model_lib.param_shapes(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / "params", target)
    return cfg, params


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_any(path: str | Path, dtype=None, shardings=None) -> tuple[LlamaConfig, dict]:
    """A HF checkpoint directory or an orbax params checkpoint written by `save_orbax`."""
    path = Path(path)
    if (path / "params").is_dir():
        cfg, params = load_orbax(path, shardings)
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
            cfg = dataclasses.replace(cfg, dtype=np.dtype(dtype).name)
        return cfg, params
    return load_hf(path, dtype, shardings)
