"""The evaluation contract: a suite turns data rows into examples, scores one model output per example, and
aggregates. Generation suites are scored on completions; classification suites on logits.

A suite module (one per suite: gsm8k.py, math.py, ...) defines a `GenerationSuite` subclass and registers it with
`register_suite`. The runner (runner.py) owns decoding, sharding across ranks, outputs and logging.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from lightning_ralora.data.templates import render_prompt


class EvalDataError(ValueError):
    """An evaluation data file that does not have the suite's format (message names the file and first bad line)."""


@dataclass
class Example:
    """One evaluation item: the prompt the model sees, the reference it is scored against, and anything else the
    scorer or the per-example record needs (`meta`, e.g. HumanEval's tests and entry point)."""

    id: str
    prompt: str
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class HubSource:
    """Where a suite's data lives on the hub: `datasets.load_dataset(path, name, split=split)`."""

    path: str
    name: str | None = None
    split: str = "test"


GenerateFn = Callable[..., list[str]]  # generate(prompts, stop=[...], max_new_tokens=N) -> completions


class GenerationSuite:
    """Base of the suites scored on generated text (causal LMs, greedy by default)."""

    name: ClassVar[str] = ""
    hub: ClassVar[HubSource | None] = None
    required_keys: ClassVar[tuple[str, ...]] = ()  # columns every data row must have
    stop: ClassVar[tuple[str, ...]] = ()  # stop strings: generation is cut at the first one
    max_new_tokens: ClassVar[int] = 512
    turns: ClassVar[int] = 1  # generate calls per example (MT-Bench: 2), read by `eval.completions`'s replay
    tokenizer: Any = None  # set by the runner: `template=chat` renders through the tokenizer's chat template

    def prompt(self, template: str | None, instruction: str, input: str | None = None) -> str:
        """`instruction` in the shared prompt template (the one the SFT run trained with), as its evaluation prompt."""
        return render_prompt(template, instruction, input, tokenizer=self.tokenizer, stage="eval")

    def examples(self, rows: Sequence[Mapping[str, Any]], template: str | None) -> list[Example]:
        """Examples from data rows, prompts rendered with the shared prompt template (`task.template`)."""
        raise NotImplementedError

    def score(self, completion: str, example: Example) -> dict[str, Any]:
        """The record of one completion: at least `correct` (bool) and `extracted` (what was compared)."""
        raise NotImplementedError

    def run(self, generate: GenerateFn, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """Per-example records for one shard: one completion per prompt, scored. Multi-turn suites (MT-Bench)
        override this; `generate(prompts, stop=..., max_new_tokens=...)` is the runner's batched greedy decoder."""
        completions = generate([ex.prompt for ex in examples], stop=list(self.stop), max_new_tokens=self.max_new_tokens)
        return [
            {"id": ex.id, "prompt": ex.prompt, "completion": c, "reference": ex.reference, **self.score(c, ex)}
            for ex, c in zip(examples, completions, strict=True)
        ]

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Suite metrics from the per-example records (default: accuracy as a fraction, and n)."""
        n = len(records)
        return {"accuracy": sum(bool(r["correct"]) for r in records) / n if n else 0.0, "n": n}

    def check_rows(self, rows: Sequence[Mapping[str, Any]], source: str) -> None:
        """Raise EvalDataError naming the first row that lacks a required key."""
        for i, row in enumerate(rows, start=1):
            missing = [k for k in self.required_keys if k not in row]
            if missing:
                raise EvalDataError(
                    f"{source}: row {i} lacks {missing}; a {self.name} row needs {list(self.required_keys)}"
                )


SUITES: dict[str, type[GenerationSuite]] = {}


def register_suite(cls: type[GenerationSuite]) -> type[GenerationSuite]:
    """Class decorator: make a generation suite selectable as `eval=<cls.name>`."""
    SUITES[cls.name] = cls
    return cls


# classification suites are scored on logits: fn(module, eval_cfg) -> (metrics, per-example records), where
# `module` is the AdapterModule (backbone, task, tokenizer) in eval mode on its device
ClassificationEval = Callable[[Any, Mapping[str, Any]], tuple[dict[str, float], list[dict[str, Any]]]]
CLASSIFICATION_SUITES: dict[str, ClassificationEval] = {}
# the data check of a classification suite, run by `runner.prepare` before any model loads: fn(eval_cfg) raises
# EvalDataError on local data it cannot score (hub data is checked when it loads)
CLASSIFICATION_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {}


def register_classification_suite(
    name: str, check: Callable[[Mapping[str, Any]], None] | None = None
) -> Callable[[ClassificationEval], ClassificationEval]:
    """Decorator: make a classification suite (GLUE, image) selectable as `eval=<name>`; `check(eval_cfg)` checks
    its local data before any model loads."""

    def wrap(fn: ClassificationEval) -> ClassificationEval:
        CLASSIFICATION_SUITES[name] = fn
        if check is not None:
            CLASSIFICATION_CHECKS[name] = check
        return fn

    return wrap


def _open_text(path: Path) -> str:
    """The text of a file; `.gz` files (OpenAI ships HumanEval as HumanEval.jsonl.gz) are decompressed."""
    if path.suffix != ".gz":
        return path.read_text(encoding="utf-8")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return fh.read()


def read_rows(path: str | Path, field: str = "eval.data_files") -> list[dict[str, Any]]:
    """Rows of a local JSONL or JSON (list) file, optionally gzipped (`.jsonl.gz`, `.json.gz`); EvalDataError names
    `field`, the file and the first bad line."""
    return [row for _, row in read_numbered_rows(path, field)]


def read_numbered_rows(path: str | Path, field: str = "eval.data_files") -> list[tuple[int, Any]]:
    """(line number, row) of each non-blank JSONL line (a JSON list: (index + 1, row)), as `read_rows` reads them."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{field}={str(path)}: file not found")
    try:
        text = _open_text(path)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise EvalDataError(f"{field}={path}: cannot be read as UTF-8 text ({err})") from None
    inner = Path(path.stem) if path.suffix == ".gz" else path  # HumanEval.jsonl.gz -> HumanEval.jsonl
    if inner.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalDataError(f"{field}={path}: not valid JSON ({err})") from None
        if not isinstance(data, list):
            raise EvalDataError(f"{field}={path}: a JSON file must hold a list of rows")
        return list(enumerate(data, start=1))
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as err:
            raise EvalDataError(f"{field}={path}: line {i} is not valid JSON ({err.msg})") from None
    return rows


