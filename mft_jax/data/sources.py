"""Reading SFT rows from local files or the Hugging Face hub, and mixing sources (`dataset_mixer`).

A source is a local (or gs://) `.jsonl` / `.json` / `.parquet` file or a Hugging Face dataset name:
  org/name                 split "train" (what the reference loads), default config
  org/name:split           e.g. `allenai/tulu-3-sft-mixture:test`: a single `:` always names the split
  org/name:config:split    a config (subset) and a split; `org/name::split` is the default config
Anything that exists as a file, ends in .jsonl / .json / .parquet or starts like a path is a local source.

A mixer `{source: rows}` takes, from each source, the first `rows` rows after a shuffle seeded with `seed`
(rows None: every row, in file order) and concatenates the sources in the mixer's order. With a `fraction` < 1
(data.fraction, train split only) a source of n rows (its mixer count, or all of them) gives round(fraction * n)
rows, at least 1: the first of the same seeded permutation, so a fraction takes the rows that asking for that
count would, and a smaller fraction's rows are a subset of a larger one's. The shuffle is
`np.random.default_rng(seed).permutation(n)`, the permutation Hugging Face `datasets.Dataset.shuffle(seed=seed)`
uses, so a local copy of a hub dataset selects the same rows as the reference's
`dataset.shuffle(seed).select(range(rows))`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mft_jax import storage
from mft_jax.config import ConfigError
from mft_jax.config.run import DATA_FILE_SUFFIXES as LOCAL_SUFFIXES


class DataError(ConfigError):
    """Bad data input (a source, a row, a tokenizer); the message names it and says how to fix it."""


def is_local_source(source: str) -> bool:
    """True when `source` names a local file (it exists, has a data-file suffix, or is written as a path)."""
    return (os.path.exists(os.path.expanduser(source)) or source.endswith(LOCAL_SUFFIXES)
            or source.startswith(("/", "./", "../", "~", storage.REMOTE_PREFIX)))


def source_fingerprint(source: str) -> dict:
    """What identifies a source's content for the cache key: path + size + mtime (gs://: the object's size and
    generation, the same on every host), or the hub name.

    Hub datasets are identified by name only (their revision is not pinned), so after an upstream change
    delete the cache directory to rebuild.
    """
    if is_local_source(source):
        path = _check_local(source)
        if storage.is_remote(source):
            found = storage.blob(source)
            found.reload()
            return {"path": source, "size": found.size, "generation": found.generation}
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name, config, split = parse_hub_name(source)
    return {"hub": name, "config": config, "split": split}


def _check_local(source: str) -> Path:
    path = storage.path(source) if storage.is_remote(source) else Path(os.path.expanduser(source)).resolve()
    if not path.is_file():
        raise DataError(f"data source {source!r}: file {str(path)!r} does not exist; fix the path in "
                        f"data.train / data.dev (local sources are .jsonl, .json or .parquet files)")
    if not str(path).endswith(LOCAL_SUFFIXES):
        raise DataError(f"data source {source!r}: unsupported file type; use .jsonl, .json or .parquet")
    return path


@dataclasses.dataclass
class Taken:
    """What the mixer took from one source: `indices` int64 [rows_taken] are the rows' positions in the source."""

    source: str
    rows_read: int
    indices: np.ndarray


def read_rows(source: str) -> list[dict]:
    """All rows of one source, as a list of dicts, in file order."""
    return _select(source, _open(source), None)


def _open(source: str):
    """A sized, indexable collection of the source's rows (a list, or a hub `datasets.Dataset`)."""
    if is_local_source(source):
        path = _check_local(source)
        rows = _read_parquet(path) if path.suffix == ".parquet" else _read_json(path)
    else:
        rows = _read_hub(source)
    if not len(rows):
        raise DataError(f"data source {source!r} has no rows; remove it from the mixer or fix the file")
    return rows


