"""Hugging Face Llama checkpoints <-> (LlamaConfig, params), without torch.

Host memory holds one copy of the model plus one tensor in flight, in every direction: a HF tensor is read
by row ranges straight into the slice each local device holds (`load_hf`; with target shardings a host reads
only the rows of its own slices), transposed and cast there, and placed before the next one is read; an orbax
params checkpoint is read the same way, one array and one slice at a time (`load_orbax`), and written
uncompressed by orbax, each process writing the shards it holds (`save_orbax`); a param is written to
safetensors from a view of its buffer (one CPU device) or through one temporary, transposed and cast on host a
block of rows at a time (`save_hf`). Dtypes are converted per tensor, never for the whole model at once.
Our params mirror HF's module names (see mft_jax.model); the whole name mapping is `hf_name` below. The
safetensors format itself (header validation, row reads, streaming writes) is `mft_jax.safetensors_io`.
Writers go through `mft_jax.outputs` (a new directory renamed into place; an existing one is replaced only if
we wrote it or with `overwrite`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from mft_jax import model as model_lib
from mft_jax import distributed, outputs, safetensors_io, storage
from mft_jax.config import ConfigError, LlamaConfig
from mft_jax.safetensors_io import (CheckpointError, TensorRef, read_safetensors_header,  # noqa: F401 (re-exported)
                                    read_safetensors_index, write_safetensors)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")
# Tensors some HF checkpoints carry that are not parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Orbax params are written uncompressed in chunks of at most this size: zstd's buffers would hold about a second
# copy of the model while saving, and small chunks let a sharded load read only the chunks of its slices.
_ORBAX_CHUNK_BYTES = 64 * 2**20


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
# Loading
# --------------------------------------------------------------------------------------------------------

def load_config(path: str | Path) -> LlamaConfig:
    path = storage.path(path)
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


def tensor_index(path: str | Path) -> dict[str, TensorRef]:
    """Every tensor of a HF checkpoint directory (single file or sharded with an index)."""
    path = storage.path(path)
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
    refs: dict[str, TensorRef] = {}
    for file in files:
        refs.update(read_safetensors_index(path / file))
    return refs


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if _is_kernel(path) else tuple(shape)


def load_hf(path: str | Path, dtype=None, shardings=None) -> tuple[LlamaConfig, dict]:
    """Reads a HF Llama checkpoint directory into (LlamaConfig, params).

    dtype: storage dtype of the returned params (default: the config's `torch_dtype` / `dtype`).
    shardings: optional pytree of `jax.sharding.Sharding` like the params; a host then reads only the HF rows
      of its devices' slices of each tensor (host memory holds the model plus one tensor either way).
    Missing, unexpected or mis-shaped tensors fail with their names before any tensor is read.
    """
    path = storage.path(path)
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

    flat_shardings = _flat(shardings)
    loaded = {}
    for p, leaf, ref in plan:
        read = functools.partial(safetensors_io.read_slice, ref, transposed=_is_kernel(p), dtype=leaf.dtype)
        loaded[p] = safetensors_io.place(leaf.shape, flat_shardings.get(p), read)
    return cfg, _unflatten(expected, loaded)


def _flat(tree) -> dict:
    return {} if tree is None else {_path_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(like, flat: dict):
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[_path_keys(p)], like)


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
    and, when tokenizer_dir is given, its tokenizer files. Params may be device arrays (fully addressable) or
    numpy arrays; each is brought to host, transposed and cast one at a time (`_hf_blocks`), so host memory
    holds the params plus one tensor.
    The directory is written as a temporary sibling and renamed into place at the end (`outputs.new_dir`):
    a killed export never leaves a half-written model at `path`, and an existing `path` is replaced only if
    it is an earlier output of ours or with `overwrite` (never when it is, holds or lies inside an input).
    """
    out_dtype = np.dtype(dtype or cfg.dtype)
    if tokenizer_dir is not None and not storage.path(tokenizer_dir).is_dir():
        raise CheckpointError(f"tokenizer directory {str(tokenizer_dir)!r} does not exist")
    limit = parse_size(max_shard_size)
    with outputs.new_dir(path, inputs=[*inputs, tokenizer_dir], overwrite=overwrite, command=command,
                         flag=flag) as tmp:
        _write_hf(cfg, params, tmp, out_dtype, tokenizer_dir, limit)
    return storage.path(path)


def _write_hf(cfg: LlamaConfig, params: dict, tmp: Path, out_dtype: np.dtype, tokenizer_dir, limit: int) -> None:
    tensors = [(hf_name(p), _hf_shape(p, leaf.shape), out_dtype,
                functools.partial(safetensors_io.row_blocks, leaf, transposed=_is_kernel(p)))
               for p, leaf in named_leaves(params)]
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
        if (storage.path(src) / name).is_file():
            storage.copy_file(storage.path(src) / name, storage.path(dst) / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------------
# Orbax params checkpoints (`mft-jax convert`)
# --------------------------------------------------------------------------------------------------------

def save_orbax(cfg: LlamaConfig, params: dict, path: str | Path, *, overwrite: bool = False, inputs=(),
               command: str = "save_orbax", flag: str = "--out") -> Path:
    """Params as an orbax checkpoint at PATH/params, with the HF config.json beside it; written as a
    temporary sibling and renamed into place, with the same rules as `save_hf`. Uncompressed, in chunks of at
    most `_ORBAX_CHUNK_BYTES`, so saving adds no second copy of the model to host memory.
    On several processes every process calls it with the same (global) params and each writes the shards it
    holds, into the one temporary directory process 0 made (PATH must be on a filesystem they share)."""
    import orbax.checkpoint as ocp

    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_ORBAX_CHUNK_BYTES), params)
    with _new_dir_on_every_process(path, inputs=inputs, overwrite=overwrite, command=command, flag=flag) as tmp:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
            checkpointer.save(storage.absolute(tmp) / "params", args=ocp.args.PyTreeSave(params, save_args=save_args),
                              force=True)
        if jax.process_index() == 0:
            (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return storage.absolute(path)


@contextlib.contextmanager
def _new_dir_on_every_process(path, **kwargs) -> Iterator[Path]:
    """`outputs.new_dir` shared by all processes: process 0 makes the temporary directory, tells the others its
    name, and renames it into place once every process has finished writing."""
    if jax.process_count() == 1:
        with outputs.new_dir(path, **kwargs) as tmp:
            yield tmp
        return
    from jax.experimental import multihost_utils

    def share(tmp: Path | None) -> Path:  # process 0's temporary directory, on every process
        return storage.path(distributed.broadcast_json(None if tmp is None else str(storage.absolute(tmp))))

    if jax.process_index() == 0:
        with outputs.new_dir(path, **kwargs) as tmp:
            yield share(tmp)
            multihost_utils.sync_global_devices("mft_jax.convert.written")
    else:
        yield share(None)
        multihost_utils.sync_global_devices("mft_jax.convert.written")
    multihost_utils.sync_global_devices("mft_jax.convert.renamed")  # no process returns before PATH exists


def check_orbax(path: str | Path) -> LlamaConfig:
    """The config of an orbax params checkpoint written by `save_orbax`, checked without reading params."""
    path = storage.path(path)
    cfg = load_config(path)
    if not (path / "params").is_dir():
        raise CheckpointError(f"{path}: no params/ directory; an orbax params checkpoint is what "
                              f"`mft-jax convert --from-hf HF_DIR --out DIR` writes (config.json + params/)")
    return cfg


def load_orbax(path: str | Path, shardings=None, dtype=None) -> tuple[LlamaConfig, dict]:
    """Reads an orbax params checkpoint written by `save_orbax` (any compression or chunking) into (LlamaConfig,
    params), one array at a time and, with `shardings`, only the slices the local devices hold, cast to `dtype`
    (default: the config's) as each slice is read."""
    path = storage.absolute(path)
    cfg = check_orbax(path)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=np.dtype(dtype).name)
    expected = model_lib.param_shapes(cfg)
    flat_shardings = _flat(shardings)
    loaded = {}
    try:
        stores = _OrbaxArrays(path / "params")
        for p, leaf in named_leaves(expected):
            store = stores.open(".".join(p))
            if tuple(store.shape) != leaf.shape:
                raise CheckpointError(f"{path}/params: {'.'.join(p)} has shape {list(store.shape)}, but its "
                                      f"config.json implies {list(leaf.shape)}; was it written with another config?")
            read = functools.partial(_read_orbax_slice, store, dtype=leaf.dtype)
            loaded[p] = safetensors_io.place(leaf.shape, flat_shardings.get(p), read)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}/params: cannot be restored with its config.json ({error_summary(e)}); is "
                              f"it complete and written by `mft-jax convert --from-hf`?") from e
    return cfg, _unflatten(expected, loaded)


