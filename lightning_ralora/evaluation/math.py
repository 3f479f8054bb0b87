"""MATH (competition mathematics): the full 5,000-problem test set (`math`) and the MATH-500 subset (`math500`).

Two answer-extraction rules, chosen by `eval.extract` (null: `reference`):

- `reference`: MetaMath's eval_math.py with its util.py (meta-math/MetaMath; PiSSA's utils/test_acc.py repeats
  it). The answer is the text after the last "The answer is: " (exact case, colon and one space) up to the first
  ".\\n", stripped, less one trailing period; without the marker the completion is invalid (wrong). It is compared
  with the gold by Hendrycks' `is_equiv`: both strings normalised (`normalize_math_answer`) and compared as strings;
  when normalising either one fails, the raw strings are compared.
- `lenient`: our forgiving rule. The content of the last `\\boxed{...}` (or `\\fbox{...}`; balanced braces), else the
  text after the last "The answer is" (any case; a leading ':' and a trailing period dropped), compared with the gold
  by `math_verify` (gold first, both `$...$`-wrapped); when math-verify parses nothing, the strings are compared
  without whitespace and `$`.

The gold: a row's `answer` when it has one (MATH-500); else, for Hendrycks' {problem, solution} rows, the solution's
last boxed answer, read as the rule asks (`reference_math_gold` / `last_boxed`). Generation follows the reference:
greedy, at most 2,048 new tokens, cut at MetaMath's stop strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lightning_ralora.evaluation.base import EvalDataError, Example, GenerationSuite, HubSource, register_suite
from lightning_ralora.evaluation.gsm8k import ANSWER_MARKER, REFERENCE_STOP, check_extract

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s$]+)")  # "\boxed 5"
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)

# the seven subject configs of EleutherAI/hendrycks_math; its 5,000 test problems are their union
MATH_SUBJECTS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

# ------------------------------------------------------------------------------------------------ reference rule
# plain substring edits of Hendrycks' normalisation, in its order, before its unit / percent steps
_EARLY_EDITS: tuple[tuple[str, str], ...] = (
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
)
_UNIT = "\\text{ "  # in MATH a "\text{ " only ever starts a unit on the right


def reference_math_answer(completion: str) -> str | None:
    """MetaMath's answer: after the last "The answer is: ", up to ".\\n", less a final '.'; None when invalid."""
    if ANSWER_MARKER not in completion:
        return None
    answer = completion.rsplit(ANSWER_MARKER, 1)[1].split(".\n", 1)[0].strip()
    return (answer[:-1] if answer.endswith(".") else answer).strip()


