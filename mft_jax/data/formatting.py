"""Chat formatting and tokenization: conversations -> (token ids, supervised-target mask), as the reference.

Templates (`data.template`):
- `tulu` (the default, docs/method.md "Chat format and labels"): the reference's tulu jinja, rendered in Python.
  System and user turns are `<|system|>\\n{c}\\n` / `<|user|>\\n{c}\\n`; an assistant turn is
  `<|assistant|>\\n{c}{eos}`, followed by `\\n` unless it is the last message; the generation prompt is
  `<|assistant|>\\n` (after a non-empty conversation). Contents are not stripped. `TULU_CHAT_TEMPLATE` is the
  same format as a jinja template (written into the tokenizers we train) and renders identically.
- `chat_template`: the tokenizer's own jinja `chat_template` (`apply_chat_template`).
- `plain`: the contents concatenated verbatim, each assistant content followed by EOS; no role markers.
With `add_bos` the BOS token's text is prepended to every rendering, as the reference prepends
`{{ bos_token }}` to its template; otherwise there is no BOS.

Labels are computed exactly as the reference's `encode_sft_example`: the full conversation is rendered and
tokenized (no special tokens added, cut at max_seq_length), then every non-assistant message i is masked from
its start, the token count of the rendering of messages[:i] (0 for i = 0), to its end, the token count of the
rendering of messages[:i + 1], with the generation prompt when an assistant message follows (each count cut at
max_seq_length; masking stops after the first message whose end reaches max_seq_length). Everything else is a
target: each assistant content and its EOS, and, where two assistant turns meet, the header between them. We
tokenize those prefixes too (batched in the Rust encoder), so the counts are the tokenizer's own, also where it
merges across a turn boundary. Differences from the reference's output: position 0 is never a target here (no
position predicts it; the reference's shifted loss ignores it too), and an example whose only targets would be
position 0 is dropped rather than kept with zero loss.

Empty assistant content is kept, as in the reference: the example teaches the EOS. An example is dropped
(`DroppedExample`, counted per source) when it has no messages, an unknown role, no assistant turn, or no target
left within max_seq_length.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import jinja2
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mft_jax import storage

from mft_jax.data.schemas import DroppedExample, row_to_messages
from mft_jax.data.sources import DataError

TEMPLATES = ("tulu", "chat_template", "plain")
TULU_GENERATION_PROMPT = "<|assistant|>\n"

# The tulu format as a jinja chat template (the reference's format, written our way); renders exactly as
# `format_tulu`, including the generation prompt and the missing "\n" after the last assistant turn.
TULU_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'system' or role == 'user' -%}{{ '<|' + role + '|>\\n' + message['content'] + '\\n' }}"
    "{%- elif role == 'assistant' -%}{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{{- '' if loop.last else '\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + role) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif -%}"
)

Renderer = Callable[[Sequence[dict], bool], str]  # (messages, add_generation_prompt) -> text


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike | None):
    """A Hugging Face fast tokenizer from a local directory; a clear error when it is missing or unusable."""
    fix = ("set data.tokenizer to a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json), "
           "or model.path to a checkpoint directory that contains one")
    if path is None:
        raise DataError(f"no tokenizer directory given; {fix}")
    if storage.is_remote(path):
        if not storage.path(path).is_dir():
            raise DataError(f"tokenizer directory {str(path)!r} does not exist; {fix}")
        path = storage.local_copy(path)  # transformers reads local files: the small files, cached
    path = Path(os.path.expanduser(str(path)))
    if not path.is_dir():
        raise DataError(f"tokenizer directory {str(path)!r} does not exist; {fix}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise DataError(f"tokenizer directory {str(path)!r} has no tokenizer.json / tokenizer.model; {fix}")
    from transformers import AutoTokenizer  # heavy: ~4 s to import; only loading a tokenizer needs it

    try:
        # mistral_format=False: a Mistral checkpoint's tokenizer.json, not mistral-common's tekken.json backend
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, mistral_format=False)
    except Exception as e:  # transformers raises many types for broken files
        raise DataError(f"tokenizer directory {str(path)!r} could not be loaded ({type(e).__name__}: {e}); "
                        f"{fix}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError(f"tokenizer in {str(path)!r} is not a fast (tokenizers) tokenizer; mft_jax needs "
                        f"tokenizer.json (save the tokenizer with transformers to write one)")
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer in {str(path)!r} has no eos_token; set eos_token in tokenizer_config.json")
    return tokenizer


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the tokenizer files' contents (for the cache key)."""
    digest = hashlib.sha256()
    prefixes = ("tokenizer", "special_tokens_map", "chat_template", "added_tokens", "vocab", "merges")
    for file in sorted(storage.local_copy(path).iterdir()):
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
# Conversations -> text
# ----------------------------------------------------------------------------------------------------------

