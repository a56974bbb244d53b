"""Tests of mft_jax.data: templates and labels, the TFDS cache, batches, packing, resume, sharding, bad input."""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mft_jax.config import DataConfig
from mft_jax.data import sources
from mft_jax.data import (TULU_CHAT_TEMPLATE, DataError, DroppedExample, add_data_commands, build_dataset, check_drops,
                          detect_schema, format_tulu, load_tokenizer, make_loader, parse_hub_name, row_to_messages,
                          to_global_batch, tokenize_example, train_bpe_tokenizer)
from data_fixtures import SCHEMA_CASES, lossy_rows, make_rows, tokenizer_corpus, write_jsonl
from tolerances import assert_close, forward_length, gamma, mean_nll_bound, rounding_bound

REPO = Path(__file__).resolve().parents[1]

CHAT = [
    {"role": "system", "content": "You are terse. "},
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Five."},
    {"role": "user", "content": "And four plus four?"},
    {"role": "assistant", "content": " Eight. "},
]
# The reference's tulu rendering: contents verbatim (not stripped), "\n" after system / user turns and after
# every assistant turn but the last.
CHAT_TEXT = ("<|system|>\nYou are terse. \n<|user|>\nWhat is two plus three?\n<|assistant|>\nFive.</s>\n"
             "<|user|>\nAnd four plus four?\n<|assistant|>\n Eight. </s>")


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return train_bpe_tokenizer(tokenizer_corpus(), 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tok_dir):
    """A built train split of 120 rows (plus 3 that are dropped) shared by the loader tests."""
    root = tmp_path_factory.mktemp("corpus")
    rows = make_rows(120, max_words=25)
    bad = [{"messages": []}, {"messages": [{"role": "user", "content": "only a question"}]},
           {"text": "no schema"}]
    path = write_jsonl(root / "train.jsonl", rows[:60] + bad + rows[60:])
    cfg = DataConfig(train={str(path): None}, tokenizer=str(tok_dir), max_seq_length=96, cache_dir=str(root / "c"),
                     shuffle=True, seed=7, max_drop_fraction=0.03)
    info = build_dataset(cfg)
    return cfg, info, rows


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def records(info) -> list[tuple[np.ndarray, np.ndarray]]:
    source = info.data_source()
    return [(source[i]["ids"], source[i]["labels"]) for i in range(len(source))]


def docs_of(batch) -> list[tuple[int, ...]]:
    """The token sequences of every document in a batch (row-major, in segment order)."""
    out = []
    for inputs_L, segments_L in zip(batch["inputs"], batch["segment_ids"]):
        for segment in range(1, int(segments_L.max()) + 1):
            out.append(tuple(inputs_L[segments_L == segment].tolist()))
    return out


# ------------------------------------------------------------------------------------------------------------
# Tokenizer, templates, labels
# ------------------------------------------------------------------------------------------------------------

def test_train_bpe_tokenizer_is_fast_and_loads(tmp_path):
    from transformers import AutoTokenizer

    start = time.perf_counter()
    out = train_bpe_tokenizer(tokenizer_corpus() * 2, 500, tmp_path / "tok")
    assert time.perf_counter() - start < 2.0
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    hf = AutoTokenizer.from_pretrained(str(out))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [3, 4, 5]
    assert len(hf) <= 500
    assert encode(hf, "<|user|>\n</s>") == [4, encode(hf, "\n")[0], 2]
    assert hf.apply_chat_template(CHAT, tokenize=False) == CHAT_TEXT
    assert hf.chat_template == TULU_CHAT_TEMPLATE


def test_tulu_text_is_exact():
    assert format_tulu(CHAT) == CHAT_TEXT
    assert format_tulu(CHAT[:2], add_generation_prompt=True) == (
        "<|system|>\nYou are terse. \n<|user|>\nWhat is two plus three?\n<|assistant|>\n")
    # After an assistant turn that ends the prefix, the generation prompt follows its EOS directly.
    assert format_tulu(CHAT[:3], add_generation_prompt=True).endswith("Five.</s><|assistant|>\n")
    assert format_tulu([], add_generation_prompt=True) == ""