class EvalConfigError(ValueError):
    """An evaluation request that cannot run (unknown suite, code execution not allowed, wrong model family)."""


@dataclass
class SuiteJob:
    """One suite ready to run: its examples (generation suites) or its scoring function (classification suites);
    `completions` (from `eval.completions`): per example, its samples, each a list of turns, replayed instead of
    generated."""

    name: str
    suite: GenerationSuite | None = None
    examples: list[Example] = field(default_factory=list)
    classify: Callable[..., tuple[dict[str, float], list[dict[str, Any]]]] | None = None
    completions: list[list[list[str]]] | None = None


def plain_cfg(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def suite_file(cfg: Mapping[str, Any], name: str, n_suites: int, key: str = "data_files") -> Any:
    """The suite's entry of `eval.<key>` (data_files, completions): one file, or {suite: file} for several suites."""
    files = cfg.get(key)
    if isinstance(files, Mapping):  # {suite: file}; with one suite, a mapping of its own (commonsense subsets)
        return files.get(name, files if n_suites == 1 and key == "data_files" else None)
    if files and n_suites > 1:
        raise EvalConfigError(
            f"eval.{key}={files} is one file but eval.suites lists {n_suites} suites; give a mapping "
            f"eval.{key}={{suite: file}}"
        )
    return files or None
