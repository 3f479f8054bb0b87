"""Stop signals, process-wide: SIGTERM, SIGINT and SIGUSR1 (the requeue signal inside SLURM) only set a flag, and the
loops of every layer (fit through run/cluster.StopOnSignal, the GID warm-up, evaluation) stop at their next safe point
by raising `Interrupted` (docs/cluster.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

REQUEUE_CMD_ENV = "LIGHTNING_RALORA_REQUEUE_CMD"  # shell command; {job_id} is replaced by the SLURM job id


DEFAULT_REQUEUE_CMD = "scontrol requeue {job_id}"


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


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a run at its next safe point: SIGTERM (SLURM's cancel, time limit, preemption), SIGINT
    (Ctrl+C) and the requeue signals."""
    return list(dict.fromkeys([signal.SIGTERM, signal.SIGINT, *requeue_signals()]))


class StopRequest:
    """Process-wide: the first stop signal received (None until then) and the handlers it replaced."""

    signum: signal.Signals | None = None
    previous: dict[signal.Signals, Any] = {}  # noqa: RUF012 - process-wide state on purpose

    @classmethod
    def reset(cls) -> None:
        cls.signum = None


def _on_stop_signal(signum: int, _frame: Any) -> None:
    """Only a flag (the checkpoint is saved at a consistent point); a second SIGINT stops at once."""
    sig = signal.Signals(signum)
    if StopRequest.signum is None:
        StopRequest.signum = sig
        print(f"received {sig.name}: stopping at the next safe point (checkpoint, record); Ctrl+C again stops at "
              "once", file=sys.stderr, flush=True)  # fmt: skip
    elif sig == signal.SIGINT:
        raise KeyboardInterrupt


def install_stop_handlers() -> None:
    """Route the stop signals to `_on_stop_signal` (main thread only; again after Lightning composes its own SIGTERM
    handler at the start of fit, so ours decides)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in stop_signals():
        current = signal.getsignal(sig)
        if current is not _on_stop_signal:
            StopRequest.previous.setdefault(sig, current)
            signal.signal(sig, _on_stop_signal)


def stop_agreed(strategy: Any = None) -> bool:
    """Whether a stop was requested on any rank (a collective when a strategy spans several processes)."""
    requested = StopRequest.signum is not None
    if strategy is not None:
        return bool(strategy.reduce_boolean_decision(requested, all=False))
    return requested


class Interrupted(Exception):
    """A run stopped by a signal at a safe point: what `train` reports and `run_job` records (status `interrupted`,
    or `requeued` when the requeue signal came inside SLURM), with the phase, the step and the checkpoint saved."""

    def __init__(self, phase: str, step: int | None = None, ckpt: str | None = None) -> None:
        self.signum = StopRequest.signum or signal.SIGTERM
        self.phase, self.step, self.ckpt = phase, step, ckpt
        self.requeued = self.signum in requeue_signals() and requeue_enabled() and self.signum != signal.SIGTERM
        at = f" at step {step}" if step is not None else ""
        saved = f"; checkpoint {ckpt}" if ckpt else "; no checkpoint (nothing trained to keep)"
        super().__init__(f"{self.signum.name} in {phase}{at}{saved}")

    @property
    def status(self) -> str:
        return "requeued" if self.requeued else "interrupted"

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for a process ended by that signal."""
        return 128 + int(self.signum)

    def requeue(self) -> int:
        """Requeue the job (a submitit job through submitit's own handler, which exits); the command's status."""
        previous = StopRequest.previous.get(self.signum)
        if callable(previous) and type(getattr(previous, "__self__", None)).__module__.startswith("submitit"):
            previous(self.signum, None)  # submitit: checkpoint its submission, requeue (counted), exit
        cmd_template = os.environ.get(REQUEUE_CMD_ENV) or DEFAULT_REQUEUE_CMD
        job_id = slurm_job_id()
        if job_id is None and REQUEUE_CMD_ENV not in os.environ:
            print("requeue: not a SLURM job; run the same command again to resume", file=sys.stderr, flush=True)
            return 0
        cmd = cmd_template.format(job_id=job_id or "")
        status = subprocess.run(cmd, shell=True, check=False).returncode
        print(f"requeue: `{cmd}` exited with {status}", file=sys.stderr, flush=True)
        return status


def check_stop(phase: str, step: int | None = None) -> None:
    """Raise Interrupted when a stop was requested (for loops outside Lightning's: the GID warm-up, evaluation);
    this rank only, nothing saved: those phases are recomputed on resume."""
    if StopRequest.signum is not None:
        raise Interrupted(phase, step)
