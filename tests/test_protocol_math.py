"""GSM8K / MATH scoring and the MetaMath prompt against the reference: MetaMath's own evaluation and training scripts.

The reference rules are re-derived below, as small helpers, from meta-math/MetaMath (eval_gsm8k.py, eval_math.py,
util.py, train_math.py). Realistic completions (as a MetaMathQA-tuned LLaMA writes them) must get the same verdict
from our default (`extract="reference"`) as from those helpers, and `extract="lenient"` must keep the verdicts of our
earlier forgiving rule (given per case, worked out by hand from that rule: marker any case or "####", else the last
number; last `\\boxed{}` first; math-verify).
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

import pytest

from lightning_ralora.data.templates import render_prompt
from lightning_ralora.evaluation import GSM8KSuite, Math500Suite, MathSuite
from lightning_ralora.evaluation.base import EvalConfigError, Example
from lightning_ralora.evaluation.runner import build_suite


# ------------------------------------------------------------------------------------ reference helpers (re-derived)
def ref_is_number(s: str) -> bool:
    """meta-math/MetaMath eval_gsm8k.py `is_number`: float() parses it, or it is one numeric unicode character."""
    try:
        float(s)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(s)
        return True
    except (TypeError, ValueError):
        return False


def ref_gsm8k_prediction(completion: str) -> int | None:
    """meta-math/MetaMath eval_gsm8k.py `extract_answer_number`: after the last 'The answer is: ', the first match of
    [-+]?\\d*[.,/]?\\d+, commas dropped, a/b divided (via `fraction.Fraction`; stdlib Fraction gives the same value),
    rounded with Python's round; None when there is no marker or no number."""
    parts = completion.split("The answer is: ")
    if len(parts) < 2:
        return None
    match = re.search(r"[\-+]?\d*[\.,/]?\d+", parts[-1].strip())
    if not match:
        return None
    token = match.group()
    if "/" in token:
        numerator, denominator = token.split("/")
        if not (ref_is_number(numerator) and ref_is_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        frac = Fraction(token.replace(",", ""))
        return round(float(frac.numerator / frac.denominator))
    if float(token.replace(",", "")) == float("inf"):
        return None
    return round(float(token.replace(",", "")))


def ref_gsm8k_gold(answer: str) -> int:
    """meta-math/MetaMath eval_gsm8k.py: int(response.split('#### ')[1]) with commas removed."""
    return int(answer.split("#### ")[1].replace(",", ""))


def ref_gsm8k_correct(completion: str, answer: str) -> bool:
    """meta-math/MetaMath eval_gsm8k.py `gsm8k_test`: float(prediction) == float(gold); no prediction is wrong."""
    predicted = ref_gsm8k_prediction(completion)
    return predicted is not None and float(predicted) == float(ref_gsm8k_gold(answer))


def ref_last_boxed_only_string(string: str) -> str | None:
    """meta-math/MetaMath util.py `last_boxed_only_string`: from the last '\\boxed' (else '\\fbox') to the brace
    that closes the first one opened after it."""
    idx = string.rfind("\\boxed")
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        if string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx : i + 1]
    return None


def ref_remove_boxed(s: str | None) -> str | None:
    """meta-math/MetaMath eval_math.py `remove_boxed`: the inside of '\\boxed{...}', None for anything else."""
    left = "\\boxed{"
    if s is None or not s.startswith(left) or not s.endswith("}"):
        return None
    return s[len(left) : -1]


def ref_fix_fracs(string: str) -> str:
    """meta-math/MetaMath util.py `fix_fracs` (an empty piece after '\\frac' raises IndexError, as there)."""
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":
            new_str += substr
        elif len(substr) < 2:
            return string
        elif substr[1] != "{":
            new_str += "{" + substr[0] + "}{" + substr[1] + "}" + substr[2:]
        else:
            new_str += "{" + substr[0] + "}" + substr[1:]
    return new_str


def ref_fix_a_slash_b(string: str) -> str:
    """meta-math/MetaMath util.py `fix_a_slash_b` (int() raises ValueError on a non-integer side, as there)."""
    if len(string.split("/")) != 2:
        return string
    a, b = (int(x) for x in string.split("/"))
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if string == f"{a}/{b}" else string