def _select(source: str, rows, indices: np.ndarray | None) -> list[dict]:
    """rows[indices] (all rows when None) as a list of dicts; a non-object row is an error for the source."""
    if hasattr(rows, "select"):  # a hub Dataset: materialize only the selected rows
        return (rows if indices is None else rows.select(indices)).to_list()
    picked = rows if indices is None else [rows[i] for i in indices]
    bad = next((i for i, row in enumerate(picked) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"data source {source!r}: row {bad if indices is None else int(indices[bad])} is a "
                        f"{type(picked[bad]).__name__}, not a JSON object; each row must be an object such as "
                        f"{{\"messages\": [...]}} (see mft_jax.data.schemas)")
    return picked


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):  # one JSON array; otherwise JSON lines
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"data source {str(path)!r}: not valid JSON ({e})") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"data source {str(path)!r}, line {line_no}: not valid JSON ({e.msg}); each line of "
                            f"a .jsonl file must be one JSON object") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        if storage.is_remote(path):
            with path.open("rb") as f:
                return pq.read_table(f).to_pylist()
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"data source {str(path)!r}: cannot read Parquet ({e})") from None


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE",
                                                                                      "HF_DATASETS_OFFLINE"))


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One HEAD request to the hub (honouring proxy settings): offline, `datasets` would retry for minutes."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False
    return True


def parse_hub_name(source: str) -> tuple[str, str | None, str]:
    """`org/name[:split]` or `org/name:config:split` -> (name, config or None, split); split defaults to train."""
    parts = source.split(":")
    if len(parts) > 3 or not all(parts[:1] + parts[-1:]) or (len(parts) == 3 and not parts[2]):
        raise DataError(f"data source {source!r}: write a hub dataset as org/name, org/name:split or "
                        f"org/name:config:split")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1] or None, parts[2]


def _read_hub(source: str):
    name, config, split = parse_hub_name(source)
    fix = (f"data source {source!r} is a Hugging Face dataset name: reading it needs the `datasets` package and "
           f"network access (or the dataset in the local Hugging Face cache and HF_DATASETS_OFFLINE=1); "
           f"otherwise save a local copy as .jsonl / .parquet and list that path instead")
    if "." in name.rsplit("/", 1)[-1] or name.count("/") != 1:  # not org/name: a file meant, or mistyped?
        fix += (f" (no local file {source!r} exists either; a local source is an existing file or a path "
                f"ending in {', '.join(LOCAL_SUFFIXES)})")
    try:
        import datasets  # optional: only hub sources need it (~1 s to import)
    except ImportError:
        raise DataError(fix + " [`datasets` is not installed: pip install datasets]") from None
    if not _hub_offline() and not _hub_reachable():
        raise DataError(fix + " [the hub is not reachable from this machine]")
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # unknown name, config or split, gated, not cached while offline: all end here
        raise DataError(f"{fix} [{type(e).__name__}: {e}]") from None


def fraction_rows(n_rows: int, fraction: float) -> int:
    """How many of `n_rows` rows data.fraction keeps: the nearest integer to fraction * n_rows (halves up), >= 1."""
    return max(1, math.floor(fraction * n_rows + 0.5))


def mix(mixer: dict[str, int | None], seed: int, fraction: float = 1.0) -> tuple[list[dict], list[Taken]]:
    """Applies a `{source: rows}` mixer. Returns (rows, [Taken per source]) in mixer order.

    Each source: all rows in file order when rows is None, else the first `rows` of a seeded permutation.
    Asking for more rows than a source has is an error (the reference's `select` fails the same way).
    fraction < 1: `fraction_rows(rows or all, fraction)` rows, the first of the seeded permutation.
    """
    if not mixer:
        raise DataError("the dataset mixer is empty; list at least one source, e.g. data.train: {file.jsonl: null}")
    out: list[dict] = []
    taken: list[Taken] = []
    for source, n_rows in mixer.items():
        rows = _open(source)
        if n_rows is not None and n_rows > len(rows):
            raise DataError(f"data source {source!r} has {len(rows)} rows but the mixer asks for {n_rows}; "
                            f"lower it or use null (all rows)")
        if n_rows is None and fraction == 1:
            indices = np.arange(len(rows))
        else:
            count = fraction_rows(len(rows) if n_rows is None else n_rows, fraction)
            indices = np.random.default_rng(seed).permutation(len(rows))[:count]
        out.extend(_select(source, rows, None if n_rows is None and fraction == 1 else indices))
        taken.append(Taken(source, len(rows), indices))
    return out, taken
