"""The tokenized-example cache: a TFDS dataset in array_record files, keyed by everything that changes it.

`build_dataset` reads the mixer's sources, tokenizes every row, and writes the kept examples, in mixer order,
with a TFDS `GeneratorBasedBuilder` (`file_format="array_record"`, shuffling disabled; TensorFlow is not
needed). A second call with the same key finds the finished dataset and only reads its metadata.

Layout: `{cache_dir}/{split}-{key}/sft_examples/1.0.0/` holding `sft_examples-{split}.array_record-*`,
`dataset_info.json`, `features.json` and `metadata.json` (the counts, the per-source table and every example's
length, which the packer needs before reading any example). TFDS writes into a temporary directory, renames it
when complete and removes it on any exception, so a failed or interrupted build leaves no dataset that a later
call would reuse (only a `metadata.json` inside the final directory marks a finished one).

Each record: `ids` int32 [N] token ids, `labels` bool [N] (True = supervised target), 1 <= N <= max_seq_length.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mft_jax import storage
from mft_jax.config import DataConfig
from mft_jax.data import accounting, formatting, sources
from mft_jax.data.schemas import DroppedExample
from mft_jax.data.sources import DataError

# Bump when tokenization or the record layout changes: old caches then stop matching.
FORMAT_VERSION = 2  # 2: the reference's tulu rendering (no strip) and encode_sft_example labels
BUILDER_NAME = "sft_examples"
DEFAULT_CACHE_DIR = "~/.cache/mft_jax/data"


@dataclasses.dataclass
class DatasetInfo:
    """A built split. `lengths` int32 [num_examples] holds every example's token count, in record order."""

    path: Path  # the TFDS dataset directory (…/sft_examples/1.0.0)
    data_dir: Path  # what `tfds.data_source(BUILDER_NAME, data_dir=...)` takes
    split: str
    key: str
    num_examples: int
    num_dropped: int
    dropped: dict[str, int]  # reason -> count (see formatting.DROP_REASONS)
    num_truncated: int
    num_tokens: int
    num_label_tokens: int
    lengths: np.ndarray
    sources: list[tuple[str, int]]  # (source, rows taken) in mixer order
    settings: dict  # tokenizer, template, max_seq_length, add_bos
    reused: bool = False  # True when this call found the cache
    source_stats: list[accounting.SourceStats] = dataclasses.field(default_factory=list)  # in mixer order

    def data_source(self):
        """Random-access reader of the records (`tfds.data_source`, array_record backed)."""
        return open_data_source(self.data_dir, self.split)

    def table(self) -> str:
        """Rows read / taken / kept / dropped by reason / truncated, per source."""
        return accounting.source_table(self.source_stats, self.split)

    def summary(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.split}: {self.num_examples} examples, {self.num_tokens} tokens "
                f"({self.num_label_tokens} supervised), {self.num_truncated} truncated, "
                f"{self.num_dropped} dropped ({dropped}) [{'reused' if self.reused else 'built'} {self.path}]")


def open_data_source(data_dir: str | os.PathLike, split: str):
    return tfds.data_source(BUILDER_NAME, split=split, data_dir=str(data_dir), download=False)


def tokenizer_dir(data_cfg: DataConfig, tokenizer_path: str | os.PathLike | None) -> str | None:
    """data.tokenizer when set, else the given fallback (the model directory)."""
    return data_cfg.tokenizer or (str(tokenizer_path) if tokenizer_path is not None else None)


def mixer_of(data_cfg: DataConfig, split: str) -> dict[str, int | None]:
    if split not in ("train", "dev"):
        raise DataError(f"split {split!r} is not one of ['train', 'dev']")
    mixer = getattr(data_cfg, split)
    if not mixer:
        raise DataError(f"data.{split} lists no sources; add e.g. data.{split}: {{path/to/file.jsonl: null}}")
    return mixer


def split_fraction(data_cfg: DataConfig, split: str) -> float:
    """data.fraction for the train split; the dev split is always whole (checkpoint selection compares runs)."""
    return data_cfg.fraction if split == "train" else 1.0


