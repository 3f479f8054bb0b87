"""The eight LLM-Adapters commonsense-reasoning suites (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-c, ARC-e, OBQA)
evaluated as LLM-Adapters' `commonsense_evaluate.py` does (AGI-Edgerunners/LLM-Adapters):

- decoding: beam search with 4 beams, no sampling, at most 32 new tokens, no stop strings (EOS ends a beam);
- the response is the generated text before any further "### Response:" (the reference splits the decoded prompt +
  completion on it and keeps piece [1]), stripped;
- the prediction is the FIRST match of the subset's answer pattern in it, case-sensitive (so "True" does not match
  BoolQ's `true|false`), or none; it is correct when it equals the row's `answer`.

Rows hold `instruction` and `answer` (the `input` column is empty and the reference ignores it). The data is a folder
of `<subset>/test.json` under LLM-Adapters' folder names (`social_i_qa`, `ARC-Challenge`, ...) or ours (`siqa`,
`arc_challenge`, ...); metric keys always use ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from lightning_ralora.evaluation.base import (
    EvalDataError,
    Example,
    GenerateFn,
    GenerationSuite,
    HubSource,
    read_rows,
    register_suite,
)

# our subset name -> the folder (and --dataset) name in LLM-Adapters' dataset/
LLM_ADAPTERS_NAMES: dict[str, str] = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_challenge": "ARC-Challenge",
    "arc_easy": "ARC-Easy",
    "openbookqa": "openbookqa",
}
COMMONSENSE_SUITES: tuple[str, ...] = tuple(LLM_ADAPTERS_NAMES)
_OUR_NAME: dict[str, str] = {**{v: k for k, v in LLM_ADAPTERS_NAMES.items()}, **{k: k for k in LLM_ADAPTERS_NAMES}}
ALLOWED_NAMES: tuple[str, ...] = tuple(dict.fromkeys([*COMMONSENSE_SUITES, *LLM_ADAPTERS_NAMES.values()]))

_ANSWERS = r"answer1|answer2|answer3|answer4|answer5"  # SIQA, ARC-c, ARC-e and OBQA share one pattern there
CHOICE_PATTERNS: dict[str, re.Pattern[str]] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "siqa": re.compile(_ANSWERS),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
    "arc_challenge": re.compile(_ANSWERS),
    "arc_easy": re.compile(_ANSWERS),
    "openbookqa": re.compile(_ANSWERS),
}
RESPONSE_MARK = "### Response:"  # the reference keeps the text between the prompt's marker and the next one
NUM_BEAMS = 4
MAX_NEW_TOKENS = 32


def subset_name(name: str, field: str = "eval.subsets") -> str:
    """Our name of a subset given in either naming ('social_i_qa' -> 'siqa'); ValueError naming `field` if unknown."""
    if name not in _OUR_NAME:
        raise ValueError(f"{field}: unknown commonsense suite {name!r}; allowed: {list(ALLOWED_NAMES)}")
    return _OUR_NAME[name]


def response_text(completion: str) -> str:
    """The reference's output: the completion up to a further "### Response:" (if the model wrote one), stripped."""
    return completion.split(RESPONSE_MARK)[0].strip()


def extract_choice(text: str, suite: str) -> str | None:
    """The first match of the subset's answer pattern in the stripped text, or None (the reference's "")."""
    found = CHOICE_PATTERNS[subset_name(suite, "suite")].findall(text.strip())
    return found[0] if found else None


def choice_correct(completion: str, suite: str, reference: str) -> bool:
    """Whether the completion's response has its first answer-pattern match equal to the label (e.g. 'answer2')."""
    predicted = extract_choice(response_text(completion), suite)
    return predicted is not None and predicted == str(reference)


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r} must be a positive integer")
    return value


