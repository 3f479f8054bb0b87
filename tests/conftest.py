"""Shared fixtures: compose real Hydra configs (shrunk for CPU) and small generated data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from lightning_ralora.train import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

FAST = [
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "callbacks.checkpoint.every_n_train_steps=6",
]
FAST_PLANTED = ["task.train_size=64", "task.val_size=16", "task.batch_size=8", "task.seq_len=16"]


def make_cfg(run_dir: Path, overrides: list[str] | None = None, fast: bool = True) -> DictConfig:
    """The composed config the CLI would build, with `run_dir` set (no Hydra runtime in tests)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        other_task = any(o.startswith("task=") for o in overrides or [])
        shrink = (FAST + ([] if other_task else FAST_PLANTED)) if fast else []
        cfg = compose("config", overrides=shrink + list(overrides or []))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


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
    """`python -m lightning_ralora.train hydra.run.dir=<run_dir> overrides...` as a user runs it (W&B disabled
    unless `env` says otherwise)."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags (-m) go before the overrides
    return subprocess.run(
        [sys.executable, "-m", "lightning_ralora.train", *flags, f"hydra.run.dir={run_dir}"]
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
