"""`eval.completions=FILE`: a file of existing completions scored without a model, matched to the suite's examples by
order or by id (HumanEval's `task_id`, our `id`, FastChat's `question_id`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_ralora.evaluation.base import (
    SUITES,
    EvalConfigError,
    EvalDataError,
    Example,
    SuiteJob,
    plain_cfg,
    read_numbered_rows,
    suite_file,
)

ID_KEYS = ("task_id", "id", "question_id")  # a line's example id (HumanEval, ours, FastChat's model answers)


def _samples_of(row: Any, where: str) -> list[list[str]]:
    """One line's samples, each a list of turns: {"completion": s}, {"completions": [s, ...]} (n samples),
    {"turns": [a1, a2]} or FastChat's model answer {"choices": [{"turns": [a1, a2]}, ...]}."""
    if not isinstance(row, Mapping):
        raise EvalDataError(f"{where} is a {type(row).__name__}, not a JSON object")

    def strings(value: Any, key: str) -> list[str]:
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise EvalDataError(f"{where}: `{key}` must be a non-empty list of strings")
        return list(value)

    if "completion" in row:
        if not isinstance(row["completion"], str):
            raise EvalDataError(f"{where}: `completion` must be a string")
        return [[row["completion"]]]
    if "completions" in row:
        return [[c] for c in strings(row["completions"], "completions")]
    if "turns" in row:
        return [strings(row["turns"], "turns")]
    if "choices" in row:
        choices = row["choices"]
        if not (isinstance(choices, list) and choices and all(isinstance(c, Mapping) for c in choices)):
            raise EvalDataError(f'{where}: `choices` must be a non-empty list of {{"turns": [...]}} objects')
        return [strings(c.get("turns"), "choices[].turns") for c in choices]
    raise EvalDataError(f"{where} has none of `completion`, `completions`, `turns`, `choices`; it has {sorted(row)}")


def _line_id(row: Mapping[str, Any]) -> str | None:
    return next((str(row[k]) for k in ID_KEYS if row.get(k) is not None), None)


def _by_id(lines: list[tuple[int, Any]], examples: Sequence[Example], field: str) -> list[tuple[int, Any]]:
    """The lines in the examples' order, matched by id: every example exactly one line, else one error."""
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise EvalDataError(f"{field}: the suite's example ids are not unique; give the lines in suite order, no ids")
    found: dict[str, tuple[int, Any]] = {}
    for n, row in lines:
        key = _line_id(row)
        if key is None:
            raise EvalDataError(f"{field}: line {n} has no id ({'/'.join(ID_KEYS)}) but other lines do")
        if key in found:
            raise EvalDataError(f"{field}: lines {found[key][0]} and {n} have the same id {key!r}")
        found[key] = (n, row)
    missing, extra = [i for i in ids if i not in found], sorted(set(found) - set(ids))
    if missing or extra:

        def show(what: str, xs: list[str]) -> str:
            return f"{what} {xs[:5]}" + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

        parts = ([show("missing", missing)] if missing else []) + ([show("extra", extra)] if extra else [])
        raise EvalDataError(f"{field}: the ids do not match the suite's {len(ids)} examples: {'; '.join(parts)}")
    return [found[i] for i in ids]


def read_completions(path: str | Path, examples: Sequence[Example], turns: int = 1) -> list[list[list[str]]]:
    """Per example, its samples (each `turns` texts) from a JSONL completions file: one line per example in the
    suite's order, or matched by id when lines carry `task_id` / `id` / `question_id`. Every line must have the
    same number of samples. EvalDataError (one line naming `eval.completions` and the file) on bad input."""
    field = f"eval.completions={path}"
    lines = read_numbered_rows(path, "eval.completions")
    if any(isinstance(row, Mapping) and _line_id(row) is not None for _, row in lines):
        lines = _by_id(lines, examples, field)
    elif len(lines) != len(examples):
        raise EvalDataError(f"{field}: {len(lines)} lines for {len(examples)} examples (one line per example)")
    answers = [_samples_of(row, f"{field}: line {n}") for n, row in lines]
    for (n, _), samples in zip(lines, answers, strict=True):
        if len(samples) != len(answers[0]):
            raise EvalDataError(
                f"{field}: line {n} has {len(samples)} samples, line {lines[0][0]} has {len(answers[0])}; every "
                "line needs the same number"
            )
        wrong = next((len(s) for s in samples if len(s) != turns), None)
        if wrong is not None:
            raise EvalDataError(f"{field}: line {n} has {wrong} turns; this suite needs {turns}")
    return answers


def attach_completions(jobs: Sequence[SuiteJob], eval_cfg: Mapping[str, Any]) -> None:
    """Read `eval.completions` (one file, or {suite: file}) into each job and set the suite's sample count from the
    file (HumanEval's `samples`). Classification suites and the lm_eval backend are refused: they score the model."""
    cfg = plain_cfg(eval_cfg)
    if (cfg.get("backend") or "builtin") != "builtin":
        raise EvalConfigError("eval.completions scores a file with the builtin suites; eval.backend must be builtin")
    for job in jobs:
        if job.classify is not None or job.suite is None:
            raise EvalConfigError(
                f"eval.completions: eval={job.name} is scored on the model's logits, not on completions; "
                f"allowed: generation suites {sorted(SUITES)}"
            )
    for job in jobs:
        path = suite_file(cfg, job.name, len(jobs), "completions")
        if not path:
            raise EvalConfigError(f"eval.completions has no file for eval={job.name}; give {{suite: file}}")
        turns = job.suite.turns
        answers = read_completions(path, job.examples, turns)
        n = len(answers[0]) if answers else 1
        if hasattr(job.suite, "samples"):
            if cfg.get("samples") is not None and int(cfg["samples"]) != n:
                raise EvalConfigError(
                    f"eval.samples={cfg['samples']} but eval.completions={path} has {n} samples per example"
                )
            job.suite.samples = n
        elif n != 1:
            raise EvalConfigError(
                f"eval.completions={path} has {n} samples per example; eval={job.name} scores one completion each"
            )
        job.completions = answers
