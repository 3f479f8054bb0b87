"""End to end on CPU through the eval CLI: a HumanEval-format file and a commonsense folder (LLM-Adapters layout) on
a tiny Llama trained by task=sft (1 process, and 2 DDP ranks for commonsense), a GLUE pair task (MRPC) and STS-B
regression on the tiny Llama classifier trained by task=classification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_ralora.cli.eval import main as eval_main
from lightning_ralora.evaluation.humaneval import CODE_STOP
from lightning_ralora.run.job import train
from tests.conftest import make_cfg
from tests.helpers import pearson, spearman

N_HUMANEVAL = 3
COMMONSENSE = ("boolq", "piqa")
N_PER_SUBSET = 3


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path: Path) -> int:
    """Non-empty lines of a file (the independent count of rows / records)."""
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _records(run: Path, suite: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "eval" / f"{suite}.jsonl").read_text().splitlines()]


def _snapshot(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")}


# --- data in the suites' formats ------------------------------------------------------------------------------------
def _humaneval_rows() -> list[dict[str, str]]:
    """HumanEval rows (task_id, prompt, canonical_solution, test, entry_point) of three small problems."""
    problems = [
        ("add", "a: int, b: int", "Return a + b.", "    return a + b\n", "assert candidate(2, 3) == 5"),
        ("neg", "x: int", "Return -x.", "    return -x\n", "assert candidate(4) == -4"),
        ("first", "xs: list", "Return the first item.", "    return xs[0]\n", "assert candidate([7, 8]) == 7"),
    ]
    return [
        {
            "task_id": f"Toy/{i}",
            "prompt": f'def {name}({args}):\n    """{doc}"""\n',
            "canonical_solution": body,
            "test": f"def check(candidate):\n    {check}\n",
            "entry_point": name,
        }
        for i, (name, args, doc, body, check) in enumerate(problems)
    ]


def _commonsense_folder(root: Path) -> Path:
    """<root>/<subset>/test.json (a JSON list of {instruction, answer}), as LLM-Adapters ships its dataset folder."""
    rows = {
        "boolq": [
            {"instruction": f"Please answer true or false. Is {i} even?", "answer": "true" if i % 2 == 0 else "false"}
            for i in range(N_PER_SUBSET)
        ],
        "piqa": [
            {
                "instruction": f"Goal: task {i}. Solution1: do a. Solution2: do b. Answer format: solution1/solution2",
                "answer": f"solution{i % 2 + 1}",
            }
            for i in range(N_PER_SUBSET)
        ],
    }
    for subset, subset_rows in rows.items():
        (root / subset).mkdir(parents=True)
        (root / subset / "test.json").write_text(json.dumps(subset_rows, indent=1))
    return root


def _mrpc_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"sentence1": f"{w} {i}", "sentence2": f"{w if i % 2 else 'other'} {i}", "label": i % 2, "idx": i}
        for i, w in enumerate(["cat", "dog", "sun", "sea"] * (n // 4))
    ]


def _stsb_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"sentence1": "x" * k, "sentence2": "y" * (k % 3 + 1), "label": round(k / 4, 2), "idx": k}
        for k in range(1, n + 1)
    ]


# --- the tiny Llama trained by task=sft ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama trained briefly by task=sft (no eval during training), with the evaluation data beside it."""
    tmp = tmp_path_factory.mktemp("e2e_sft")
    train_rows = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(4) for b in range(4)]
    train_file = _write_jsonl(tmp / "train.jsonl", train_rows)
    run = tmp / "run"
    overrides = [
        "task=sft", f"task.data_files={train_file}", "task.template=alpaca", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2",
    ]  # fmt: skip
    train(make_cfg(run, overrides))
    return {
        "run": run,
        "humaneval": _write_jsonl(tmp / "humaneval.jsonl", _humaneval_rows()),
        "commonsense": _commonsense_folder(tmp / "commonsense"),
    }


def _humaneval_args(sft_run: dict[str, Path]) -> list[str]:
    return [f"run_dir={sft_run['run']}", "eval=humaneval", f"eval.data_files={sft_run['humaneval']}",
            "eval.max_new_tokens=8"]  # fmt: skip


