"""Benchmark of the SFT data pipeline: tokenize + write the TFDS cache, then read packed 2048-token batches.

    python bench/data_loader.py [--examples 20000] [--seq-len 2048] [--batch-size 16] [--batches 200]

Makes a synthetic chat dataset (a few hundred to a few thousand tokens per example, like SFT mixtures), trains a
small BPE tokenizer on it, builds the cache in a temporary directory and prints:
  build:  examples/s and tokens/s of tokenization + array_record writing
  loader: batches/s and tokens/s (row tokens = B * L per batch; document tokens = non-padding ones)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mft_jax.config import DataConfig  # noqa: E402
from mft_jax.data import build_dataset, make_loader, train_bpe_tokenizer  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by this are or from at which but not have an "
         "they one you all were we can there their has more if will would about so what when up out into "
         "number two three four five plus minus equals answer step first then solve def return print code").split()


def synthetic_rows(num_examples: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(num_words):
        return " ".join(rng.choice(WORDS) for _ in range(num_words))

    rows = []
    for i in range(num_examples):
        turns = [{"role": "system", "content": "You are a helpful assistant."}] if i % 4 == 0 else []
        for _ in range(rng.choice((1, 1, 1, 2))):
            turns.append({"role": "user", "content": f"Question {i}: " + text(rng.randint(10, 200))})
            turns.append({"role": "assistant", "content": text(int(rng.lognormvariate(5.0, 0.9)) + 5)})
        rows.append({"messages": turns})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch")
    parser.add_argument("--batches", type=int, default=200, help="batches to time")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = synthetic_rows(args.examples)
        with open(tmp / "train.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        start = time.perf_counter()
        tokenizer = train_bpe_tokenizer((m["content"] for row in rows[:3000] for m in row["messages"]), 4096,
                                        tmp / "tokenizer")
        print(f"tokenizer: trained in {time.perf_counter() - start:.2f} s")
        cfg = DataConfig(train={str(tmp / "train.jsonl"): None}, tokenizer=str(tokenizer),
                         max_seq_length=args.seq_len, packing=True, cache_dir=str(tmp / "cache"),
                         num_workers=args.num_workers)
        start = time.perf_counter()
        info = build_dataset(cfg)
        seconds = time.perf_counter() - start
        print(f"build: {info.num_examples} examples, {info.num_tokens} tokens in {seconds:.2f} s "
              f"({info.num_examples / seconds:,.0f} examples/s, {info.num_tokens / seconds:,.0f} tokens/s, "
              f"including the tokenizer load)")

        start = time.perf_counter()
        loader = make_loader(cfg, None, "train", args.batch_size, process_index=0, process_count=1)
        print(f"loader: {loader.num_rows} packed rows of {args.seq_len} "
              f"({info.num_tokens / (loader.num_rows * args.seq_len):.1%} filled), {loader.batches_per_epoch} "
              f"batches per epoch; set up in {time.perf_counter() - start:.2f} s")
        next(loader)  # warm-up: opens the data source, starts the prefetch threads
        start = time.perf_counter()
        document_tokens = 0
        for _ in range(args.batches):
            batch = next(loader)
            document_tokens += int((batch["segment_ids"] > 0).sum())
        seconds = time.perf_counter() - start
        row_tokens = args.batches * args.batch_size * args.seq_len
        print(f"loader: {args.batches} batches of {args.batch_size}x{args.seq_len} in {seconds:.2f} s: "
              f"{args.batches / seconds:,.1f} batches/s, {row_tokens / seconds:,.0f} row tokens/s, "
              f"{document_tokens / seconds:,.0f} document tokens/s")
        loader.close()


if __name__ == "__main__":
    main()
