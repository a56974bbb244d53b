"""The demo's arithmetic task as a registered benchmark: exact match of the last number of a greedy answer.

Data: a JSONL file of chat rows `{"messages": [{"role": "user", ...}, ...], "answer": N}`, such as the
`test.jsonl` / `dev.jsonl` that `mft-jax demo` writes (`--arith-data FILE`). The prompt is the first (user)
message in the tulu format with the assistant prefix, as the model was trained; the metric is the demo's own
(`mft_jax.demo.task.accuracy`): the last integer of the completion equals the answer (`last_number`).
Decoding: greedy, at most 40 new tokens (the demo's `eval.max_new_tokens`), stopping at EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from mft_jax.demo import task as demo_task
from mft_jax.evaluate.base import EvalError, Generation, GenerationTask, take, with_primary

GENERATION = Generation(max_new_tokens=40)


def read_rows(path: str | Path | None) -> list[dict]:
    """The rows of an arith JSONL file; each needs a first user message and an integer "answer"."""
    if path is None:
        raise EvalError("the arith task needs its data: pass --arith-data FILE (a JSONL of messages rows with an "
                        "\"answer\" field, e.g. the test.jsonl that `mft-jax demo` writes)")
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"arith data file {str(path)!r} does not exist; pass an existing JSONL file (--arith-data)")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"arith data {str(path)!r}, line {line_no}: not valid JSON ({e.msg})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not (messages and isinstance(row.get("answer"), int) and messages[0].get("role") == "user"):
            raise EvalError(f"arith data {str(path)!r}, line {line_no}: rows need \"messages\" starting with a "
                            f"user turn and an integer \"answer\" (as the demo's test.jsonl)")
        rows.append(row)
    if not rows:
        raise EvalError(f"arith data {str(path)!r} has no rows")
    return rows


class Arith(GenerationTask):
    name = "arith"
    primary_metric = "accuracy"
    generation = GENERATION

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = path
        self.rows = read_rows(path)  # a missing or malformed file fails here, before any model loads

    def load(self, limit: int | None = None) -> "Arith":
        self.rows = take(read_rows(self.path), limit)
        return self

    def __len__(self) -> int:
        return len(self.rows)

    def prompts(self) -> list[str]:
        return [demo_task.prompt(r) for r in self.rows]

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        if len(completions) != len(self.rows):
            raise ValueError(f"arith: {len(completions)} completions for {len(self.rows)} rows")
        answer = demo_task.last_number
        self.records = [{"question": r["messages"][0]["content"], "completion": c, "predicted": answer(c),
                         "target": r["answer"], "correct": answer(c) == r["answer"]}
                        for r, c in zip(self.rows, completions)]
        correct = sum(r["correct"] for r in self.records)
        return with_primary({"accuracy": correct / max(len(self.records), 1), "n": len(self.records)},
                            self.primary_metric)
