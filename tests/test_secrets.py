"""No secrets in a run's outputs: environment credentials and config values interpolated from
them never reach results.json, logs, checkpoints or the offline W&B files; checkpoints load with weights_only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ralora.modules.adapter_module import read_plan
from lightning_ralora.modules.backbone import trust_remote_code
from lightning_ralora.secrets import REDACTED, redact
from lightning_ralora.train import train

from .conftest import make_cfg

SECRETS = {
    "WANDB_API_KEY": "sk-test-SECRET123-wandb-0123456789abcdef0123",
    "HF_TOKEN": "hf_test_SECRET456_token",
    "HUGGING_FACE_HUB_TOKEN": "hf_test_SECRET789_hub",
    "OPENAI_API_KEY": "sk-test-SECRET000-judge",
    "MY_SERVICE_PASSWORD": "pw-test-SECRET111",
}


def test_redact_keys_and_env_values():
    env = {**SECRETS, "PATH": "/usr/bin:/bin", "SHORT_KEY": "0"}
    cfg = {
        "eval": {"judge": {"api_key": "typed-in", "api_key_env": "OPENAI_API_KEY", "model": "gpt"}},
        "task": {"prompt_key": "prompt", "max_new_tokens": 8, "pad_token": "<pad>"},
        "hub": {"hf_token": None, "notes": SECRETS["HF_TOKEN"]},
        "overrides": [f"+wandb.notes={SECRETS['HF_TOKEN']}", "seed=0"],
        "path": "/usr/bin:/bin",
        "flag": "0",
    }
    out = redact(cfg, env)
    assert out["eval"]["judge"] == {"api_key": REDACTED, "api_key_env": "OPENAI_API_KEY", "model": "gpt"}
    assert out["task"] == cfg["task"]  # ordinary *_key / *_token settings survive
    assert out["hub"] == {"hf_token": None, "notes": REDACTED}
    assert out["overrides"] == [f"+wandb.notes={REDACTED}", "seed=0"]
    assert (out["path"], out["flag"]) == ("/usr/bin:/bin", "0")  # not secrets, and too-short values never match
    assert cfg["hub"]["notes"] == SECRETS["HF_TOKEN"]  # a copy: the input is untouched


def test_trust_remote_code_off_unless_set():
    cfg = make_cfg(Path("unused"), fast=False)
    assert cfg.model.trust_remote_code is False and trust_remote_code(cfg.model) is False
    assert trust_remote_code({}) is False and trust_remote_code({"trust_remote_code": "yes"}) is False
    assert trust_remote_code({"trust_remote_code": True}) is True


def files_below(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_no_secret_reaches_run_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A short run with W&B offline: no file below the run dir or the W&B dir holds a secret. Also: its checkpoint
    loads with weights_only=True (read_plan's way)."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = ["logger=default", "wandb.mode=offline", "eval=none", "+wandb.notes=${oc.env:HF_TOKEN}"]
    results = train(make_cfg(run_dir, overrides))
    assert results["config"]["wandb"]["notes"] == REDACTED  # the interpolated secret was there to leak
    files = files_below(run_dir, wandb_dir)
    assert any(p.suffix == ".wandb" for p in files), "no offline W&B run was written"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    leaks = [(p, name) for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert not leaks, leaks
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == results["global_step"]
    read_plan(run_dir / "checkpoints" / "last.ckpt")
