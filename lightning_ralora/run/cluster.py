"""Cluster runs: stop on a signal (the flag itself: core/signals.py), requeue under SLURM, resume of a requeued job,
the Hydra+DDP launcher guard and the sweep objective (docs/cluster.md).

SIGTERM (SLURM's cancel, time limit, preemption), SIGINT and SIGUSR1 stop a run at its next safe point: it saves
`<run_dir>/checkpoints/last.ckpt`, records itself (status `interrupted`) and exits 128 + the signal. Inside SLURM,
SIGUSR1 (`#SBATCH --signal=USR1@90`, or submitit's preemption signal) also writes `<run_dir>/requeue.json` and
requeues the job (status `requeued`); the requeued job (same command, same run_dir) finds the marker and resumes
from that checkpoint with its plan, schedules and W&B run: the same code path as `ckpt_path=last`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.io import save_staged, write_json_atomic
from lightning_ralora.core.signals import Interrupted, install_stop_handlers, slurm_job_id, stop_agreed
from lightning_ralora.modules.distributed import FSDP2Strategy
from lightning_ralora.run.checkpoints import AtomicCheckpointIO
from lightning_ralora.tasks import TASKS

REQUEUE_MARKER = "requeue.json"  # <run_dir>/requeue.json: written on the signal, removed when the resumed fit ends


# --------------------------------------------------------------------------------------------------------------
# stop on signal: SIGTERM, SIGINT, SIGUSR1 (requeue under SLURM)
# --------------------------------------------------------------------------------------------------------------


def _save_last(trainer: L.Trainer) -> str:
    """Save <run_dir>/checkpoints/last.ckpt (every rank takes part), atomically: a file through AtomicCheckpointIO, a
    sharded directory by FSDP2Strategy (staged and renamed in); any other writer's output is staged here the same
    way (`io.save_staged`)."""
    ckpt = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    sharded = bool(getattr(trainer.strategy, "_save_distributed_checkpoint", False))
    atomic_file = isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) and not sharded
    if atomic_file or isinstance(trainer.strategy, FSDP2Strategy):
        trainer.save_checkpoint(ckpt)
        return str(ckpt)
    return str(save_staged(ckpt, trainer.save_checkpoint, trainer.strategy.barrier, trainer.is_global_zero))


class StopOnSignal(L.Callback):
    """On SIGTERM, SIGINT or SIGUSR1 (and submitit's preemption signal), at the next safe point: in fit, after an
    optimizer step, save `<run_dir>/checkpoints/last.ckpt` (atomically; mid-validation too) and raise `Interrupted`,
    which `train.run_job` records (results.json or attempts/, status interrupted or requeued), then requeues the job
    under SLURM and exits 128 + the signal. A requeued job (marker `requeue.json`) or `ckpt_path=last` resumes
    exactly. Also saves last.ckpt when fit ends between periodic checkpoints, so `last` is the run's last step."""

    def __init__(self) -> None:
        self._step_before: int | None = None
        self._saved_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install_stop_handlers()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        install_stop_handlers()  # Lightning registered its SIGTERM handler just before: ours decides

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        install_stop_handlers()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_before:  # inside a gradient accumulation: not a resumable point
            return
        if stop_agreed(trainer.strategy):
            self._stop(trainer, "fit")

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.sanity_checking or not stop_agreed(trainer.strategy):
            return
        if trainer.state.fn == "fit":  # validation inside fit: the weights are those of the last step
            self._stop(trainer, "validation")
        raise Interrupted("validation", trainer.global_step)  # the final validation: fit's last.ckpt is complete

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        savers = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "save_last", False)]
        saved = {getattr(cb, "_last_global_step_saved", None) for cb in savers} | {self._saved_step}
        if savers and trainer.global_step not in saved:
            self._saved_step = trainer.global_step
            _save_last(trainer)

    def _stop(self, trainer: L.Trainer, phase: str) -> None:
        ckpt = _save_last(trainer)
        self._saved_step = trainer.global_step
        stop = Interrupted(phase, trainer.global_step, ckpt)
        if stop.requeued and trainer.is_global_zero:
            marker = {"ckpt_path": ckpt, "global_step": trainer.global_step, "job_id": slurm_job_id()}
            wandb_id = next((lg.version for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"), None)
            write_json_atomic(Path(trainer.default_root_dir) / REQUEUE_MARKER, {**marker, "wandb_id": wandb_id})
        trainer.strategy.barrier("stop_marker")
        print(f"stop: saved {ckpt} at step {trainer.global_step}", file=sys.stderr, flush=True)
        raise stop

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # the run got past its interruptions: a later job starts as configured
            (Path(trainer.default_root_dir) / REQUEUE_MARKER).unlink(missing_ok=True)


def stop_callbacks() -> list[L.Callback]:
    """Every run stops cleanly on a signal: [StopOnSignal()]."""
    return [StopOnSignal()]


def slurm_plugins() -> list[Any]:
    """Inside SLURM, Lightning's SLURM environment with its own auto-requeue off: StopOnSignal owns SIGUSR1."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# --------------------------------------------------------------------------------------------------------------
# resume of a requeued job
# --------------------------------------------------------------------------------------------------------------
def requeued_ckpt(run_dir: str | Path) -> str | None:
    """The checkpoint a requeued job resumes from (named by <run_dir>/requeue.json, if it exists), else None.
    W&B continues the interrupted run through the run's stable id (identity.py), as for any resume."""
    marker = Path(run_dir) / REQUEUE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ckpt = Path(info.get("ckpt_path") or Path(run_dir) / "checkpoints" / "last.ckpt")
    return str(ckpt) if ckpt.exists() else None


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
    problems = launcher_problems(trainer, multirun, env)
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------------------------------------------
# sweep objective
# --------------------------------------------------------------------------------------------------------------
def task_objective(task: str | type | Mapping[str, Any]) -> tuple[str, str]:
    """(metric, "maximize"|"minimize") of a task: a task config's `objective` node, else the class attribute."""
    if isinstance(task, Mapping):
        node = task.get("objective")
        if node:
            return str(node["metric"]), str(node["direction"])
        task = task["name"]
    cls = TASKS[task] if isinstance(task, str) else task
    return cls.objective


def worst_objective(task: str | type | Mapping[str, Any]) -> float:
    """The value a failed, diverged or stopped trial reports: -inf when the task maximises, +inf when it minimises.
    Optuna ranks it last and goes on; NaN would make Hydra's Optuna sweeper stop the whole search with a traceback
    (optuna 2.10 refuses a NaN value in `tell`, and the sweeper re-raises)."""
    return float("-inf") if task_objective(task)[1] == "maximize" else float("inf")


def objective_value(task: str | type | Mapping[str, Any], final_metrics: Mapping[str, float]) -> float:
    """The value a sweep optimises: the task's objective metric from results.json's final_metrics; the worst value
    (`worst_objective`) when the run did not log it or logged a NaN."""
    metric, _ = task_objective(task)
    value = final_metrics.get(metric)
    if value is None or math.isnan(float(value)):
        got = "NaN" if value is not None else f"not logged; got {sorted(final_metrics)}"
        print(f"objective: {metric} {got}: the trial counts as the worst", file=sys.stderr, flush=True)
        return worst_objective(task)
    return float(value)
