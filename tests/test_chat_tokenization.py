"""Our chat tokenization against the reference's algorithm, on two real tokenizers shipped in registry packages.

Oracle: open-instruct's `encode_sft_example` as the reference runs it, written here from its behaviour: the
tokenizer's `apply_chat_template` (tulu template set on the tokenizer, `{{ bos_token }}` prepended with add_bos)
on the whole conversation and on growing prefixes, each truncated at max_seq_length, every non-assistant message
labelled -100 from its start to its end (with the generation prompt when an assistant message follows).
Our side: `tokenize_example` on the tokenizer loaded from disk by `load_tokenizer`, as `train` loads it.

Tokenizers (converted once per test session, offline, from files in packages installed --no-deps by
`launch/install.sh --test`, located without importing the packages):
- Llama-2 style: mistral-common's `tokenizer.model.v1` (SentencePiece BPE, 32000 pieces, byte fallback) converted
  by transformers into a fast Llama tokenizer;
- Llama 3: llama-models' `llama3/tokenizer.model` (tiktoken ranks) through transformers' TikTokenConverter with
  Llama 3's 256 special tokens (checked against tiktoken itself).
Each gets the reference's special-token setup (finetune.py adds `<pad>`) before it is saved.
"""

from __future__ import annotations

import base64
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from mft_jax.data import DroppedExample, TULU_CHAT_TEMPLATE, format_tulu, load_tokenizer, tokenize_example
from mft_jax.data.formatting import tokenize_rows

MISSING = [name for name in ("mistral_common", "llama_models", "sentencepiece", "tiktoken")
           if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{MISSING} not installed: run launch/install.sh --test")

# The reference's tulu chat template (scripts/dataset_processor.py CHAT_TEMPLATES["tulu"]), written out from its
# behaviour: system / user turns end in "\n", an assistant turn ends in EOS and then "\n" unless it is the last
# message, the generation prompt is added after the last message, and other roles render nothing.
REFERENCE_TULU = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)


def _chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


CODE = ('```python\ndef add(a, b):\n    """Add two numbers."""\n    if a is None:\n        return b  # fallback\n'
        '\treturn a + b\n\n\nclass  Foo :\n  pass\n```\n')
LONG_Q = "Explain, step by step, why the sky looks blue at noon and red at sunset. " * 6
LONG_A = "Sunlight is scattered by molecules; shorter wavelengths scatter more (Rayleigh). " * 8
CONVERSATIONS = {
    "whitespace": _chat(("system", "  You are helpful.  \n"), ("user", "\n\n  Leading and trailing  \n"),
                        ("assistant", "  Answer with spaces.  \n\n")),
    "code": _chat(("user", "Write `add`:\n```python\n"), ("assistant", CODE)),
    "unicode": _chat(("user", "日本語で答えて。Ça va? naïve café, Zürich 😀🚀"),
                     ("assistant", "はい、大丈夫です。👍🏽 Ελληνικά, русский, עברית, 中文标点，。")),
    "multi_turn": _chat(("system", "Be terse."), ("user", "2+2?"), ("assistant", "4."), ("user", "Times 3?"),
                        ("assistant", "12."), ("user", "Minus 5?"), ("assistant", "7.")),
    "system_prompt": _chat(("system", "You are a pirate."), ("user", "Hello"), ("assistant", "Arr, hello!")),
    "consecutive_users": _chat(("user", "First part."), ("user", "Second part."), ("assistant", "Both read."),
                               ("user", "a"), ("user", "b"), ("assistant", "c")),
    "assistant_first": _chat(("assistant", "How can I help?"), ("user", "Say hi."), ("assistant", "Hi!")),
    "empty_assistant_last": _chat(("user", "Say nothing."), ("assistant", "")),
    "empty_assistant_middle": _chat(("user", "q1"), ("assistant", ""), ("user", "q2"), ("assistant", "ok")),
    "consecutive_assistants": _chat(("user", "Two answers?"), ("assistant", "One."), ("assistant", "Two.")),
    "special_text_in_content": _chat(("user", "What do </s>, <s>, <pad> and <|assistant|> mean?"),
                                     ("assistant", "Markers: <|end_of_text|> <|begin_of_text|> </s> <unk>.")),
    "empty_and_blank": _chat(("user", ""), ("assistant", "   ")),
    "newlines_only": _chat(("system", "\n"), ("user", "\n\n"), ("assistant", "\n\n\n")),
    "numbers": _chat(("user", "12345678901234567890 + 3.14159 = ?"), ("assistant", "1,000,000.5 or 0x1F, 1e-9")),
    "ends_with_user": _chat(("user", "q"), ("assistant", "a"), ("user", "follow-up without an answer")),
    "long": _chat(("system", "Answer fully."), ("user", LONG_Q), ("assistant", LONG_A), ("user", LONG_Q),
                  ("assistant", LONG_A)),
}


# ------------------------------------------------------------------------------------------------------------
# Tokenizers (converted once per session)
# ------------------------------------------------------------------------------------------------------------