def ref_fix_sqrt(string: str) -> str:
    """meta-math/MetaMath util.py `fix_sqrt` (an empty piece after '\\sqrt' raises IndexError, as there)."""
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        new_string += "\\sqrt" + (split if split[0] == "{" else "{" + split[0] + "}" + split[1:])
    return new_string


def ref_strip_string(string: str) -> str:
    """meta-math/MetaMath util.py `strip_string` (Hendrycks' `_strip_string`), step by step in its order."""
    for old, new in [("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")]:  # fmt: skip
        string = string.replace(old, new)
    if "\\text{ " in string:  # remove_right_units
        splits = string.split("\\text{ ")
        assert len(splits) == 2
        string = splits[0]
    string = string.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = ref_fix_sqrt(string).replace(" ", "")
    string = ref_fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return ref_fix_a_slash_b(string)


def ref_is_equiv(str1: str | None, str2: str | None) -> bool:
    """meta-math/MetaMath util.py `is_equiv`: normalised strings equal; any exception -> raw strings equal."""
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return ref_strip_string(str1) == ref_strip_string(str2)
    except Exception:  # noqa: BLE001 - the reference catches everything
        return str1 == str2


def ref_math_correct(completion: str, solution: str) -> bool:
    """meta-math/MetaMath eval_math.py `process_results`, gold = remove_boxed(last_boxed_only_string(solution)):
    after the last 'The answer is: ', up to the first '.\\n', stripped, one trailing '.' dropped; no marker: wrong."""
    gold = ref_remove_boxed(ref_last_boxed_only_string(solution))
    split_ans = completion.split("The answer is: ")
    if len(split_ans) < 2:
        return False
    answer = split_ans[-1].split(".\n")[0].strip()
    if answer and answer[-1] == ".":
        answer = answer[:-1]
    return ref_is_equiv(answer.strip(), gold)


# MetaMath's vLLM stop list and budgets (eval_gsm8k.py, eval_math.py)
REF_STOP = ["Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:", "Instruction",
            "Response:", "Response"]  # fmt: skip
# MetaMath's prompts, verbatim: train_math.py PROMPT_DICT and eval_*.py problem_prompt
REF_TRAIN = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
REF_TRAIN_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
REF_EVAL = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)


# ---------------------------------------------------------------------------------------------------- GSM8K cases
def _gsm(n: str) -> str:
    return f"Work it out step by step.\n#### {n}"


