"""Cluster runs: requeue on SLURM's warning signal, resume of a requeued job, the Hydra+DDP launcher guard and the
sweep objective (docs/cluster.md).

A job warned by SIGUSR1 (`#SBATCH --signal=USR1@90`, or submitit's preemption signal) saves
`<run_dir>/checkpoints/last.ckpt` at the next batch end, writes `<run_dir>/requeue.json` and requeues itself; the
requeued job (same command, same run_dir) finds the marker in `run.resolve_ckpt` and resumes from that checkpoint
with its plan, schedules and W&B run: the same code path as `ckpt_path=last`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

REQUEUE_MARKER = "requeue.json"  # <run_dir>/requeue.json: written on the signal, removed when the resumed fit ends
REQUEUE_CMD_ENV = "LIGHTNING_RALORA_REQUEUE_CMD"  # shell command; {job_id} is replaced by the SLURM job id
DEFAULT_REQUEUE_CMD = "scontrol requeue {job_id}"


# --------------------------------------------------------------------------------------------------------------
# requeue on signal
# --------------------------------------------------------------------------------------------------------------
def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else SLURM_JOB_ID (None outside)."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Requeue handling is on inside a SLURM job or when LIGHTNING_RALORA_REQUEUE_CMD names a requeue command."""
    env = os.environ if env is None else env
    return bool(slurm_job_id(env) or env.get(REQUEUE_CMD_ENV))


