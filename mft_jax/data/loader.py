"""Batches for the trainer: packing plan, batch assembly, the grain loader and the global-batch helper.

A batch is a dict of numpy arrays, each [B, L] (B rows of this process, L = max_seq_length):
  inputs        int32    token ids fed to the model
  targets       int32    the next token of the same document (0 where there is none)
  loss_weights  float32  per target: 1/(label tokens of its document) for loss_reduction "example" (each
                         document sums to 1), 1.0 for "token"; 0 on prompt tokens, padding and each
                         document's last token. loss = sum(w * nll) / sum(w) over the optimizer batch.
  positions     int32    position within the token's own document (restarts at 0 per document)
  segment_ids   int32    1, 2, 3, ... per document within a row; 0 on padding

How an epoch is laid out (all of it is a pure function of the example lengths and the seed, so every process
computes the same plan and a restart reproduces it):
1. Rows. Padded: one example per row. Packed: the examples, in a seeded random order, are placed best-fit
   (the open row with the least room that still fits; ties to the oldest row) into rows of L tokens. The plan is
   made once, so every epoch has the same number of rows and `batches_per_epoch` is exact; which documents
   share a row does not change the loss, because attention and targets never cross documents.
2. Each epoch permutes the rows with a seed derived from (seed, epoch) (identity when shuffle is off).
3. Global batch b of an epoch is permuted rows [b*G, (b+1)*G), G = B * process_count; process p takes the
   p-th block of B rows, so processes read disjoint rows that together cover the epoch. With drop_remainder the
   last incomplete global batch is skipped; without it, it is filled with empty rows (all weights 0).

The loader is a grain `MapDataset` of global batch indices mapped to batches, read through grain's prefetching
iterator; its state is grain's position plus the loader's settings, so a restore with other settings fails
loudly instead of silently feeding other data.
"""

from __future__ import annotations

import bisect
import json
import sys
import threading
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from mft_jax.data.sources import DataError
from mft_jax.data.store import build_dataset, open_data_source

BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_weights": np.float32, "positions": np.int32,
                "segment_ids": np.int32}  # what the model's step takes of a batch (the table above)
BATCH_KEYS = tuple(BATCH_DTYPES)


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------

def pack_rows(lengths_E: np.ndarray, seq_len: int, order_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit packing of examples, taken in `order_E`, into rows of `seq_len` tokens.

    Returns (row_offsets_R1 int64 [R+1], row_docs int64 [E]): row r holds the examples
    row_docs[row_offsets[r]:row_offsets[r+1]], in placement order. Deterministic.
    """
    if len(lengths_E) and int(lengths_E.max()) > seq_len:
        raise DataError(f"an example has {int(lengths_E.max())} tokens, more than the row length {seq_len}; "
                        f"rebuild the dataset with data.max_seq_length <= {seq_len}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row id) of rows that can still take an example
    for example in order_E.tolist():
        n = int(lengths_E[example])
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            rows[row].append(example)
            room -= n
        else:
            row, room = len(rows), seq_len - n
            rows.append([example])
        if room >= 2:  # every kept example has at least 2 tokens
            bisect.insort(free, (room, row))
    row_offsets_R1 = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=row_offsets_R1[1:])
    row_docs = np.fromiter((e for r in rows for e in r), np.int64, count=int(row_offsets_R1[-1]))
    return row_offsets_R1, row_docs


def plan_rows(lengths_E: np.ndarray, seq_len: int, packing: bool, seed: int,
              shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row_offsets_R1, row_docs) for padded (one example per row, in record order) or packed rows."""
    num_examples = len(lengths_E)
    if not packing:
        return np.arange(num_examples + 1, dtype=np.int64), np.arange(num_examples, dtype=np.int64)
    order_E = (np.random.default_rng([seed, 0]).permutation(num_examples) if shuffle
               else np.arange(num_examples))
    return pack_rows(lengths_E, seq_len, order_E)


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------

def assemble_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]], seq_len: int,
                   loss_reduction: str = "example") -> dict[str, np.ndarray]:
    """Rows of documents (each a list of (ids_N int32, labels_N bool)) -> a batch of [len(rows), seq_len] arrays.

    The documents of a row are laid out one after another from position 0; the rest of the row is padding.
    """
    batch_size = len(rows)
    inputs_BxL = np.zeros((batch_size, seq_len), np.int32)
    targets_BxL = np.zeros((batch_size, seq_len), np.int32)
    weights_BxL = np.zeros((batch_size, seq_len), np.float32)
    positions_BxL = np.zeros((batch_size, seq_len), np.int32)
    segments_BxL = np.zeros((batch_size, seq_len), np.int32)
    arange_L = np.arange(seq_len, dtype=np.int32)
    for r, docs in enumerate(rows):
        start = 0
        for segment, (ids_N, labels_N) in enumerate(docs, start=1):
            n = len(ids_N)
            end = start + n
            if end > seq_len:
                raise DataError(f"documents of {end} tokens do not fit a row of {seq_len}")
            inputs_BxL[r, start:end] = ids_N
            targets_BxL[r, start:end - 1] = ids_N[1:]  # position t predicts token t+1 of the same document
            weights_N1 = labels_N[1:].astype(np.float32)
            if loss_reduction == "example":
                weights_N1 /= max(weights_N1.sum(), 1.0)
            weights_BxL[r, start:end - 1] = weights_N1
            positions_BxL[r, start:end] = arange_L[:n]
            segments_BxL[r, start:end] = segment
            start = end
    return {"inputs": inputs_BxL, "targets": targets_BxL, "loss_weights": weights_BxL,
            "positions": positions_BxL, "segment_ids": segments_BxL}


