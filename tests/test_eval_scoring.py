"""Scoring rules of the generation suites (GSM8K, MATH, commonsense, HumanEval) and their `run()`/`aggregate()`
through a fake generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from lightning_ralora.data.templates import render_prompt
from lightning_ralora.evaluation import (
    SUITES,
    CommonsenseSuite,
    EvalDataError,
    GSM8KSuite,
    HumanEvalSuite,
    MathSuite,
    choice_correct,
    gsm8k_correct,
    math_correct,
    pass_at_k,
)
from lightning_ralora.evaluation.humaneval import build_program, extract_code, truncate_at_stop
from lightning_ralora.evaluation.math import extract_math_answer, last_boxed


def fake_generate(outputs: dict[str, Any]):
    """A generator returning known completions per prompt (a list of them when sampling n per prompt)."""
    calls: list[dict[str, Any]] = []

    def generate(prompts: Sequence[str], **kwargs: Any) -> list[str]:
        calls.append(kwargs)
        n = kwargs.get("num_return_sequences", 1)
        out: list[str] = []
        for p in prompts:
            got = outputs[p]
            out.extend(got if isinstance(got, list) else [got] * n)
        return out

    generate.calls = calls  # type: ignore[attr-defined]
    return generate


# ---------------------------------------------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("She has 3 + 15 = 18 apples. The answer is 18.", "18", True),
        ("She has 18 apples.\n#### 18", "18", True),
        ("The answer is 18.", "Natalia sold 48/2 = 24 clips.\n#### 18", True),
        ("First 5, then 7, so 12 in all", "12", True),  # no marker: last number
        ("The answer is 12, not 5 or 7", "12", True),  # marker: first number after it
        ("The answer is 5. Wait, recheck. The answer is 9, since 9 > 5", "9", True),  # the LAST marker counts
        ("The answer is 5. Wait. The answer is 9", "5", False),
        ("#### 4\nThe answer is 7", "7", True),  # both marker kinds: the last one
        ("The total is 1,234 dollars", "1234", True),
        ("The answer is 1,234,567.", "#### 1,234,567", True),
        ("The temperature drops to -3 degrees", "-3", True),
        ("The answer is -3", "3", False),
        ("It costs $3.50 each", "3.5", True),
        ("The answer is 18.0", "18", True),
        ("The answer is $18.", "18", True),
        ("The answer is 18.00001", "18", True),  # within 1e-4
        ("The answer is 18.01", "18", False),
        ("5-3 = 2", "2", True),
        ("I cannot tell", "5", False),  # no number
        ("The answer is unknown", "5", False),  # marker without a number after it
        ("", "0", False),
    ],
)
def test_gsm8k_rule(completion: str, reference: str, expected: bool) -> None:
    """The lenient rule (`eval.extract=lenient`); the reference rule is tested in test_protocol_math.py."""
    assert gsm8k_correct(completion, reference, extract="lenient") is expected


def test_gsm8k_marker_is_case_insensitive_and_wins_over_last_number() -> None:
    assert gsm8k_correct("the answer is 7 because 3 + 4 = 7 and not 8", "7", extract="lenient")
    assert not gsm8k_correct("the answer is 7 because 3 + 4 = 7 and not 8", "8", extract="lenient")


def test_gsm8k_bad_reference_is_a_data_error() -> None:
    with pytest.raises(EvalDataError, match="row 1"):
        GSM8KSuite().examples([{"question": "q", "answer": "no number here"}], None)


# ----------------------------------------------------------------------------------------------------------------- MATH
@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        (r"So the probability is $\boxed{\frac{1}{2}}$.", "0.5", True),
        (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}", True),
        (r"$\boxed{\dfrac{1}{2}}$", r"\frac12", True),
        (r"$\boxed{2\sqrt{2}}$", r"\sqrt{8}", True),
        (r"$\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt{3}}{2}", True),  # nested braces kept
        (r"first \boxed{3}, corrected: \boxed{4}", "4", True),  # the last box
        (r"first \boxed{3}, corrected: \boxed{4}", "3", False),
        ("The answer is $x^2$.", "x^2", True),
        ("The answer is: 5", "5", True),
        (r"$\boxed{6}$", "5", False),
        (r"$\boxed{x^2 + 1}$", "x^2 - 1", False),
        ("No final answer given", "5", False),
        (r"$\boxed{\text{(C)}}$", r"\text{(C)}", True),
    ],
)
def test_math_rule(completion: str, reference: str, expected: bool) -> None:
    """The lenient rule (`eval.extract=lenient`); the reference rule is tested in test_protocol_math.py."""
    assert math_correct(completion, reference, extract="lenient") is expected


def test_math_extraction() -> None:
    assert last_boxed(r"\boxed{\frac{a}{b^{2}}} and \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced: no answer
    assert last_boxed(r"\boxed{1} then \boxed{2") == "1"  # a truncated last box falls back to the previous one
    assert extract_math_answer("The answer is $x^2$.") == "$x^2$"
    assert extract_math_answer(r"The answer is 3, i.e. \boxed{3}") == "3"  # a box wins
    assert extract_math_answer("nothing") is None


def test_math_reference_from_solution() -> None:
    rows = [{"problem": "p", "solution": r"Thus $\boxed{\frac{1}{\sqrt{2}}}$."}, {"problem": "q", "answer": "7"}]
    examples = MathSuite().examples(rows, "alpaca")
    assert [e.reference for e in examples] == [r"\frac{1}{\sqrt{2}}", "7"]
    assert examples[0].prompt == render_prompt("alpaca", "p")
    with pytest.raises(EvalDataError, match="row 1"):
        MathSuite(extract="lenient").examples([{"problem": "p", "solution": "no box"}], None)
    with pytest.raises(EvalDataError, match="row 1"):  # neither an answer nor a solution, under either rule
        MathSuite().examples([{"problem": "p"}], None)
    # MetaMath keeps a problem whose solution has no readable box and scores it wrong
    (unboxed,) = MathSuite().examples([{"problem": "p", "solution": "no box"}], None)
    assert unboxed.reference is None and not MathSuite().score("The answer is: no box", unboxed)["correct"]


# ---------------------------------------------------------------------------------------------------------- commonsense
@pytest.mark.parametrize(
    ("suite", "completion", "reference", "expected"),
    [
        ("boolq", "the correct answer is true", "true", True),
        ("boolq", "false, definitely not true", "false", True),  # first match
        ("boolq", "True", "true", False),  # case-sensitive, as LLM-Adapters
        ("piqa", "the correct answer is solution2", "solution2", True),
        ("piqa", "Solution1", "solution1", False),
        ("siqa", "answer3", "answer3", True),
        ("siqa", "answer4", "answer3", False),  # extracted (answer1-5 as ARC/OBQA in LLM-Adapters), but wrong
        ("social_i_qa", "answer5", "answer5", True),  # LLM-Adapters' name for siqa
        ("hellaswag", "ending4 fits best", "ending4", True),
        ("hellaswag", "ending5", "ending4", False),
        ("winogrande", "option1", "option1", True),
        ("winogrande", "option2", "option1", False),
        ("arc_challenge", "answer5", "answer5", True),
        ("arc_easy", "answer2 ... but maybe answer1", "answer2", True),  # the FIRST match, not the last
        ("arc_easy", "answer2 ... but maybe answer1", "answer1", False),
        ("openbookqa", "  answer4\n", "answer4", True),
        ("openbookqa", "none of them", "answer1", False),
        ("winogrande", "option1\n\n### Response:\noption2", "option1", True),  # cut at a further "### Response:"
        ("winogrande", "### Response: option2", "option2", False),
    ],
)
def test_choice_rule(suite: str, completion: str, reference: str, expected: bool) -> None:
    assert choice_correct(completion, suite, reference) is expected


def test_choice_unknown_suite() -> None:
    with pytest.raises(ValueError, match="unknown commonsense suite"):
        choice_correct("answer1", "mmlu", "answer1")


def test_commonsense_load_rows_from_folder_and_mapping(tmp_path) -> None:
    import json

    for suite in ("boolq", "piqa"):
        (tmp_path / suite).mkdir()
        (tmp_path / suite / "test.json").write_text(json.dumps([{"instruction": f"{suite} q", "answer": "x"}] * 2))
    cs = CommonsenseSuite(subsets=["boolq", "piqa"])
    rows = cs.load_rows(tmp_path)
    assert [r["suite"] for r in rows] == ["boolq", "boolq", "piqa", "piqa"]
    assert cs.load_rows({"boolq": tmp_path / "boolq/test.json", "piqa": tmp_path / "piqa/test.json"}) == rows
    assert [e.id for e in cs.examples(rows, None)] == ["boolq/0", "boolq/1", "piqa/0", "piqa/1"]
    with pytest.raises(EvalDataError, match="siqa"):
        CommonsenseSuite(subsets=["siqa"]).load_rows(tmp_path)
    with pytest.raises(EvalDataError, match="no `suite`"):
        cs.examples([{"instruction": "q", "answer": "true"}], None)
    with pytest.raises(ValueError, match="unknown"):
        CommonsenseSuite(subsets=["mmlu"])


# -------------------------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 1, 10), (200, 17, 100)])
def test_pass_at_k_matches_closed_form(n: int, c: int, k: int) -> None:
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 1.0
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: some sample of any k passes
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for bad in [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ----------------------------------------------------------------------------------------------------------- HumanEval
PROMPT = 'from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TEST = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
ROW = {
    "task_id": "Toy/0",
    "prompt": PROMPT,
    "canonical_solution": "    return sum(xs)\n",
    "test": TEST,
    "entry_point": "add",
}


def test_completion_truncated_at_stop_strings() -> None:
    completion = "    return sum(xs)\n\n\ndef helper():\n    pass\n"
    assert truncate_at_stop(completion) == "    return sum(xs)\n\n"
    for stop in ["\nclass X:", '\nif __name__ == "__main__":', "\nprint(add([1]))", "\n# tests"]:
        assert truncate_at_stop("    return sum(xs)\n" + stop + "\nboom") == "    return sum(xs)\n"
    assert build_program(PROMPT, completion, "add") == PROMPT + "    return sum(xs)\n\n"


def test_instruct_code_extraction() -> None:
    """The lenient rule (`eval.extract=lenient`); EvalPlus's rule (the default) is in test_protocol_humaneval.py."""
    completion = (
        "Here is an example:\n```python\nprint('hi')\n```\nAnd the solution:\n```python\n"
        "def add(xs):\n    return sum(xs)\n```\nDone."
    )
    assert extract_code(completion, "add") == "def add(xs):\n    return sum(xs)\n"
    assert extract_code("```py\nx = 1\n```", "add") == "x = 1\n"
    assert extract_code("def add(xs): return 0", "add") == "def add(xs): return 0"  # no fence: as is
    program = build_program(PROMPT, completion, "add", mode="instruct", extract="lenient")
    assert program == "from typing import List\ndef add(xs):\n    return sum(xs)\n"
    body_only = build_program(PROMPT, "```python\n    return sum(xs)\n```", "add", mode="instruct", extract="lenient")
    assert body_only == PROMPT + "    return sum(xs)\n"
    # the default (EvalPlus's sanitize): the prompt's import, then the answer's function; a bare body is no program
    reference = build_program(PROMPT, completion, "add", mode="instruct")
    assert reference == "from typing import List\n\n\ndef add(xs):\n    return sum(xs)\n"
    assert "return sum(xs)" not in build_program(PROMPT, "```python\n    return sum(xs)\n```", "add", mode="instruct")


