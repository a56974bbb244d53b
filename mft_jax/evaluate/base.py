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
generates a contiguous share of every call's prompts (`process_share`, so the order is kept) and the texts are
gathered to every process (`allgather_texts`); process 0 alone scores (a task's `run` returns {} elsewhere) and
`evaluate` hands its metrics to the others (`broadcast_json`), so every process returns the same results.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mft_jax.config import ConfigError, LlamaConfig
from mft_jax.generate import generate_text

OLMES_MAX_LENGTH = 2048  # olmes's model max_length: prompt + new tokens fit in it


class EvalError(ConfigError):
    """A task name, data file or eval option is wrong; the one-line message names it and the fix."""


def process_share(n: int, index: int | None = None, count: int | None = None) -> slice:
    """The contiguous part of `n` items (prompts, batches) that process `index` of `count` handles (default: this
    process of all); the parts differ by at most one item and, in process order, are the items in order."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return slice(index * n // count, (index + 1) * n // count)


def check_local_mesh(mesh) -> None:
    """With several processes each evaluates on a mesh of its own devices (a whole model copy per host)."""
    if jax.process_count() > 1 and mesh is not None and not all(
            d.process_index == jax.process_index() for d in mesh.devices.flat):
        raise EvalError(f"evaluation with {jax.process_count()} processes needs each process's mesh to hold only its "
                        f"own devices (as `eval` builds it); this one spans processes")


def allgather_texts(texts: Sequence[str]) -> list[str]:
    """Every process's `texts`, concatenated in process order, on every process (one process: `texts`).
    Every process must call it (it is a collective): lengths first, then the UTF-8 bytes, padded to one size."""
    if jax.process_count() == 1:
        return list(texts)
    encoded = [t.encode("utf-8") for t in texts]
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(encoded)], np.int32))).reshape(-1)
    lengths = np.zeros(max(int(counts.max()), 1), np.int32)
    lengths[:len(encoded)] = [len(b) for b in encoded]
    all_lengths = np.asarray(multihost_utils.process_allgather(lengths))  # [P, most texts of a process]
    joined = b"".join(encoded)
    buffer = np.zeros(max(int(all_lengths.sum(axis=1).max()), 1), np.uint8)
    buffer[:len(joined)] = np.frombuffer(joined, np.uint8)
    all_bytes = np.asarray(multihost_utils.process_allgather(buffer))  # [P, most bytes of a process]
    out = []
    for p, count in enumerate(counts):
        data, offset = all_bytes[p].tobytes(), 0
        for length in all_lengths[p, :count]:
            out.append(data[offset:offset + length].decode("utf-8"))
            offset += int(length)
    return out


def broadcast_json(value):
    """Process 0's `value` (anything JSON can hold) on every process, as JSON reads it back; process 0 gets its
    own object. One process: `value`. Every process must call it (it is a collective)."""
    if jax.process_count() == 1:
        return value
    data = json.dumps(value).encode("utf-8") if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    buffer = np.zeros(max(size, 1), np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return value if jax.process_index() == 0 else json.loads(received[:size].tobytes().decode("utf-8"))


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
