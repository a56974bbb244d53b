"""Synthetic SFT data for the data tests: chat rows, JSONL files and a small BPE tokenizer, all made offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the a cat dog sat on mat what is two plus three four five six seven eight answer equals and you are "
         "terse question hello world def return print code solve step first then number").split()


def sentence(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def make_rows(num_rows: int, seed: int = 0, tag: str = "row", max_words: int = 40) -> list[dict]:
    """Chat rows in the "messages" layout; every row's text is unique (it names `{tag} {i}`), a quarter of
    them have a system prompt and a quarter have two user/assistant exchanges."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        turns = [{"role": "system", "content": "You are terse."}] if i % 4 == 0 else []
        for turn in range(2 if i % 4 == 1 else 1):
            question = sentence(rng, rng.randint(2, max_words))
            turns.append({"role": "user", "content": f"{tag} {i} turn {turn}: {question}"})
            turns.append({"role": "assistant", "content": sentence(rng, rng.randint(1, max_words))})
        rows.append({"messages": turns})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path = Path(path)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def tokenizer_corpus() -> list[str]:
    rng = random.Random(1)
    texts = [sentence(rng, rng.randint(3, 30)) for _ in range(2000)]
    return texts + [f"row {i} turn {t}:" for i in range(200) for t in range(2)] + ["What is two plus three?"]