def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / relative
    assert path.is_file(), path
    return path


def _reference_setup(tokenizer, out: Path) -> Path:
    """The reference's finetune.py adds <pad> (Llama: with bos / eos / unk re-set) before encoding; save."""
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory) -> Path:
    from transformers import LlamaTokenizer

    source = tmp_path_factory.mktemp("sp_model")
    shutil.copy(_package_file("mistral_common", "data/tokenizer.model.v1"), source / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(source))  # SentencePiece -> fast (needs sentencepiece, protobuf)
    assert len(tokenizer) == 32000 and tokenizer.convert_tokens_to_ids("<0x0A>") == 13
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return _reference_setup(tokenizer, tmp_path_factory.mktemp("llama2_tok"))


# Llama 3's pre-tokenizer regex and special tokens (as llama-models' tokenizer.py defines them).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                    "<|image|>"] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)])


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _package_file("llama_models", "llama3/tokenizer.model")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file in place, no copy under /tmp
        backend = TikTokenConverter(vocab_file=str(ranks), pattern=LLAMA3_PATTERN,
                                    extra_special_tokens=LLAMA3_SPECIALS).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>")
    assert tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"]) == [128000, 128009]
    return _reference_setup(tokenizer, tmp_path_factory.mktemp("llama3_tok"))


@pytest.fixture(scope="session", params=["llama2", "llama3"])
def tokenizers(request):
    """(ours: loaded by load_tokenizer, oracle: AutoTokenizer with the reference's template) from one directory."""
    from transformers import AutoTokenizer

    directory = request.getfixturevalue(f"{request.param}_dir")
    return request.param, load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))


# ------------------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------------------

