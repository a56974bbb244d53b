"""Synthetic SFT data for the data tests: chat rows, JSONL files and a small BPE tokenizer, all made offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the a cat dog sat on mat what is two plus three four five six seven eight answer equals and you are "
         "terse question hello world def return print code solve step first then number").split()


def sentence(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def make_rows(num_rows: int, seed: int = 0, tag: str = "row", max_words: int = 40) -> list[dict]:
    """Chat rows in the "messages" layout; every row's text is unique (it names `{tag} {i}`), a quarter of
    them have a system prompt and a quarter have two user/assistant exchanges."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        turns = [{"role": "system", "content": "You are terse."}] if i % 4 == 0 else []
        for turn in range(2 if i % 4 == 1 else 1):
            question = sentence(rng, rng.randint(2, max_words))
            turns.append({"role": "user", "content": f"{tag} {i} turn {turn}: {question}"})
            turns.append({"role": "assistant", "content": sentence(rng, rng.randint(1, max_words))})
        rows.append({"messages": turns})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path = Path(path)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def tokenizer_corpus() -> list[str]:
    rng = random.Random(1)
    texts = [sentence(rng, rng.randint(3, 30)) for _ in range(2000)]
    return texts + [f"row {i} turn {t}:" for i in range(200) for t in range(2)] + ["What is two plus three?"]


def lossy_rows(num_rows: int = 100, num_dropped: int = 2, seed: int = 0, tag: str = "lossy") -> list[dict]:
    """`num_rows` chat rows of which exactly `num_dropped` are dropped when built (their only turn is a user turn:
    reason no_assistant), spread through the file. With the defaults the source loses 2% of its rows, more than
    the default data.max_drop_fraction (0.01), so building or training on it fails."""
    rows = make_rows(num_rows - num_dropped, seed=seed, tag=tag)
    step = max(num_rows // max(num_dropped, 1), 1)
    for k in range(num_dropped):
        rows.insert(min(k * step + step // 2, len(rows)), {"messages": [{"role": "user", "content": f"{tag} q{k}"}]})
    return rows


ALPACA_HEAD = ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n")


def _chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# One row per supported schema, with the messages it must convert to (derived from the reference's converters
# where it has one). Contents keep their whitespace.
SCHEMA_CASES = [
    ("messages", {"messages": _chat(("system", "Be brief."), ("user", " hi "), ("assistant", "yo\n"))},
     _chat(("system", "Be brief."), ("user", " hi "), ("assistant", "yo\n"))),
    ("alpaca", {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
     _chat(("user", ALPACA_HEAD + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:"),
           ("assistant", "5"))),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi"},  # empty input: the section stays
     _chat(("user", ALPACA_HEAD + "### Instruction:\nSay hi.\n\n### Input:\n\n\n### Response:"), ("assistant", "hi"))),
    ("prompt_completion", {"prompt": "2+2=", "completion": "4"}, _chat(("user", "2+2="), ("assistant", "4"))),
    ("prompt_completion", {"prompt": _chat(("system", "s"), ("user", "q")), "completion": _chat(("assistant", "a"))},
     _chat(("system", "s"), ("user", "q"), ("assistant", "a"))),
    ("conversations", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "a"}, {"from": "User", "value": "q2"},
                                         {"from": "Assistant", "value": "a2"}]},
     _chat(("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2"))),
    ("open_orca", {"system_prompt": "You are helpful.", "question": "q", "response": "a"},
     _chat(("system", "You are helpful."), ("user", "q"), ("assistant", "a"))),
    ("open_orca", {"system_prompt": "", "question": "q", "response": "a"},  # present but empty: kept
     _chat(("system", ""), ("user", "q"), ("assistant", "a"))),
    ("open_orca", {"question": "q", "response": "a"}, _chat(("user", "q"), ("assistant", "a"))),
    ("query_answer", {"query": "q", "answer": "a"}, _chat(("user", "q"), ("assistant", "a"))),
    ("query_response", {"query": "q", "response": "a"}, _chat(("user", "q"), ("assistant", "a"))),
    ("prompt_response", {"prompt": "q", "response": "a"}, _chat(("user", "q"), ("assistant", "a"))),
    ("inputs_targets", {"inputs": "q", "targets": "a"}, _chat(("user", "q"), ("assistant", "a"))),
    ("chosen", {"chosen": _chat(("user", "q"), ("assistant", "good")), "rejected": _chat(("user", "q"),
                                                                                        ("assistant", "bad"))},
     _chat(("user", "q"), ("assistant", "good"))),
    # Roles in any case and the aliases, in a messages row.
    ("messages", {"messages": [{"role": "SYSTEM", "content": "s"}, {"role": "Human", "content": "q"},
                               {"role": "bot", "content": "a"}, {"role": "User", "content": "q2"},
                               {"role": "model", "content": "a2"}, {"role": "user", "content": None},
                               {"role": "Assistant", "content": ""}]},
     _chat(("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2"), ("user", ""),
           ("assistant", ""))),
    # messages wins over every other layout; a null column counts as absent.
    ("messages", {"messages": _chat(("user", "m"), ("assistant", "n")), "prompt": "p", "completion": "c",
                  "instruction": "i", "output": "o"}, _chat(("user", "m"), ("assistant", "n"))),
    ("conversations", {"messages": None, "conversations": [{"from": "human", "value": "q"},
                                                           {"from": "gpt", "value": "a"}]},
     _chat(("user", "q"), ("assistant", "a"))),
]