def test_humaneval_refuses_without_allow_code_execution(sft_run, capsys) -> None:
    run = sft_run["run"]
    before = _snapshot(run)
    with pytest.raises(SystemExit) as exc:
        eval_main(_humaneval_args(sft_run))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allow_code_execution" in err, err
    assert _snapshot(run) == before  # nothing written


def test_humaneval_file_end_to_end(sft_run, capsys) -> None:
    run = sft_run["run"]
    eval_main([*_humaneval_args(sft_run), "eval.allow_code_execution=true"])
    metrics = json.loads((run / "eval.json").read_text())["humaneval"]
    n_rows = _lines(sft_run["humaneval"])
    assert n_rows == N_HUMANEVAL and metrics["n"] == n_rows
    assert {"pass@1", "accuracy", "n"} <= set(metrics)
    records = _records(run, "humaneval")
    assert len(records) == n_rows == _lines(run / "eval" / "humaneval.jsonl")
    assert [r["index"] for r in records] == list(range(n_rows))
    assert [r["id"] for r in records] == [row["task_id"] for row in _humaneval_rows()]
    for rec, row in zip(records, _humaneval_rows(), strict=True):
        assert isinstance(rec["status"], str) and rec["status"]  # the sandbox's verdict on every program
        assert rec["correct"] == (rec["status"] == "passed")
        # the executed program: prompt + completion cut at the first code stop, the tests, the check call
        code = rec["completion"]
        code = code[: min([i for i in (code.find(s) for s in CODE_STOP) if i >= 0], default=len(code))]
        assert rec["extracted"] == row["prompt"] + code + "\n" + row["test"] + f"\ncheck({row['entry_point']})\n"
        assert rec["n_samples"] == 1 and rec["passed"] == [rec["correct"]]
    assert metrics["pass@1"] == pytest.approx(sum(bool(r["correct"]) for r in records) / n_rows)
    assert metrics["accuracy"] == metrics["pass@1"]
    assert json.loads((run / "results.json").read_text())["eval"]["humaneval"] == metrics
    assert "humaneval: pass@1" in capsys.readouterr().out


def _commonsense_args(sft_run: dict[str, Path]) -> list[str]:
    return [f"run_dir={sft_run['run']}", "eval=commonsense", f"eval.data_files={sft_run['commonsense']}",
            f"eval.subsets=[{','.join(COMMONSENSE)}]", "eval.max_new_tokens=8"]  # fmt: skip


def _check_commonsense(run: Path, folder: Path) -> dict[str, float]:
    """The commonsense metrics against the folder's row counts and the per-example records; returns the metrics."""
    metrics = json.loads((run / "eval.json").read_text())["commonsense"]
    sizes = {s: len(json.loads((folder / s / "test.json").read_text())) for s in COMMONSENSE}
    records = _records(run, "commonsense")
    assert metrics["n"] == sum(sizes.values()) == len(records) == len(COMMONSENSE) * N_PER_SUBSET
    assert [r["index"] for r in records] == list(range(len(records)))
    accuracies = []
    for subset in COMMONSENSE:
        mine = [r for r in records if r["suite"] == subset]
        assert len(mine) == sizes[subset] == metrics[f"{subset}/n"]
        assert [r["id"] for r in mine] == [f"{subset}/{i}" for i in range(sizes[subset])]
        accuracy = sum(bool(r["correct"]) for r in mine) / len(mine)
        assert metrics[f"{subset}/accuracy"] == pytest.approx(accuracy)
        accuracies.append(accuracy)
    assert metrics["average"] == pytest.approx(sum(accuracies) / len(accuracies))
    return metrics


def test_commonsense_folder_end_to_end(sft_run) -> None:
    run = sft_run["run"]
    eval_main(_commonsense_args(sft_run))
    _check_commonsense(run, sft_run["commonsense"])
    refs = {
        f"{s}/{i}": row["answer"]
        for s in COMMONSENSE
        for i, row in enumerate(json.loads((sft_run["commonsense"] / s / "test.json").read_text()))
    }
    for rec in _records(run, "commonsense"):
        assert rec["reference"] == refs[rec["id"]]
        assert rec["correct"] == (rec["extracted"] is not None and rec["extracted"] == rec["reference"])
        assert rec["num_beams"] == 4  # LLM-Adapters' beam search, the default protocol
        assert rec["prompt"].startswith("Below is an instruction")  # the run's task.template (alpaca)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_commonsense_two_ranks_match_one_process(sft_run) -> None:
    run = sft_run["run"]
    eval_main(_commonsense_args(sft_run))
    one = _check_commonsense(run, sft_run["commonsense"])
    completions = [r["completion"] for r in _records(run, "commonsense")]
    (run / "eval.json").unlink()
    res = subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.eval", *_commonsense_args(sft_run), "trainer=ddp",
         "trainer.devices=2", "trainer.accelerator=cpu"],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    two = _check_commonsense(run, sft_run["commonsense"])
    assert two == one
    assert [r["completion"] for r in _records(run, "commonsense")] == completions