def cache_key(data_cfg: DataConfig, tokenizer_path: str, split: str) -> str:
    """16 hex digits of sha256 over the sources (path + size + mtime or hub name, rows), the mixer seed (when any
    rows are sampled), data.fraction (train, when < 1), the tokenizer files, template, max_seq_length, add_bos
    and FORMAT_VERSION."""
    mixer = mixer_of(data_cfg, split)
    fraction = split_fraction(data_cfg, split)
    described = {
        "format": FORMAT_VERSION,
        "sources": [[sources.source_fingerprint(s), rows] for s, rows in mixer.items()],
        "seed": data_cfg.seed if fraction != 1 or any(rows is not None for rows in mixer.values()) else None,
        "tokenizer": formatting.tokenizer_fingerprint(tokenizer_path),
        "template": data_cfg.template,
        "max_seq_length": data_cfg.max_seq_length,
        "add_bos": data_cfg.add_bos,
    }
    if fraction != 1:  # only then, so that the caches built before data.fraction existed stay valid
        described["fraction"] = fraction
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


class SftExamples(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Tokenized SFT examples of one split, in mixer order."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")

    # No source-file lookups: there are no download checksums, and TFDS's lookup for a builder defined
    # inside a package needs `importlib_resources`, which is not installed.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(self, *, split: str, examples, **kwargs):
        self._split = split
        self._examples = examples  # iterable of (ids_N, labels_N); stats filled into self.stats
        self.stats = None
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tokenized SFT examples (mft_jax.data)",
            features=tfds.features.FeaturesDict({
                "ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "labels": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep mixer order: record i is the i-th kept example
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        for index, (ids_N, labels_N) in enumerate(self._examples):
            yield index, {"ids": ids_N, "labels": labels_N}
        # Runs after the last example, before TFDS writes metadata.json.
        self.info.metadata.update(self.stats)

    # TFDS prints "Downloading and preparing dataset..." banners; build_dataset prints its own summary.
    def _log_download_bytes(self):
        pass

    def _log_download_done(self):
        pass


def build_dataset(data_cfg: DataConfig, tokenizer_path: str | os.PathLike | None = None,
                  split: str = "train", *, verbose: bool = False) -> DatasetInfo:
    """Tokenizes `data.{split}` and writes the TFDS cache, or reuses it. Returns its `DatasetInfo`.

    The tokenizer is `data.tokenizer`, else `tokenizer_path` (the model directory). Rows that cannot be trained
    on are dropped and counted per source; a source that drops more than `data.max_drop_fraction` of the rows
    taken from it fails the build as soon as its rows are done (nothing is written), and fails a cache hit too.
    verbose: print the summary and the per-source table.
    """
    tok_dir = tokenizer_dir(data_cfg, tokenizer_path)
    if tok_dir is None or not storage.path(tok_dir).is_dir():
        formatting.load_tokenizer(tok_dir)  # raises the "tokenizer directory ... does not exist" error
    if not storage.is_remote(tok_dir):
        tok_dir = str(Path(os.path.expanduser(tok_dir)).resolve())
    key = cache_key(data_cfg, tok_dir, split)  # also checks that every local source exists
    cache_root = data_cfg.cache_dir or DEFAULT_CACHE_DIR
    remote = f"{str(cache_root).rstrip('/')}/{split}-{key}" if storage.is_remote(cache_root) else None
    # A gs:// cache is mirrored on local disk (ArrayRecord files are read by local random access): built there
    # and uploaded, or downloaded from the bucket when another host or an earlier run built it.
    cache_dir = storage.local_cache(cache_root) if remote else Path(os.path.expanduser(cache_root))
    data_dir = cache_dir / f"{split}-{key}"
    path = data_dir / BUILDER_NAME / "1.0.0"
    reused = (path / "metadata.json").is_file() or (remote is not None and _download(remote, data_dir))
    if not reused:
        _build(data_cfg, tok_dir, split, key, data_dir, cache_dir, verbose)
        if remote is not None:
            _upload(data_dir, remote)
    info = _read_info(data_dir, split, key, reused=reused)
    if verbose:
        print(info.summary())
        print(info.table())
    accounting.check_drops(info.source_stats, data_cfg.max_drop_fraction, split, data_cfg.max_seq_length)
    for warning in accounting.check_truncation(info.source_stats, data_cfg.max_truncated_fraction, split,
                                               data_cfg.max_seq_length):
        print(warning, file=sys.stderr, flush=True)
    return info


def _build(data_cfg: DataConfig, tok_dir: str, split: str, key: str, data_dir: Path, cache_dir: Path,
           verbose: bool) -> None:
    """Writes the split through TFDS, which works in a temporary directory and renames it when complete: an
    exception anywhere (the drop check included) leaves no dataset behind, and nothing else is deleted."""
    tfds.display_progress_bar(verbose)
    tokenizer = formatting.load_tokenizer(tok_dir)
    rows, taken = sources.mix(mixer_of(data_cfg, split), data_cfg.seed, split_fraction(data_cfg, split))
    settings = {"tokenizer": tok_dir, "template": data_cfg.template, "max_seq_length": data_cfg.max_seq_length,
                "add_bos": data_cfg.add_bos}
    stats = [accounting.SourceStats(t.source, t.rows_read, len(t.indices)) for t in taken]
    lengths: list[int] = []
    totals = {"num_truncated": 0, "num_label_tokens": 0}

    def check(done: list[accounting.SourceStats]) -> None:
        try:
            accounting.check_drops(done, data_cfg.max_drop_fraction, split, data_cfg.max_seq_length)
        except DataError:
            if verbose:
                print(accounting.source_table(done, split))
            raise

    def examples():
        items = formatting.tokenize_rows(rows, tokenizer, data_cfg.template, data_cfg.max_seq_length,
                                         data_cfg.add_bos)
        for s, take in enumerate(taken):
            for index in take.indices.tolist():
                item = next(items)
                if isinstance(item, DroppedExample):
                    stats[s].count_drop(item.reason, f"row {index}: {item.detail or item.reason}"[:300])
                    continue
                stats[s].kept += 1
                stats[s].truncated += item.truncated
                lengths.append(len(item.ids_N))
                totals["num_truncated"] += item.truncated
                totals["num_label_tokens"] += int(item.labels_N.sum())
                yield item.ids_N, item.labels_N
            check(stats[: s + 1])  # fail as soon as a source is done: raising here aborts the TFDS build
        dropped = collections.Counter()
        for s in stats:
            dropped.update(s.dropped)
        if not lengths:
            first = next(f"{s.source!r} {s.first_drop[r]}" for s in stats for r in s.first_drop)
            raise DataError(f"data.{split}: all {len(rows)} rows were dropped "
                            f"({', '.join(f'{r} {n}' for r, n in sorted(dropped.items()))}; first: {first}); "
                            f"fix the sources (data.max_drop_fraction < 1 names the fix per source)")
        builder.stats = {"split": split, "key": key, "sources": [[t.source, len(t.indices)] for t in taken],
                         "source_stats": [s.to_json() for s in stats], "settings": settings,
                         "dropped": dict(dropped), "lengths": lengths, **totals}

    builder = SftExamples(split=split, examples=examples(), data_dir=str(data_dir), file_format="array_record")
    try:
        builder.download_and_prepare(download_dir=str(cache_dir / "tfds_downloads"))
    except OSError:
        # Another process sharing cache_dir finished the same dataset first (its rename won); theirs is identical.
        if not (data_dir / BUILDER_NAME / "1.0.0" / "metadata.json").is_file():
            raise


_COMPLETE = f"{BUILDER_NAME}/1.0.0/metadata.json"  # written last: a dataset without it is incomplete


def _upload(data_dir: Path, remote: str) -> None:
    """Copies a built dataset to the bucket, its metadata.json last (a reader takes it as complete only then)."""
    files = sorted(str(f.relative_to(data_dir)) for f in data_dir.rglob("*") if f.is_file())
    for name in sorted(files, key=lambda n: n == _COMPLETE):
        storage.copy_file(data_dir / name, f"{remote}/{name}")


def _download(remote: str, data_dir: Path) -> bool:
    """Copies a complete dataset from the bucket into the local mirror; False when the bucket has none."""
    names = storage.objects(remote)
    if _COMPLETE not in names:
        return False
    tmp = data_dir.with_name(f".{data_dir.name}.{os.getpid()}.tmp")
    for name in names:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        storage.copy_file(f"{remote}/{name}", tmp / name)
    try:
        os.rename(tmp, data_dir)
    except OSError:  # another process on this host mirrored it first; theirs is identical
        shutil.rmtree(tmp)
    return True


def _read_info(data_dir: Path, split: str, key: str, reused: bool) -> DatasetInfo:
    path = data_dir / BUILDER_NAME / "1.0.0"
    meta = json.loads((path / "metadata.json").read_text())
    lengths = np.asarray(meta["lengths"], np.int32)
    return DatasetInfo(
        path=path, data_dir=data_dir, split=split, key=key, num_examples=len(lengths),
        num_dropped=sum(meta["dropped"].values()), dropped=meta["dropped"], num_truncated=meta["num_truncated"],
        num_tokens=int(lengths.sum()), num_label_tokens=meta["num_label_tokens"], lengths=lengths,
        sources=[tuple(s) for s in meta["sources"]], settings=meta["settings"], reused=reused,
        source_stats=[accounting.SourceStats.from_json(s) for s in meta["source_stats"]])