def _wrap_sqrt_arguments(text: str) -> str:
    """Wrap a one-character `\\sqrt` argument in braces (`\\sqrt3` -> `\\sqrt{3}`); ValueError on a bare `\\sqrt`."""
    head, *pieces = text.split("\\sqrt")
    out = [head]
    for piece in pieces:
        if not piece:
            raise ValueError("\\sqrt without an argument")
        out.append("\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:]))
    return "".join(out)


def _brace_fractions(text: str) -> str:
    """Brace one-character `\\frac` arguments (`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`); the text
    unchanged when a `\\frac` has one character after it; ValueError when it has none."""
    head, *pieces = text.split("\\frac")
    out = [head]
    for piece in pieces:
        if not piece:
            raise ValueError("\\frac without arguments")
        if piece[0] == "{":
            out.append("\\frac" + piece)
            continue
        if len(piece) < 2:
            return text
        numerator, second, rest = piece[0], piece[1], piece[2:]
        out.append("\\frac{" + numerator + "}" + (second if second == "{" else "{" + second + "}") + rest)
    return "".join(out)


def _slash_to_frac(text: str) -> str:
    """`3/4` -> `\\frac{3}{4}` for two canonical integers; ValueError when a side of the only '/' is no integer."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    top, bottom = int(parts[0]), int(parts[1])  # ValueError: the caller compares the raw strings
    return f"\\frac{{{top}}}{{{bottom}}}" if text == f"{top}/{bottom}" else text


def normalize_math_answer(text: str) -> str:
    """Hendrycks' `_strip_string` as in MetaMath's util.py: LaTeX spacing, `\\left`/`\\right`, degrees, `\\$`, a unit
    after "\\text{ ", `\\%`, leading zeros of decimals, a short "x =" prefix, spaces, and `\\frac12` / `a/b` / 0.5
    spelled as `\\frac{a}{b}`. ValueError where the original raises (the caller then compares raw strings)."""
    for old, new in _EARLY_EDITS:
        text = text.replace(old, new)
    if _UNIT in text:
        before, *after = text.split(_UNIT)
        if len(after) != 1:
            raise ValueError("more than one \\text{ unit")
        text = before
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5", "k=5" -> the right side
        text = sides[1]
    text = _brace_fractions(_wrap_sqrt_arguments(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _slash_to_frac(text)


def is_equiv(prediction: str | None, gold: str | None) -> bool:
    """Hendrycks' `is_equiv`: equal normalised strings (raw strings when normalising fails); None only equals None."""
    if prediction is None or gold is None:
        return prediction is None and gold is None
    try:
        return normalize_math_answer(prediction) == normalize_math_answer(gold)
    except ValueError:
        return prediction == gold


def reference_math_gold(solution: str) -> str | None:
    """MetaMath's gold from a solution: the last "\\boxed" (else "\\fbox") through its closing brace, kept only when it
    reads "\\boxed{...}"; None otherwise (MetaMath then scores the problem wrong)."""
    start = solution.rfind("\\boxed")
    if start < 0:
        start = solution.rfind("\\fbox")
    if start < 0:
        return None
    depth = 0
    for end in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[end], 0)
        if solution[end] == "}" and depth == 0:
            boxed = solution[start : end + 1]
            return boxed[len("\\boxed{") : -1] if boxed.startswith("\\boxed{") else None
    return None


# -------------------------------------------------------------------------------------------------- lenient rule
def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (balanced braces), or None."""
    starts = list(_BOXED.finditer(text))
    for match in reversed(starts):
        depth, i = 1, match.end()
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : i].strip()
            i += 1
        # unbalanced (e.g. a truncated completion): try the previous one
    bare = list(_BOXED_BARE.finditer(text))
    return bare[-1].group(1).strip() if bare else None


def extract_math_answer(completion: str) -> str | None:
    """The lenient answer: the last boxed content, else the text after the last 'The answer is' (any case)."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    markers = list(_ANSWER_IS.finditer(completion))
    if not markers:
        return None
    answer = completion[markers[-1].end() :].strip().lstrip(":").strip()
    answer = answer.split("\n", 1)[0].strip()
    return answer.rstrip(".").strip() or None


def _wrap(answer: str) -> str:
    """`answer` as math-verify input: as is when it already has math delimiters, else wrapped in `$...$`."""
    return answer if ("$" in answer or "\\(" in answer or "\\[" in answer) else f"${answer}$"


def _plain(answer: str) -> str:
    """A whitespace- and `$`-free form for the string fallback."""
    return re.sub(r"\s+|\$", "", answer)


def math_equivalent(prediction: str, reference: str) -> bool:
    """Whether two LaTeX answers are mathematically equivalent (math-verify, gold first; string fallback)."""
    from math_verify import parse, verify

    gold = parse(_wrap(reference))
    pred = parse(_wrap(prediction))
    if gold and pred:
        try:
            if verify(gold, pred):
                return True
        except Exception:  # a sympy failure on odd input is a non-match, not a crash
            pass
    return _plain(prediction) == _plain(reference)


