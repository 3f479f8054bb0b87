"""Run identity: every key that changes a result moves the run to its own directory, W&B group, name and id; the
same config maps to the same place; resuming under a changed identity is refused; failed jobs are recorded and a
sweep goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.run.compose import compose_config
from lightning_ralora.run.identity import IDENTITY_KEY, identity_changes, identity_record
from lightning_ralora.run.job import run_job, train
from lightning_ralora.run.tracking import run_names
from tests.conftest import make_cfg


def label(*overrides: str) -> str:
    return identity_record(compose_config(list(overrides), run_dir="/tmp/unused"))["label"]


def test_identity_moves_with_result_keys_only() -> None:
    base = label("debug=fast")
    keys = ("adapter.r=4", "optim.lr=0.01", "task.strength=0.3", "adapter=rslora")
    changed = {o: label("debug=fast", o) for o in keys}
    assert len({base, *changed.values()}) == 1 + len(changed), changed  # each result key: its own identity
    for same in ("seed=3", "trainer.devices=2", "trainer.log_every_n_steps=7", "wandb.mode=offline", "ckpt_path=last"):
        assert label("debug=fast", same) == base, same
    assert label("debug=fast", "adapter.r=8") == base  # the default value: the same config, the same place
    assert label("debug=fast", "resume.allow_changes=[trainer.max_steps]") == base  # resume plumbing only


def test_methods_table_entry_is_part_of_the_identity() -> None:
    """An experiment's per-method settings count as set: LoRA at the table's s = 2 differs from s = 4."""
    lora = label("experiment=sds_commonsense_llama", "adapter=lora")
    assert label("experiment=sds_commonsense_llama", "adapter=lora", "adapter.scale=2.0") == lora
    assert label("experiment=sds_commonsense_llama", "adapter=lora", "adapter.scale=4.0") != lora


def test_wandb_names_are_distinct_per_identity_and_stable() -> None:
    a = run_names(compose_config(["adapter.r=4"], run_dir="/x"))
    b = run_names(compose_config(["adapter.r=16"], run_dir="/x"))
    assert a["group"] != b["group"] and a["name"] != b["name"] and a["id"] != b["id"]
    assert a == run_names(compose_config(["adapter.r=4"], run_dir="/elsewhere"))
    assert "adapter.r=4" in a["tags"] and "seed:0" in a["tags"]
    s1 = run_names(compose_config(["adapter.r=4", "seed=1"], run_dir="/x"))
    assert s1["group"] == a["group"] and s1["id"] != a["id"]  # seeds: one group, their own runs


def test_a_credential_is_not_part_of_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret-looking key does not change the result: same hash and directory with or without it, and neither the
    identity keys, its overrides nor the W&B tags hold the secret (a secret value in an ordinary key: redacted)."""
    monkeypatch.setenv("HF_TOKEN", "hf_envSECRET_0123456789")
    literal = "hf_litSECRET_9876543210"
    given = ["debug=fast", "adapter.r=4", f"+model.hf_token={literal}", "+task.note=hf_envSECRET_0123456789"]
    identity = identity_record(compose_config(given, run_dir="/x"))
    assert identity["hash"] == identity_record(compose_config([*given[:2], given[3]], run_dir="/x"))["hash"]
    assert "model.hf_token" not in identity["keys"] and identity["keys"]["task.note"] == "<redacted>"
    assert identity["overrides"] == ["debug=fast", "adapter.r=4", "+task.note=<redacted>"]
    tags = run_names(compose_config([*given, f"wandb.tags=[{literal}]"], run_dir="/x"))["tags"]
    assert "<redacted>" in tags and not [t for t in tags if "SECRET" in t], tags


def test_identity_changes_names_keys() -> None:
    old, new = {"adapter.r": 4, "optim.lr": 1e-3}, {"adapter.r": 16, "optim.lr": 1e-3, "adapter.k": 2}
    assert identity_changes(old, new) == ["adapter.k: '<absent>' -> 2", "adapter.r: 4 -> 16"]
    assert identity_changes(old, new, ["adapter"]) == []
    assert identity_changes({**old, "model.hf_token": "hf_old_0123456789"}, old) == []  # an older checkpoint's


def test_resume_refuses_a_changed_identity_and_allows_listed_changes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(make_cfg(run, ["adapter.r=4", "wandb.mode=disabled"]))
    ckpt = run / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)[IDENTITY_KEY]
    assert stored["hash"] == first["identity"]["hash"]
    with pytest.raises(ConfigError) as err:
        train(make_cfg(run, ["adapter.r=16", f"ckpt_path={ckpt}", "wandb.mode=disabled"]))
    assert "adapter.r: 4 -> 16" in str(err.value) and "resume.allow_changes=[adapter.r]" in str(err.value)
    longer = tmp_path / "longer"  # a deliberate change: its own identity and directory, started from the old run
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        train(make_cfg(longer, ["adapter.r=4", "trainer.max_steps=16", f"ckpt_path={ckpt}", "wandb.mode=disabled"]))
    allow = ["adapter.r=4", "trainer.max_steps=16", f"ckpt_path={ckpt}", "resume.allow_changes=[trainer.max_steps]"]
    resumed = train(make_cfg(longer, [*allow, "wandb.mode=disabled"]))
    assert resumed["global_step"] == 16 and resumed["identity"]["hash"] != first["identity"]["hash"]