def test_tulu_ids_and_labels_are_exact(tok):
    ids_N, labels_N = tokenize_example(CHAT, tok)
    assert ids_N.dtype == np.int32 and labels_N.dtype == bool
    assert ids_N.tolist() == encode(tok, CHAT_TEXT)
    # Expected ids piece by piece (this byte-level tokenizer never merges across "\n" or special tokens), with the
    # supervised pieces being exactly each assistant content and its EOS.
    nl, eos = encode(tok, "\n"), [tok.eos_token_id]
    tag = {role: tok.convert_tokens_to_ids(f"<|{role}|>") for role in ("system", "user", "assistant")}
    expected_ids, expected_labels = [], []
    for i, message in enumerate(CHAT):
        head, body = [tag[message["role"]]] + nl, encode(tok, message["content"])
        if message["role"] == "assistant":  # content + EOS are targets; the "\n" after the EOS is not
            tail = [] if i == len(CHAT) - 1 else nl
            expected_ids += head + body + eos + tail
            expected_labels += [False] * len(head) + [True] * (len(body) + 1) + [False] * len(tail)
        else:
            expected_ids += head + body + nl
            expected_labels += [False] * (len(head) + len(body) + 1)
    assert ids_N.tolist() == expected_ids
    assert labels_N.tolist() == expected_labels
    assert tok.decode(ids_N[labels_N].tolist()) == "Five.</s> Eight. </s>"
    # No BOS by default; with add_bos the BOS is prepended and unsupervised.
    assert ids_N[0] == tag["system"]
    bos_ids, bos_labels = tokenize_example(CHAT, tok, add_bos=True)
    assert bos_ids.tolist() == [tok.bos_token_id] + expected_ids
    assert bos_labels.tolist() == [False] + expected_labels


def test_chat_template_mode_equals_tulu(tok):
    tulu = tokenize_example(CHAT, tok, template="tulu")
    chat = tokenize_example(CHAT, tok, template="chat_template")
    np.testing.assert_array_equal(tulu[0], chat[0])
    np.testing.assert_array_equal(tulu[1], chat[1])


def test_plain_prompt_completion(tok):
    row = {"prompt": "What is two plus three?\n", "completion": "five"}
    ids_N, labels_N = tokenize_example(row, tok, template="plain")
    prompt, answer = encode(tok, row["prompt"]), encode(tok, "five")
    assert ids_N.tolist() == prompt + answer + [tok.eos_token_id]
    assert labels_N.tolist() == [False] * len(prompt) + [True] * (len(answer) + 1)
    # The same row in tulu: user prompt, assistant completion.
    ids_N, labels_N = tokenize_example(row, tok)
    assert tok.decode(ids_N.tolist()) == "<|user|>\nWhat is two plus three?\n\n<|assistant|>\nfive</s>"
    assert tok.decode(ids_N[labels_N].tolist()) == "five</s>"


def test_truncation_and_drops(tok):
    ids_N, labels_N = tokenize_example(CHAT, tok)
    full = len(ids_N)
    # Cut inside the second answer, or inside the second user turn: kept, cut at max_seq_length, labels are the
    # prefix of the full labels.
    second_user = np.flatnonzero(ids_N == tok.convert_tokens_to_ids("<|user|>"))[1]
    for cut in (full - 2, second_user + 3):
        cut_ids, cut_labels = tokenize_example(CHAT, tok, max_seq_length=cut)
        assert cut_ids.tolist() == ids_N[:cut].tolist() and cut_labels.tolist() == labels_N[:cut].tolist()
    # Cut before the first answer: nothing left to learn, dropped.
    first_label = int(np.argmax(labels_N))
    with pytest.raises(DroppedExample) as e:
        tokenize_example(CHAT, tok, max_seq_length=first_label)
    assert e.value.reason == "no_labels_after_truncation"
    # Empty assistant content is kept, as in the reference: the EOS (and any whitespace) is the target.
    for content in ("", " "):
        ids_N, labels_N = tokenize_example([{"role": "user", "content": ""},
                                            {"role": "assistant", "content": content}], tok)
        assert tok.decode(ids_N[labels_N].tolist()) == content + "</s>"
    cases = {
        "empty": [[], {"messages": []}, {"conversations": []}],
        "no_assistant": [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]],
        "unknown_role": [[{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
                         {"conversations": [{"from": "function", "value": "x"}, {"from": "gpt", "value": "y"}]}],
        "malformed": [{"text": "no chat here"}, {"messages": "not a list"}, {"chosen": "a string"},
                      {"prompt": ["not", "turns"], "completion": "c"}, {"instruction": 3, "output": "o"},
                      [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "y"}],
                      [{"content": "no role"}, {"role": "assistant", "content": "y"}]],
    }
    for reason, examples in cases.items():
        for example in examples:
            with pytest.raises(DroppedExample) as e:
                tokenize_example(example, tok)
            assert e.value.reason == reason, example