class _OrbaxArrays:
    """Opens the arrays of an orbax PyTree checkpoint one at a time as TensorStores (orbax builds the spec, so
    OCDBT or not, zarr or zarr3, compressed or not, are all read as orbax itself would)."""

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp
        from etils import epath

        self._ocp, self._directory = ocp, epath.Path(directory)
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self._directory)
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)

    def open(self, name: str):
        import tensorstore as ts

        error = None
        for zarr3 in (False, True):
            info = self._ocp.type_handlers.ParamInfo(name=name, parent_dir=self._directory, use_zarr3=zarr3,
                                                     is_ocdbt_checkpoint=self._ocdbt, ts_context=self._context)
            spec = self._ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            try:
                return ts.open(spec, open=True, context=self._context).result()
            except ValueError as e:  # not found under this format
                error = error or e
        if "NOT_FOUND" in str(error):
            raise CheckpointError(f"{self._directory}: no array {name}, which its config.json implies; was it "
                                  f"written with another config?")
        raise error


def _read_orbax_slice(store, bounds: tuple[tuple[int, int], ...], dtype) -> np.ndarray:
    return np.asarray(store[tuple(slice(start, stop) for start, stop in bounds)].read().result()).astype(
        dtype, copy=False)


def error_summary(error: BaseException, limit: int = 300) -> str:
    """'Type: first line' of an error (orbax and TensorStore messages run to dozens of lines); a first line that
    ends with ':' is continued by the next one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_hf_dir(path: str | Path) -> bool:
    path = storage.path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_any(path: str | Path, dtype=None, shardings=None) -> tuple[LlamaConfig, dict]:
    """A HF checkpoint directory or an orbax params checkpoint written by `save_orbax`."""
    path = storage.path(path)
    if (path / "params").is_dir():
        return load_orbax(path, shardings, dtype)
    return load_hf(path, dtype, shardings)
