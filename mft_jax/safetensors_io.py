"""Safetensors files, read and written by hand: a u64 header length, a JSON header, then raw little-endian bytes.

Reading validates a file's header against the file before any tensor is touched (a truncated or foreign file is
one `CheckpointError` line naming it), then reads tensors by row ranges into new arrays (`TensorRef.iter_rows`),
so a reader holds the rows it asked for and nothing of the file stays mapped. Writing streams each tensor from a
producer that returns the array or its row blocks, so a writer holds one tensor (or one block) at a time.
`place`, `read_slice` and `row_blocks` move one tensor at a time between these files and devices (each
device slice read on its own; a device array fetched through one temporary). `mft_jax.convert` maps tensors to
params; `mft_jax.export` writes its masks file with `write_safetensors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import ml_dtypes
import numpy as np

from mft_jax import storage

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header
BLOCK_BYTES = 16 * 2**20  # rows are read and cast in blocks of about this size


class CheckpointError(ValueError):
    """A checkpoint does not match its config, or is missing files; the message names what and where."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, dtype, shape and the absolute byte offset of its data."""
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def num_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def load(self) -> np.ndarray:
        """The whole tensor as a read-only memory map (small tensors, tests); loaders use `iter_rows`."""
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        if not self.shape:
            return self._read(0, 1).reshape(())
        if storage.is_remote(self.file):
            return self._read(0, self.num_rows)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)

    def iter_rows(self, start: int, stop: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows [first, first + n) as an array [n, *row_shape]) for rows [start, stop) of the first
        dimension, about `block_bytes` at a time. Each block is a new array; nothing stays mapped."""
        row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        step = max(1, block_bytes // max(1, row_bytes))
        for first in range(start, stop, step):
            yield first, self._read(first, min(stop, first + step))

    def _read(self, start: int, stop: int) -> np.ndarray:
        row_shape = self.row_shape
        rows = np.empty((stop - start, *row_shape), self.dtype)
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        view = memoryview(rows.reshape(-1).view(np.uint8))
        with _open_read(self.file) as f:
            f.seek(self.offset + start * row_bytes)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{self.file}: truncated while reading (it changed after its header "
                                          f"was checked); re-download or re-export it")
                done += n
        return rows


def _open_read(path):
    """A binary reader: unbuffered locally (reads go straight into the caller's array); on gs:// a ranged
    reader that fetches about one row block per request."""
    if storage.is_remote(path):
        return storage.filesystem().open(str(path), "rb", block_size=BLOCK_BYTES)
    return open(path, "rb", buffering=0)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorRef], dict]:
    """(tensor name -> where its bytes are, `__metadata__`) of one .safetensors file, reading only the header.

    The header is validated against the file before any tensor is touched: its length, its JSON, every
    tensor's dtype and shape, and that its data_offsets match shape x itemsize and lie inside the file, so a
    truncated, damaged or foreign file fails here with one line naming it instead of at a read."""
    path = storage.path(path)
    with _open_read(path) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
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
    refs = {name: _tensor_ref(path, name, entry, data_start, size) for name, entry in header.items()}
    return refs, metadata if isinstance(metadata, dict) else {}


def _tensor_ref(path: Path, name: str, entry, data_start: int, size: int) -> TensorRef:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name} {why}; the file is damaged or not a safetensors file "
                               f"(re-download or re-export it)")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("has no dtype / shape / data_offsets")
    if entry["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']!r} (supported: "
                              f"{sorted(DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    dtype = np.dtype(DTYPES[entry["dtype"]])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"holds {offsets[1] - offsets[0]} bytes, but shape {shape} x {dtype.name} needs {nbytes}")
    if data_start + offsets[1] > size:
        raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {data_start + offsets[1]}, the file "
                              f"has {size} bytes; re-download or re-export it")
    return TensorRef(path, dtype, tuple(shape), data_start + offsets[0])


def read_safetensors_index(path: Path) -> dict[str, TensorRef]:
    """Tensor name -> where its bytes are, for one .safetensors file (reads and validates only the header)."""
    return read_safetensors_header(path)[0]


Producer = Callable[[], "np.ndarray | Iterable[np.ndarray]"]


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype, Producer]],
                      metadata: dict | None = None) -> None:
    """Writes (name, shape, dtype, produce) tensors in order. `produce()` returns the array, or an iterable of
    arrays whose bytes follow one another (row blocks); each is cast to `dtype` and written as it comes, so the
    writer holds one tensor, or one block, at a time."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    with storage.path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape, dtype, produce in tensors:
            _write_tensor(f, name, tuple(shape), np.dtype(dtype), produce())


def _write_tensor(f, name: str, shape: tuple[int, ...], dtype: np.dtype, produced) -> None:
    if isinstance(produced, np.ndarray) or np.isscalar(produced):
        if np.shape(produced) != shape:
            raise ValueError(f"tensor {name}: produced shape {np.shape(produced)}, declared {shape}")
        produced = [produced]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    written = 0
    for block in produced:
        block = np.ascontiguousarray(block, dtype=dtype)
        written += f.write(memoryview(block.reshape(-1).view(np.uint8)))
    if written != expected:
        raise ValueError(f"tensor {name}: produced {written} bytes, declared shape {shape} x {dtype.name} needs "
                         f"{expected}")


# --------------------------------------------------------------------------------------------------------
# Tensors between files and devices, one at a time
# --------------------------------------------------------------------------------------------------------

def place(shape: tuple[int, ...], sharding, read: Callable[[tuple[tuple[int, int], ...]], np.ndarray]) -> jax.Array:
    """A device array built from `read(bounds) -> np.ndarray` ((start, stop) per dimension). Without a sharding:
    on the default device, uncommitted as `jax.device_put` leaves it. With one: each distinct slice the local
    devices hold is read once, so a host reads only its own slices. Returns once placed, so the host buffers of
    one array are gone before the caller reads the next."""
    if sharding is None:
        return jax.device_put(read(tuple((0, n) for n in shape))).block_until_ready()
    slices = {}

    def one(index):
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if bounds not in slices:
            slices[bounds] = read(bounds)
        return slices[bounds]

    return jax.make_array_from_callback(shape, sharding, one).block_until_ready()


def read_slice(ref: TensorRef, bounds: tuple[tuple[int, int], ...], transposed: bool, dtype) -> np.ndarray:
    """The block `bounds` of a stored 2-D tensor's transpose (`transposed`) or of the tensor itself, cast to
    `dtype` while it is copied in: only the stored rows it covers are read, about `BLOCK_BYTES` at a time."""
    out = np.empty([stop - start for start, stop in bounds], dtype)
    if not bounds:  # a scalar
        out[()] = ref.load()
        return out
    stored_bounds, stored_out = (bounds[::-1], out.T) if transposed else (bounds, out)  # a view in stored layout
    (row0, row1), columns = stored_bounds[0], tuple(slice(start, stop) for start, stop in stored_bounds[1:])
    copy = _copy_tiled if transposed else functools.partial(np.copyto, casting="unsafe")
    for first, rows in ref.iter_rows(row0, row1):
        copy(stored_out[first - row0:first - row0 + len(rows)], rows[(slice(None), *columns)])
    return out


def row_blocks(array, transposed: bool) -> Iterator[np.ndarray]:
    """A device or numpy array (a 2-D one transposed if `transposed`) as row blocks of about `BLOCK_BYTES`, for
    `write_safetensors` (which casts and copies each block). An array on one CPU device is read through a view
    of its buffer; any other device array through one temporary, never `np.asarray` of the array itself, which
    would copy it to host and keep that copy cached on it for as long as it lives."""
    if isinstance(array, jax.Array) and not _on_one_cpu(array):
        bits = _bits(array, transposed=transposed)  # the temporary; kept alive here while its host view is written
        host, transposed = _to_host(bits).view(np.dtype(array.dtype)), False  # transposed on its device
    else:
        host = np.asarray(array).T if transposed else np.asarray(array)
    if host.ndim == 0:
        yield host
        return
    step = max(1, BLOCK_BYTES // max(1, int(np.prod(host.shape[1:])) * host.dtype.itemsize))
    for first in range(0, host.shape[0], step):
        block = host[first:first + step]
        if transposed:
            block = _copy_tiled(np.empty(block.shape, block.dtype), block)
        yield block


def _copy_tiled(dst: np.ndarray, src: np.ndarray, tile: int = 64) -> np.ndarray:
    """dst[...] = src (2-D, cast as needed) where one side is a transposed view: tile by tile, so that both
    sides stay in cache (about twice as fast as one strided copy)."""
    for i in range(0, src.shape[0], tile):
        for j in range(0, src.shape[1], tile):
            dst[i:i + tile, j:j + tile] = src[i:i + tile, j:j + tile]
    return dst


def _on_one_cpu(x: jax.Array) -> bool:
    """Whether `np.asarray(x)` is a view of x's buffer (no copy, nothing cached on x)."""
    return len(x.sharding.device_set) == 1 and next(iter(x.sharding.device_set)).platform == "cpu"


_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@functools.partial(jax.jit, static_argnames="transposed")
def _bits(x: jax.Array, transposed: bool) -> jax.Array:
    """x (transposed) as unsigned ints of its width: a new array, bit for bit."""
    return jax.lax.bitcast_convert_type(x.T if transposed else x, _UINTS[np.dtype(x.dtype).itemsize])


def _to_host(x: jax.Array) -> np.ndarray:
    """A temporary device array on host: a view of its buffer on CPU when it lies on one device, else assembled
    from its distinct shards (each read once)."""
    if not x.is_fully_addressable:
        raise ValueError("a param spans several processes; gather it first "
                         "(jax.experimental.multihost_utils.process_allgather) on the writing process")
    if len(x.sharding.device_set) == 1:
        return np.asarray(x)
    host = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            host[shard.index] = np.asarray(shard.data)
    return host