# (completion, GSM8K answer, verdict of the lenient rule)
GSM8K_CASES: list[tuple[str, str, bool]] = [
    (
        " Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so she uses 3 + 4 = 7 eggs.\n"
        "She sells 16 - 7 = 9 eggs for $2 each, so she makes 9 * $2 = $18.\n#### 18\nThe answer is: 18",
        _gsm("18"),
        True,
    ),
    (" She makes 9 * 2 = 18 dollars.\nThe answer is: $18", _gsm("18"), True),
    (
        " The house is now worth 80,000 * 2.5 = 200,000 dollars... so the profit is 1,234.\nThe answer is: 1,234",
        _gsm("1234"),
        True,
    ),
    (" He runs 3 * 3 * 2 = 18 meters.\nThe answer is: 18.0", _gsm("18"), True),
    (" She makes 9 * $2 = $18 every day at the farmers' market.", _gsm("18"), True),  # no marker
    (" 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18", _gsm("18"), True),  # only "####"
    (" So she makes 9 * 2 = 18 dollars. Therefore, the answer is $\\boxed{18}$.", _gsm("18"), True),
    (" So the total is 18.\nthe answer is: 18", _gsm("18"), True),  # lower-case marker
    (" The temperature falls 8 degrees from 3, to 3 - 8 = -5 degrees.\nThe answer is: -5", _gsm("-5"), True),
    (" Each box holds 6, so 3 boxes hold 3 * 6 = 18.\nThe answer is: 18.", _gsm("18"), True),
    (" The average is 37 / 2 = 18.5 apples.\nThe answer is: 18.5", _gsm("18"), False),  # round half to even
    (" 39 / 2 = 19.5 hours.\nThe answer is: 19.5", _gsm("20"), False),
    (" She eats 3/4 of the pie.\nThe answer is: 3/4", _gsm("1"), False),  # a fraction, divided and rounded
    (" The city has 1,234,567 people.\nThe answer is: 1,234,567", _gsm("1,234,567"), True),
    (" The trip takes 10 / 2 = 5 hours.\nThe answer is: 5 hours", _gsm("5"), True),
    (" He has 2 + 3 = 5 apples.\nThe answer is: 2 + 3 = 5", _gsm("5"), False),
    (
        " First 4 * 3 = 12 cookies.\nThe answer is: 12\nWait, he also bakes 3 more, so 12 + 3 = 15.\nThe answer is: 15",
        _gsm("15"),
        True,
    ),  # the last marker counts
    (" The meeting is on Tuesday.\nThe answer is: Tuesday", _gsm("2"), False),  # marker, no number
    (" 20 out of 200 is 20 / 200 * 100 = 10 percent.\nThe answer is: 10%", _gsm("10"), True),
    (" So the answer is 18.\nThe answer is:18", _gsm("18"), True),  # no space after the colon
    (" 15 / 2 = 7.5 pounds.\nThe answer is: 7.5", _gsm("8"), False),
    (" He spent $20 more than he had, so his balance is -$20.\nThe answer is: -$20", _gsm("-20"), True),
    (" Step 1: 4 * 6 = 24\nStep 2: 24 + ", _gsm("30"), False),  # cut at max_new_tokens
    (" 3 quarters is 0.75 of a dollar.\nThe answer is: .75", _gsm("1"), False),
    (" He saves 1000000 cents.\nThe answer is: 1000000", _gsm("1,000,000"), True),
    (" The cost is $2,000.\nThe answer is: 2,000.", _gsm("2000"), True),
    (" Dividing 5 by 0 is undefined, so 5/0.\nThe answer is: 5/0", _gsm("5"), True),
    (" The price is 12.4 dollars.\nThe answer is: 12.4", _gsm("12"), False),
]


def _gsm8k_examples(suite: GSM8KSuite) -> list[Example]:
    rows = [{"question": f"q{i}", "answer": answer} for i, (_, answer, _) in enumerate(GSM8K_CASES)]
    return suite.examples(rows, "metamath")


def test_gsm8k_default_equals_metamath_on_realistic_completions() -> None:
    suite = GSM8KSuite()
    examples = _gsm8k_examples(suite)
    assert len(GSM8K_CASES) >= 20
    for (completion, answer, _), example in zip(GSM8K_CASES, examples, strict=True):
        assert float(example.reference) == ref_gsm8k_gold(answer)
        record = suite.score(completion, example)
        assert record["correct"] is ref_gsm8k_correct(completion, answer), completion
        assert record["extracted"] == ref_gsm8k_prediction(completion), completion
        assert record["extract"] == "reference"


def test_gsm8k_lenient_keeps_todays_verdicts_and_differs_from_reference() -> None:
    suite = GSM8KSuite(extract="lenient")
    examples = _gsm8k_examples(suite)
    differ = []
    for (completion, answer, lenient), example in zip(GSM8K_CASES, examples, strict=True):
        record = suite.score(completion, example)
        assert record["correct"] is lenient, completion
        assert record["extract"] == "lenient"
        if lenient is not ref_gsm8k_correct(completion, answer):
            differ.append((completion.strip().splitlines()[-1], answer.split("#### ")[1], lenient))
    print(f"\nGSM8K: lenient and reference verdicts differ on {len(differ)} of {len(GSM8K_CASES)} cases")
    for line, gold, lenient in differ:
        print(f"  gold {gold:>10}  lenient {lenient!s:5}  reference {not lenient!s:5}  {line!r}")
    assert len(differ) >= 5  # the two rules are not the same rule