class _BatchMaker:
    """Global batch index -> this process's batch (a picklable function for grain's workers)."""

    def __init__(self, data_dir: str, split: str, row_offsets_R1, row_docs, *, seq_len: int, batch_size: int,
                 loss_reduction: str, seed: int, shuffle: bool, process_index: int, process_count: int,
                 drop_remainder: bool):
        self.data_dir, self.split = data_dir, split
        self.row_offsets_R1, self.row_docs = row_offsets_R1, row_docs
        self.seq_len, self.batch_size, self.loss_reduction = seq_len, batch_size, loss_reduction
        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        num_rows = len(row_offsets_R1) - 1
        global_rows = batch_size * process_count
        self.batches_per_epoch = num_rows // global_rows if drop_remainder else -(-num_rows // global_rows)
        self._init_runtime()

    def _init_runtime(self):
        self._source = None
        self._lock = threading.Lock()
        self._epoch_rows: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("_source", "_lock", "_epoch_rows"):
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def rows_of_epoch(self, epoch: int) -> np.ndarray:
        """The row order of one epoch, int64 [R]."""
        with self._lock:
            order = self._epoch_rows.get(epoch)
            if order is None:
                num_rows = len(self.row_offsets_R1) - 1
                order = (np.random.default_rng([self.seed, 1, epoch]).permutation(num_rows) if self.shuffle
                         else np.arange(num_rows))
                self._epoch_rows = {epoch: order}  # batches are read in order; keep only the current epoch
            return order

    def rows_of_batch(self, index: int) -> np.ndarray:
        """Row ids of this process's share of global batch `index` (fewer than B at an undropped tail)."""
        epoch, batch = divmod(index, self.batches_per_epoch)
        start = (batch * self.process_count + self.process_index) * self.batch_size
        return self.rows_of_epoch(epoch)[start:start + self.batch_size]

    def docs_of_batch(self, index: int) -> list[np.ndarray]:
        """Example (record) ids of each row of this process's share of global batch `index`."""
        return [self.row_docs[self.row_offsets_R1[r]:self.row_offsets_R1[r + 1]] for r in self.rows_of_batch(index)]

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if self._source is None:
            with self._lock:
                if self._source is None:
                    self._source = open_data_source(self.data_dir, self.split)
        docs = self.docs_of_batch(index)
        flat = [int(e) for row in docs for e in row]
        records = self._source.__getitems__(flat) if flat else []
        rows, at = [], 0
        for row in docs:
            rows.append([(rec["ids"], rec["labels"]) for rec in records[at:at + len(row)]])
            at += len(row)
        rows += [[] for _ in range(self.batch_size - len(rows))]  # empty rows at an undropped tail
        return assemble_batch(rows, self.seq_len, self.loss_reduction)


# ----------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------