def format_tulu(messages: Sequence[dict], eos_token: str = "</s>", *,
                add_generation_prompt: bool = False) -> str:
    """The tulu text of a conversation (no BOS), exactly as the reference's template renders it."""
    parts = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "assistant":
            parts.append(f"<|assistant|>\n{content}{eos_token}" + ("" if i == last else "\n"))
        elif role in ("system", "user"):
            parts.append(f"<|{role}|>\n{content}\n")
        else:  # rows are validated first; the reference's template would silently render nothing
            raise DroppedExample("unknown_role", repr(role))
    if messages and add_generation_prompt:
        parts.append(TULU_GENERATION_PROMPT)
    return "".join(parts)


def _format_plain(messages: Sequence[dict], eos_token: str) -> str:
    return "".join(m["content"] + (eos_token if m["role"] == "assistant" else "") for m in messages)


def _bos_text(tokenizer, add_bos: bool) -> str:
    if not add_bos:
        return ""
    if tokenizer.bos_token is None:
        raise DataError("data.add_bos is true but the tokenizer has no bos_token; set data.add_bos: false")
    return tokenizer.bos_token


def _chat_template_renderer(tokenizer, add_bos: bool) -> Renderer:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError("data.template is chat_template but the tokenizer has no chat_template; use tulu or plain")
    if add_bos and (template.startswith("{{ bos_token }}") or template.startswith(str(tokenizer.bos_token))):
        raise DataError("data.add_bos is true but the tokenizer's chat_template already starts with the BOS; "
                        "set data.add_bos: false")

    bos = _bos_text(tokenizer, add_bos)

    def render(messages, add_generation_prompt):
        try:
            return bos + tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # the template rejects this conversation (e.g. role order)
            raise DroppedExample("malformed", f"chat_template: {e}") from None
    return render


def make_renderer(tokenizer, template: str = "tulu", add_bos: bool = False) -> Renderer:
    """(messages, add_generation_prompt) -> text for `data.template`, with the BOS text when `add_bos`."""
    if template == "chat_template":
        return _chat_template_renderer(tokenizer, add_bos)
    bos, eos = _bos_text(tokenizer, add_bos), tokenizer.eos_token
    if template == "tulu":
        return lambda messages, gen: bos + format_tulu(messages, eos, add_generation_prompt=gen)
    if template == "plain":
        return lambda messages, gen: bos + _format_plain(messages, eos)
    raise DataError(f"data.template is {template!r}; choose one of {list(TEMPLATES)}")


def render(messages: Sequence[dict], tokenizer, template: str = "tulu", *, add_bos: bool = False,
           add_generation_prompt: bool = False) -> str:
    """The text of a validated conversation in `template` (what gets tokenized)."""
    return make_renderer(tokenizer, template, add_bos)(messages, add_generation_prompt)


# ----------------------------------------------------------------------------------------------------------
# Text -> ids and labels (the reference's encode_sft_example)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Tokenized:
    """One tokenized example. ids_N int32 token ids; labels_N bool, True where the token is a target of the
    loss (never at position 0, which no position predicts); truncated: the text was cut at max_seq_length."""

    ids_N: np.ndarray
    labels_N: np.ndarray
    truncated: bool


def _masked_prefixes(messages: Sequence[dict]) -> list[tuple[tuple[int, bool], tuple[int, bool] | None]]:
    """Per non-assistant message i: (end prefix, start prefix or None for i = 0), each prefix written as
    (number of messages, add_generation_prompt): the renderings whose token counts bound what it masks."""
    out = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            assistant_next = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
            out.append(((i + 1, assistant_next), (i, False) if i else None))
    return out


@dataclass
class _Plan:
    """One example's texts to tokenize: texts[0] is the whole conversation, slots maps each prefix needed for
    the labels, (messages, add_generation_prompt), to its text."""

    messages: Sequence[dict]
    texts: list[str]
    slots: dict[tuple[int, bool], int]