def test_gsm8k_reference_protocol_settings() -> None:
    assert list(GSM8KSuite.stop) == REF_STOP
    assert GSM8KSuite.max_new_tokens == 512
    assert MathSuite.stop == Math500Suite.stop == GSM8KSuite.stop
    assert MathSuite.max_new_tokens == Math500Suite.max_new_tokens == 2048


# ------------------------------------------------------------------------------------------------------ MATH cases
def _sol(answer: str) -> str:
    """A Hendrycks-style solution ending in a boxed answer."""
    return f"We simplify step by step, which gives $\\boxed{{{answer}}}$."


# (completion, Hendrycks solution, verdict of the lenient rule)
MATH_CASES: list[tuple[str, str, bool]] = [
    (" We have $2x + 3 = 13$, so $2x = 10$ and $x = \\boxed{5}$.\nThe answer is: 5", _sol("5"), True),
    (" The probability is $\\frac{3}{6} = \\frac{1}{2}$.\nThe answer is: \\frac{1}{2}", _sol("\\frac{1}{2}"), True),
    (" Half of the marbles are red.\nThe answer is: \\dfrac12", _sol("\\frac{1}{2}"), True),
    (" Half of the marbles are red.\nThe answer is: 1/2", _sol("\\frac{1}{2}"), True),
    (" Half of the marbles are red.\nThe answer is: 0.5", _sol("\\frac{1}{2}"), True),
    (" The probability is one half.\nThe answer is: $\\frac{1}{2}$", _sol("\\frac{1}{2}"), True),  # `$` kept
    (" The side is 10 inches long.\nThe answer is: 10\\text{ inches}", _sol("10"), True),
    (" The side is 10 inches long.\nThe answer is: 10 inches", _sol("10"), True),
    (" The inequality holds for all $x \\le 3$.\nThe answer is: (-\\infty, 3]", _sol("(-\\infty,3]"), True),
    (" So $x \\le 3$.\nThe answer is: \\left( -\\infty, 3 \\right]", _sol("(-\\infty,3]"), True),
    (" Subtracting, $y = -2$.\nThe answer is: -2", _sol("-2"), True),
    (" The sum of the roots is $-b/a = 7$.\nThe answer is: 7.", _sol("7"), True),
    (" The area is $3 \\cdot 4 = \\boxed{12}$.", _sol("12"), True),  # boxed, no marker
    (" At first $\\boxed{11}$, but I forgot one case, so 12.\nThe answer is: 12", _sol("12"), False),
    (" Solving, we find the root.\nThe answer is: x = 5", _sol("5"), True),
    (" Each angle of the triangle is 30 degrees.\nThe answer is: 30^\\circ", _sol("30"), True),
    (" One quarter of 100 is 25.\nThe answer is: 25\\%", _sol("25\\%"), True),
    (" One quarter of 100 is 25.\nThe answer is: 25%", _sol("25\\%"), True),
    (" The diagonal is $\\sqrt{8} = 2\\sqrt{2}$.\nThe answer is: 2\\sqrt2", _sol("2\\sqrt{2}"), True),
    (" The diagonal is $\\sqrt{4+4}$.\nThe answer is: \\sqrt{8}", _sol("2\\sqrt{2}"), True),
    (" Only (C) satisfies it.\nThe answer is: \\text{(C)}", _sol("\\text{(C)}"), True),
    (" The roots are 1 and 2.\nThe answer is: 2, 1", _sol("1, 2"), True),
    (
        " The vector is as follows.\nThe answer is: \\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        _sol("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        True,
    ),
    (" The remainder is 5.\nThe answer is: 5.\nI hope it is correct.", _sol("5"), True),
    (" The remainder is 5.\nThe answer is: 5\nI hope it is correct.", _sol("5"), True),  # no '.\n': runs on
    (" We expand $(x+1)^2 = x^2 + 2x + 1$ and collect terms, so the coefficient of", _sol("2"), False),  # truncated
    (" The line through both points.\nThe answer is: y = 2x + 3", _sol("y=2x+3"), True),
    (" The height is $\\frac{\\sqrt{3}}{2}$.\nThe answer is: \\frac{\\sqrt{3}}{2}", _sol("\\frac{\\sqrt3}{2}"), True),
    (" The quotient is 3.\nThe answer is: 3.0", _sol("3"), True),
    (" There are 1000 ways.\nThe answer is: 1000", _sol("1,\\!000"), True),
    (" There are 1,000 ways.\nThe answer is: 1,000", _sol("1,\\!000"), True),
    (" The ratio is $a/b$.\nThe answer is: a/b", _sol("\\frac{a}{b}"), True),  # fix_a_slash_b raises: raw strings
    (" The day is Tuesday.\nThe answer is: \\text{Tuesday}", _sol("\\text{Tuesday}"), True),
    (" It costs $\\$18.90$.\nThe answer is: 18.90", _sol("\\$18.90"), False),  # math-verify reads no "\\$18.90"
]