class SFTLoader(grain.DatasetIterator):
    """Iterator over this process's batches (dicts of [B, L] numpy arrays, see the module docstring).

    `batches_per_epoch`: global batches (= steps) per epoch. `num_batches`: total, None when repeating forever.
    `get_state()` -> a JSON-serializable dict; `set_state(state)` resumes exactly. Being a grain
    `DatasetIterator`, it also works with `grain.checkpoint.CheckpointSave/CheckpointRestore` in orbax.
    """

    def __init__(self, info, *, batch_size: int, seq_len: int, packing: bool, loss_reduction: str, seed: int,
                 shuffle: bool, num_epochs: int | None, process_index: int, process_count: int,
                 drop_remainder: bool, num_workers: int = 0, num_threads: int = 2, prefetch: int = 4):
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if batch_size <= 0:
            raise DataError(f"batch_size must be > 0, got {batch_size}")
        if not (isinstance(seed, int) and seed >= 0):
            raise DataError(f"the data seed must be an integer >= 0, got {seed!r}")
        if num_epochs is not None and num_epochs <= 0:
            raise DataError(f"num_epochs must be > 0 or None (repeat forever), got {num_epochs}")
        row_offsets_R1, row_docs = plan_rows(info.lengths, seq_len, packing, seed, shuffle)
        self.maker = _BatchMaker(str(info.data_dir), info.split, row_offsets_R1, row_docs, seq_len=seq_len,
                                 batch_size=batch_size, loss_reduction=loss_reduction, seed=seed, shuffle=shuffle,
                                 process_index=process_index, process_count=process_count,
                                 drop_remainder=drop_remainder)
        self.info = info
        self.num_rows = len(row_offsets_R1) - 1
        self.batches_per_epoch = self.maker.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise DataError(f"data.{info.split} has {self.num_rows} rows, fewer than one global batch of "
                            f"{batch_size * process_count}; lower the batch size or add data")
        self.num_batches = None if num_epochs is None else self.batches_per_epoch * num_epochs
        dataset = grain.MapDataset.range(self.num_batches or sys.maxsize).map(self.maker)
        iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                                 prefetch_buffer_size=prefetch))
        if num_workers:
            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; use their defaults
                flags.FLAGS.mark_as_parsed()
            iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        # What a saved position means; restoring into a loader with other settings is refused.
        self.settings = {"dataset": info.key, "split": info.split, "batch_size": batch_size, "seq_len": seq_len,
                         "packing": packing, "loss_reduction": loss_reduction, "seed": seed, "shuffle": shuffle,
                         "process_index": process_index, "process_count": process_count,
                         "drop_remainder": drop_remainder, "num_workers": num_workers}
        super().__init__(iter(iter_dataset))

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"position": self._parent.get_state(), "settings": dict(self.settings)}

    def set_state(self, state: dict[str, Any]) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        saved = state.get("settings", {})
        differ = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise DataError(f"data loader state does not match this loader ({detail}); resume with the same data "
                            f"config, batch size and process count, or start the data from scratch")
        self._parent.set_state(state["position"])

    def __str__(self) -> str:
        return f"SFTLoader({self.settings})"


def make_loader(data_cfg, tokenizer_path, split: str, batch_size: int, *, seed: int | None = None,
                shuffle: bool | None = None, num_epochs: int | None = None, process_index: int | None = None,
                process_count: int | None = None, drop_remainder: bool | None = None,
                num_workers: int | None = None, verbose: bool = False) -> SFTLoader:
    """Builds (or reuses) the split's cache and returns an `SFTLoader` of this process's batches.

    batch_size: rows per process. seed/shuffle: data.seed / data.shuffle by default (shuffle off for dev).
    num_epochs None: repeat forever. process_index/process_count: jax.process_index()/process_count() by default.
    drop_remainder: default True for train (every step full), False otherwise (every example seen once).
    verbose: print the split's summary and per-source table (train passes it on process 0). A source that
    dropped more than data.max_drop_fraction of its rows raises `DataError` (see `build_dataset`).
    """
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    info = build_dataset(data_cfg, tokenizer_path, split, verbose=verbose)
    return SFTLoader(
        info, batch_size=batch_size, seq_len=data_cfg.max_seq_length, packing=data_cfg.packing,
        loss_reduction=data_cfg.loss_reduction, seed=data_cfg.seed if seed is None else seed,
        shuffle=(data_cfg.shuffle and split == "train") if shuffle is None else shuffle, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
        drop_remainder=(split == "train") if drop_remainder is None else drop_remainder,
        num_workers=data_cfg.num_workers if num_workers is None else num_workers)


def to_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
    """This process's [B, L] arrays -> global jax.Arrays [B * process_count, L] laid out by `sharding`.

    `sharding` is one `jax.sharding.Sharding` for every key (e.g. NamedSharding(mesh, P(("data", "fsdp"))))
    or a dict of them by key. Each process passes its own rows (`jax.make_array_from_process_local_data`).
    """
    return {key: jax.make_array_from_process_local_data(sharding[key] if isinstance(sharding, dict) else sharding,
                                                        value)
            for key, value in local_batch.items()}
