"""GSM8K (grade-school math word problems), scored by the final number of the completion.

Two answer-extraction rules, chosen by `eval.extract` (null: `reference`):

- `reference`: MetaMath's eval_gsm8k.py (meta-math/MetaMath; PiSSA's utils/test_acc.py repeats it). Only the text
  after the last "The answer is: " (exact case, colon and one space) counts; without it the completion is invalid
  (wrong). There the first match of `[-+]?\\d*[.,/]?\\d+` is read with its comma dropped ("1,234" -> 1234;
  "1,234,567" matches only "1,234"), an `a/b` match is divided ("b" == "0": the numerator alone), and the value is
  rounded to an integer (Python's `round`, half to even: "18.5" -> 18). Correct when it equals the gold integer.
- `lenient`: our forgiving rule. After the last answer marker ("The answer is", any case, or "####") the first
  number, else the last number of the completion; `$` dropped, "1,234" read whole, a minus only when not after a
  word character ("5-3" is 5 and 3); correct within 1e-4.

The gold is the number after "####" in a GSM8K answer ("... #### 18"), or a bare number. Generation follows the
reference: greedy, at most 512 new tokens, cut at MetaMath's stop strings (`REFERENCE_STOP`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lightning_ralora.evaluation.base import EvalDataError, Example, GenerationSuite, HubSource, register_suite

# stop strings for free-text answers in the shared templates (alpaca / metamath) and common end-of-turn markers
TEXT_STOP: tuple[str, ...] = ("\n\n### Instruction", "\n### Instruction", "</s>", "<|im_end|>", "<|eot_id|>")

# the vLLM stop list of MetaMath's eval_gsm8k.py and eval_math.py, in its order (generation ends before the first)
REFERENCE_STOP: tuple[str, ...] = (
    "Question:",
    "Question",
    "USER:",
    "USER",
    "ASSISTANT:",
    "ASSISTANT",
    "Instruction:",
    "Instruction",
    "Response:",
    "Response",
)

# `eval.extract` values of the GSM8K and MATH suites
EXTRACT_RULES: tuple[str, ...] = ("reference", "lenient")

# MetaMath's answer marker: its training responses end "The answer is: <answer>"
ANSWER_MARKER = "The answer is: "

_REFERENCE_NUMBER = re.compile(r"[-+]?\d*[.,/]?\d+")
_MARKER = re.compile(r"the answer is|####", re.IGNORECASE)
# a number: optional minus (not after a word character), comma-grouped or plain digits, optional decimals
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_TOLERANCE = 1e-4


def check_extract(extract: str, rules: Sequence[str] = EXTRACT_RULES, suite: str = "") -> str:
    """`extract` when it names one of the suite's `rules`; ValueError naming `eval.extract` and the allowed values
    otherwise (every suite's default, null, is `reference`)."""
    if extract not in rules:
        where = f" for {suite}" if suite else ""
        raise ValueError(f"eval.extract={extract!r} is unknown{where}; allowed: {list(rules)} (null: reference)")
    return extract


def reference_gsm8k_answer(completion: str) -> int | None:
    """MetaMath's prediction: the first number after the last "The answer is: ", rounded; None when invalid."""
    if ANSWER_MARKER not in completion:
        return None
    match = _REFERENCE_NUMBER.search(completion.rsplit(ANSWER_MARKER, 1)[1].strip())
    if match is None:
        return None
    token = match.group()
    if "/" in token:
        numerator, denominator = token.split("/")
        if not numerator.lstrip("+-"):  # "/5", "-/5": the numerator is not a number
            return None
        if int(denominator) == 0:  # MetaMath: a "0" denominator gives the numerator (others crash its script)
            return round(float(numerator))
        return round(int(numerator) / int(denominator))
    value = float(token.replace(",", ""))
    return None if math.isinf(value) else round(value)


def _numbers(text: str) -> list[float]:
    """Every number in `text`, in order (`$` dropped, "1,234" read as 1234)."""
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text.replace("$", ""))]


def extract_gsm8k_answer(completion: str) -> float | None:
    """The lenient prediction: the first number after the last answer marker, else the last number; None if absent."""
    markers = list(_MARKER.finditer(completion))
    if markers:
        found = _numbers(completion[markers[-1].end() :])
        return found[0] if found else None
    found = _numbers(completion)
    return found[-1] if found else None


def parse_gsm8k_reference(reference: str | float | int) -> float:
    """The gold number: a bare number, or the number after '####' in a GSM8K answer (ValueError otherwise)."""
    if isinstance(reference, int | float):
        return float(reference)
    text = str(reference)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _numbers(text.strip())
    if not found:
        raise ValueError(f"GSM8K reference {reference!r} holds no number")
    return found[0]


def gsm8k_verdict(completion: str, gold: float, extract: str = "reference") -> tuple[bool, float | int | None]:
    """(correct, extracted) of one completion against the gold number under the `extract` rule."""
    if check_extract(extract) == "reference":
        predicted: float | int | None = reference_gsm8k_answer(completion)
        return predicted is not None and float(predicted) == float(gold), predicted
    predicted = extract_gsm8k_answer(completion)
    return predicted is not None and abs(predicted - gold) < _TOLERANCE, predicted


def gsm8k_correct(completion: str, reference: str | float | int, extract: str = "reference") -> bool:
    """Whether the completion's answer equals the gold (a bare number or a '#### N' answer) under `extract`."""
    return gsm8k_verdict(completion, parse_gsm8k_reference(reference), extract)[0]


@register_suite
class GSM8KSuite(GenerationSuite):
    """GSM8K test (1,319 problems): rows `question`, `answer` ('... #### N'); accuracy of the final number.
    `extract` (`eval.extract`): `reference` (MetaMath's rule, the default) or `lenient`."""

    name: ClassVar[str] = "gsm8k"
    hub: ClassVar[HubSource | None] = HubSource("openai/gsm8k", "main", "test")
    required_keys: ClassVar[tuple[str, ...]] = ("question", "answer")
    stop: ClassVar[tuple[str, ...]] = REFERENCE_STOP
    max_new_tokens: ClassVar[int] = 512  # MetaMath's eval_gsm8k.py: max_tokens=512

    def __init__(self, extract: str = "reference") -> None:
        self.extract = check_extract(extract)

    def examples(self, rows: Sequence[Mapping[str, Any]], template: str | None) -> list[Example]:
        """One example per row; the reference is the number after '####' (EvalDataError when there is none)."""
        self.check_rows(rows, self.name)
        out = []
        for i, row in enumerate(rows):
            try:
                reference = parse_gsm8k_reference(row["answer"])
            except ValueError as err:
                raise EvalDataError(f"{self.name}: row {i + 1}: {err}") from None
            out.append(
                Example(id=str(row.get("id", i)), prompt=self.prompt(template, row["question"]), reference=reference)
            )
        return out

    def score(self, completion: str, example: Example) -> dict[str, Any]:
        """`correct`, the `extracted` number (None when there is none) and the `extract` rule that scored it."""
        correct, extracted = gsm8k_verdict(completion, float(example.reference), self.extract)
        return {"correct": correct, "extracted": extracted, "extract": self.extract}
