"""What every task shares: the model bundle it runs on and the task interface.

A task is built with its options (data paths), then `load(limit)` reads its examples and `run(model)`
returns a flat dict of metric name -> number. Generation tasks only write `prompts()` and
`score(completions)`; `run` decodes the prompts greedily (the paper's protocol: plain prompts, no chat
template) and scores the completions. Per-example details land in `task.records` for the samples file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

from mft_jax.config import LlamaConfig


@dataclasses.dataclass
class EvalModel:
    """A model ready to evaluate: config, params (masks already applied), tokenizer and decode settings."""

    cfg: LlamaConfig
    params: Any
    tokenizer: Any = None  # a Hugging Face fast tokenizer (None only for tasks that need none)
    tokenizer_dir: str | None = None
    compute_dtype: Any = jnp.bfloat16
    batch_size: int = 8
    max_new_tokens: int = 512
    mesh: Any = None  # a jax.sharding.Mesh to split generation batches over its "data" axis

    def complete(self, prompts: Sequence[str], *, stop_strings: Sequence[str] = (),
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations of text prompts, cut before the first stop string."""
        from mft_jax.generate import generate_text

        if self.tokenizer is None:
            raise ValueError("this task generates text and needs a tokenizer; the model directory has none")
        eos = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:  # a tokenizer may end turns with its own EOS
            eos.add(self.tokenizer.eos_token_id)
        return generate_text(self.cfg, self.params, self.tokenizer, list(prompts),
                             max_new_tokens=max_new_tokens or self.max_new_tokens, eos_ids=sorted(eos),
                             stop_strings=list(stop_strings) or None, compute_dtype=self.compute_dtype,
                             batch_size=self.batch_size, mesh=self.mesh)


class Task:
    """Base task. Subclasses set `name` and implement `load` and `run` (or `prompts` and `score`)."""

    name: str = ""

    def __init__(self):
        self.records: list[dict] = []

    def load(self, limit: int | None = None) -> "Task":
        raise NotImplementedError

    def run(self, model: EvalModel) -> dict[str, float]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class GenerationTask(Task):
    """Greedy generation then scoring; `stop_strings` end a completion (the model sets max_new_tokens)."""

    stop_strings: tuple[str, ...] = ()

    def prompts(self) -> list[str]:
        raise NotImplementedError

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        raise NotImplementedError

    def run(self, model: EvalModel) -> dict[str, float]:
        completions = model.complete(self.prompts(), stop_strings=self.stop_strings)
        return self.score(completions)


def take(rows: list, limit: int | None) -> list:
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 or None, got {limit}")
    return rows if limit is None else rows[:limit]
