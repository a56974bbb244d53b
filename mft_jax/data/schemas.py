"""Row schemas: one source row, in any layout users bring, -> a conversation [{"role", "content"}].

The schema is detected per row; the first match wins, in this order (the reference's converters in the order its
`get_datasets` tries them, then ours). A key whose value is null counts as absent, so a Parquet file that mixes
layouts (nulls in the other layouts' columns) is read row by row.

  messages                  [{role, content}] as is (preferred whenever present, as in the reference)
  instruction + output      alpaca: one user turn (`ALPACA_PROMPT` with instruction and input) + the output.
                            As the reference, the "### Input:" section is written even when input is empty
                            (a missing input counts as empty).
  prompt + completion       strings (user, assistant) or message lists (conversational prompt-completion)
  conversations             ShareGPT [{from, value}]
  question + response       open-orca: a system turn with system_prompt when that key is present (even when
                            empty, as the reference), then user, assistant
  query + answer            user, assistant
  query + response          user, assistant
  prompt + response         user, assistant (ours)
  inputs + targets          user, assistant (ours)
  chosen                    a preference row: the chosen conversation, a message list (ours: the reference
                            needs rejected and reference_completion too)

Turns are dicts with role/content or from/value. Roles are matched in any case; human -> user and
gpt / bot / model -> assistant (the reference maps these only for ShareGPT rows, and its template silently
renders nothing for any other spelling). A content of null is the empty string. Contents are never stripped.
A row that cannot be trained on raises `DroppedExample`; the builder counts it per source and reason.
"""

from __future__ import annotations

from typing import Any, Callable

from mft_jax.data.sources import DataError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

# The alpaca prompt of the reference's instruction/output converter, with the Input section always present.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")

# Why an example was dropped (counted per source in the dataset stats; see store.check_drops).
DROP_REASONS = {
    "empty": "no messages",
    "malformed": "no known schema, or a turn / field of the wrong type",
    "unknown_role": "a role other than system / user / assistant (or an alias)",
    "no_assistant": "no assistant turn (nothing to learn)",
    "no_labels_after_truncation": "no supervised token left within max_seq_length",
    "no_labels": "the chat template leaves no supervised token",
}


class DroppedExample(DataError):
    """An example that cannot be trained on; `reason` is a key of `DROP_REASONS`, `detail` says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"example dropped ({reason}): {DROP_REASONS[reason]}{': ' + detail if detail else ''}")


# ----------------------------------------------------------------------------------------------------------
# Turns
# ----------------------------------------------------------------------------------------------------------

def normalize_role(role: Any) -> str:
    """system / user / assistant for any case and alias; raises `DroppedExample("unknown_role")` otherwise."""
    if not isinstance(role, str):
        raise DroppedExample("malformed", f"role {role!r:.60} is not a string")
    name = role.strip().lower()
    name = ROLE_ALIASES.get(name, name)
    if name not in ROLES:
        raise DroppedExample("unknown_role", repr(role))
    return name


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DroppedExample("malformed", f"{field} is a {type(value).__name__}, not a string")
    return value


def _turns(raw: Any, field: str) -> list[dict]:
    """A list of {role, content} or {from, value} dicts -> validated messages."""
    if not isinstance(raw, list):
        raise DroppedExample("malformed", f"{field} is a {type(raw).__name__}, not a list of turns")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict) or not ({"role", "from"} & turn.keys()):
            raise DroppedExample("malformed", f"{field} turn {turn!r:.80} has no role / from")
        role = turn["role"] if "role" in turn else turn["from"]
        content = turn["content"] if "content" in turn else turn.get("value")
        messages.append({"role": normalize_role(role), "content": _text(content, f"{field} content")})
    return messages


def _pair(user: Any, assistant: Any, fields: tuple[str, str]) -> list[dict]:
    return [{"role": "user", "content": _text(user, fields[0])},
            {"role": "assistant", "content": _text(assistant, fields[1])}]


# ----------------------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------------------

def _alpaca(row: dict) -> list[dict]:
    prompt = ALPACA_PROMPT.format(instruction=_text(row["instruction"], "instruction"),
                                  input=_text(row.get("input"), "input"))
    return _pair(prompt, row["output"], ("instruction", "output"))


def _prompt_completion(row: dict) -> list[dict]:
    prompt, completion = row["prompt"], row["completion"]
    head = _turns(prompt, "prompt") if isinstance(prompt, list) else [
        {"role": "user", "content": _text(prompt, "prompt")}]
    tail = _turns(completion, "completion") if isinstance(completion, list) else [
        {"role": "assistant", "content": _text(completion, "completion")}]
    return head + tail


def _open_orca(row: dict) -> list[dict]:
    system = ([{"role": "system", "content": _text(row["system_prompt"], "system_prompt")}]
              if row.get("system_prompt") is not None else [])
    return system + _pair(row["question"], row["response"], ("question", "response"))


def _simple(user_key: str, assistant_key: str) -> Callable[[dict], list[dict]]:
    return lambda row: _pair(row[user_key], row[assistant_key], (user_key, assistant_key))


# (name, keys that must be present and not null, converter), in detection order.
SCHEMAS: tuple[tuple[str, tuple[str, ...], Callable[[dict], list[dict]]], ...] = (
    ("messages", ("messages",), lambda row: _turns(row["messages"], "messages")),
    ("alpaca", ("instruction", "output"), _alpaca),
    ("prompt_completion", ("prompt", "completion"), _prompt_completion),
    ("conversations", ("conversations",), lambda row: _turns(row["conversations"], "conversations")),
    ("open_orca", ("question", "response"), _open_orca),
    ("query_answer", ("query", "answer"), _simple("query", "answer")),
    ("query_response", ("query", "response"), _simple("query", "response")),
    ("prompt_response", ("prompt", "response"), _simple("prompt", "response")),
    ("inputs_targets", ("inputs", "targets"), _simple("inputs", "targets")),
    ("chosen", ("chosen",), lambda row: _turns(row["chosen"], "chosen")),
)
SCHEMA_KEYS = ", ".join("/".join(keys) for _, keys, _ in SCHEMAS)
_CONVERTERS = {name: convert for name, _, convert in SCHEMAS}


def detect_schema(row: dict) -> str | None:
    """The name of the first schema whose keys `row` has (non-null), or None."""
    for name, keys, _ in SCHEMAS:
        if all(row.get(key) is not None for key in keys):
            return name
    return None


def row_to_messages(row: dict) -> list[dict]:
    """A row of any schema -> [{"role", "content"}] with canonical roles; raises `DroppedExample`.

    Kept: any non-empty conversation of known roles, empty contents included (an empty assistant turn still
    teaches its EOS, as in the reference). Dropped: no messages, an unknown role, no known schema, wrong types.
    """
    if not isinstance(row, dict):
        raise DroppedExample("malformed", f"row is a {type(row).__name__}, not an object")
    name = detect_schema(row)
    if name is None:
        raise DroppedExample("malformed", f"row keys {sorted(row)} match no schema (one of: {SCHEMA_KEYS})")
    messages = _CONVERTERS[name](row)
    if not messages:
        raise DroppedExample("empty", f"{name} is an empty list")
    return messages