@pytest.mark.parametrize("schema, row, messages", SCHEMA_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SCHEMA_CASES)])
def test_schema_rows_convert_to_messages(schema, row, messages):
    assert detect_schema(row) == schema
    assert row_to_messages(row) == messages


def test_unknown_schema_names_the_keys_found():
    with pytest.raises(DroppedExample, match=r"row keys \['answer', 'text'\] match no schema.*messages.*conversations"):
        row_to_messages({"text": "t", "answer": "a"})
    assert detect_schema({"messages": None, "prompt": None}) is None


def test_missing_tokenizer_dir_names_it_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer directory .*nope.* does not exist.*data\.tokenizer"):
        load_tokenizer(tmp_path / "nope")
    cfg = DataConfig(train={"x.jsonl": None}, tokenizer=str(tmp_path / "nope"), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="nope"):
        build_dataset(cfg)


# ------------------------------------------------------------------------------------------------------------
# Sources, mixer, cache
# ------------------------------------------------------------------------------------------------------------

def test_build_counts_drops_and_reuses_cache(corpus, tok, tok_dir):
    cfg, info, rows = corpus
    assert info.num_examples == 120 and info.num_dropped == 3
    assert info.dropped == {"empty": 1, "no_assistant": 1, "malformed": 1}
    (stats,) = info.source_stats
    assert (stats.rows_read, stats.rows_taken, stats.kept, stats.dropped) == (123, 123, 120, info.dropped)
    assert stats.first_drop["malformed"].startswith("row 62: row keys ['text'] match no schema")
    stored = records(info)
    # Stored in file order (no sampling), each record exactly tokenize_example's output.
    for (ids_N, labels_N), row in zip(stored, rows):
        want_ids, want_labels = tokenize_example(row, tok, max_seq_length=96)
        np.testing.assert_array_equal(ids_N, want_ids)
        np.testing.assert_array_equal(labels_N, want_labels)
    assert info.lengths.tolist() == [len(r[0]) for r in stored]
    assert info.num_tokens == sum(len(r[0]) for r in stored)
    assert info.num_label_tokens == sum(int(r[1].sum()) for r in stored)
    assert info.num_truncated == sum(len(tokenize_example(r, tok, max_seq_length=10_000)[0]) > 96 for r in rows) > 0
    assert stats.truncated == info.num_truncated
    again = build_dataset(cfg)
    assert again.reused and again.path == info.path
    # Anything in the key changes the cache directory.
    assert build_dataset(DataConfig(**{**vars(cfg), "max_seq_length": 80})).path != info.path


def test_cache_key_follows_source_file(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "a.jsonl", make_rows(10))
    cfg = DataConfig(train={str(path): None}, tokenizer=str(tok_dir), max_seq_length=64, cache_dir=str(tmp_path / "c"))
    first = build_dataset(cfg)
    write_jsonl(path, make_rows(12))
    second = build_dataset(cfg)
    assert second.path != first.path and not second.reused and second.num_examples == 12


def test_mixer_takes_first_rows_of_seeded_shuffle(tmp_path, tok, tok_dir):
    rows_a, rows_b = make_rows(30, seed=1, tag="alpha"), make_rows(20, seed=2, tag="beta")
    path_a, path_b = write_jsonl(tmp_path / "a.jsonl", rows_a), write_jsonl(tmp_path / "b.jsonl", rows_b)
    cfg = DataConfig(train={str(path_a): 7, str(path_b): None}, tokenizer=str(tok_dir), max_seq_length=128,
                     cache_dir=str(tmp_path / "c"), seed=3)
    info = build_dataset(cfg)
    assert info.sources == [(str(path_a), 7), (str(path_b), 20)]
    chosen = [rows_a[i] for i in np.random.default_rng(3).permutation(30)[:7]] + rows_b
    for (ids_N, _), row in zip(records(info), chosen, strict=True):
        np.testing.assert_array_equal(ids_N, tokenize_example(row, tok, max_seq_length=128)[0])


