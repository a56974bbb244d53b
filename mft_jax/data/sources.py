"""Reading SFT rows from local files or the Hugging Face hub, and mixing sources (`dataset_mixer`).

A source is a local `.jsonl` / `.json` / `.parquet` file or a Hugging Face dataset name (`org/name`, optionally
`org/name:split`). A mixer `{source: rows}` takes, from each source, the first `rows` rows after a shuffle seeded
with `seed` (rows None: every row, in file order) and concatenates the sources in the mixer's order. The shuffle is
`np.random.default_rng(seed).permutation(n)`, the permutation Hugging Face `datasets.Dataset.shuffle(seed=seed)`
uses, so a local copy of a hub dataset selects the same rows as the reference's
`dataset.shuffle(seed).select(range(rows))`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mft_jax.config import ConfigError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ConfigError):
    """Bad data input (a source, a row, a tokenizer); the message names it and says how to fix it."""


def is_local_source(source: str) -> bool:
    """True when `source` names a local file (it exists, has a data-file suffix, or is written as a path)."""
    return (os.path.exists(os.path.expanduser(source)) or source.endswith(LOCAL_SUFFIXES)
            or source.startswith(("/", "./", "../", "~")))


def source_fingerprint(source: str) -> dict:
    """What identifies a source's content for the cache key: path + size + mtime, or the hub name.

    Hub datasets are identified by name only (their revision is not pinned), so after an upstream change
    delete the cache directory to rebuild.
    """
    if is_local_source(source):
        path = _check_local(source)
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"hub": source}


def _check_local(source: str) -> Path:
    path = Path(os.path.expanduser(source)).resolve()
    if not path.is_file():
        raise DataError(f"data source {source!r}: file {str(path)!r} does not exist; fix the path in "
                        f"data.train / data.dev (local sources are .jsonl, .json or .parquet files)")
    if not str(path).endswith(LOCAL_SUFFIXES):
        raise DataError(f"data source {source!r}: unsupported file type; use .jsonl, .json or .parquet")
    return path


def read_rows(source: str) -> list[dict]:
    """All rows of one source, as a list of dicts, in file order."""
    if is_local_source(source):
        path = _check_local(source)
        rows = _read_parquet(path) if path.suffix == ".parquet" else _read_json(path)
    else:
        rows = _read_hub(source)
    if not rows:
        raise DataError(f"data source {source!r} has no rows; remove it from the mixer or fix the file")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"data source {source!r}: row {bad} is a {type(rows[bad]).__name__}, not a JSON object "
                        f"with 'messages' or 'prompt'/'completion'")
    return rows


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
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"data source {str(path)!r}: cannot read Parquet ({e})") from None


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE",
                                                                                      "HF_DATASETS_OFFLINE"))


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One HEAD request to the hub (honouring proxy settings): offline, `datasets` would retry for minutes."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False
    return True


def _read_hub(source: str) -> list[dict]:
    name, _, split = source.partition(":")
    fix = (f"data source {source!r} is a Hugging Face dataset name: reading it needs the `datasets` package and "
           f"network access (or the dataset in the local Hugging Face cache and HF_DATASETS_OFFLINE=1); "
           f"otherwise save a local copy as .jsonl / .parquet and list that path instead")
    try:
        import datasets  # only needed for hub sources
    except ImportError:
        raise DataError(fix + " [`datasets` is not installed: pip install datasets]") from None
    if not _hub_offline() and not _hub_reachable():
        raise DataError(fix + " [the hub is not reachable from this machine]")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # unknown name, gated, not cached while offline: all end here
        raise DataError(f"{fix} [{type(e).__name__}: {e}]") from None
    return list(dataset)


def mix(mixer: dict[str, int | None], seed: int) -> tuple[list[dict], list[tuple[str, int]]]:
    """Applies a `{source: rows}` mixer. Returns (rows, [(source, rows taken)]) in mixer order.

    Each source: all rows in file order when rows is None, else the first `rows` of a seeded permutation.
    Asking for more rows than a source has is an error (the reference's `select` fails the same way).
    """
    if not mixer:
        raise DataError("the dataset mixer is empty; list at least one source, e.g. data.train: {file.jsonl: null}")
    out: list[dict] = []
    taken: list[tuple[str, int]] = []
    for source, n_rows in mixer.items():
        rows = read_rows(source)
        if n_rows is not None:
            if n_rows > len(rows):
                raise DataError(f"data source {source!r} has {len(rows)} rows but the mixer asks for {n_rows}; "
                                f"lower it or use null (all rows)")
            order = np.random.default_rng(seed).permutation(len(rows))[:n_rows]
            rows = [rows[i] for i in order]
        out.extend(rows)
        taken.append((source, len(rows)))
    return out, taken
