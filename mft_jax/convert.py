"""Hugging Face Llama checkpoints <-> (LlamaConfig, params), without torch.

Safetensors files are read tensor by tensor through memory maps (a checkpoint never needs two full copies
in host memory; with target shardings each device reads only its own slice) and written the same way.
Our params mirror HF's module names (see mft_jax.model); the whole name mapping is `hf_name` below.
Every safetensors header is validated against its file before a tensor is mapped (a truncated or foreign
file is one `CheckpointError` line), and writers go through `mft_jax.outputs` (a new directory renamed into
place; an existing one is replaced only if we wrote it or with `overwrite`).
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
from mft_jax import outputs
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


_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def read_safetensors_header(path: str | Path) -> tuple[dict[str, _TensorRef], dict]:
    """(tensor name -> where its bytes are, `__metadata__`) of one .safetensors file, reading only the header.

    The header is validated against the file before any tensor is touched: its length, its JSON, every
    tensor's dtype and shape, and that its data_offsets match shape x itemsize and lie inside the file, so a
    truncated, damaged or foreign file fails here with one line naming it instead of at a memory map."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header "
                                  f"length); re-download or re-export it")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file or truncated (its header claims {header_len} "
                                  f"bytes, the file has {size}); re-download or re-export it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e}); re-download or "
                                  f"re-export it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    refs = {}
    for name, entry in header.items():
        refs[name] = _tensor_ref(path, name, entry, data_start, size)
    return refs, metadata if isinstance(metadata, dict) else {}


def _tensor_ref(path: Path, name: str, entry, data_start: int, size: int) -> _TensorRef:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name} {why}; the file is damaged or not a safetensors file "
                               f"(re-download or re-export it)")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("has no dtype / shape / data_offsets")
    if entry["dtype"] not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']!r} (supported: "
                              f"{sorted(_ST_DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"holds {offsets[1] - offsets[0]} bytes, but shape {shape} x {dtype.name} needs {nbytes}")
    if data_start + offsets[1] > size:
        raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {data_start + offsets[1]}, the file "
                              f"has {size} bytes; re-download or re-export it")
    return _TensorRef(path, dtype, tuple(shape), data_start + offsets[0])


def read_safetensors_index(path: Path) -> dict[str, _TensorRef]:
    """Tensor name -> where its bytes are, for one .safetensors file (reads and validates only the header)."""
    return read_safetensors_header(path)[0]


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
    raw = _read_json(config_file)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: not a JSON object; a Hugging Face config.json is one")
    try:
        return LlamaConfig.from_hf(raw)
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: a field has the wrong type ({e})") from None


def _read_json(path: Path):
    """A JSON file's content; a syntax error is one line naming file:line:column."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); re-download or fix it") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a text (JSON) file; re-download or fix it") from None


def tensor_index(path: str | Path) -> dict[str, _TensorRef]:
    """Every tensor of a HF checkpoint directory (single file or sharded with an index)."""
    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_file}: no weight_map of tensor name -> file; re-download or fix it")
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
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: " + "; ".join(problems[:5]) + more)

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
        raise ConfigError(f"max_shard_size {size!r}: write bytes or a size like '5GB' or '500MB'")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[(match.group(2) or "B").upper()])


def save_hf(cfg: LlamaConfig, params: dict, path: str | Path, dtype=None, tokenizer_dir: str | Path | None = None,
            max_shard_size: int | str = "5GB", *, overwrite: bool = False, inputs=(), command: str = "save_hf",
            flag: str = "--out") -> Path:
    """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json, safetensors (sharded with model.safetensors.index.json when larger than max_shard_size)
    and, when tokenizer_dir is given, its tokenizer files. Tensors are fetched and written one at a time.
    The directory is written as a temporary sibling and renamed into place at the end (`outputs.new_dir`):
    a killed export never leaves a half-written model at `path`, and an existing `path` is replaced only if
    it is an earlier output of ours or with `overwrite` (never when it is, holds or lies inside an input).
    """
    out_dtype = np.dtype(dtype or cfg.dtype)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"tokenizer directory {str(tokenizer_dir)!r} does not exist")
    limit = parse_size(max_shard_size)
    with outputs.new_dir(path, inputs=[*inputs, tokenizer_dir], overwrite=overwrite, command=command,
                         flag=flag) as tmp:
        _write_hf(cfg, params, tmp, out_dtype, tokenizer_dir, limit)
    return Path(path)


def _write_hf(cfg: LlamaConfig, params: dict, tmp: Path, out_dtype: np.dtype, tokenizer_dir, limit: int) -> None:
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
        copy_tokenizer_files(tokenizer_dir, tmp)


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

def save_orbax(cfg: LlamaConfig, params: dict, path: str | Path, *, overwrite: bool = False, inputs=(),
               command: str = "save_orbax", flag: str = "--out") -> Path:
    """Params as an orbax checkpoint at PATH/params, with the HF config.json beside it; written as a
    temporary sibling and renamed into place, with the same rules as `save_hf`."""
    import orbax.checkpoint as ocp

    with outputs.new_dir(path, inputs=inputs, overwrite=overwrite, command=command, flag=flag) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp.absolute() / "params", params, force=True)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return Path(path).absolute()


def check_orbax(path: str | Path) -> LlamaConfig:
    """The config of an orbax params checkpoint written by `save_orbax`, checked without reading params."""
    path = Path(path)
    cfg = load_config(path)
    if not (path / "params").is_dir():
        raise CheckpointError(f"{path}: no params/ directory; an orbax params checkpoint is what "
                              f"`mft-jax convert --from-hf HF_DIR --out DIR` writes (config.json + params/)")
    return cfg


def load_orbax(path: str | Path, shardings=None) -> tuple[LlamaConfig, dict]:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    cfg = check_orbax(path)
    target = model_lib.param_shapes(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path / "params", target)
    except Exception as e:
        raise CheckpointError(f"{path}/params: cannot be restored with its config.json ({error_summary(e)}); is "
                              f"it complete and written by `mft-jax convert --from-hf`?") from e
    return cfg, params


def error_summary(error: BaseException, limit: int = 300) -> str:
    """'Type: first line' of an error (orbax and TensorStore messages run to dozens of lines); a first line that
    ends with ':' is continued by the next one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