def test_parquet_source(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows(8)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    cfg = DataConfig(train={str(tmp_path / "a.parquet"): None}, tokenizer=str(tok_dir), cache_dir=str(tmp_path / "c"))
    jsonl = DataConfig(**{**vars(cfg), "train": {str(write_jsonl(tmp_path / "a.jsonl", rows)): None}})
    from_parquet, from_jsonl = records(build_dataset(cfg)), records(build_dataset(jsonl))
    assert [r[0].tolist() for r in from_parquet] == [r[0].tolist() for r in from_jsonl]


def test_bad_sources_fail_clearly(tmp_path, tok_dir, monkeypatch):
    def cfg(train, **kw):
        return DataConfig(train=train, tokenizer=str(tok_dir), cache_dir=str(tmp_path / "c"), **kw)

    with pytest.raises(DataError, match=r"missing\.jsonl.* does not exist"):
        build_dataset(cfg({str(tmp_path / "missing.jsonl"): None}))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        build_dataset(cfg({str(tmp_path / "empty.jsonl"): None}))
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n{not json\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        build_dataset(cfg({str(tmp_path / "broken.jsonl"): None}))
    small = write_jsonl(tmp_path / "small.jsonl", make_rows(3))
    with pytest.raises(DataError, match="has 3 rows but the mixer asks for 5"):
        build_dataset(cfg({str(small): 5}))
    # Hub names fail fast offline, whether or not `datasets` is installed (no network is touched here).
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=5.0: False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    for datasets_module in ([] if importlib.util.find_spec("datasets") is None else [True]) + [None]:
        if datasets_module is None:
            monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
        with pytest.raises(DataError, match="Hugging Face dataset name.*network.*local copy") as err:
            build_dataset(cfg({"allenai/some-dataset": 10}))
        assert "no local file" not in str(err.value)
        # a name that looks like a file (not org/name) also says that no such file exists
        with pytest.raises(DataError, match=r"'data/train\.csv' is a Hugging Face dataset name.*no local file "
                                            r"'data/train\.csv' exists either.*\.jsonl, \.json, \.parquet"):
            build_dataset(cfg({"data/train.csv": None}))
    assert time.perf_counter() - start < 5
    hopeless = write_jsonl(tmp_path / "hopeless.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 3)
    with pytest.raises(DataError, match=r"source '.*hopeless\.jsonl': 3 of 3 rows taken \(100\.0%\) were dropped.*"
                                        r"3 no_assistant.*give every row an assistant turn"):
        build_dataset(cfg({str(hopeless): None}))
    with pytest.raises(DataError, match=r"all 3 rows were dropped \(no_assistant 3; first: '.*hopeless\.jsonl' row 0"):
        build_dataset(cfg({str(hopeless): None}, max_drop_fraction=1.0))
    long = write_jsonl(tmp_path / "long.jsonl", make_rows(4, max_words=200))
    with pytest.raises(DataError, match=r"no_labels_after_truncation.*raise data\.max_seq_length \(now 8\)"):
        build_dataset(cfg({str(long): None}, max_seq_length=8))
    schemaless = write_jsonl(tmp_path / "schemaless.jsonl", [{"text": "a", "label": 1}] * 5)
    with pytest.raises(DataError, match=r"5 malformed.*first: row 0: row keys \['label', 'text'\] match no schema"):
        build_dataset(cfg({str(schemaless): None}))
    with pytest.raises(DataError, match="write a hub dataset as org/name, org/name:split or org/name:config:split"):
        build_dataset(cfg({"org/name:a:b:c": None}))
    with pytest.raises(DataError, match="data.dev lists no sources"):
        build_dataset(cfg({str(small): None}), split="dev")


def test_hub_names_with_config_and_split():
    assert parse_hub_name("org/name") == ("org/name", None, "train")
    assert parse_hub_name("org/name:test") == ("org/name", None, "test")
    assert parse_hub_name("org/name:main:validation") == ("org/name", "main", "validation")
    assert parse_hub_name("org/name::test") == ("org/name", None, "test")
    for bad in ("org/name:", ":train", "org/name:a:", "org/name:a:b:c"):
        with pytest.raises(DataError, match="org/name:config:split"):
            parse_hub_name(bad)
    # The config and split are part of the cache key (a hub name is not read to compute it).
    assert (sources.source_fingerprint("org/name") == sources.source_fingerprint("org/name:train")
            != sources.source_fingerprint("org/name:c:train"))


def table_cells(out: str, source: str) -> list[str]:
    """The cells after `source` on its line of a printed per-source table."""
    line = next(line for line in out.splitlines() if line.startswith(f"{source} "))
    return line[len(source):].split()


def test_hub_source_reads_config_and_split(tmp_path, tok_dir, monkeypatch):
    """A hub name goes to datasets.load_dataset(name, config, split=...); the mixer selects from it like a file."""
    datasets = pytest.importorskip("datasets")
    rows = make_rows(12, tag="hub")
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    local = write_jsonl(tmp_path / "copy.jsonl", rows)
    hub_cfg = DataConfig(train={"org/name:sub:test": 5}, tokenizer=str(tok_dir), cache_dir=str(tmp_path / "c"))
    local_cfg = DataConfig(**{**vars(hub_cfg), "train": {str(local): 5}})
    hub, copy = build_dataset(hub_cfg), build_dataset(local_cfg)
    assert calls == [("org/name", "sub", "test")]
    assert [r[0].tolist() for r in records(hub)] == [r[0].tolist() for r in records(copy)]
    assert [(s.rows_read, s.rows_taken) for s in hub.source_stats] == [(12, 5)]


def test_max_drop_fraction_is_validated():
    from mft_jax.config import ConfigError

    DataConfig(max_drop_fraction=0).validate()
    for bad in (-0.1, 1.5, "1%"):
        with pytest.raises(ConfigError, match="data.max_drop_fraction must be a number in \\[0, 1\\]"):
            DataConfig(max_drop_fraction=bad).validate()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_source_losing_two_percent_fails_and_writes_nothing(tmp_path, tok_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", make_rows(50, tag="good"))
    lossy = write_jsonl(tmp_path / "lossy.jsonl", lossy_rows(100, 2))  # 2 of 100 rows dropped (no_assistant)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "keep.txt").write_text("not ours")
    cfg = DataConfig(train={str(good): None, str(lossy): 100}, tokenizer=str(tok_dir), cache_dir=str(cache))
    expected = (rf"data\.train source '{re.escape(str(lossy))}': 2 of 100 rows taken \(2\.0%\) were dropped, more "
                rf"than data\.max_drop_fraction=0\.01; 2 no_assistant \(.*first: row \d+: roles \['user'\]\); "
                rf"give every row an assistant turn, or set data\.max_drop_fraction=0\.02 to accept the loss$")
    with pytest.raises(DataError, match=expected):
        build_dataset(cfg, verbose=True)
    table = capsys.readouterr().out
    assert "data.train per source:" in table
    assert table_cells(table, str(good)) == ["50", "50", "50", "0", "0", "-"]
    assert table_cells(table, str(lossy)) == ["100", "100", "98", "2", "0", "no_assistant", "2"]
    with pytest.raises(DataError, match=expected):
        make_loader(cfg, None, "train", 4, process_index=0, process_count=1)
    # Nothing was written (TFDS removed its temporary directory), and nothing else was touched.
    assert _files_under(cache) == [cache / "keep.txt"] and (cache / "keep.txt").read_text() == "not ours"
    # Accepting the loss builds it; the fraction is not part of the cache key, so a stricter setting fails the
    # cache hit, and the table is printed on a hit too.
    accepted = DataConfig(**{**vars(cfg), "max_drop_fraction": 0.02})
    info = build_dataset(accepted)
    assert info.num_examples == 148 and not info.reused
    assert [(s.source, s.rows_read, s.rows_taken, s.kept, s.dropped) for s in info.source_stats] == [
        (str(good), 50, 50, 50, {}), (str(lossy), 100, 100, 98, {"no_assistant": 2})]
    assert build_dataset(DataConfig(**{**vars(cfg), "max_drop_fraction": 0.5}), verbose=True).reused
    out = capsys.readouterr().out
    assert "reused" in out and table_cells(out, "total") == ["150", "150", "148", "2", "0"]
    assert table_cells(out, str(lossy)) == ["100", "100", "98", "2", "0", "no_assistant", "2"]
    with pytest.raises(DataError, match=expected):
        build_dataset(cfg)
    with pytest.raises(DataError, match=expected):
        check_drops(info.source_stats, 0.01, "train")
    check_drops(info.source_stats, 0.02, "train")  # exactly at the limit passes


def test_failed_build_leaves_no_dataset(tmp_path, tok_dir, monkeypatch):
    from mft_jax.data import formatting

    path = write_jsonl(tmp_path / "a.jsonl", make_rows(40))
    cache = tmp_path / "cache"
    cfg = DataConfig(train={str(path): None}, tokenizer=str(tok_dir), cache_dir=str(cache))
    real = formatting.tokenize_rows

    def crash_midway(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 25:
                raise RuntimeError("disk on fire")
            yield item

    monkeypatch.setattr(formatting, "tokenize_rows", crash_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_dataset(cfg)
    assert _files_under(cache) == []
    monkeypatch.setattr(formatting, "tokenize_rows", real)
    info = build_dataset(cfg)
    assert not info.reused and info.num_examples == 40


# ------------------------------------------------------------------------------------------------------------
# Batches and packing
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["example", "token"])
def test_padded_batch_layout(corpus, reduction):
    cfg, info, _ = corpus
    cfg = DataConfig(**{**vars(cfg), "loss_reduction": reduction})
    loader = make_loader(cfg, None, "train", 8, shuffle=False, process_index=0, process_count=1)
    assert loader.batches_per_epoch == 120 // 8
    batch = next(loader)
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "inputs": ("int32", (8, 96)), "targets": ("int32", (8, 96)), "loss_weights": ("float32", (8, 96)),
        "positions": ("int32", (8, 96)), "segment_ids": ("int32", (8, 96))}
    for r, (ids_N, labels_N) in enumerate(records(info)[:8]):
        n = len(ids_N)
        np.testing.assert_array_equal(batch["inputs"][r, :n], ids_N)
        np.testing.assert_array_equal(batch["targets"][r, :n - 1], ids_N[1:])
        want_w = labels_N[1:] / (labels_N[1:].sum() if reduction == "example" else 1.0)
        # exact: 1 / count rounds once to float32 (float64 first, then float32, rounds the same: 53 >= 2 * 24 + 2)
        np.testing.assert_array_equal(batch["loss_weights"][r, :n - 1], want_w.astype(np.float32))
        np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
        np.testing.assert_array_equal(batch["segment_ids"][r, :n], 1)
        for key in ("inputs", "targets", "loss_weights", "positions", "segment_ids"):
            assert not batch[key][r, n:].any(), key
        assert batch["loss_weights"][r, n - 1] == 0


def test_packed_epochs_cover_every_document_once(corpus):
    cfg, info, _ = corpus
    cfg = DataConfig(**{**vars(cfg), "packing": True})
    loader = make_loader(cfg, None, "train", 4, num_epochs=2, drop_remainder=False, process_index=0,
                         process_count=1)
    assert loader.num_rows < 0.65 * info.num_examples  # several documents per row
    everything = collections.Counter(tuple(r[0].tolist()) for r in records(info))
    epochs = []
    for _ in range(2):
        docs = []
        for _ in range(loader.batches_per_epoch):
            batch = next(loader)
            docs += docs_of(batch)
            for r in range(4):
                segments_L, positions_L, weights_L = (batch[k][r] for k in ("segment_ids", "positions", "loss_weights"))
                used = int((segments_L > 0).sum())
                assert (segments_L[:used] > 0).all() and not segments_L[used:].any()  # documents first, then pad
                for segment in range(1, int(segments_L.max(initial=0)) + 1):
                    where = np.flatnonzero(segments_L == segment)
                    np.testing.assert_array_equal(positions_L[where], np.arange(len(where)))
                    # count copies of float32(1 / count) (each off by <= u), summed in float32: gamma_n
                    assert abs(float(weights_L[where].sum()) - 1.0) <= gamma(len(where))
                    assert weights_L[where[-1]] == 0  # a document's last token predicts nothing
        assert collections.Counter(docs) == everything
        epochs.append(docs)
    assert epochs[0] != epochs[1]  # rows are reshuffled every epoch
    with pytest.raises(StopIteration):
        next(loader)


def test_packed_logits_and_loss_equal_unpacked(corpus):
    model = pytest.importorskip("mft_jax.model")
    import jax
    import jax.numpy as jnp

    from mft_jax.config import LlamaConfig
    from mft_jax.data import assemble_batch

    cfg, info, _ = corpus
    loader = make_loader(DataConfig(**{**vars(cfg), "packing": True}), None, "train", 4, process_index=0,
                         process_count=1)
    batch = next(loader)
    # Two packed rows holding several documents each.
    rows = [r for r in range(4) if batch["segment_ids"][r].max() >= 2][:2]
    assert len(rows) == 2
    packed = {k: v[rows] for k, v in batch.items()}
    docs = []  # (row, positions in the row, ids_N, labels_N)
    stored = {tuple(ids_N.tolist()): labels_N for ids_N, labels_N in records(info)}
    for b in range(2):
        for segment in range(1, int(packed["segment_ids"][b].max()) + 1):
            where = np.flatnonzero(packed["segment_ids"][b] == segment)
            ids_N = packed["inputs"][b, where]
            docs.append((b, where, ids_N, stored[tuple(ids_N.tolist())]))
    # The same documents unpacked: one per row, padded.
    unpacked = assemble_batch([[(ids_N, labels_N)] for _, _, ids_N, labels_N in docs], 96, "example")

    vocab = int(max(r[0].max() for r in records(info))) + 1
    llama = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    # Random params with the init_params layout (shapes only: an eager flax init costs seconds on CPU);
    # large values make documents' logits clearly different, so leakage between them would show.
    shapes = jax.eval_shape(lambda: model.init_params(llama, jax.random.PRNGKey(0), jnp.float32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape) + (len(s.shape) == 1), s.dtype),
                          shapes)

    forward = jax.jit(model.forward, static_argnums=0)

    def logits(b):
        return np.asarray(forward(llama, params, *(jnp.asarray(b[k]) for k in ("inputs", "positions", "segment_ids"))))

    packed_BxLxV, unpacked_DxLxV = logits(packed), logits(unpacked)
    # other rows around each document: the attention sums (over 96 keys, others' exactly 0) and matmuls reorder
    logits_bound = rounding_bound(forward_length(llama, 96), np.abs(unpacked_DxLxV).max())
    for d, (b, where, _, _) in enumerate(docs):
        assert_close(packed_BxLxV[b, where], unpacked_DxLxV[d, :len(where)], logits_bound, f"document {d}")

    def weighted_nll(logits_BxLxV, b):
        logp_BxLxV = logits_BxLxV - logits_BxLxV.max(-1, keepdims=True)
        logp_BxLxV -= np.log(np.exp(logp_BxLxV).sum(-1, keepdims=True))
        nll_BxL = -np.take_along_axis(logp_BxLxV, b["targets"][..., None], -1)[..., 0]
        return np.where(b["loss_weights"] > 0, b["loss_weights"] * nll_BxL, 0.0)  # padding logits are unused

    packed_loss = weighted_nll(packed_BxLxV, packed).sum() / packed["loss_weights"].sum()
    per_example_means = weighted_nll(unpacked_DxLxV, unpacked).sum(-1)  # example weights: each row's mean
    labelled = (unpacked["loss_weights"] > 0).sum(-1)  # copies of float32(1 / count), summed in float32
    assert (np.abs(unpacked["loss_weights"].sum(-1) - 1.0) <= [gamma(c) for c in labelled]).all()
    # the NLLs move with the logits, then the weighted sums over the 2 x 96 positions run in other orders
    bound = mean_nll_bound(logits_bound, np.abs(unpacked_DxLxV).max(), vocab, packed["inputs"].size, packed_loss)
    assert_close(packed_loss, per_example_means.mean(), bound, "loss")


# ------------------------------------------------------------------------------------------------------------
# Resume, processes, checkpoints, global batch
# ------------------------------------------------------------------------------------------------------------

RESUME_SCRIPT = """
import json, sys
import numpy as np
from mft_jax.config import DataConfig
from mft_jax.data import sources
from mft_jax.data import make_loader
args = json.loads(open(sys.argv[1]).read())
loader = make_loader(DataConfig(**args["cfg"]), None, "train", args["batch_size"], process_index=0, process_count=1)
loader.set_state(args["state"])
batches = [next(loader) for _ in range(args["steps"])]
np.savez(args["out"], **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
"""


def test_resume_in_a_new_process_is_exact(corpus, tmp_path):
    cfg, _, _ = corpus
    cfg = DataConfig(**{**vars(cfg), "packing": True})
    loader = make_loader(cfg, None, "train", 3, process_index=0, process_count=1)
    # k crosses an epoch boundary on the way, so the per-epoch reshuffle is part of what must match.
    k = loader.batches_per_epoch + 1
    for _ in range(k):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(3)]
    (tmp_path / "args.json").write_text(json.dumps(
        {"cfg": vars(cfg), "batch_size": 3, "state": state, "steps": 3, "out": str(tmp_path / "out.npz")}))
    (tmp_path / "resume.py").write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, str(tmp_path / "resume.py"), str(tmp_path / "args.json")], check=True, env=env,
                   cwd=REPO, timeout=120)
    got = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            np.testing.assert_array_equal(got[f"{i}_{key}"], value, err_msg=f"batch {i} {key}")
    # A state from other settings is refused.
    other = make_loader(cfg, None, "train", 4, process_index=0, process_count=1)
    with pytest.raises(DataError, match="batch_size: saved 3, now 4"):
        other.set_state(state)


