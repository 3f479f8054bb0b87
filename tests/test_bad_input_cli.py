"""Every bad input a cluster user tried, through the real CLI (`python -m lightning_ralora.cli.train`): exit code 2, ONE
line on stderr that names the field, and nothing written (no results, checkpoint, lock or W&B dir; the run dir holds
at most what Hydra writes before the job). `python -m tests.test_bad_input_cli` prints the table of all cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HYDRA_OWN = {".hydra", "train.log"}  # what Hydra writes into a run dir before the job starts


def _sft(tmp: Path, rows: list[str]) -> str:
    path = tmp / "data.jsonl"
    path.write_text("".join(r + "\n" for r in rows))
    return str(path)


def _good_rows(n: int) -> list[str]:
    return [json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(n)]


def _cls(tmp: Path, labels: list[int]) -> str:
    path = tmp / "cls.csv"
    path.write_text("text,label\n" + "".join(f"item {i},{y}\n" for i, y in enumerate(labels)))
    return str(path)


def _ckpt_file(tmp: Path, data: bytes) -> str:
    path = tmp / "given.ckpt"
    path.write_bytes(data)
    return str(path)


def _completed_run(tmp: Path) -> None:
    """The run dir of a completed run: results.json and a checkpoint (a plausible one, never loaded)."""
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"status": "completed", "global_step": 12}))
    torch.save({"global_step": 12}, run / "checkpoints" / "last.ckpt")


def _file_blocks_run_dir(tmp: Path) -> None:
    (tmp / "blocker").write_text("a file, not a directory")


# (id, overrides (may use {tmp}), setup(tmp) -> extra overrides or None, expected fragment of the one line)
Case = tuple[str, list[str], Callable[[Path], "list[str] | None"] | None, str]
CASES: list[Case] = [
    # Hydra level: refused before Hydra runs
    ("unknown group option", ["adapter=lorra"], None, "'lorra' is not an option of config group 'adapter'"),
    ("unknown top-level key", ["foo=1"], None, "'foo' is not in the config"),
    ("unknown key in a group", ["adapter.foo=1"], None, "'adapter.foo' is not in the config"),
    ("unknown model option", ["model=llama9"], None, "'llama9' is not an option of config group 'model'"),
    ("unknown experiment", ["experiment=nope"], None, "'nope' is not an option of config group 'experiment'"),
    ("adding an existing key", ["+seed=1"], None, "'seed' is already in the config"),
    ("malformed override", ["seed=[1,2"], None, "cannot parse this override"),
    ("a sweep without -m", ["adapter=lora,ralora"], None, "a sweep needs -m (--multirun)"),
    ("a bad value inside a sweep", ["-m", "adapter=lora,lorra"], None, "'lorra' is not an option"),
    ("run dir under a file", ["hydra.run.dir={tmp}/blocker/run"], _file_blocks_run_dir, "is a file, not a directory"),
    # the adapter
    ("rank 0", ["adapter.r=0"], None, "adapter.r must be a positive integer, got 0"),
    ("rank above the layer width", ["adapter.r=512"], None, "adapter.r"),
    ("negative dropout", ["adapter.dropout=-0.1"], None, "adapter.dropout"),
    ("misspelt adapter field", ["+adapter.rnak=4"], None, "adapter.rnak is not a field of adapter.kind='lora'"),
    ("RaLoRA scale rule", ["adapter=ralora", "adapter.scale=2.0"], None, "adapter.scale"),
    ("GraLoRA k not dividing", ["adapter=gralora", "adapter.k=3"], None, "adapter.k"),
    ("SDS rank above the width", ["adapter=sds_lora", "adapter.r=512"], None, "adapter.r"),
    ("targets matching nothing", ["adapter.target_modules=[nonexistent_proj]"], None, "matches no linear layer"),
    # the trainer and optimiser
    ("devices 0", ["trainer.devices=0"], None, "trainer.devices=0 is not accepted"),
    ("unknown precision", ["trainer.precision=bogus"], None, "trainer.precision='bogus' is unknown"),
    ("nodes 0", ["trainer.num_nodes=0"], None, "trainer.num_nodes must be a positive integer"),
    ("unknown strategy", ["trainer.strategy=bogus"], None, "trainer.strategy='bogus' is unknown"),
    ("accumulation 0", ["trainer.accumulate_grad_batches=0"], None, "trainer.accumulate_grad_batches"),
    ("val interval 0", ["trainer.val_check_interval=0"], None, "trainer.val_check_interval"),
    ("negative clip", ["trainer.gradient_clip_val=-1"], None, "trainer.gradient_clip_val"),
    ("max_steps 0", ["trainer.max_steps=0"], None, "trainer.max_steps"),
    ("a GPU on a CPU node", ["trainer.accelerator=gpu"], None, "trainer.accelerator='gpu': no such device"),
    ("learning rate 0", ["optim.lr=0"], None, "optim.lr"),
    ("negative seed", ["seed=-1"], None, "seed must be a non-negative integer"),
    # the model
    ("missing model dir", ["model.pretrained=/missing/dir"], None, "model.pretrained=/missing/dir: path not found"),
    ("missing tokenizer dir", ["model.tokenizer=./no/such/tokenizer"], None, "model.tokenizer=./no/such/tokenizer"),
    # the data, read in full before compute
    ("missing data file", ["task=sft", "task.data_files=/no/such/file.jsonl"], None, "task.data_files="),
    ("empty JSONL", ["task=sft"], lambda t: [f"task.data_files={_sft(t, [])}"], "task.data_files="),
    (
        "a bad JSON line after 1,000",
        ["task=sft"],
        lambda t: [f"task.data_files={_sft(t, [*_good_rows(1500), '{bad json', *_good_rows(3)])}"],
        "1501",
    ),
    (
        "a row without the response key",
        ["task=sft"],
        lambda t: [f"task.data_files={_sft(t, [*_good_rows(20), json.dumps({'prompt': 'x'})])}"],
        "response",
    ),
    (
        "a label outside the classes",
        ["task=classification", "model=tiny_llama_cls", "task.num_labels=2"],
        lambda t: [f"task.data_files={_cls(t, [0, 1] * 20 + [5])}"],
        "5",
    ),
    # evaluation
    ("generation suite without a tokenizer", ["eval=gsm8k"], None, "model.tokenizer"),
    ("unknown eval suite", ["eval.suites=[nope]"], None, "eval.suites"),
    # resuming and the run dir
    ("missing checkpoint", ["ckpt_path=/nonexistent/last.ckpt"], None, "ckpt_path=/nonexistent/last.ckpt not found"),
    ("empty checkpoint file", [], lambda t: [f"ckpt_path={_ckpt_file(t, b'')}"], "is empty (0 bytes)"),
    ("a checkpoint that is not one", [], lambda t: [f"ckpt_path={_ckpt_file(t, b'x' * 999)}"], "not a complete"),
    ("last with nothing to resume", ["ckpt_path=last"], None, "holds no checkpoint to resume"),
    ("re-running a completed run", [], _completed_run, "holds a completed run (step 12)"),
    ("fresh and resume at once", ["fresh=true", "ckpt_path=last"], None, "fresh=true starts over and ckpt_path=last"),
]


def run_case(case: Case, tmp: Path) -> tuple[subprocess.CompletedProcess, Path]:
    _, overrides, setup, _ = case
    extra = (setup(tmp) if setup else None) or []
    run = tmp / "run"
    args = [o.format(tmp=tmp) for o in [*overrides, *extra]]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run}")
    flags = [a for a in args if a.startswith("-")]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_ralora.cli.train",
            *flags,
            "debug=fast",
            *(a for a in args if a not in flags),
        ],  # noqa: E501
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"},
        cwd=tmp,
    )
    return out, run


SETUP_FILES = {"data.jsonl", "cls.csv", "given.ckpt", "blocker", "run/results.json", "run/checkpoints/last.ckpt"}


def written(tmp: Path, run: Path) -> list[str]:
    """Files the command wrote: everything under `tmp` but the case's own setup and Hydra's (`.hydra/`, job log)."""
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return [p for p in files if p not in SETUP_FILES and not set(Path(p).parts) & HYDRA_OWN and not p.endswith(".log")]


@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "_") for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: Case) -> None:
    out, run = run_case(case, tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and case[3] in lines[0], out.stderr[-3000:]
    assert lines[0].startswith("lightning-ralora-train: "), lines[0]
    made = written(tmp_path, run)
    assert made == [], made
    assert not (run / ".lock").exists() and not (run / "wandb").exists()


if __name__ == "__main__":  # the table for the docs / closing note
    import tempfile

    print("| # | bad input | overrides | exit | stderr (one line) | written |\n|---|---|---|---|---|---|")
    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            out, run = run_case(case, tmp)
            made = written(tmp, run)
            lines = out.stderr.strip().splitlines()
            msg = (lines[-1] if lines else "").replace("|", "\\|").replace(str(tmp), "<tmp>")
            args = " ".join(case[1]).replace("{tmp}", "<tmp>")
            print(
                f"| {i} | {case[0]} | `{args}` | {out.returncode} ({len(lines)} line) | {msg} | {made or 'nothing'} |"
            )
