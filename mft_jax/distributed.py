"""Joining the other processes of a multi-process (multi-host) run: `initialize()`, first thing on every host;
and what processes share afterwards: `process_share`, `allgather_texts`, `broadcast_json`.

How a run finds its processes, first match wins:
  explicit   MFT_JAX_COORDINATOR=host:port, MFT_JAX_NUM_PROCESSES=N, MFT_JAX_PROCESS_ID=i (all three, the same
             coordinator and N on every process, i = 0..N-1); each process uses all its local devices, or those
             listed in MFT_JAX_LOCAL_DEVICE_IDS=0,1,...
  automatic  JAX detects the cluster itself: a TPU pod slice (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with
             more than one host, or MEGASCALE_NUM_SLICES > 1), a SLURM step with more than one task, Open MPI
             with more than one rank, or anywhere when MFT_JAX_AUTO_DISTRIBUTED=1 (e.g. a Cloud TPU VM pod,
             whose hosts are known from the metadata server rather than the environment). Under SLURM and Open
             MPI, JAX then gives each process one GPU (one task per GPU); with one process per host, use the
             explicit variables. MFT_JAX_AUTO_DISTRIBUTED=0 turns the detection off.
  otherwise  one process: nothing to do.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mft_jax.config import ConfigError

COORDINATOR = "MFT_JAX_COORDINATOR"
NUM_PROCESSES = "MFT_JAX_NUM_PROCESSES"
PROCESS_ID = "MFT_JAX_PROCESS_ID"
LOCAL_DEVICE_IDS = "MFT_JAX_LOCAL_DEVICE_IDS"
AUTO = "MFT_JAX_AUTO_DISTRIBUTED"
_EXPLICIT = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} is not an integer") from None


def explicit_settings(environ: Mapping[str, str]) -> dict | None:
    """The `jax.distributed.initialize` arguments given by the MFT_JAX_* variables, or None when none is set."""
    given = [name for name in (*_EXPLICIT, LOCAL_DEVICE_IDS) if environ.get(name)]
    if not given:
        return None
    missing = [name for name in _EXPLICIT if not environ.get(name)]
    if missing:
        raise ConfigError(f"{', '.join(given)} set but {', '.join(missing)} not: a multi-process run needs all of "
                          f"{', '.join(_EXPLICIT)} on every process (unset them all to run on one process)")
    num_processes = _int(environ, NUM_PROCESSES)
    process_id = _int(environ, PROCESS_ID)
    if num_processes < 1:
        raise ConfigError(f"{NUM_PROCESSES}={num_processes}: the number of processes must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"{PROCESS_ID}={process_id} is not in [0, {NUM_PROCESSES}={num_processes}); number the "
                          f"processes 0, 1, ..., {num_processes - 1}")
    coordinator = environ[COORDINATOR]
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{COORDINATOR}={coordinator!r} is not host:port; give process 0's address and a free "
                          f"port, the same on every process, e.g. 10.0.0.1:8476")
    settings = {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    if environ.get(LOCAL_DEVICE_IDS):
        try:
            settings["local_device_ids"] = [int(i) for i in environ[LOCAL_DEVICE_IDS].split(",")]
        except ValueError:
            raise ConfigError(f"{LOCAL_DEVICE_IDS}={environ[LOCAL_DEVICE_IDS]!r} is not a comma-separated list of "
                              f"device ids, e.g. 0,1,2,3") from None
    return settings


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name) or 0)
    except ValueError:
        return 0


def detected_cluster(environ: Mapping[str, str]) -> str | None:
    """Why JAX should detect the processes itself (a `NAME=value` reason), or None for a single process."""
    auto = environ.get(AUTO, "")
    if auto not in ("", "0", "1"):
        raise ConfigError(f"{AUTO}={auto!r}: use 1 (detect the cluster) or 0 (never)")
    if auto:
        return f"{AUTO}=1" if auto == "1" else None
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        if len([h for h in environ.get(name, "").split(",") if h.strip()]) > 1:
            return f"{name} lists several hosts"
    if _count(environ, "MEGASCALE_NUM_SLICES") > 1:
        return f"MEGASCALE_NUM_SLICES={environ['MEGASCALE_NUM_SLICES']}"
    # SLURM_NTASKS alone is also set in an `salloc` shell that runs one python; srun sets SLURM_PROCID per task.
    slurm_tasks = _count(environ, "SLURM_STEP_NUM_TASKS") or _count(environ, "SLURM_NTASKS")
    if slurm_tasks > 1 and "SLURM_PROCID" in environ:
        return f"SLURM with {slurm_tasks} tasks"
    if _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"OMPI_COMM_WORLD_SIZE={environ['OMPI_COMM_WORLD_SIZE']}"
    return None


def initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Joins this process to the run's other processes when there are several; returns whether there are.

    Call it before anything touches a JAX device (jax.devices(), any computation): JAX fixes the device set
    when its backend starts. Safe to call again; a single process does nothing.
    """
    if jax.distributed.is_initialized():
        return True
    environ = os.environ if environ is None else environ
    settings = explicit_settings(environ)
    if settings is None:
        if detected_cluster(environ) is None:
            return False
        settings = {}
    elif settings["num_processes"] == 1:
        return False
    else:
        # Given explicitly, the settings are complete: JAX's own detection would otherwise fill in the unset
        # local devices, and under SLURM or Open MPI that means one GPU per process even with one process per host.
        settings["cluster_detection_method"] = "deactivate"
    # CPU processes exchange collectives through gloo over TCP; without it (the default of older JAX) a
    # computation spanning processes fails. It only concerns the CPU backend; an explicit choice (mpi) is kept.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    return True


