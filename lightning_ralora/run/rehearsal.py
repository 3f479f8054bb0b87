"""Fixture data for `debug=rehearsal` (conf/debug/rehearsal.yaml): small files in the real formats, written on first
use below `<run_dir>/rehearsal_data/` by the `${rehearsal_data:RUN_DIR,KIND,...}` resolver.

Kinds: `sft,PROMPT_KEY,RESPONSE_KEY` (training JSONL with the experiment's columns), `glue,TASK` (GLUE rows with the
task's columns, JSONL; TASK None: text/label), `gsm8k` ({question, answer "#### N"}), `math` ({problem, solution with
\\boxed{}}), `humaneval` / `humaneval_plus` ({task_id, prompt, test, entry_point, canonical_solution}), `mt_bench`
(FastChat's {question_id, category, turns}), `mt_bench_reference` (FastChat's reference answers file), `commonsense`
(LLM-Adapters' dataset/ folder: <name>/test.json with {instruction, input, output, answer}, under its folder names),
`images` (an imagefolder of two colour classes, train/ and test/). The content is
deterministic; a file that exists is left as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_ralora.tasks.classification import GLUE_TASKS, glue_task_name

N_TRAIN = 48  # training rows (a 20 % hold-out leaves ~38, i.e. ~9 batches of 4)
N_EVAL = 4  # rows per evaluation file
N_COMMONSENSE = 2  # rows per commonsense subset (eight subsets)

Rows = list[dict[str, Any]]


def _sft(prompt_key: str, response_key: str) -> Rows:
    """Arithmetic prompt/response pairs under the experiment's column names."""
    return [{prompt_key: f"What is {i % 7} + {i % 5}?", response_key: f"{i % 7 + i % 5}"} for i in range(N_TRAIN)]


def _glue(task: str | None) -> Rows:
    """GLUE-format rows (the task's text columns and `label`); a `text`/`label` pair without a GLUE task."""
    if task in (None, "None", "null"):
        return [{"text": f"{'good' if i % 2 else 'bad'} item {i}", "label": i % 2} for i in range(N_TRAIN)]
    spec = GLUE_TASKS[glue_task_name(task)]
    rows = []
    for i in range(N_TRAIN):
        label: Any = float(i % 6) if spec.num_labels == 1 else i % spec.num_labels
        row = {spec.text_key: f"{'good' if i % 2 else 'bad'} sentence {i}", "label": label}
        if spec.text_pair_key:
            row[spec.text_pair_key] = f"{'same' if i % 2 else 'other'} sentence {i}"
        rows.append(row)
    return rows


def _gsm8k() -> Rows:
    return [
        {"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(N_EVAL)
    ]


def _math() -> Rows:
    return [
        {
            "problem": f"Compute ${i} + 1$.",
            "solution": f"${i} + 1 = \\boxed{{{i + 1}}}$",
            "level": "Level 1",
            "type": "Algebra",
        }
        for i in range(N_EVAL)
    ]


def _humaneval() -> Rows:
    problems = [
        ("add", "a: int, b: int", "Return a + b.", "    return a + b\n", "assert candidate(2, 3) == 5"),
        ("neg", "x: int", "Return -x.", "    return -x\n", "assert candidate(4) == -4"),
        ("first", "xs: list", "Return the first item.", "    return xs[0]\n", "assert candidate([7, 8]) == 7"),
        ("double", "x: int", "Return 2 * x.", "    return 2 * x\n", "assert candidate(3) == 6"),
    ]
    return [
        {
            "task_id": f"Rehearsal/{i}",
            "prompt": f'def {name}({args}):\n    """{doc}"""\n',
            "canonical_solution": body,
            "test": f"def check(candidate):\n    {check}\n",
            "entry_point": name,
        }
        for i, (name, args, doc, body, check) in enumerate(problems)
    ]


MT_BENCH_CATEGORIES = ("writing", "math", "coding", "reasoning")


def _mt_bench() -> Rows:
    return [
        {"question_id": 81 + i, "category": c, "turns": [f"Say something about {c}.", "Now say it shorter."]}
        for i, c in enumerate(MT_BENCH_CATEGORIES)
    ]


def _mt_bench_reference() -> Rows:
    """Reference answers in FastChat's model-answer format for every question (the judge reads those it needs)."""
    return [
        {"question_id": 81 + i, "model_id": "gpt-4", "choices": [{"index": 0, "turns": [f"About {c}.", "Shorter."]}]}
        for i, c in enumerate(MT_BENCH_CATEGORIES)
    ]


_ANSWERS = {  # LLM-Adapters' dataset/ folder names -> answer words
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}


def _commonsense(root: Path) -> None:
    """<root>/<name>/test.json for the eight sets, as LLM-Adapters ships them (a JSON list of rows)."""
    for subset, answers in _ANSWERS.items():
        rows = [
            {
                "instruction": f"Question {i} of {subset}. Answer format: {'/'.join(answers)}",
                "input": "",
                "output": f"the correct answer is {answers[i % 2]}",
                "answer": answers[i % 2],
            }
            for i in range(N_COMMONSENSE)
        ]
        _write(root / subset / "test.json", json.dumps(rows, indent=0))


def _images(root: Path) -> None:
    """An imagefolder: <root>/{train,test}/class_<c>/<i>.png, 32x32 images whose colour is their class."""
    if (root / "test").is_dir():
        return
    from PIL import Image

    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    for split, n in (("train", N_TRAIN // 2), ("test", N_EVAL // 2)):
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = tmp / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (32, 32), tuple(min(255, v + 3 * i) for v in colour)).save(folder / f"{i}.png")
    try:
        os.replace(tmp, root)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically unless it exists (concurrent runs may share a run_dir's parent)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonl(rows: Rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


ROWS: dict[str, Callable[..., Rows]] = {
    "sft": _sft,
    "glue": _glue,
    "gsm8k": _gsm8k,
    "math": _math,
    "humaneval": _humaneval,
    "humaneval_plus": _humaneval,
    "mt_bench": _mt_bench,
    "mt_bench_reference": _mt_bench_reference,
}


def rehearsal_data(run_dir: Any, kind: str, *args: Any) -> str:
    """Path of fixture `kind` (args: its columns / GLUE task) below `<run_dir>/rehearsal_data/`, written if absent."""
    root = Path(str(run_dir)) / "rehearsal_data"
    if kind == "commonsense":
        _commonsense(root / "commonsense")
        return str(root / "commonsense")
    if kind == "images":
        root.mkdir(parents=True, exist_ok=True)
        _images(root / "images")
        return str(root / "images")
    if kind not in ROWS:
        raise ValueError(f"rehearsal_data: unknown kind {kind!r}; allowed: {sorted([*ROWS, 'commonsense', 'images'])}")
    path = root / "_".join([kind, *(str(a) for a in args)]).replace("/", "_")
    path = path.with_name(path.name + ".jsonl")
    _write(path, _jsonl(ROWS[kind](*args)))
    return str(path)
