"""The demo's task: two-step arithmetic word problems with worked solutions, scored by exact match.

Train / dev / test splits in the "messages" format with an "answer" field; questions never repeat across
splits. The answer is the last number of the completion (as GSM8K's extraction).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mft_jax.data import format_tulu

_NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon")
_ITEMS = ("apples", "books", "coins", "marbles", "pens", "stickers", "cards", "shells")


def make_problem(rng: np.random.Generator, max_operand: int) -> dict:
    """One word problem: start with a, then two changes (+ or -), never going below zero."""
    name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
    total = int(rng.integers(1, max_operand + 1))
    clauses, steps = [], []
    for _ in range(2):
        n = int(rng.integers(1, max_operand + 1))
        if rng.random() < 0.5 or n > total:
            clauses.append(f"finds {n} more")
            steps.append(f"{total} + {n} = {total + n}.")
            total += n
        else:
            clauses.append(f"gives away {n}")
            steps.append(f"{total} - {n} = {total - n}.")
            total -= n
    start = steps[0].split(" ")[0]
    question = (f"{name} has {start} {item}. {name} {clauses[0]}, then {clauses[1]}. "
                f"How many {item} does {name} have now?")
    answer = " ".join(steps) + f" The answer is {total}."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer": total}


def make_task(out: Path, seed: int, task_cfg: dict) -> dict[str, Path]:
    """Writes train/dev/test .jsonl (disjoint questions) under OUT; returns their paths."""
    rng = np.random.default_rng(seed)
    sizes = {"train": task_cfg["train_examples"], "dev": task_cfg["dev_examples"], "test": task_cfg["test_examples"]}
    seen, splits = set(), {}
    for split, size in sizes.items():
        rows = []
        while len(rows) < size:
            row = make_problem(rng, task_cfg["max_operand"])
            key = row["messages"][0]["content"]
            if key not in seen:
                seen.add(key)
                rows.append(row)
        splits[split] = out / f"{split}.jsonl"
        splits[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return splits


def last_number(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


def prompt(row: dict) -> str:
    """The question as the model sees it: the tulu chat format up to the assistant's turn."""
    return format_tulu(row["messages"][:1], add_generation_prompt=True)


def accuracy(eval_model, rows: list[dict], max_new_tokens: int) -> float:
    """Exact match of the last number of the greedy completion with the answer."""
    prompts = [prompt(r) for r in rows]
    completions = eval_model.complete(prompts, max_new_tokens=max_new_tokens)
    return float(np.mean([last_number(c) == r["answer"] for c, r in zip(completions, rows)]))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