# ------------------------------------------------------------------------------------------------------- both rules
def math_verdict(completion: str, gold: str | None, extract: str = "reference") -> tuple[bool, str | None]:
    """(correct, extracted) of one completion against the gold answer under the `extract` rule."""
    if check_extract(extract) == "reference":
        predicted = reference_math_answer(completion)
        return predicted is not None and is_equiv(predicted, gold), predicted
    predicted = extract_math_answer(completion)
    return predicted is not None and gold is not None and math_equivalent(predicted, gold), predicted


def math_correct(completion: str, reference: str, extract: str = "reference") -> bool:
    """Whether the completion's final answer equals the LaTeX gold answer under the `extract` rule."""
    return math_verdict(completion, reference, extract)[0]


def math_reference(row: Mapping[str, Any], extract: str = "lenient") -> str | None:
    """A row's gold answer: `answer` when present, else the solution's last boxed answer (MetaMath's reading for
    `reference`, our balanced-brace `last_boxed` for `lenient`); None when there is none."""
    if row.get("answer") not in (None, ""):
        return str(row["answer"]).strip()
    if row.get("solution"):
        solution = str(row["solution"])
        return reference_math_gold(solution) if check_extract(extract) == "reference" else last_boxed(solution)
    return None


@register_suite
class MathSuite(GenerationSuite):
    """MATH test, 5,000 problems: rows `problem` + `solution` (or `answer`). On the hub the set is split into the
    subject configs `hub_configs` of `hub.path`; a runner loading from the hub concatenates their test splits.
    `extract` (`eval.extract`): `reference` (MetaMath's rule, the default) or `lenient`."""

    name: ClassVar[str] = "math"
    hub: ClassVar[HubSource | None] = HubSource("EleutherAI/hendrycks_math", MATH_SUBJECTS[0], "test")
    hub_configs: ClassVar[tuple[str, ...]] = MATH_SUBJECTS
    required_keys: ClassVar[tuple[str, ...]] = ("problem",)
    stop: ClassVar[tuple[str, ...]] = REFERENCE_STOP
    max_new_tokens: ClassVar[int] = 2048  # MetaMath's eval_math.py: max_tokens=2048

    def __init__(self, extract: str = "reference") -> None:
        self.extract = check_extract(extract)

    def examples(self, rows: Sequence[Mapping[str, Any]], template: str | None) -> list[Example]:
        """One example per row. The gold is `answer` or the solution's boxed answer; a row with neither is a data
        error, except that under `reference` a solution without a readable `\\boxed{}` is kept and scored wrong,
        as MetaMath does."""
        self.check_rows(rows, self.name)
        out = []
        for i, row in enumerate(rows):
            reference = math_reference(row, self.extract)
            keep_unboxed = self.extract == "reference" and bool(row.get("solution"))
            if reference is None and not keep_unboxed:
                raise EvalDataError(
                    f"{self.name}: row {i + 1} has neither an `answer` nor a `solution` with a \\boxed{{}} answer"
                )
            meta = {k: row[k] for k in ("level", "type", "subject") if k in row}
            ex_id = str(row.get("unique_id", row.get("id", i)))
            out.append(Example(id=ex_id, prompt=self.prompt(template, row["problem"]), reference=reference, meta=meta))
        return out

    def score(self, completion: str, example: Example) -> dict[str, Any]:
        """`correct`, the `extracted` final answer (None when there is none) and the `extract` rule that scored it."""
        gold = None if example.reference is None else str(example.reference)
        correct, extracted = math_verdict(completion, gold, self.extract)
        return {"correct": correct, "extracted": extracted, "extract": self.extract}


@register_suite
class Math500Suite(MathSuite):
    """MATH-500 (HuggingFaceH4/MATH-500): rows `problem`, `solution`, `answer`, `subject`, `level`, `unique_id`."""

    name: ClassVar[str] = "math500"
    hub: ClassVar[HubSource | None] = HubSource("HuggingFaceH4/MATH-500", None, "test")
    hub_configs: ClassVar[tuple[str, ...]] = ()
