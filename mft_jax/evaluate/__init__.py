"""Benchmark tasks and the runner: held-out loss, GSM8K, HumanEval(+), IFEval, MATH, as the paper's authors ran
them with the olmes harness (MFT.md; each task module says what olmes does and where).

Modules: `base` (EvalModel, the Task interface, Generation settings, EvalError), one module per task
(`loss`, `gsm8k`, `humaneval`, `ifeval`, `minerva_math`; `arith`, the demo's task), `sandbox` (runs generated
code in limited child processes), `commands` (the `eval` and `generate` CLI commands). `evaluate(model, tasks)`
runs tasks and returns {task: {metric: value}}; `format_table` prints them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import jax

from mft_jax.evaluate.arith import Arith
from mft_jax.distributed import broadcast_json
from mft_jax.evaluate.base import EvalError, EvalModel, Generation, GenerationTask, Task
from mft_jax.evaluate.gsm8k import GSM8K
from mft_jax.evaluate.humaneval import HumanEval, HumanEvalPlus
from mft_jax.evaluate.ifeval import IFEval
from mft_jax.evaluate.loss import Loss
from mft_jax.evaluate.minerva_math import MATH

TASKS = {"loss": Loss, "gsm8k": GSM8K, "humaneval": HumanEval, "humanevalplus": HumanEvalPlus, "ifeval": IFEval,
         "math": MATH, "arith": Arith}


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise EvalError(f"unknown or no tasks {unknown or names} in --tasks; choose from {sorted(TASKS)}, "
                        f"comma-separated")
    return names


def evaluate(model: EvalModel, tasks: Sequence[Task], *, limit: int | None = None,
             samples_dir: str | Path | None = None, verbose: bool = True, load: bool = True) -> dict[str, dict]:
    """Loads (unless `load` is False: already loaded) and runs each task; returns {task name: metrics}. With
    `samples_dir`, writes each task's per-example records to `samples_dir/<task>.jsonl`.

    With several processes every process calls it with the same tasks: each generates its share of the prompts
    (the loss task: of the batches), process 0 scores, prints and writes the samples, and every process returns
    process 0's metrics."""
    results = {}
    writer = jax.process_index() == 0
    verbose = verbose and writer
    for task in tasks:
        start = time.perf_counter()
        if load:
            task.load(limit)
        if verbose:
            print(f"[eval] {task.name}: {len(task) or 'all'} examples", flush=True)
        metrics = task.run(model)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        metrics = broadcast_json(metrics)  # process 0's (only it scores generation tasks); a no-op on one process
        results[task.name] = metrics
        if samples_dir is not None and task.records and writer:
            path = Path(samples_dir) / f"{task.name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for record in task.records:
                    f.write(json.dumps(record, default=str) + "\n")
        if verbose:
            print(format_table({task.name: metrics}), flush=True)
    return results


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: task | metric | value."""
    rows = [(task, metric, f"{value:.4f}" if isinstance(value, float) else str(value))
            for task, metrics in results.items() for metric, value in metrics.items()]
    widths = [max(len(r[i]) for r in rows + [("task", "metric", "value")]) for i in range(3)]
    lines = [f"{'task':<{widths[0]}}  {'metric':<{widths[1]}}  {'value':>{widths[2]}}"]
    lines += [f"{t:<{widths[0]}}  {m:<{widths[1]}}  {v:>{widths[2]}}" for t, m, v in rows]
    return "\n".join(lines)


def add_eval_commands(subparsers):
    """Registers `eval` and `generate` on an argparse subparsers object (each sets `func`)."""
    from mft_jax.evaluate.commands import add_eval_commands as add  # local: commands imports this package (cycle)

    return add(subparsers)


__all__ = ["Arith", "EvalError", "EvalModel", "GSM8K", "Generation", "GenerationTask", "HumanEval", "HumanEvalPlus",
           "IFEval", "Loss", "MATH", "TASKS", "Task", "add_eval_commands", "evaluate", "format_table", "parse_tasks"]