# --- the tiny Llama classifier trained by task=classification --------------------------------------------------------
def _classification_run(tmp: Path, glue_task: str, rows: list[dict[str, Any]]) -> dict[str, Path]:
    data = _write_jsonl(tmp / f"{glue_task}.jsonl", rows)
    overrides = [
        "model=tiny_llama_cls", "task=classification", f"task.glue_task={glue_task}", f"task.data_files={data}",
        "task.batch_size=8", "task.max_length=24", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "callbacks.checkpoint.every_n_train_steps=4",
    ]  # fmt: skip
    run = tmp / "run"
    train(make_cfg(run, overrides))
    return {"run": run, "data": data}


@pytest.fixture(scope="module")
def mrpc_run(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama classifier trained on an MRPC-format file (sentence1, sentence2, label)."""
    return _classification_run(tmp_path_factory.mktemp("e2e_mrpc"), "mrpc", _mrpc_rows(24))


@pytest.fixture(scope="module")
def stsb_run(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama regressor (num_labels 1) trained on an STS-B-format file."""
    return _classification_run(tmp_path_factory.mktemp("e2e_stsb"), "stsb", _stsb_rows(24))


def _confusion(records: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    pairs = [(int(r["prediction"]), int(r["label"])) for r in records]
    tp = sum(p == 1 and y == 1 for p, y in pairs)
    tn = sum(p == 0 and y == 0 for p, y in pairs)
    return tp, tn, sum(p == 1 and y == 0 for p, y in pairs), sum(p == 0 and y == 1 for p, y in pairs)


def test_glue_pair_task_end_to_end(mrpc_run) -> None:
    run, data = mrpc_run["run"], mrpc_run["data"]
    eval_main([f"run_dir={run}", "eval=glue", "eval.glue_task=mrpc", f"eval.data_files={data}"])
    metrics = json.loads((run / "eval.json").read_text())["glue"]
    assert set(metrics) == {"accuracy", "f1", "score", "n"}
    records = _records(run, "glue")
    assert metrics["n"] == _lines(data) == len(records)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [(r["text"], r["text_pair"], r["label"]) for r in records] == [
        (row["sentence1"], row["sentence2"], row["label"]) for row in rows
    ]
    assert all(r["correct"] == (r["prediction"] == r["label"]) for r in records)
    tp, tn, fp, fn = _confusion(records)
    assert metrics["accuracy"] == pytest.approx(sum(bool(r["correct"]) for r in records) / len(records))
    assert metrics["accuracy"] == pytest.approx((tp + tn) / len(records))
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert metrics["score"] == pytest.approx((metrics["accuracy"] + metrics["f1"]) / 2)


def test_stsb_regression_end_to_end(stsb_run) -> None:
    run, data = stsb_run["run"], stsb_run["data"]
    eval_main([f"run_dir={run}", "eval=glue", "eval.glue_task=stsb", f"eval.data_files={data}"])
    metrics = json.loads((run / "eval.json").read_text())["glue"]
    assert set(metrics) == {"pearson", "spearman", "score", "n"}
    records = _records(run, "glue")
    assert metrics["n"] == _lines(data) == len(records)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    labels = [float(r["label"]) for r in records]
    assert labels == [float(row["label"]) for row in rows]
    assert all(r["correct"] is None for r in records)  # a regression has no per-example correctness
    preds = [float(r["prediction"]) for r in records]
    assert metrics["pearson"] == pytest.approx(pearson(preds, labels), abs=1e-4)
    assert metrics["spearman"] == pytest.approx(spearman(preds, labels), abs=1e-4)
    assert metrics["score"] == pytest.approx((metrics["pearson"] + metrics["spearman"]) / 2)