@register_suite
class CommonsenseSuite(GenerationSuite):
    """The commonsense suites in one run: per-subset accuracy and their average (keys in our subset names).

    Options: `subsets` (`eval.subsets`, either naming; default all eight) and `num_beams` (`eval.num_beams`, default
    4 as the reference; 1 is greedy). Data: `load_rows(data)` reads a mapping subset -> file, or a folder of
    `<subset>/test.json`, and tags every row with its `suite`; `examples()` takes rows that carry `suite` (rows
    without it are accepted only when a single subset is selected).
    """

    name: ClassVar[str] = "commonsense"
    hub: ClassVar[HubSource | None] = None  # LLM-Adapters' dataset folder, given as local files
    required_keys: ClassVar[tuple[str, ...]] = ("instruction", "answer")
    stop: ClassVar[tuple[str, ...]] = ()  # none, as the reference: with beams a stop string would end hypotheses
    max_new_tokens: ClassVar[int] = MAX_NEW_TOKENS

    def __init__(self, subsets: Sequence[str] | None = None, num_beams: int = NUM_BEAMS) -> None:
        if isinstance(subsets, str):
            subsets = [subsets]
        names = list(subsets) if subsets else list(COMMONSENSE_SUITES)
        unknown = [s for s in names if s not in _OUR_NAME]
        if unknown:
            raise ValueError(f"eval.subsets: unknown commonsense suites {unknown}; allowed: {list(ALLOWED_NAMES)}")
        self.suites: tuple[str, ...] = tuple(dict.fromkeys(_OUR_NAME[s] for s in names))
        self.num_beams = _positive_int(num_beams, "eval.num_beams")

    def _files_in_folder(self, root: Path) -> dict[str, Path]:
        """`<name>/test.json` of every selected subset, under our folder name or LLM-Adapters'."""
        if not root.is_dir():
            raise EvalDataError(f"eval.data_files={root}: not a folder of <subset>/test.json (nor a mapping)")
        files, missing = {}, []
        for suite in self.suites:
            found = [
                root / folder / "test.json"
                for folder in dict.fromkeys([suite, LLM_ADAPTERS_NAMES[suite]])
                if (root / folder / "test.json").is_file()
            ]
            if len(found) > 1:
                raise EvalDataError(
                    f"eval.data_files={root}: {suite} is there twice ({found[0].parent.name}/ and "
                    f"{found[1].parent.name}/); keep one"
                )
            if found:
                files[suite] = found[0]
            else:
                missing.append(suite)
        if missing:
            wanted = [f"{s} ({'/'.join(dict.fromkeys([s, LLM_ADAPTERS_NAMES[s]]))}/test.json)" for s in missing]
            raise EvalDataError(
                f"eval.data_files={root}: no test.json for commonsense suites {wanted}; give them or choose "
                f"among the present ones with eval.subsets"
            )
        return files

    def _files_in_mapping(self, data: Mapping[str, str | Path]) -> dict[str, Path]:
        """{subset: file} with keys in either naming."""
        given: dict[str, Path] = {}
        for key, path in data.items():
            suite = subset_name(str(key), "eval.data_files")
            if suite in given:
                raise EvalDataError(f"eval.data_files: a file for {suite} is given twice")
            given[suite] = Path(path)
        missing = [s for s in self.suites if s not in given]
        if missing:
            raise EvalDataError(f"eval.data_files: no file for commonsense suites {missing}")
        return {s: given[s] for s in self.suites}

    def load_rows(self, data: str | Path | Mapping[str, str | Path]) -> list[dict[str, Any]]:
        """Rows of the selected subsets tagged with `suite` (our name), from {subset: file} or a folder."""
        try:
            files = self._files_in_mapping(data) if isinstance(data, Mapping) else self._files_in_folder(Path(data))
        except ValueError as err:  # an unknown mapping key
            raise EvalDataError(str(err)) from None
        rows: list[dict[str, Any]] = []
        for suite, path in files.items():
            suite_rows = read_rows(path)
            if not suite_rows:  # scored, the subset would report accuracy 0.0 over nothing
                raise EvalDataError(f"eval.data_files={path}: no data rows for commonsense subset {suite} (empty)")
            self.check_rows(suite_rows, str(path))
            rows.extend({**row, "suite": suite} for row in suite_rows)
        return rows

    def examples(self, rows: Sequence[Mapping[str, Any]], template: str | None) -> list[Example]:
        """One example per row of a selected subset (the instruction alone, as the reference); ids are
        '<subset>/<index within the subset>'."""
        self.check_rows(rows, self.name)
        counts: dict[str, int] = {}
        out = []
        for i, row in enumerate(rows):
            tag = row.get("suite")
            if tag is None:
                if len(self.suites) != 1:
                    raise EvalDataError(
                        f"{self.name}: row {i + 1} has no `suite`; with several suites selected use load_rows()"
                    )
                suite = self.suites[0]
            else:
                try:
                    suite = subset_name(str(tag), f"{self.name} row {i + 1} `suite`")
                except ValueError as err:
                    raise EvalDataError(str(err)) from None
            if suite not in self.suites:
                continue
            index = counts.get(suite, 0)
            counts[suite] = index + 1
            out.append(
                Example(
                    id=f"{suite}/{index}",
                    prompt=self.prompt(template, row["instruction"]),
                    reference=str(row["answer"]),
                    meta={"suite": suite},
                )
            )
        return out

    def run(self, generate: GenerateFn, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """Records of one shard: one beam-search completion per prompt (the reference's decoding), scored."""
        completions = generate(
            [ex.prompt for ex in examples],
            stop=list(self.stop),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
        )
        return [
            {"id": ex.id, "prompt": ex.prompt, "completion": c, "reference": ex.reference, **self.score(c, ex)}
            for ex, c in zip(examples, completions, strict=True)
        ]

    def score(self, completion: str, example: Example) -> dict[str, Any]:
        """`correct`, the `extracted` label (None when no pattern matched), the `suite` and the `num_beams` used."""
        suite = example.meta["suite"]
        extracted = extract_choice(response_text(completion), suite)
        return {
            "correct": extracted is not None and extracted == example.reference,
            "extracted": extracted,
            "suite": suite,
            "num_beams": self.num_beams,
        }

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """`<suite>/accuracy` and `<suite>/n` per subset present, `average` of their accuracies, the total `n` and
        the decoding's `num_beams`."""
        by_suite: dict[str, list[bool]] = {}
        for r in records:
            by_suite.setdefault(r["suite"], []).append(bool(r["correct"]))
        metrics: dict[str, float] = {}
        accuracies = []
        for suite in [s for s in self.suites if s in by_suite] + [s for s in by_suite if s not in self.suites]:
            hits = by_suite[suite]
            metrics[f"{suite}/accuracy"] = sum(hits) / len(hits)
            metrics[f"{suite}/n"] = len(hits)
            accuracies.append(metrics[f"{suite}/accuracy"])
        metrics["average"] = sum(accuracies) / len(accuracies) if accuracies else 0.0
        metrics["n"] = len(records)
        metrics["num_beams"] = self.num_beams
        return metrics