def reference_encode(tokenizer, messages: list[dict], max_seq_length: int, add_bos: bool,
                     template: str = REFERENCE_TULU) -> tuple[list, list]:
    """(input_ids, labels) as the reference's encode_sft_example computes them (labels -100 where masked)."""
    tokenizer.chat_template = ("{{ bos_token }}" if add_bos else "") + template

    def ids(conversation, add_generation_prompt):
        return list(tokenizer.apply_chat_template(conversation, tokenize=True, truncation=True,
                                                  max_length=max_seq_length, return_dict=False,
                                                  add_generation_prompt=add_generation_prompt))

    input_ids = ids(messages, False)
    labels = list(input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else len(ids(messages[:i], False))
        assistant_next = i < len(messages) - 1 and messages[i + 1]["role"] == "assistant"
        end = len(ids(messages[: i + 1], assistant_next))
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return input_ids, labels


def cut_points(labels: list[int]) -> dict[str, int]:
    """max_seq_length values that cut inside the first assistant turn, inside the prompt after it, and just
    before the first target (nothing left to learn: dropped)."""
    target = np.asarray(labels) != -100
    target[0] = False
    first = int(np.argmax(target))
    cuts = {"inside_assistant": first + max(1, int(np.argmin(target[first:])) // 2)}
    after = np.flatnonzero(~target[first:]) + first
    if len(after):
        prompt_run = np.split(after, np.flatnonzero(np.diff(after) > 1) + 1)[0]
        cuts["inside_prompt"] = int(prompt_run[len(prompt_run) // 2]) + 1
    if first >= 2:  # max_seq_length >= 2
        cuts["before_any_target"] = first
    return cuts


def assert_same(ours, oracle, messages, max_seq_length, add_bos):
    want_ids, want_labels = reference_encode(oracle, messages, max_seq_length, add_bos)
    want_targets = [label != -100 for label in want_labels]
    want_targets[:1] = [False]  # position 0 is never a target for us (nothing predicts it)
    if not any(want_targets):  # the reference's filter drops it
        with pytest.raises(DroppedExample):
            tokenize_example(messages, ours, max_seq_length=max_seq_length, add_bos=add_bos)
        return "dropped"
    ids_N, labels_N = tokenize_example(messages, ours, max_seq_length=max_seq_length, add_bos=add_bos)
    assert ids_N.tolist() == want_ids
    assert labels_N.tolist() == want_targets
    return "kept"


# ------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_and_targets_equal_the_reference(tokenizers, name):
    _, ours, oracle = tokenizers
    messages = CONVERSATIONS[name]
    outcomes = {}
    for add_bos in (False, True):
        full_ids, full_labels = reference_encode(oracle, messages, 4096, add_bos)
        assert outcomes.setdefault(("full", add_bos), assert_same(ours, oracle, messages, 4096, add_bos)) == "kept"
        assert (full_ids[0] == ours.bos_token_id) == add_bos
        for cut_name, cut in cut_points(full_labels).items():
            outcomes[(cut_name, add_bos)] = assert_same(ours, oracle, messages, cut, add_bos)
    assert outcomes[("inside_assistant", False)] == "kept"
    assert outcomes.get(("before_any_target", False), "dropped") == "dropped"
    assert (("before_any_target", False) in outcomes) == (messages[0]["role"] != "assistant")


def test_truncation_inside_user_and_assistant_turns_is_covered(tokenizers):
    """The cuts above land where they claim to, on the conversations with a prompt after an answer."""
    _, _, oracle = tokenizers
    covered = set()
    for name in ("multi_turn", "long", "consecutive_users", "empty_assistant_middle"):
        messages = CONVERSATIONS[name]
        _, labels = reference_encode(oracle, messages, 4096, False)
        for cut_name, cut in cut_points(labels).items():
            last_is_target = labels[cut - 1] != -100
            if cut_name == "inside_assistant" and last_is_target and labels[cut] != -100:
                covered.add(cut_name)
            if cut_name == "inside_prompt" and not last_is_target and labels[cut] == -100:
                covered.add(cut_name)
    assert covered == {"inside_assistant", "inside_prompt"}


def test_batched_rows_equal_single_examples(tokenizers):
    _, ours, _ = tokenizers
    rows = [{"messages": m} for m in CONVERSATIONS.values()]
    batched = list(tokenize_rows(rows, ours, "tulu", 64, False, chunk=5))
    assert [getattr(item, "reason", None) for item in batched].count("no_labels_after_truncation") == 1  # long
    for row, item in zip(rows, batched, strict=True):
        if isinstance(item, DroppedExample):
            with pytest.raises(DroppedExample, match=item.reason):
                tokenize_example(row, ours, max_seq_length=64)
            continue
        ids_N, labels_N = tokenize_example(row, ours, max_seq_length=64)
        np.testing.assert_array_equal(item.ids_N, ids_N)
        np.testing.assert_array_equal(item.labels_N, labels_N)
        assert item.truncated == (len(tokenize_example(row, ours, max_seq_length=10_000)[0]) > 64)


def test_templates_render_identically(tokenizers):
    """format_tulu (what we tokenize), our jinja TULU_CHAT_TEMPLATE and the reference's template agree."""
    _, ours, oracle = tokenizers
    for messages in CONVERSATIONS.values():
        for generation_prompt in (False, True):
            ours_text = format_tulu(messages, ours.eos_token, add_generation_prompt=generation_prompt)
            for template in (REFERENCE_TULU, TULU_CHAT_TEMPLATE):
                oracle.chat_template = template
                assert oracle.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt) == ours_text


# Qwen2 / 2.5's ChatML template for conversations without tools, written out from its behaviour: a default
# system turn when the conversation has none, every turn `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, and
# `<|im_start|>assistant\n` as the generation prompt.
QWEN_CHATML = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.'"
    " + '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{% if not (m['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chatml_dir(llama3_dir, tmp_path_factory) -> Path:
    """A byte-level BPE (Llama 3's tiktoken ranks, the kind of tokenizer Qwen's is) set up as Qwen's instruct
    tokenizers are: ChatML's special tokens, EOS <|im_end|>, no BOS, and the ChatML template as its own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = QWEN_CHATML
    out = tmp_path_factory.mktemp("chatml_tok")
    tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_chatml_equals_the_reference(chatml_dir, name):
    """data.template: chat_template renders the tokenizer's own template (ChatML here, as Qwen's): ids and targets
    equal the reference's encode_sft_example over that template, whole and truncated inside turns."""
    from transformers import AutoTokenizer

    ours, oracle = load_tokenizer(chatml_dir), AutoTokenizer.from_pretrained(str(chatml_dir))
    assert ours.chat_template == QWEN_CHATML
    messages = CONVERSATIONS[name]
    _, full_labels = reference_encode(oracle, messages, 4096, False, QWEN_CHATML)
    for cut in [4096, *cut_points(full_labels).values()]:
        want_ids, want_labels = reference_encode(oracle, messages, cut, False, QWEN_CHATML)
        want_targets = [label != -100 for label in want_labels]
        want_targets[:1] = [False]
        if not any(want_targets):
            with pytest.raises(DroppedExample):
                tokenize_example(messages, ours, "chat_template", max_seq_length=cut)
            continue
        ids_N, labels_N = tokenize_example(messages, ours, "chat_template", max_seq_length=cut)
        assert ids_N.tolist() == want_ids, cut
        assert labels_N.tolist() == want_targets, cut
    assert "<|im_start|>" in ours.decode(tokenize_example(messages, ours, "chat_template")[0])


def test_llama3_conversion_is_tiktoken(llama3_dir):
    """The converted Llama 3 tokenizer gives tiktoken's ids on every rendered conversation."""
    import tiktoken

    ours = load_tokenizer(llama3_dir)
    ranks = {}
    for line in _package_file("llama_models", "llama3/tokenizer.model").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)} | {"<pad>": len(ranks) + 256}
    encoding = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    for messages in CONVERSATIONS.values():
        ids_N, _ = tokenize_example(messages, ours)
        assert ids_N.tolist() == encoding.encode(format_tulu(messages, ours.eos_token), allowed_special="all")
