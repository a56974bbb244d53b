"""Chat formatting and tokenization: rows -> (token ids, label mask), plus tokenizer loading and training.

Templates (`data.template`):
- `tulu` (the default, ../shared/docs/MFT.md "Chat format"): `<|system|>\\n{c}`, `<|user|>\\n{c}`,
  `<|assistant|>\\n{c}{eos}`, turns joined by `\\n`. As in the reference (open-instruct's
  `encode_with_messages_format`) each content is `.strip()`ped; no BOS unless `add_bos`.
- `chat_template`: the tokenizer's own jinja `chat_template`.
- `plain`: the contents concatenated verbatim (prompt + completion + EOS); no role markers.

How labels are made exact: the whole example is rendered to one string while recording the character spans
that are supervised (each assistant content plus its EOS). The string is tokenized once (so the ids are exactly
what the tokenizer gives for the full text, as in the reference), and a token is supervised iff its first
character lies inside a supervised span. A token that straddles the prompt/answer boundary therefore counts as
prompt. The reference instead tokenizes growing prefixes and masks the first len(prefix ids) positions, which is
off by the straddling tokens whenever the tokenizer merges across a boundary; the two agree whenever it does not
(the usual case: tulu turns meet at special tokens and newlines).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from mft_jax.data.sources import DataError

TEMPLATES = ("tulu", "chat_template", "plain")
ROLES = ("system", "user", "assistant")
TULU_TAGS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
TULU_GENERATION_PROMPT = "<|assistant|>\n"

# The tulu format as a jinja chat template: identical text to `format_tulu` (the separator "\n" is written
# before every turn but the first, so the text of a conversation prefix is a prefix of the full text).
TULU_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\\n' + message['content'] | trim }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\\n' + message['content'] | trim }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\\n' + message['content'] | trim + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif -%}"
)

# Why an example was dropped (counted in the dataset stats, never raised).
DROP_REASONS = {
    "empty": "no messages, or every content empty",
    "no_assistant": "no assistant turn with content (entirely prompt)",
    "unknown_role": "a role other than system / user / assistant",
    "malformed": "neither messages (list of {role, content}) nor prompt/completion strings",
    "no_labels_after_truncation": "no supervised token left within max_seq_length",
}


class DroppedExample(DataError):
    """An example that cannot be trained on; `reason` is a key of `DROP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"example dropped ({reason}): {DROP_REASONS[reason]}{': ' + detail if detail else ''}")


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike | None):
    """A Hugging Face fast tokenizer from a local directory; a clear error when it is missing or unusable."""
    fix = ("set data.tokenizer to a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json), "
           "or model.path to a checkpoint directory that contains one")
    if path is None:
        raise DataError(f"no tokenizer directory given; {fix}")
    path = Path(os.path.expanduser(str(path)))
    if not path.is_dir():
        raise DataError(f"tokenizer directory {str(path)!r} does not exist; {fix}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise DataError(f"tokenizer directory {str(path)!r} has no tokenizer.json / tokenizer.model; {fix}")
    from transformers import AutoTokenizer  # slow import; only when a tokenizer is needed

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken files
        raise DataError(f"tokenizer directory {str(path)!r} could not be loaded ({type(e).__name__}: {e}); "
                        f"{fix}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError(f"tokenizer in {str(path)!r} is not a fast (tokenizers) tokenizer; mft_jax needs "
                        f"tokenizer.json for exact character offsets")
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer in {str(path)!r} has no eos_token; set eos_token in tokenizer_config.json")
    return tokenizer


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the tokenizer files' contents (for the cache key)."""
    import hashlib

    digest = hashlib.sha256()
    prefixes = ("tokenizer", "special_tokens_map", "chat_template", "added_tokens", "vocab", "merges")
    for file in sorted(Path(path).iterdir()):
        if file.is_file() and file.name.startswith(prefixes):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                        min_frequency: int = 2, model_max_length: int = 4096) -> Path:
    """Trains a byte-level BPE on `texts` offline and saves it as a Hugging Face tokenizer directory.

    Ids 0..5 are `<pad>`, `<s>` (bos), `</s>` (eos), `<|system|>`, `<|user|>`, `<|assistant|>`; the vocabulary
    has at most `vocab_size` entries in all (fewer if the corpus runs out of merges; use `len(tokenizer)`).
    The chat template is the tulu format. Writes tokenizer.json, tokenizer_config.json,
    special_tokens_map.json and chat_template.jinja; `AutoTokenizer.from_pretrained(out_dir)` loads it.
    transformers is not imported, so this takes well under a second for a few thousand short texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Untrimmed offsets: a token's offsets cover every character it encodes (labels rely on them).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {
        **special_map,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": s, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for i, s in enumerate(specials)},
        "chat_template": TULU_CHAT_TEMPLATE,  # transformers 4.x reads it here, 5.x from chat_template.jinja
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (out / "chat_template.jinja").write_text(TULU_CHAT_TEMPLATE)
    return out


# ----------------------------------------------------------------------------------------------------------
# Rows -> messages -> text with supervised character spans
# ----------------------------------------------------------------------------------------------------------

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}


def row_format(row: dict) -> str | None:
    """Which row layout `row` has: "messages", "conversations" (ShareGPT), "prompt_completion" or None."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "conversations"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def row_to_messages(row: dict) -> list[dict]:
    """A row in any supported layout -> [{"role", "content"}], validated; raises `DroppedExample`."""
    layout = row_format(row)
    if layout == "messages":
        raw = row["messages"]
    elif layout == "conversations":
        raw = row["conversations"]
        if isinstance(raw, list):
            raw = [{"role": _SHAREGPT_ROLES.get(turn.get("from"), turn.get("from")), "content": turn.get("value")}
                   if isinstance(turn, dict) else turn for turn in raw]
    elif layout == "prompt_completion":
        # Strings (plain prompt / completion) or lists of messages (conversational prompt-completion).
        prompt, completion = row["prompt"], row["completion"]
        raw = ((prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
               + (completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]))
    else:
        raise DroppedExample("malformed", f"keys {sorted(row)}")
    if not isinstance(raw, list):
        raise DroppedExample("malformed", f"{layout} is a {type(raw).__name__}, not a list")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict) or "role" not in turn:
            raise DroppedExample("malformed", f"turn {turn!r:.80}")
        content = turn.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise DroppedExample("malformed", f"content of type {type(content).__name__}")
        if turn["role"] not in ROLES:
            raise DroppedExample("unknown_role", repr(turn["role"]))
        messages.append({"role": turn["role"], "content": content})
    if not messages or not any(m["content"].strip() for m in messages):
        raise DroppedExample("empty")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DroppedExample("no_assistant")
    return messages


def format_tulu(messages: Sequence[dict], eos_token: str = "</s>", *,
                add_generation_prompt: bool = False) -> str:
    """The tulu text of a conversation (no BOS). `add_generation_prompt` appends `\\n<|assistant|>\\n`."""
    return _render_tulu(messages, eos_token, add_generation_prompt)[0]


def _render_tulu(messages, eos_token, add_generation_prompt=False) -> tuple[str, list[tuple[int, int]]]:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for i, message in enumerate(messages):
        if message["role"] not in TULU_TAGS:
            raise DroppedExample("unknown_role", repr(message["role"]))
        head = ("\n" if i else "") + TULU_TAGS[message["role"]]
        body = message["content"].strip()
        if message["role"] == "assistant":
            body += eos_token
            spans.append((length + len(head), length + len(head) + len(body)))
        parts += [head, body]
        length += len(head) + len(body)
    if add_generation_prompt:
        parts.append(("\n" if messages else "") + TULU_GENERATION_PROMPT)
    return "".join(parts), spans


def _render_plain(messages, eos_token) -> tuple[str, list[tuple[int, int]]]:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for message in messages:
        body = message["content"]
        if message["role"] == "assistant":
            body += eos_token
            spans.append((length, length + len(body)))
        parts.append(body)
        length += len(body)
    return "".join(parts), spans


def _render_chat_template(messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Renders with the tokenizer's template; an assistant turn's span runs from the end of the rendered prefix
    (with the generation prompt) to the end of the rendered turn, minus trailing whitespace (the template's
    turn separator is not something the model needs to emit)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is chat_template but the tokenizer has no chat_template; use tulu or plain")

    import jinja2

    def render(msgs, generation_prompt=False) -> str:
        if not msgs and not generation_prompt:
            return ""
        try:
            return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as e:  # the template rejects this conversation (e.g. role order)
            raise DroppedExample("malformed", f"chat_template: {e}") from None

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError("the tokenizer's chat_template renders a conversation prefix differently from the "
                            "full conversation (e.g. it rewrites earlier turns), so supervised spans cannot be "
                            "found; use data.template: tulu or plain")
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def render(messages: Sequence[dict], tokenizer, template: str = "tulu") -> tuple[str, list[tuple[int, int]]]:
    """(text, supervised character spans [start, end)) of a validated conversation."""
    if template == "tulu":
        return _render_tulu(messages, tokenizer.eos_token)
    if template == "plain":
        return _render_plain(messages, tokenizer.eos_token)
    if template == "chat_template":
        return _render_chat_template(messages, tokenizer)
    raise DataError(f"data.template is {template!r}; choose one of {list(TEMPLATES)}")


# ----------------------------------------------------------------------------------------------------------
# Text -> ids and labels
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Tokenized:
    """One tokenized example. ids_N int32 token ids; labels_N bool, True where the token is a target of the
    loss (never at position 0, which no position predicts); truncated: the text was cut at max_seq_length."""

    ids_N: np.ndarray
    labels_N: np.ndarray
    truncated: bool


def _labels_from_offsets(offsets_Nx2: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    starts_N = offsets_Nx2[:, 0] if len(offsets_Nx2) else np.zeros(0, np.int64)
    labels_N = np.zeros(len(starts_N), bool)
    for start, end in spans:
        labels_N |= (starts_N >= start) & (starts_N < end)
    return labels_N


def _finish(ids: list[int], offsets: list[tuple[int, int]], spans, max_seq_length: int,
            bos_id: int | None) -> Tokenized:
    ids_N = np.asarray(ids, np.int32)
    labels_N = _labels_from_offsets(np.asarray(offsets, np.int64).reshape(-1, 2), spans)
    if bos_id is not None and (len(ids_N) == 0 or ids_N[0] != bos_id):
        ids_N = np.concatenate([np.asarray([bos_id], np.int32), ids_N])
        labels_N = np.concatenate([[False], labels_N])
    truncated = len(ids_N) > max_seq_length
    ids_N, labels_N = ids_N[:max_seq_length], labels_N[:max_seq_length]
    if len(labels_N):
        labels_N[0] = False  # no position predicts the first token
    if not labels_N.any():
        raise DroppedExample("no_labels_after_truncation", f"{len(ids)} tokens, max_seq_length {max_seq_length}")
    return Tokenized(ids_N, labels_N, truncated)


def _bos_id(tokenizer, add_bos: bool) -> int | None:
    if not add_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise DataError("data.add_bos is true but the tokenizer has no bos_token; set add_bos: false")
    return tokenizer.bos_token_id


def tokenize_example(messages_or_row, tokenizer, template: str = "tulu", max_seq_length: int = 4096,
                     add_bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One conversation (list of {role, content}, or a row dict) -> (ids_N int32, labels_N bool).

    labels_N[t] is True where token t is supervised (assistant content and its EOS). N <= max_seq_length.
    Raises `DroppedExample` (with `.reason`) for examples that must be dropped.
    """
    row = messages_or_row if isinstance(messages_or_row, dict) else {"messages": messages_or_row}
    messages = row_to_messages(row)
    text, spans = render(messages, tokenizer, template)
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    out = _finish(encoding.ids, encoding.offsets, spans, max_seq_length, _bos_id(tokenizer, add_bos))
    return out.ids_N, out.labels_N


def tokenize_rows(rows: Sequence[dict], tokenizer, template: str, max_seq_length: int, add_bos: bool,
                  chunk: int = 512) -> Iterator[Tokenized | DroppedExample]:
    """Tokenizes rows in order, yielding a `Tokenized` or the `DroppedExample` per row. Texts are encoded in
    chunks with the Rust batch encoder (parallel) rather than one call per row."""
    bos_id = _bos_id(tokenizer, add_bos)
    backend = tokenizer.backend_tokenizer
    for begin in range(0, len(rows), chunk):
        rendered: list[tuple[str, list] | DroppedExample] = []
        for row in rows[begin: begin + chunk]:
            try:
                rendered.append(render(row_to_messages(row), tokenizer, template))
            except DroppedExample as dropped:
                rendered.append(dropped)
        texts = [r[0] for r in rendered if not isinstance(r, DroppedExample)]
        encodings = iter(backend.encode_batch(texts, add_special_tokens=False))
        for r in rendered:
            if isinstance(r, DroppedExample):
                yield r
                continue
            encoding = next(encodings)
            try:
                yield _finish(encoding.ids, encoding.offsets, r[1], max_seq_length, bos_id)
            except DroppedExample as dropped:
                yield dropped
