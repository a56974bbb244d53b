"""Reads an offline wandb run back from its files, for tests: the history rows and the config.

wandb (0.31) writes RUN/wandb/offline-run-<time>-<id>/run-<id>.wandb: a 7-byte file header (":W&B", magic
0xBEE1, version 0), then a LevelDB-style log of protobuf `Record`s in 32 KiB blocks; each chunk has a 7-byte
header (CRC-32 of type + data, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and a block's
tail shorter than a header is zero padding. wandb ships no reader of it, so this is ours.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

BLOCK = 32768
HEADER = 7
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    """Every `wandb_internal_pb2.Record` of a .wandb file, in order; a bad CRC or framing raises."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:HEADER] != FILE_HEADER:
        raise ValueError(f"{path}: not a wandb 0 log (header {data[:HEADER]!r})")
    out, pos, pending = [], HEADER, None
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block tail: padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero-filled rest of a block
            pos += room
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: bad CRC at byte {pos}")
        pos += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = None
    return out


def finished_records(path: str | Path, timeout: float = 30.0) -> list:
    """`records` once the run's `exit` record is in the file: wandb's service writes the file on its own
    schedule, and `finish()` can return before the records reach the disk."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = records(path)
            if found and found[-1].WhichOneof("record_type") == "exit":
                return found
        except ValueError:  # a chunk being written
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s; was the run finished?")
        time.sleep(0.05)


def run_dirs(files_root: str | Path) -> list[Path]:
    """The offline run directories under FILES_ROOT/wandb (offline-run-<time>-<id>[-<n>]), oldest first."""
    def started(run_dir: Path):
        start = run_record(run_dir).start_time
        return start.seconds, start.nanos

    return sorted((Path(files_root) / "wandb").glob("offline-run-*"), key=started)


def wandb_file(run_dir: Path) -> Path:
    (path,) = run_dir.glob("run-*.wandb")
    return path


def _set(tree: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def history(run_dir: Path, internal: bool = False) -> list[dict]:
    """The history rows, with nested keys made nested dicts again; wandb's own keys (`_step`, `_runtime`,
    `_timestamp`) dropped unless `internal`."""
    rows = []
    for record in finished_records(wandb_file(run_dir)):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            if internal or not keys[0].startswith("_"):
                _set(row, keys, json.loads(item.value_json))
        rows.append(row)
    return rows


def config(run_dir: Path) -> dict:
    """The run's config: the run record's, then every config update, wandb's `_wandb` entry dropped."""
    out: dict = {}
    for record in finished_records(wandb_file(run_dir)):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            keys = list(item.nested_key) or [item.key]
            if keys[0] != "_wandb":
                _set(out, keys, json.loads(item.value_json))
    return out


def run_record(run_dir: Path):
    """The run's `RunRecord` (id, project, group, job type, ...)."""
    return next(r.run for r in finished_records(wandb_file(run_dir)) if r.WhichOneof("record_type") == "run")
