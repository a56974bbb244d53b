"""What every task shares: the model bundle it runs on, the task interface, generation settings, errors.

A task is built with its options (data paths), then `load(limit)` reads its examples and `run(model)`
returns a flat dict of metric name -> number. Generation tasks only write `prompts()` and
`score(completions)`; `run` decodes the prompts greedily with the task's own `Generation` settings and
scores the completions. Per-example details land in `task.records` for the samples file.

Prompt encoding follows the olmes harness with vLLM, as the paper's authors ran it
(`olmes/oe_eval/models/eleuther_vllm_causallms.py` in the reference mirror):
- no BOS: the wrapper encodes every context with `tokenizer(contexts, add_special_tokens=False)` (line 77),
  and olmes's model default is `add_bos_token: False` (`oe_eval/default_configs.py:16`); no task used here
  asks for one, so `Generation.add_bos` is False for all of them;
- the context window is `max_length` = 2048 tokens (`default_configs.py:9`, passed to vLLM as
  `max_model_len`): a prompt keeps its last `max_length - max_new_tokens` tokens (lines 138-160);
- the tokenizer's EOS text is appended to the task's stop sequences (lines 125-130) and the text is cut
  before the first stop sequence (`oe_eval/utils.py:cut_at_stop_sequence`); decoding is greedy.

Several processes (hosts): each holds a whole model copy on a mesh of its own devices (`commands.eval_mesh`),
generates a contiguous share of every call's prompts (`distributed.process_share`, so the order is kept) and
the texts are gathered to every process (`distributed.allgather_texts`); process 0 alone scores (a task's
`run` returns {} elsewhere) and `evaluate` hands its metrics to the others (`distributed.broadcast_json`), so
every process returns the same results.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mft_jax.config import ConfigError, LlamaConfig
from mft_jax.distributed import allgather_texts, process_share
from mft_jax.generate import generate_text

OLMES_MAX_LENGTH = 2048  # olmes's model max_length: prompt + new tokens fit in it


class EvalError(ConfigError):
    """A task name, data file or eval option is wrong; the one-line message names it and the fix."""


def check_local_mesh(mesh) -> None:
    """With several processes each evaluates on a mesh of its own devices (a whole model copy per host)."""
    if jax.process_count() > 1 and mesh is not None and not all(
            d.process_index == jax.process_index() for d in mesh.devices.flat):
        raise EvalError(f"evaluation with {jax.process_count()} processes needs each process's mesh to hold only its "
                        f"own devices (as `eval` builds it); this one spans processes")


@dataclasses.dataclass(frozen=True)
class Generation:
    """How a task decodes: at most `max_new_tokens`, cut before the first of `stop_strings`, BOS or not."""

    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    add_bos: bool = False


@dataclasses.dataclass
class EvalModel:
    """A model ready to evaluate: config, params (masks already applied), tokenizer and decode settings.

    max_new_tokens: None = each task's own; a number overrides every task's (quick runs).
    max_length: the context window (prompt + new tokens); longer prompts keep their last tokens. None = no
    limit.
    """

    cfg: LlamaConfig
    params: Any
    tokenizer: Any = None  # a Hugging Face fast tokenizer (None only for tasks that need none)
    tokenizer_dir: str | None = None
    compute_dtype: Any = jnp.bfloat16
    batch_size: int = 8
    max_new_tokens: int | None = None
    mesh: Any = None  # a jax.sharding.Mesh to split generation batches over its "data" axis
    max_length: int | None = OLMES_MAX_LENGTH
    progress: bool = False  # a progress bar per generation call (prompts done, new tokens/s, ETA) on stderr

    def complete(self, prompts: Sequence[str], *, stop_strings: Sequence[str] = (),
                 max_new_tokens: int | None = None, add_bos: bool = False) -> list[str]:
        """Greedy continuations of text prompts (no BOS unless `add_bos`), cut before the first stop string.
        max_new_tokens: this call's limit (default: the model's `max_new_tokens`).
        With several processes every process calls it with the same prompts: each decodes its share
        (`process_share`) and every process returns all the texts, in order."""
        if self.tokenizer is None:
            raise EvalError("this task generates text and needs a tokenizer; the model directory has none "
                            "(pass --tokenizer DIR)")
        max_new_tokens = max_new_tokens or self.max_new_tokens
        if not max_new_tokens:
            raise ValueError("EvalModel.complete needs max_new_tokens (the call's or the model's)")
        check_local_mesh(self.mesh)
        eos = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:  # a tokenizer may end turns with its own EOS
            eos.add(self.tokenizer.eos_token_id)
        share = process_share(len(prompts))
        label = "generate" if jax.process_count() == 1 else f"generate (process {jax.process_index()})"
        texts = generate_text(self.cfg, self.params, self.tokenizer, list(prompts)[share], add_bos=add_bos,
                              max_prompt_tokens=self.prompt_budget(max_new_tokens), max_new_tokens=max_new_tokens,
                              eos_ids=sorted(eos), stop_strings=list(stop_strings) or None,
                              compute_dtype=self.compute_dtype, batch_size=self.batch_size, mesh=self.mesh,
                              progress=label if self.progress else None)
        return allgather_texts(texts)

    def prompt_budget(self, max_new_tokens: int) -> int | None:
        """Prompt tokens that fit in the context window next to `max_new_tokens` (None: no window)."""
        if self.max_length is None:
            return None
        if max_new_tokens >= self.max_length:
            raise EvalError(f"max new tokens ({max_new_tokens}) must be below the context window "
                            f"max_length ({self.max_length}); lower --max-new-tokens or raise --max-length")
        return self.max_length - max_new_tokens

    def truncated_prompts(self, prompts: Sequence[str], settings: Generation) -> int:
        """How many prompts lose their first tokens to the context window under `settings`."""
        budget = self.prompt_budget(self.max_new_tokens or settings.max_new_tokens)
        if budget is None or not prompts:
            return 0
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return sum(len(ids) + settings.add_bos > budget for ids in encoded)

    def generate(self, prompts: Sequence[str], settings: Generation) -> list[str]:
        """A task's prompts with its settings (the model's max_new_tokens overrides) plus, as olmes's vLLM
        wrapper does, the tokenizer's EOS text as one more stop string."""
        stops = list(settings.stop_strings)
        eos_text = getattr(self.tokenizer, "eos_token", None)
        if eos_text and eos_text not in stops:
            stops.append(eos_text)
        return self.complete(prompts, stop_strings=stops, add_bos=settings.add_bos,
                             max_new_tokens=self.max_new_tokens or settings.max_new_tokens)