def test_grain_checkpoint_handler_round_trip(corpus, tmp_path):
    import grain

    cfg, _, _ = corpus
    loader = make_loader(cfg, None, "train", 4, process_index=0, process_count=1)
    for _ in range(5):
        next(loader)
    grain.checkpoint.CheckpointHandler().save(tmp_path, args=grain.checkpoint.CheckpointSave(loader))
    want = next(loader)
    fresh = make_loader(cfg, None, "train", 4, process_index=0, process_count=1)
    grain.checkpoint.CheckpointHandler().restore(tmp_path, args=grain.checkpoint.CheckpointRestore(fresh))
    got = next(fresh)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_read_disjoint_halves_of_each_global_batch(corpus, packing):
    cfg, info, _ = corpus
    cfg = DataConfig(**{**vars(cfg), "packing": packing})
    kw = dict(num_epochs=1, drop_remainder=False)
    procs = [make_loader(cfg, None, "train", 3, process_index=p, process_count=2, **kw) for p in range(2)]
    whole = make_loader(cfg, None, "train", 6, process_index=0, process_count=1, **kw)
    assert procs[0].batches_per_epoch == procs[1].batches_per_epoch == whole.batches_per_epoch
    seen = [[], []]
    for step in range(whole.batches_per_epoch):
        parts = [next(loader) for loader in procs]
        glued = next(whole)
        for key in glued:  # process p holds rows [3p, 3p + 3) of the global batch
            np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), glued[key])
        for p in range(2):
            seen[p] += docs_of(parts[p])
    assert not set(seen[0]) & set(seen[1])
    everything = collections.Counter(tuple(r[0].tolist()) for r in records(info))
    assert collections.Counter(seen[0] + seen[1]) == everything