def _math_examples(suite: MathSuite) -> list[Example]:
    rows = [{"problem": f"p{i}", "solution": solution} for i, (_, solution, _) in enumerate(MATH_CASES)]
    return suite.examples(rows, "metamath")


def test_math_default_equals_metamath_on_realistic_completions() -> None:
    suite = MathSuite()
    examples = _math_examples(suite)
    assert len(MATH_CASES) >= 20
    for (completion, solution, _), example in zip(MATH_CASES, examples, strict=True):
        assert example.reference == ref_remove_boxed(ref_last_boxed_only_string(solution))
        record = suite.score(completion, example)
        assert record["correct"] is ref_math_correct(completion, solution), completion
        assert record["extract"] == "reference"


def test_math_lenient_keeps_todays_verdicts_and_differs_from_reference() -> None:
    suite = MathSuite(extract="lenient")
    examples = _math_examples(suite)
    differ = []
    for (completion, solution, lenient), example in zip(MATH_CASES, examples, strict=True):
        record = suite.score(completion, example)
        assert record["correct"] is lenient, completion
        assert record["extract"] == "lenient"
        if lenient is not ref_math_correct(completion, solution):
            differ.append((completion.strip().splitlines()[-1], example.reference, lenient))
    print(f"\nMATH: lenient and reference verdicts differ on {len(differ)} of {len(MATH_CASES)} cases")
    for line, gold, lenient in differ:
        print(f"  gold {gold!r:>24}  lenient {lenient!s:5}  reference {not lenient!s:5}  {line!r}")
    assert len(differ) >= 5


@pytest.mark.parametrize(
    "solution",
    [
        "So the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$.",  # nested braces
        "First $\\boxed{3}$; correcting the sign, $\\boxed{-3}$.",  # the last box
        "The answer is $\\fbox{7}$.",  # \fbox: MetaMath's remove_boxed reads no answer
        "The answer is $\\boxed 7$.",  # no braces
        "Hence $\\boxed{\\{1, 2\\}}$ and then {x}.",
        "Truncated $\\boxed{\\frac{1}{2}$",  # unbalanced
        "Plain text with no box at all, but braces {a} {b}.",
        "Two parts: $\\boxed{5}$ and $\\boxed 6 + {7}$.",  # the last \boxed reads through a later brace
    ],
)
def test_math_gold_from_hendrycks_solution_is_metamaths(solution: str) -> None:
    (example,) = MathSuite().examples([{"problem": "p", "solution": solution}], None)
    assert example.reference == ref_remove_boxed(ref_last_boxed_only_string(solution))
    # such a problem is kept and scored as MetaMath scores it
    completion = "So it is done.\nThe answer is: 7"
    assert MathSuite().score(completion, example)["correct"] is ref_math_correct(completion, solution)


