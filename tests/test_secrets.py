"""No secrets in a run's outputs: environment credentials and config values interpolated from
them never reach results.json, logs, checkpoints or the offline W&B files; checkpoints load with weights_only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_ralora.core.secrets import REDACTED, redact, redacted_argv
from lightning_ralora.modules.adapter_module import read_plan
from lightning_ralora.modules.backbone import trust_remote_code
from lightning_ralora.run.compose import compose_config
from lightning_ralora.run.job import train
from lightning_ralora.run.tracking import wandb_mode
from tests.conftest import make_cfg, run_cli

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


def test_redact_overrides_and_every_copy_of_their_values():
    """An override of a secret-looking key keeps its key (`+model.hf_token=<redacted>`); its value is blanked
    wherever else it appears (Hydra's `override_dirname`); ordinary overrides and dotted keys such as
    `task.pad_token` are kept."""
    literal = "hf_literal_0123456789"
    given = [
        "debug=fast",
        f"+model.hf_token={literal}",
        "++eval.judge.api_key=${oc.env:MY_SERVICE_TOKEN}",
        "hydra.job.env_set.HF_TOKEN=abc",
        "task.pad_token=<pad>",
        f"+wandb.notes=copied {literal} here",
    ]
    out = redact({"overrides": given, "override_dirname": f"seed=1,+model.hf_token={literal}"}, env={})
    assert out["overrides"] == [
        "debug=fast",
        f"+model.hf_token={REDACTED}",
        f"++eval.judge.api_key={REDACTED}",
        f"hydra.job.env_set.HF_TOKEN={REDACTED}",
        "task.pad_token=<pad>",
        f"+wandb.notes=copied {REDACTED} here",
    ]
    assert out["override_dirname"] == f"seed=1,+model.hf_token={REDACTED}"
    flat = {"model.hf_token": literal, "task.pad_token": "<pad>", "task.max_new_tokens": 8}
    assert redact(flat, env={}) == {"model.hf_token": REDACTED, "task.pad_token": "<pad>", "task.max_new_tokens": 8}


def test_redacted_argv_only_inside_the_block(monkeypatch: pytest.MonkeyPatch):
    """W&B records sys.argv at `wandb.init`: it sees the redacted command line; afterwards sys.argv is the real one
    again (a DDP launcher re-runs it)."""
    import sys

    argv = ["train.py", "+model.hf_token=hf_literal_0123456789", f"wandb.tags=[{SECRETS['HF_TOKEN']}]", "seed=1"]
    monkeypatch.setattr(sys, "argv", list(argv))
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    with redacted_argv():
        assert sys.argv == ["train.py", f"+model.hf_token={REDACTED}", f"wandb.tags=[{REDACTED}]", "seed=1"]
    assert sys.argv == argv


def test_wandb_mode_precedence(monkeypatch: pytest.MonkeyPatch):
    """`wandb.mode` first, then the WANDB_MODE environment variable, then online with a key and offline without:
    a W&B key in the environment does not override WANDB_MODE=offline."""
    cfg, explicit = compose_config([], run_dir="x"), compose_config(["wandb.mode=disabled"], run_dir="x")
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert (wandb_mode(cfg), wandb_mode(explicit)) == ("offline", "disabled")
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(cfg) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode(cfg) == "offline"


# the secrets a CLI run is given: (a) a literal override of a secret-looking key, (b) a secret-looking key set from
# the environment with ${oc.env:...}, (c) environment-only credentials, one of them also pasted by the shell into an
# ordinary option (W&B tags)
LITERAL = "hf_cliLITERAL_7f3a9c21e5"
CLI_ENV = {
    "MY_SERVICE_TOKEN": "svc-cliINTERP-5b8d0e6a44",
    "HF_TOKEN": "hf_cliENVONLY_c4e1f09b27",
    "WANDB_API_KEY": "fake0000cliWANDBKEY000000000000000000000",
    "OPENAI_API_KEY": "sk-cliOPENAI-2e7c5a9d13",
}
CLOSED_PORT = "127.0.0.1:9"  # W&B's server, were it contacted: nothing listens there


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One training run through the real CLI with W&B offline (WANDB_MODE) while a W&B key is set, given the
    secrets above; W&B's home, cache and config directories are its own, to be searched too."""
    root = tmp_path_factory.mktemp("secrets_cli")
    dirs = {name: root / name for name in ("home", "wandb_dir", "wandb_cache", "wandb_config", "wandb_data")}
    for d in dirs.values():
        d.mkdir()
    env = {
        **CLI_ENV,
        "WANDB_MODE": "offline",
        "WANDB_BASE_URL": f"http://{CLOSED_PORT}",
        "WANDB_INIT_TIMEOUT": "15",  # were it to go online, it fails in seconds
        "HOME": str(dirs["home"]),
        "WANDB_DIR": str(dirs["wandb_dir"]),
        "WANDB_CACHE_DIR": str(dirs["wandb_cache"]),
        "WANDB_CONFIG_DIR": str(dirs["wandb_config"]),
        "WANDB_DATA_DIR": str(dirs["wandb_data"]),
    }
    run_dir = root / "run"
    overrides = [
        "debug=fast",
        "logger=default",  # CSV and W&B (debug=fast alone: CSV)
        f"+model.hf_token={LITERAL}",
        "+eval.judge.api_key=${oc.env:MY_SERVICE_TOKEN}",
        f"wandb.tags=[{CLI_ENV['HF_TOKEN']}]",
    ]
    res = run_cli(run_dir, *overrides, env=env)
    return {"res": res, "run_dir": run_dir, "searched": [run_dir, *dirs.values()]}


@pytest.mark.slow
@pytest.mark.xdist_group("secrets_cli")
def test_cli_run_writes_no_secret(cli_run: dict):
    """No file below the run dir (results.json, checkpoints, .hydra/, CSV, W&B's offline run: config, tags,
    metadata args, logs) or W&B's own directories holds any of the secrets, read as bytes."""
    res, run_dir = cli_run["res"], cli_run["run_dir"]
    assert res.returncode == 0, res.stderr[-3000:]
    planted = {"literal": LITERAL, **CLI_ENV}
    files = files_below(*cli_run["searched"])
    leaks = [f"{name} in {p}" for name, value in planted.items() for p in files if value.encode() in p.read_bytes()]
    assert not leaks, "secrets written:\n" + "\n".join(leaks)
    # each secret was there to leak, and is redacted where it was
    results = json.loads((run_dir / "results.json").read_text())
    config = results["config"]
    assert (config["model"]["hf_token"], config["eval"]["judge"]["api_key"]) == (REDACTED, REDACTED)
    assert config["wandb"]["tags"] == [REDACTED] and REDACTED in results["wandb"]["tags"]
    assert not any("hf_token" in k or "api_key" in k for k in results["identity"]["keys"])
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"+model.hf_token={REDACTED}" in overrides and f"+eval.judge.api_key={REDACTED}" in overrides
    log = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()  # W&B's record of the run
    assert f"+model.hf_token={REDACTED}".encode() in log
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model_cfg"]["hf_token"] == REDACTED


@pytest.mark.slow
@pytest.mark.xdist_group("secrets_cli")
def test_cli_wandb_offline_with_a_key_set(cli_run: dict):
    """WANDB_API_KEY set and WANDB_MODE=offline: the run completes offline (an offline-run-* directory, no online
    run directory) and W&B never tries its server."""
    res, run_dir = cli_run["res"], cli_run["run_dir"]
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p.name for p in (run_dir / "wandb").iterdir() if p.name.startswith(("run-", "offline-run-")))
    assert len(runs) == 1 and runs[0].startswith("offline-run-"), runs
    tried = [str(p) for p in files_below(*cli_run["searched"]) if CLOSED_PORT.encode() in p.read_bytes()]
    assert not tried and CLOSED_PORT not in res.stderr, tried


@pytest.mark.slow
def test_cli_multirun_yaml_and_hydra_files_redacted(tmp_path: Path):
    """A sweep: Hydra's multirun.yaml (written before any job) and each job's .hydra/*.yaml hold `<redacted>` where
    the command line had a secret."""
    sweep = tmp_path / "sweep"
    res = run_cli(tmp_path / "unused", "-m", "debug=fast", f"hydra.sweep.dir={sweep}", f"+model.hf_token={LITERAL}")
    assert res.returncode == 0, res.stderr[-3000:]
    files = files_below(sweep)
    leaks = [str(p) for p in files if LITERAL.encode() in p.read_bytes()]
    assert not leaks, "secret written to:\n" + "\n".join(leaks)
    multirun = (sweep / "multirun.yaml").read_text()
    assert f"hf_token: {REDACTED}" in multirun and f"+model.hf_token={REDACTED}" in multirun
    hydra_files = [p for p in files if p.parent.name == ".hydra"]
    assert sorted(p.name for p in hydra_files) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert all(REDACTED in p.read_text() for p in hydra_files)