def requeue_signals(env: Mapping[str, str] | None = None) -> list[signal.Signals]:
    """SIGUSR1, plus submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL, default USR2) in a submitit SLURM job."""
    env = os.environ if env is None else env
    signals = [signal.SIGUSR1]
    if env.get("SUBMITIT_EXECUTOR") == "slurm":
        extra = getattr(signal, "SIG" + env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if extra is not None and extra not in signals:
            signals.append(extra)
    return signals


def _replace(tmp: Path, path: Path) -> None:
    """Move a finished checkpoint (file or distributed-checkpoint directory) over the old one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or (tmp.is_dir() and path.exists()):
        path.unlink()
    os.replace(tmp, path)


class RequeueOnSignal(L.Callback):
    """On SIGUSR1 (SLURM's warning before the time limit or preemption): at the next batch end save
    `<run_dir>/checkpoints/last.ckpt` and the requeue marker, requeue the job and exit; the requeued job resumes."""

    def __init__(self, requeue_cmd: str | None = None) -> None:
        self.requeue_cmd = requeue_cmd or os.environ.get(REQUEUE_CMD_ENV) or DEFAULT_REQUEUE_CMD
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum)  # only a flag: the checkpoint is saved at a consistent point

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            for sig in requeue_signals():
                self._previous[sig] = signal.signal(sig, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # the run got past its interruptions: a later job starts as configured
            (Path(trainer.default_root_dir) / REQUEUE_MARKER).unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        run_dir = Path(trainer.default_root_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        tmp = ckpt.with_name("last.ckpt.requeue-tmp")
        trainer.save_checkpoint(tmp)  # collective: every rank takes part
        trainer.strategy.barrier("requeue_checkpoint")
        if trainer.is_global_zero:
            _replace(tmp, ckpt)
            wandb_id = next((lg.version for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"), None)
            marker = {"ckpt_path": str(ckpt), "global_step": trainer.global_step, "job_id": slurm_job_id()}
            (run_dir / REQUEUE_MARKER).write_text(json.dumps({**marker, "wandb_id": wandb_id}, indent=1))
            print(f"requeue: saved {ckpt} at step {trainer.global_step}", file=sys.stderr, flush=True)
        trainer.strategy.barrier("requeue_marker")
        for lg in trainer.loggers:
            lg.finalize("requeued")
        previous = self._previous.get(self.received) if self.received is not None else None
        if callable(previous) and type(getattr(previous, "__self__", None)).__module__.startswith("submitit"):
            previous(self.received, None)  # submitit's handler: checkpoint its submission, requeue (counted), exit
            raise SystemExit(0)
        raise SystemExit(self.requeue() if trainer.is_global_zero else 0)

    def requeue(self) -> int:
        """Run the requeue command (default `scontrol requeue <job id>`); its exit status (0 outside SLURM)."""
        job_id = slurm_job_id()
        if job_id is None and REQUEUE_CMD_ENV not in os.environ and self.requeue_cmd == DEFAULT_REQUEUE_CMD:
            print("requeue: not a SLURM job; run the same command again to resume", file=sys.stderr, flush=True)
            return 0
        cmd = self.requeue_cmd.format(job_id=job_id or "")
        status = subprocess.run(cmd, shell=True, check=False).returncode
        print(f"requeue: `{cmd}` exited with {status}", file=sys.stderr, flush=True)
        return status


def requeue_callbacks() -> list[L.Callback]:
    """[RequeueOnSignal()] inside a SLURM job (or with LIGHTNING_RALORA_REQUEUE_CMD set), else []."""
    return [RequeueOnSignal()] if requeue_enabled() else []


def slurm_plugins() -> list[Any]:
    """Inside SLURM, Lightning's SLURM environment with its own auto-requeue off: RequeueOnSignal owns SIGUSR1."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# --------------------------------------------------------------------------------------------------------------
# resume of a requeued job
# --------------------------------------------------------------------------------------------------------------
def requeued_ckpt(run_dir: str | Path) -> str | None:
    """The checkpoint a requeued job resumes from (named by <run_dir>/requeue.json, if it exists), else None.
    W&B continues the interrupted run through the run's stable id (identity.py), as for any resume."""
    marker = Path(run_dir) / REQUEUE_MARKER
    if not marker.exists():
        return None
    info = json.loads(marker.read_text())
    ckpt = Path(info.get("ckpt_path") or Path(run_dir) / "checkpoints" / "last.ckpt")
    if not ckpt.exists():
        return None
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"requeue: resuming from {ckpt} (SLURM_RESTART_COUNT={restart})", file=sys.stderr, flush=True)
    return str(ckpt)


# --------------------------------------------------------------------------------------------------------------
# launcher guard: no Lightning subprocess launcher inside a Hydra multirun
# --------------------------------------------------------------------------------------------------------------
def in_hydra_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`, or `hydra.mode=MULTIRUN`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def external_launcher(env: Mapping[str, str] | None = None) -> bool:
    """True when the ranks were started outside Lightning: SLURM tasks (SLURM_NTASKS > 1) or torchrun (LOCAL_RANK,
    WORLD_SIZE)."""
    env = os.environ if env is None else env
    ntasks = env.get("SLURM_NTASKS", "1")
    return (ntasks.isdigit() and int(ntasks) > 1) or "LOCAL_RANK" in env or "WORLD_SIZE" in env


def _multi_process(trainer: Mapping[str, Any]) -> bool:
    devices, nodes, strategy = trainer.get("devices", 1), trainer.get("num_nodes", 1), trainer.get("strategy")
    if isinstance(strategy, Mapping):
        strategy = str(strategy.get("_target_", ""))
    # every multi-device strategy but spawn/fork ("auto" too: it picks DDP) starts its ranks by re-running sys.argv
    parallel = not any(s in str(strategy).lower() for s in ("spawn", "fork", "notebook", "single"))
    if isinstance(devices, str):
        devices = len(devices.split(",")) if "," in devices else int(devices) if devices.lstrip("-").isdigit() else 1
    many = devices == -1 or (len(devices) > 1 if isinstance(devices, (list, tuple)) else devices > 1)
    return parallel and (many or (isinstance(nodes, int) and nodes > 1))


def launcher_problems(
    trainer: Mapping[str, Any], multirun: bool | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """The Hydra+DDP problem, if any: a multi-process trainer in a Hydra multirun without an external launcher
    (Lightning would re-launch `sys.argv` per rank, which re-runs the whole sweep)."""
    multirun = in_hydra_multirun() if multirun is None else multirun
    if not multirun or external_launcher(env) or not _multi_process(trainer):
        return []
    return [
        f"trainer.devices={trainer.get('devices')!r}, trainer.num_nodes={trainer.get('num_nodes', 1)!r} with "
        f"trainer.strategy={trainer.get('strategy')!r} cannot run inside a Hydra multirun (-m): Lightning would "
        "re-launch the sweep once per rank. Launch one task per device instead: hydra/launcher=submitit_slurm "
        "(SLURM), srun or torchrun (docs/cluster.md), or run the jobs one by one without -m"
    ]


def check_launcher(trainer: Mapping[str, Any], multirun: bool | None = None, env: Mapping[str, str] | None = None):
    """Raise ConfigError with `launcher_problems`, if any."""
    from .config import ConfigError

    problems = launcher_problems(trainer, multirun, env)
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------------------------------------------
# sweep objective
# --------------------------------------------------------------------------------------------------------------
def task_objective(task: str | type | Mapping[str, Any]) -> tuple[str, str]:
    """(metric, "maximize"|"minimize") of a task: a task config's `objective` node, else the class attribute."""
    from .tasks import TASKS

    if isinstance(task, Mapping):
        node = task.get("objective")
        if node:
            return str(node["metric"]), str(node["direction"])
        task = task["name"]
    cls = TASKS[task] if isinstance(task, str) else task
    return cls.objective


def objective_value(task: str | type | Mapping[str, Any], final_metrics: Mapping[str, float]) -> float:
    """The value a sweep optimises: the task's objective metric from results.json's final_metrics (NaN, which
    Optuna records as a failed trial, when the run did not log it)."""
    metric, _ = task_objective(task)
    if metric not in final_metrics:
        print(f"objective: {metric} was not logged; got {sorted(final_metrics)}", file=sys.stderr, flush=True)
        return float("nan")
    return float(final_metrics[metric])


__all__ = [
    "DEFAULT_REQUEUE_CMD",
    "REQUEUE_CMD_ENV",
    "REQUEUE_MARKER",
    "RequeueOnSignal",
    "check_launcher",
    "external_launcher",
    "in_hydra_multirun",
    "launcher_problems",
    "objective_value",
    "requeue_callbacks",
    "requeue_enabled",
    "requeue_signals",
    "requeued_ckpt",
    "slurm_job_id",
    "slurm_plugins",
    "task_objective",
]