def test_humaneval_executes_correct_and_wrong_completions() -> None:
    suite = HumanEvalSuite()
    (example,) = suite.examples([ROW], None)
    assert example.prompt == PROMPT and suite.needs_code_execution
    assert suite.program("    return sum(xs)\n", example).endswith(TEST + "\ncheck(add)\n")
    good = suite.score("    return sum(xs)\n\ndef unused():\n    raise SystemExit\n", example)
    bad = suite.score("    return len(xs)\n", example)
    assert good["correct"] and good["status"] == "passed"
    assert not bad["correct"] and bad["status"] == "failed"


def test_humaneval_instruct_prompt_and_raw_evalplus_rows() -> None:
    suite = HumanEvalSuite(mode="instruct")
    (example,) = suite.examples([ROW], "alpaca")
    assert example.prompt == render_prompt("alpaca", "Complete the following Python function:\n" + PROMPT)
    assert "\n\n### Instruction" in suite.stop
    record = suite.score("```python\nfrom typing import List\ndef add(xs):\n    return sum(xs)\n```", example)
    assert record["correct"]
    with pytest.raises(EvalDataError, match="base_input"):
        SUITES["humaneval_plus"]().examples(
            [{"task_id": "t", "prompt": "p", "entry_point": "f", "plus_input": []}], None
        )


