"""Shared fixtures: compose real Hydra configs (`debug=fast` for CPU) and small generated data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: no network in tests
if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per worker (and its subprocesses): no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lightning_ralora.run.compose import compose_config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns xdist_group marks into node-id suffixes
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Multi-process tests (2 ranks each) run one at a time on one xdist worker (`--dist loadgroup`)."""
    for item in items:
        if item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))


def make_cfg(run_dir: Path, overrides: list[str] | None = None, fast: bool = True) -> DictConfig:
    """The composed config the CLI would build, with `run_dir` set (no Hydra runtime in tests). `fast` selects
    `debug=fast` (12 steps, CSV logger, no progress bar; tiny data on task=planted), before `overrides`."""
    return compose_config((["debug=fast"] if fast else []) + list(overrides or []), run_dir=run_dir)


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    """A small JSONL of prompt/response pairs (arithmetic facts a tiny model can partly learn)."""
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(8) for b in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def cls_file(tmp_path: Path) -> Path:
    """A small CSV of text/label rows whose label is decidable from the text."""
    path = tmp_path / "cls.csv"
    lines = ["text,label"] + [f"{'good' if i % 2 else 'bad'} item {i},{i % 2}" for i in range(80)]
    path.write_text("\n".join(lines))
    return path


def run_cli(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m lightning_ralora.cli.train hydra.run.dir=<run_dir> overrides...` as a user runs it (W&B disabled
    unless `env` says otherwise)."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags (-m) go before the overrides
    return subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.train", *flags, f"hydra.run.dir={run_dir}"]
        + [o for o in overrides if not o.startswith("-")],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids OpenMP contention on shared CPUs (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