def test_math500_answer_column_is_the_gold() -> None:
    (example,) = Math500Suite().examples([{"problem": "p", "solution": "$\\boxed{0.5}$", "answer": "\\frac12"}], None)
    assert example.reference == "\\frac12"
    assert Math500Suite().score("It is half.\nThe answer is: \\frac{1}{2}", example)["correct"]


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("\\text{ cm}\\text{ cm}", "5"),  # two units: the reference's assertion fails -> raw strings
        ("5\\text{ cm}^2\\text{ cm}", "5"),
        ("\\sqrt", "\\sqrt"),  # \sqrt with nothing after it -> raw strings
        ("\\frac", "\\frac"),
        ("\\frac1", "\\frac{1}"),  # one character after \frac: unchanged
        ("x/y", "x/y"),  # a non-integer side of '/' -> raw strings
        ("+3/4", "\\frac{3}{4}"),  # not canonical: no \frac
        ("k = 7", "7"),
        ("abc = 7", "7"),  # a long left side stays
        (".5", "\\frac{1}{2}"),
        ("\\rightarrow", "arrow"),  # '\right' removed inside longer commands too
    ],
)
def test_math_normalisation_edge_cases(prediction: str, gold: str) -> None:
    example = Example(id="0", prompt="p", reference=gold)
    record = MathSuite().score(f"Done.\nThe answer is: {prediction}", example)
    assert record["correct"] is ref_is_equiv(prediction, gold)
    assert record["extracted"] == prediction


# ---------------------------------------------------------------------------------------------------- eval.extract
def test_extract_option_through_build_suite() -> None:
    for cls in (GSM8KSuite, MathSuite, Math500Suite):
        assert build_suite(cls, {"extract": None}).extract == "reference"  # null: the reference rule
        assert build_suite(cls, {"extract": "lenient"}).extract == "lenient"
        with pytest.raises(EvalConfigError, match=r"eval\.extract='strict'.*reference.*lenient"):
            build_suite(cls, {"extract": "strict"})


# ------------------------------------------------------------------------------------------------------- templates
QUESTION = "Janet's ducks lay 16 eggs per day. How much does she make?"
MULTILINE = "Compute the determinant.\n$\\begin{vmatrix} 1 & 2 \\\\ 3 & 4 \\end{vmatrix}$\nGive an integer."


def ref_train_source(query: str) -> str:
    """meta-math/MetaMath train_math.py on a {query, response} row: instruction = the first line, input = the rest;
    the with-input prompt when the input is not empty."""
    instruction, _, rest = query.partition("\n")
    if rest != "":
        return REF_TRAIN_INPUT.format_map({"instruction": instruction, "input": rest})
    return REF_TRAIN.format_map({"instruction": instruction})


def test_metamath_template_train_and_eval_strings() -> None:
    assert render_prompt("metamath", QUESTION) == REF_TRAIN.format(instruction=QUESTION)
    assert render_prompt("metamath", QUESTION).endswith("### Response:")  # the response follows directly
    assert render_prompt("metamath", QUESTION, stage="eval") == REF_EVAL.format(instruction=QUESTION)
    assert render_prompt("metamath", MULTILINE) == ref_train_source(MULTILINE)
    assert render_prompt("metamath", MULTILINE, stage="eval") == REF_EVAL.format(instruction=MULTILINE)
    assert render_prompt("metamath", "One line only\n") == ref_train_source("One line only\n")
    for name in ("alpaca", "none"):  # only metamath differs between the stages
        assert render_prompt(name, QUESTION, stage="eval") == render_prompt(name, QUESTION)
    with pytest.raises(ValueError, match="stage='test'"):
        render_prompt("metamath", QUESTION, stage="test")


def test_suites_prompt_with_the_eval_string() -> None:
    (gsm,) = GSM8KSuite().examples([{"question": QUESTION, "answer": "#### 18"}], "metamath")
    (mth,) = MathSuite().examples([{"problem": MULTILINE, "solution": "$\\boxed{-2}$"}], "metamath")
    assert gsm.prompt == REF_EVAL.format(instruction=QUESTION)
    assert mth.prompt == REF_EVAL.format(instruction=MULTILINE)


def test_sft_training_prompt_is_the_train_string() -> None:
    from lightning_ralora.tasks.sft import SFTTask

    task = SFTTask.__new__(SFTTask)  # only `prompt` is exercised: no tokenizer or data needed
    task.cfg, task.tokenizer = {"template": "metamath"}, None
    assert task.prompt(QUESTION) == REF_TRAIN.format(instruction=QUESTION)
    assert task.prompt(MULTILINE) == ref_train_source(MULTILINE)
