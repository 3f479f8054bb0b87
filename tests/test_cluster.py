"""Cluster runs (docs/cluster.md): the submitit launchers, requeue on SIGUSR1 and resume, the Hydra+DDP multirun
guard, and the Optuna searches with each task's objective."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from hydra import compose, initialize_config_dir

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.signals import requeue_enabled, slurm_job_id
from lightning_ralora.run.cluster import launcher_problems, objective_value, requeued_ckpt, task_objective
from lightning_ralora.run.compose import CONF_DIR
from lightning_ralora.run.validate import validate_config
from lightning_ralora.tasks import TASKS
from tests.conftest import make_cfg

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("SLURM_NTASKS", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SUBMITIT_EXECUTOR")


def hydra_cfg(*overrides: str):
    """The composed config with its `hydra` node (launcher, sweeper), as the CLI builds it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m lightning_ralora.cli.train args...` from the repo root, W&B disabled, no launcher variables."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("SLURM_")}
    return subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**base, "WANDB_MODE": "disabled", **(env or {})},
        timeout=timeout,
    )


class SendSignalAt(L.Callback):
    """Test helper (a `callbacks.<name>` entry): send this process SIGUSR1 after training step `step`, as SLURM's
    `--signal=USR1@90` would, at a reproducible point."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
def test_submitit_slurm_takes_its_resources_from_the_trainer() -> None:
    cfg = hydra_cfg(
        "hydra/launcher=submitit_slurm",
        "experiment=ralora_code_llama",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.partition == "gpu" and launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
    assert cfg.experiment_name == "ralora_code_llama"
    local = hydra_cfg("hydra/launcher=submitit_local").hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.tasks_per_node == 1


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path: Path) -> None:
    out = cli(
        "-m",
        "hydra/launcher=submitit_local",
        "seed=0,1",
        "debug=fast",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted((tmp_path / "sweep").rglob("results.json"))
    assert len(results) == 2, out.stderr[-3000:]
    assert sorted(json.loads(p.read_text())["seed"] for p in results) == [0, 1]
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # really went through submitit


# --------------------------------------------------------------------------------------------------------------
# the Hydra+DDP multirun guard
# --------------------------------------------------------------------------------------------------------------
def test_launcher_guard_rejects_lightning_launcher_in_a_multirun() -> None:
    ddp = {"devices": 2, "num_nodes": 1, "strategy": "ddp"}
    (problem,) = launcher_problems(ddp, multirun=True, env={})
    assert "trainer.devices=2" in problem and "trainer.strategy='ddp'" in problem
    assert "hydra/launcher=submitit_slurm" in problem and "torchrun" in problem
    assert launcher_problems({"devices": 1, "num_nodes": 2, "strategy": "fsdp"}, multirun=True, env={})
    fsdp2 = {"devices": 2, "strategy": {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"}}
    assert launcher_problems(fsdp2, multirun=True, env={})
    # fine: a single run, an external launcher, one device, a spawn strategy
    assert launcher_problems(ddp, multirun=False, env={}) == []
    for env in ({"SLURM_NTASKS": "2"}, {"LOCAL_RANK": "0"}, {"WORLD_SIZE": "2"}):
        assert launcher_problems(ddp, multirun=True, env=env) == [], env
    assert launcher_problems({**ddp, "devices": 1}, multirun=True, env={}) == []
    assert launcher_problems({**ddp, "strategy": "ddp_spawn"}, multirun=True, env={}) == []


def test_validate_config_reports_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    cfg = make_cfg(tmp_path, ["trainer=ddp"])
    validate_config(cfg, check_model=False)  # a single run may use Lightning's launcher
    monkeypatch.setattr("lightning_ralora.run.cluster.in_hydra_multirun", lambda: True)
    with pytest.raises(ConfigError, match=r"cannot run inside a Hydra multirun .*hydra/launcher=submitit_slurm"):
        validate_config(cfg, check_model=False)


def test_cli_multirun_with_ddp_fails_with_one_message(tmp_path: Path) -> None:
    """Each job of the sweep stops at the guard before any compute (recorded as failed, one message, no
    traceback, no checkpoint) and the sweep exits 1."""
    out = cli("-m", "trainer=ddp", "debug=fast", f"hydra.sweep.dir={tmp_path}", "seed=0,1", timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.count("job failed (failed): ConfigError: invalid config: trainer.devices=2") == 2
    assert "cannot run inside a Hydra multirun" in out.stderr and "Traceback" not in out.stderr
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("results.json")]
    assert len(records) == 2 and all(r["status"] == "failed" for r in records)
    assert not list(tmp_path.rglob("*.ckpt"))


# --------------------------------------------------------------------------------------------------------------
# requeue on SIGUSR1
# --------------------------------------------------------------------------------------------------------------
def test_requeue_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"
    assert slurm_job_id({"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}) == "5_2"
    assert requeue_enabled({"SLURM_JOB_ID": "7"}) and not requeue_enabled({})
    assert requeued_ckpt(tmp_path) is None  # no marker: a fresh job
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "requeue.json").write_text(json.dumps({"ckpt_path": str(tmp_path / "checkpoints" / "last.ckpt"),
                                                       "wandb_id": "abc123"}))  # fmt: skip
    assert requeued_ckpt(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_the_requeued_job_resumes_exactly(tmp_path: Path) -> None:
    # debug=fast planted: 64 sequences / batch 8 = 8 steps per epoch, 12 steps; the signal comes after step 4
    common = ["debug=fast", "adapter=ralora_pro", "adapter.gid_batches=2", "deterministic=true"]
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "lightning-ralora-train",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "LIGHTNING_RALORA_REQUEUE_CMD": f"echo {{job_id}} >> {tmp_path / 'requeued.txt'}",
    }
    full = cli(f"hydra.run.dir={tmp_path / 'full'}", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "job"
    job = [
        f"hydra.run.dir={run}",
        *common,
        f"+callbacks.usr1._target_={__name__}.SendSignalAt",
        "+callbacks.usr1.step=4",
    ]
    first = cli(*job, env=slurm)
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]  # the shell's code for "ended by SIGUSR1"
    assert (tmp_path / "requeued.txt").read_text().split() == ["4242"]  # `scontrol requeue 4242` stand-in
    marker = json.loads((run / "requeue.json").read_text())
    assert marker["global_step"] == 4 and Path(marker["ckpt_path"]) == run / "checkpoints" / "last.ckpt"
    stopped = json.loads((run / "results.json").read_text())  # stopped, not finished: recorded as requeued
    assert (stopped["status"], stopped["global_step"], stopped["phase"]) == ("requeued", 4, "fit")
    second = cli(*job, env={**slurm, "SLURM_RESTART_COUNT": "1"})  # the requeued job: the same command
    assert second.returncode == 0, second.stderr[-3000:]
    assert "requeue: resuming from" in second.stderr and not (run / "requeue.json").exists()
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "full", run))
    assert b["global_step"] == a["global_step"] == 12
    assert b["plan"]["entries"] == a["plan"]["entries"]  # the plan came from the checkpoint
    assert b["adapter_state_digest_per_rank"] == a["adapter_state_digest_per_rank"]


# --------------------------------------------------------------------------------------------------------------
# hyperparameter search
# --------------------------------------------------------------------------------------------------------------
def test_each_task_declares_its_objective_in_class_and_yaml() -> None:
    for name, cls in TASKS.items():
        metric, direction = cls.objective
        assert metric.startswith("val/") and direction in ("maximize", "minimize"), name
        node = yaml.safe_load((Path(CONF_DIR) / "task" / f"{name}.yaml").read_text())["objective"]
        assert (node["metric"], node["direction"]) == cls.objective, name
    assert TASKS["planted"].objective == ("val/gap_closed", "maximize")
    assert TASKS["sft"].objective == ("val/loss", "minimize")
    assert task_objective({"name": "sft", "objective": {"metric": "val/x", "direction": "maximize"}}) == (
        "val/x",
        "maximize",
    )
    metrics = {"val/loss": 0.5, "val/gap_closed": 0.25}
    assert objective_value("planted", metrics) == 0.25 and objective_value(TASKS["sft"], metrics) == 0.5
    assert objective_value({"name": "planted"}, metrics) == 0.25
    assert objective_value("classification", metrics) == float("-inf")  # not logged: the worst, maximising
    assert objective_value({"name": "planted", "objective": {"metric": "val/loss", "direction": "minimize"}},
                           {"val/loss": float("nan")}) == float("inf")  # fmt: skip


@pytest.mark.parametrize("search", ["lr", "rank"])
@pytest.mark.parametrize("task", ["planted", "sft"])
def test_hparams_search_composes_with_the_task_direction(search: str, task: str) -> None:
    cfg = hydra_cfg(f"hparams_search={search}", f"task={task}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == TASKS[task].objective[1]
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and "optim.lr" in sweeper.params
    assert search != "rank" or "adapter.r" in sweeper.params


@pytest.mark.slow
def test_optuna_two_trials_return_the_objective(tmp_path: Path) -> None:
    out = cli(
        "hparams_search=lr",
        "debug=fast",
        "hydra.sweeper.n_trials=2",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("results.json"))]
    assert len(results) == 2
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    values = [r["final_metrics"]["val/gap_closed"] for r in results]
    assert best["best_value"] == pytest.approx(max(values))  # maximised the planted objective
    assert len({r["config"]["optim"]["lr"] for r in results}) == 2  # two sampled learning rates


@pytest.mark.slow
def test_an_optuna_search_goes_on_past_a_failed_trial(tmp_path: Path) -> None:
    """A trial that fails (here: a crash at step 2, one of the two values Optuna samples) reports the worst value
    (-inf: the planted objective is maximised) and the search runs its other trials; with NaN, Hydra's Optuna sweeper
    stopped the whole search after that trial with a traceback ("Values were told ... TrialState.FAIL"). The best
    trial is the best completed one; the sweep's summary names the failure and it exits 1."""
    out = cli(
        "hparams_search=lr",
        "debug=fast",
        "hydra.sweeper.n_trials=3",
        "+callbacks.crash._target_=tests.test_exact_resume.CrashAt",
        "+callbacks.crash.step=choice(2,10000)",  # 2 crashes; 10000 is past the 12 steps of debug=fast
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("results.json"))]
    status = sorted(r["status"] for r in results)
    assert len(results) == 3 and "failed" in status and "completed" in status, status
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    completed = [r["final_metrics"]["val/gap_closed"] for r in results if r["status"] == "completed"]
    assert best["best_value"] == pytest.approx(max(completed))
    assert "completed, 1 not" in out.stderr and "simulated crash after step 2" in out.stderr