# ----------------------------------------------------------------------------------------- run() with a fake generator
def test_gsm8k_run_and_aggregate() -> None:
    suite = GSM8KSuite(extract="lenient")
    rows = [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(4)]
    examples = suite.examples(rows, "alpaca")
    outs = {examples[0].prompt: "The answer is 0.", examples[1].prompt: "#### 1", examples[2].prompt: "so 7",
            examples[3].prompt: "no idea"}  # fmt: skip
    generate = fake_generate(outs)
    records = suite.run(generate, examples)
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert suite.aggregate(records) == {"accuracy": 0.5, "n": 4}
    assert generate.calls[0] == {"stop": list(suite.stop), "max_new_tokens": 512}


def test_math_run_and_aggregate() -> None:
    suite = SUITES["math500"](extract="lenient")
    rows = [
        {"problem": "a", "answer": r"\frac{1}{2}"},
        {"problem": "b", "answer": "3"},
        {"problem": "c", "answer": "2"},
    ]
    examples = suite.examples(rows, None)
    generate = fake_generate({"a": r"\boxed{0.5}", "b": "The answer is 3.", "c": r"\boxed{3}"})
    metrics = suite.aggregate(suite.run(generate, examples))
    assert metrics["n"] == 3 and metrics["accuracy"] == pytest.approx(2 / 3)


