"""The run directory as a contract: what may change between two `train` commands on it, one process at a time,
and a `metrics.jsonl` that never holds a step twice.

A run directory holds the config it was started with (`config.yaml`). A later `train` on it compares its config
with that one key by key:
- keys that change results (model, mask, data, optim, steps, seed, ...) are refused with the list of keys: a
  checkpoint trained under one config silently continued under another is not a result of either;
- keys that only change how the run is carried out (logging and eval cadence, checkpoint retention, the mesh
  and memory knobs, the eval section) are allowed, written to `config.yaml` and recorded in `metrics.jsonl` as
  a `{"event": "config_change"}` record;
- raising `train.max_steps` / `train.epochs` needs `train --extend` and is recorded as `{"event": "extend"}`
  (it also stretches the learning-rate schedule over the new length).

`RunLock` keeps a second `train` out of a directory that one is training in: an advisory `flock` on
`RUN/.lock`, which the kernel drops when its holder dies (kill -9 included), so a lock is never stale on a
filesystem that supports it. The file names the holder (pid, host) for the refusal message and is removed
on exit; on filesystems without `flock` that record is the lock, stale when its pid is gone (same host).
On Cloud Storage (a gs:// run_dir) the same file is a lease object (`mft_jax.storage.Lease`): created only if
absent, renewed while the run lives, taken over when stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from mft_jax import storage
from mft_jax.config import ConfigError

# Keys (dotted, prefix match) that do not change what a run computes; everything else does.
RESULT_NEUTRAL_KEYS = (
    "run_dir",
    "train.log_every", "train.eval_every",
    "train.micro_batch_size",  # gradient accumulation: the same batch in more pieces (a memory knob)
    "train.grad_reduce",  # where the data-parallel gradient sum happens: the same sum in another order
    "ckpt.",
    "mesh.",
    "eval.",
    "log.",  # where the metrics are also sent (Weights & Biases)
    "data.cache_dir", "data.num_workers",
    "model.remat", "model.loss_chunk", "model.attention",  # memory / kernel knobs, same math
)
STEP_KEYS = ("train.max_steps", "train.epochs")
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"


class RunDirError(ConfigError):
    """A `train` command conflicts with what its run directory already holds (another config, another process)."""

    exit_code = 1  # not a usage error: the command is fine, the directory is taken


# --------------------------------------------------------------------------------------------------------
# Config comparison
# --------------------------------------------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}} -> {"train.seed": 1}; mappings of data sources stay whole (their keys are paths)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("data.train", "data.dev"):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _neutral(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESULT_NEUTRAL_KEYS)


def diff_configs(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every key whose value differs."""
    a, b = flatten(saved), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_config_change(saved: dict, new: dict, extend: bool) -> tuple[dict, dict]:
    """Splits the differences into (allowed, extension); raises `RunDirError` listing the refused ones."""
    changes = diff_configs(saved, new)
    refused = {k: v for k, v in changes.items() if not _neutral(k) and k not in STEP_KEYS}
    steps = {k: v for k, v in changes.items() if k in STEP_KEYS}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {value!r}" for k, (old, value) in list(refused.items())[:6])
        more = f" (+{len(refused) - 6} more)" if len(refused) > 6 else ""
        raise RunDirError(f"the run directory was started with another config and these keys change results: "
                          f"{listed}{more}; use a new run_dir (or --set run_dir=...), or restore the saved values "
                          f"from {CONFIG_FILE}")
    if steps and not extend:
        listed = "; ".join(f"{k}: {old!r} -> {value!r}" for k, (old, value) in steps.items())
        raise RunDirError(f"the run's length changed ({listed}); to continue this run to the new length pass "
                          f"--extend (it also stretches the learning-rate schedule), or use a new run_dir")
    if steps and _shorter(saved.get("train", {}), new.get("train", {})):
        listed = "; ".join(f"{k}: {old!r} -> {value!r}" for k, (old, value) in steps.items())
        raise RunDirError(f"--extend with a shorter run ({listed}): a run cannot be shortened; give a length "
                          f"above the saved one, or use a new run_dir")
    return {k: v for k, v in changes.items() if _neutral(k)}, steps


def _shorter(saved_train: dict, new_train: dict) -> bool:
    """Whether the new run length is below the saved one, where the two can be compared without the data
    (both in steps, or both in epochs); the loop checks the remaining cases against the steps trained."""
    old_steps, new_steps = saved_train.get("max_steps"), new_train.get("max_steps")
    if old_steps is not None and new_steps is not None:
        return new_steps < old_steps
    if old_steps is None and new_steps is None:
        return new_train.get("epochs", 0) < saved_train.get("epochs", 0)
    return False


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------

write_atomic = storage.write_atomic  # a reader never sees half a file (local or gs://)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `metrics.jsonl` (a line cut short by a crash is skipped)."""
    path = storage.path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: Path, last_step: int) -> int:
    """Drops the records after `last_step` (written after the checkpoint a resume starts from, and about to
    be written again) and any line cut short by a crash. Returns how many records were dropped."""
    path = storage.path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def append_metrics(run_dir: Path, record: dict) -> None:
    storage.append_text(storage.path(run_dir) / METRICS_FILE, json.dumps(record, default=str) + "\n")


# --------------------------------------------------------------------------------------------------------
# One process per run directory
# --------------------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` holds RUN/.lock for the duration; a second holder gets a `RunDirError`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = storage.path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.lease = storage.Lease(str(self.path)) if storage.is_remote(run_dir) else None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _refuse(self, holder: dict):
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"
        raise RunDirError(f"another `mft-jax train` is running in {self.path.parent} ({who}); wait for it to "
                          f"finish or stop it (SIGTERM saves a checkpoint), or use another run_dir")

    def __enter__(self) -> "RunLock":
        if self.lease is not None:
            holder = self.lease.acquire()
            if holder is not None:
                self._refuse(holder)
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                os.close(fd)
                self._refuse(holder)
            except OSError as e:  # no flock on this filesystem: judge the recorded holder instead
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = self._holder()
                stale = holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))
                if holder.get("pid") and not stale:
                    os.close(fd)
                    self._refuse(holder)
            # The holder we waited out may have removed the file meanwhile: a lock on a removed file is no lock.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.lease is not None:
            self.lease.release()
            return
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: the next holder creates a new file
        os.close(self.fd)  # drops the flock
        self.fd = None