def _plan(messages: Sequence[dict], renderer: Renderer, check_prefixes: bool) -> _Plan:
    if not any(m["role"] == "assistant" for m in messages):
        raise DroppedExample("no_assistant", f"roles {[m['role'] for m in messages]}")
    texts = [renderer(messages, False)]
    slots = {(len(messages), False): 0}
    for bounds in _masked_prefixes(messages):
        for prefix in bounds:
            if prefix is not None and prefix not in slots:
                slots[prefix] = len(texts)
                texts.append(renderer(messages[:prefix[0]], prefix[1]))
                if check_prefixes and not texts[0].startswith(texts[-1]):
                    raise DataError("the tokenizer's chat_template renders a conversation prefix differently from "
                                    "the full conversation (e.g. it rewrites earlier turns), so the prompt tokens "
                                    "cannot be masked; use data.template: tulu or plain")
    return _Plan(messages, texts, slots)


def _finish(plan: _Plan, lengths: list[int], full_ids: list[int], max_seq_length: int) -> Tokenized:
    """Labels from the prefix token counts, exactly as encode_sft_example masks them."""
    count = {prefix: min(lengths[slot], max_seq_length) for prefix, slot in plan.slots.items()}
    ids_N = np.asarray(full_ids[:max_seq_length], np.int32)
    labels_N = np.ones(len(ids_N), bool)
    for end, start in _masked_prefixes(plan.messages):
        labels_N[(count[start] if start else 0):count[end]] = False
        if count[end] >= max_seq_length:
            break
    labels_N[:1] = False  # no position predicts the first token
    truncated = len(full_ids) > max_seq_length
    if not labels_N.any():
        if truncated:
            raise DroppedExample("no_labels_after_truncation",
                                 f"{len(full_ids)} tokens, max_seq_length {max_seq_length}")
        raise DroppedExample("no_labels", f"{len(full_ids)} tokens")
    return Tokenized(ids_N, labels_N, truncated)


def _plain_backend(tokenizer):
    """The tokenizer's Rust tokenizer without truncation or padding: transformers leaves them set on it after
    a call with truncation=True / padding, which would silently cut the texts we count."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _encode_batch(backend, texts: list[str]) -> list:
    """Encodings of the texts as `tokenizer(text, add_special_tokens=False)` makes them (what the reference's
    apply_chat_template tokenizes with), from the Rust batch encoder (parallel; no offsets when it can)."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=False)


def tokenize_rows(rows: Sequence[dict], tokenizer, template: str, max_seq_length: int, add_bos: bool,
                  chunk: int = 256) -> Iterator[Tokenized | DroppedExample]:
    """Tokenizes rows in order, yielding a `Tokenized` or the `DroppedExample` per row. The texts of `chunk`
    rows (each conversation and the prefixes its labels need) are encoded in one batch call."""
    renderer = make_renderer(tokenizer, template, add_bos)
    check_prefixes = template == "chat_template"
    backend = _plain_backend(tokenizer)
    for begin in range(0, len(rows), chunk):
        plans: list[_Plan | DroppedExample] = []
        for row in rows[begin: begin + chunk]:
            try:
                plans.append(_plan(row_to_messages(row), renderer, check_prefixes))
            except DroppedExample as dropped:
                plans.append(dropped)
        texts = [text for plan in plans if isinstance(plan, _Plan) for text in plan.texts]
        encoded = iter(_encode_batch(backend, texts))
        for plan in plans:
            if isinstance(plan, DroppedExample):
                yield plan
                continue
            encodings = [next(encoded) for _ in plan.texts]
            try:
                yield _finish(plan, [len(e) for e in encodings], encodings[0].ids, max_seq_length)
            except DroppedExample as dropped:
                yield dropped


def tokenize_example(messages_or_row, tokenizer, template: str = "tulu", max_seq_length: int = 4096,
                     add_bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One conversation (list of {role, content}, or a row of any schema) -> (ids_N int32, labels_N bool).

    labels_N[t] is True where token t is a target (see the module docstring). N <= max_seq_length.
    Raises `DroppedExample` (with `.reason`) for examples that must be dropped.
    """
    row = messages_or_row if isinstance(messages_or_row, dict) else {"messages": messages_or_row}
    (out,) = tokenize_rows([row], tokenizer, template, max_seq_length, add_bos)
    if isinstance(out, DroppedExample):
        raise out
    return out.ids_N, out.labels_N