class Task:
    """Base task. Subclasses set `name` and implement `load` and `run` (or `prompts` and `score`)."""

    name: str = ""
    primary_metric: str = ""  # the metric olmes reports as the task's primary score

    def __init__(self):
        self.records: list[dict] = []

    def load(self, limit: int | None = None) -> "Task":
        raise NotImplementedError

    def run(self, model: EvalModel) -> dict[str, float]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class GenerationTask(Task):
    """Greedy generation with the task's `generation` settings, then scoring."""

    generation: Generation = Generation(max_new_tokens=512)

    def prompts(self) -> list[str]:
        raise NotImplementedError

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        raise NotImplementedError

    def run(self, model: EvalModel) -> dict[str, float]:
        """The metrics; with several processes each generates its share, process 0 alone scores (HumanEval's
        programs run once) and the others return {} (`evaluate` hands them process 0's metrics)."""
        prompts = self.prompts()
        completions = model.generate(prompts, self.generation)
        if jax.process_index() != 0:
            return {}
        metrics = self.score(completions)
        metrics["truncated_prompts"] = model.truncated_prompts(prompts, self.generation)
        return metrics


def take(rows: list, limit: int | None) -> list:
    """The first `limit` rows (olmes samples `limit` rows at random instead; only quick runs use a limit)."""
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit must be > 0, got {limit}")
    return rows if limit is None else rows[:limit]


def with_primary(metrics: dict, primary: str) -> dict:
    """`metrics` plus "primary_score", the value olmes reports as the task's primary score."""
    return {**metrics, "primary_score": metrics[primary]}