def test_commonsense_run_and_aggregate() -> None:
    suite = CommonsenseSuite(subsets=["boolq", "piqa", "winogrande"])
    rows = (
        [{"suite": "boolq", "instruction": f"b{i}", "answer": "true"} for i in range(4)]
        + [{"suite": "piqa", "instruction": f"p{i}", "answer": "solution1"} for i in range(2)]
        + [{"suite": "winogrande", "instruction": "w0", "answer": "option2"}]
    )
    examples = suite.examples(rows, None)
    outs = {"b0": "true", "b1": "true", "b2": "false", "b3": "True", "p0": "solution2 or solution1", "p1": "solution1",
            "w0": "option2"}  # fmt: skip
    metrics = suite.aggregate(suite.run(fake_generate(outs), examples))
    assert metrics == {
        "boolq/accuracy": 0.5,
        "boolq/n": 4,
        "piqa/accuracy": 0.5,
        "piqa/n": 2,
        "winogrande/accuracy": 1.0,
        "winogrande/n": 1,
        "average": pytest.approx((0.5 + 0.5 + 1.0) / 3),
        "n": 7,
        "num_beams": 4,
    }


def test_humaneval_run_greedy_and_sampled() -> None:
    rows = [ROW, {**ROW, "task_id": "Toy/1"}]
    suite = HumanEvalSuite()
    examples = suite.examples(rows, None)
    assert examples[0].prompt == examples[1].prompt  # same prompt: the fake returns the same text for both
    records = suite.run(fake_generate({PROMPT: "    return sum(xs)\n"}), examples)
    assert suite.aggregate(records) == {"pass@1": 1.0, "accuracy": 1.0, "n": 2, "sandbox": "bwrap"}

    sampled = HumanEvalSuite(samples=4, k=(1, 2, 10), workers=2)
    texts = ["    return sum(xs)\n", "    return 0\n", "    return len(xs)\n", "    return sum(xs)\n"]
    generate = fake_generate({PROMPT: texts})
    records = sampled.run(generate, sampled.examples(rows[:1], None))
    assert generate.calls[0]["num_return_sequences"] == 4 and generate.calls[0]["do_sample"] is True
    assert records[0]["passed"] == [True, False, False, True] and records[0]["n_correct"] == 2
    metrics = sampled.aggregate(records)
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))
    assert "pass@10" not in metrics and metrics["n"] == 1