# Helpers for code that runs on every process; each is a collective where it says so (every process calls it).

def process_share(n: int, index: int | None = None, count: int | None = None) -> slice:
    """The contiguous part of `n` items (prompts, batches) that process `index` of `count` handles (default: this
    process of all); the parts differ by at most one item and, in process order, are the items in order."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return slice(index * n // count, (index + 1) * n // count)


def allgather_texts(texts: Sequence[str]) -> list[str]:
    """Every process's `texts`, concatenated in process order, on every process (one process: `texts`).
    Every process must call it (it is a collective): lengths first, then the UTF-8 bytes, padded to one size."""
    if jax.process_count() == 1:
        return list(texts)
    encoded = [t.encode("utf-8") for t in texts]
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(encoded)], np.int32))).reshape(-1)
    lengths = np.zeros(max(int(counts.max()), 1), np.int32)
    lengths[:len(encoded)] = [len(b) for b in encoded]
    all_lengths = np.asarray(multihost_utils.process_allgather(lengths))  # [P, most texts of a process]
    joined = b"".join(encoded)
    buffer = np.zeros(max(int(all_lengths.sum(axis=1).max()), 1), np.uint8)
    buffer[:len(joined)] = np.frombuffer(joined, np.uint8)
    all_bytes = np.asarray(multihost_utils.process_allgather(buffer))  # [P, most bytes of a process]
    out = []
    for p, count in enumerate(counts):
        data, offset = all_bytes[p].tobytes(), 0
        for length in all_lengths[p, :count]:
            out.append(data[offset:offset + length].decode("utf-8"))
            offset += int(length)
    return out


def broadcast_json(value):
    """Process 0's `value` (anything JSON can hold) on every process, as JSON reads it back; process 0 gets its
    own object. One process: `value`. Every process must call it (it is a collective)."""
    if jax.process_count() == 1:
        return value
    data = json.dumps(value).encode("utf-8") if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    buffer = np.zeros(max(size, 1), np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return value if jax.process_index() == 0 else json.loads(received[:size].tobytes().decode("utf-8"))