def test_to_global_batch_over_all_devices(corpus):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    cfg, _, _ = corpus
    devices = jax.devices()
    batch = next(make_loader(cfg, None, "train", 2 * len(devices), process_index=0, process_count=1))
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    global_batch = to_global_batch(batch, sharding)
    for key, value in batch.items():
        assert global_batch[key].shape == value.shape and global_batch[key].dtype == value.dtype
        assert global_batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(global_batch[key]), value)
        assert global_batch[key].addressable_shards[-1].data.shape == (2, value.shape[1])


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------

def test_cli_build_and_inspect(tmp_path, tok_dir, capsys):
    import yaml

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(20) + [{"messages": []}])
    dev = write_jsonl(tmp_path / "dev.jsonl", make_rows(5, seed=9, tag="dev"))
    config = {"model": {"path": str(tok_dir)}, "mask": {"masked_layers": [0]},
              "data": {"train": {str(train): None}, "dev": {str(dev): None}, "max_seq_length": 128,
                       "cache_dir": str(tmp_path / "cache"), "max_drop_fraction": 0.05}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser(prog="mft-jax")
    add_data_commands(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["data", "build", "--config", str(tmp_path / "run.yaml")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "train: 20 examples" in out and "1 dropped (empty 1)" in out and "dev: 5 examples" in out
    assert "data.train per source:" in out and "data.dev per source:" in out
    assert table_cells(out, str(train)) == ["21", "21", "20", "1", "0", "empty", "1"]

    # a YAML flow map typed without a space after the colon still names the local file (not a hub dataset)
    args = parser.parse_args(["data", "build", "--config", str(tmp_path / "run.yaml"), "--set",
                              f"data.train={{{train}:null}}"])
    assert args.func(args) == 0
    assert "train: 20 examples" in capsys.readouterr().out

    args = parser.parse_args(["data", "inspect", "--config", str(tmp_path / "run.yaml"), "--split", "dev",
                              "--set", "data.packing=true"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dev: 5 examples" in out and "reused" in out and "tokens per example: min" in out
    assert "<|user|>\ndev 0 turn 0:" in out and "[[" in out and "</s>]]" in out