def test_resume_continues_the_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    first = train(make_cfg(run, ["wandb.mode=offline", "logger=wandb"]))
    resumed = train(make_cfg(run, ["wandb.mode=offline", "logger=wandb", "ckpt_path=last"]))
    assert resumed["wandb"]["id"] == first["wandb"]["id"]
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))  # logger.wandb.save_dir = run_dir
    assert len(runs) == 2 and all(r.endswith(first["wandb"]["id"]) for r in runs), runs


def test_a_crash_is_recorded_as_failed_and_reraised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_ralora.tasks.planted import PlantedTask

    def broken(self, model, batch):  # a bug in a task, hit at the first step
        raise RuntimeError("boom at the first step")

    monkeypatch.setattr(PlantedTask, "loss", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        run_job(make_cfg(run, ["wandb.mode=disabled"]))
    record = json.loads((run / "results.json").read_text())
    assert record["status"] == "failed" and "boom at the first step" in record["error"]
    assert record["variant"] == "lora" and record["identity"]["label"].startswith("lora-tiny_llama-planted-")


@pytest.mark.slow
def test_multirun_with_a_bad_job_records_it_and_goes_on(tmp_path: Path) -> None:
    """`adapter.r=4,-1,8`: jobs 4 and 8 complete in their own directories and W&B groups, -1 is recorded as failed,
    the summary lists all three, the exit code is 1; the same sweep again maps each job to its old directory."""

    def sweep() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "lightning_ralora.cli.train", "-m", "debug=fast", "adapter.r=4,-1,8"]
        cmd += ["wandb.mode=disabled", f"paths.root_dir={tmp_path}"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)

    res = sweep()
    assert res.returncode == 1, res.stderr[-3000:]
    records = {p.parent: json.loads(p.read_text()) for p in (tmp_path / "multirun").rglob("results.json")}
    by_r = {r["config"]["adapter"]["r"]: (d, r) for d, r in records.items()}
    assert sorted(by_r) == [-1, 4, 8]
    assert by_r[4][1]["status"] == by_r[8][1]["status"] == "completed"
    assert by_r[-1][1]["status"] == "failed" and "adapter.r" in by_r[-1][1]["error"]
    good = [by_r[4], by_r[8]]
    assert good[0][0] != good[1][0]
    assert good[0][1]["wandb"]["group"] != good[1][1]["wandb"]["group"]
    assert good[0][1]["wandb"]["name"] != good[1][1]["wandb"]["name"]
    assert "1 completed" not in res.stderr and "2 completed, 1 not" in res.stderr
    assert sweep().returncode == 1
    again = {p.parent for p in (tmp_path / "multirun").rglob("results.json")}
    assert again == set(records)  # the same three places, nothing new


def test_wandb_gets_config_once_artifacts_and_structure_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline W&B: the resolved config with the identity (no per-part `*_cfg` duplicates from the module's
    hyperparameters), results.json as an artifact, and the per-layer structure table."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    results = train(make_cfg(run, ["wandb.mode=offline", "logger=wandb"]))
    log = _settled(next((run / "wandb").glob("offline-run-*/run-*.wandb")))  # W&B's transaction log
    assert b"identity" in log and results["identity"]["hash"].encode() in log
    assert b"model_cfg" not in log and b"adapter_cfg" not in log
    assert f"run-{results['wandb']['id']}".encode() in log and b"results.json" in log  # the run artifact
    table = json.loads(next((run / "wandb").glob("offline-run-*/files/media/table/structure_*.table.json")).read_text())
    modules = [row[0] for row in table["data"]]
    assert table["columns"][0] == "module" and sorted(modules) == sorted(results["structure"]["layers"])


@pytest.mark.slow
def test_cli_resume_with_a_changed_identity_exits_2_naming_the_key(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    assert run_cli(tmp_path, "debug=fast", "adapter.r=4").returncode == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    res = run_cli(tmp_path, "debug=fast", "adapter.r=16", f"ckpt_path={ckpt}")
    assert res.returncode == 2 and "adapter.r: 4 -> 16" in res.stderr and "Traceback" not in res.stderr


def _settled(path: Path, timeout_s: float = 60.0) -> bytes:
    """The file's bytes once W&B's background writer has stopped appending to it (it may still be flushing when
    `wandb.finish` returns)."""
    import time

    deadline, last = time.monotonic() + timeout_s, b""
    while time.monotonic() < deadline:
        data = path.read_bytes()
        if data and data == last:
            return data
        last = data
        time.sleep(1.0)
    return last
