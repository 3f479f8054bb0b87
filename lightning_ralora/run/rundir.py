"""One run directory, one writer, nothing lost (docs/cluster.md, "Run directories").

- **Lock**: `<run_dir>/.lock` (host, pid, SLURM job) refuses a second run into the same directory; it is released on
  exit and taken over when stale (its process is gone on this host, it belongs to this SLURM job's earlier attempt,
  or its heartbeat stopped for `STALE_AFTER_S` on another host).
- **Records** (run/record.py): every failed, interrupted or skipped attempt is kept in `<run_dir>/attempts/`;
  `results.json` is only ever replaced by a completed run.
- **Checkpoints** (run/checkpoints.py): written atomically, checked before a resume.
- **Start**: a run dir that holds an earlier run is resumed or started over only when asked (`ckpt_path=last|auto`,
  `fresh=true`), never silently.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.run.checkpoints import CHECKPOINTS, checkpoint_problem, checkpoint_step, newest_intact_checkpoint
from lightning_ralora.run.record import ATTEMPTS, RESULTS, read_json, timestamp

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0  # the lock holder touches the lock this often
STALE_AFTER_S = 300.0  # a lock from another host untouched this long belongs to a dead run
# what a run writes in its dir (moved aside by a fresh start; anything else, e.g. a user's data file, stays)
RUN_OUTPUTS = {RESULTS, "eval.json", "eval", CHECKPOINTS, "csv", "wandb", "export", "requeue.json", "load_bytes.json"}
RUN_OUTPUT_PREFIXES = ("gid",)  # gid.json, gid.png, gid_energy.png, gid_profile.*, gid_over_training.*


# --------------------------------------------------------------------------------------------------------------
# the lock: one writer per run directory
# --------------------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_owner_stale(owner: Mapping[str, Any], age_s: float) -> str | None:
    """Why a lock left by `owner` (the JSON it holds; `age_s` since its last heartbeat) no longer guards a live run,
    or None when its run may still be alive."""
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid") or 0)
        if pid == os.getpid():
            return "left by this process"
        if not _pid_alive(pid):
            return f"its process {pid} is gone"
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job_id") == job:
        return f"left by an earlier attempt of SLURM job {job}"
    if age_s > STALE_AFTER_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


class RunLock:
    """`<run_dir>/.lock`, created exclusively (O_EXCL, which NFS v3+ honours), touched every HEARTBEAT_S by a daemon
    thread while held, removed on release."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    held = json.loads(self.path.read_text() or "{}")
                    age = time.time() - self.path.stat().st_mtime
                except (OSError, json.JSONDecodeError):
                    held, age = {}, STALE_AFTER_S + 1  # half-written by a crash, or just removed
                why = lock_owner_stale(held, age)
                if why is None:
                    raise ConfigError(
                        [f"run_dir={self.path.parent} is in use by another run (host {held.get('host')}, pid "
                         f"{held.get('pid')}, since {held.get('started')}): wait for it to end, or give this run "
                         f"another directory; if that run is gone, remove {self.path}"]
                    ) from None  # fmt: skip
                print(f"run dir: taking over a stale lock ({why}): {self.path}", file=sys.stderr, flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(owner))
            self._thread = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
            self._thread.start()
            return
        raise ConfigError([f"run_dir={self.path.parent}: could not take {self.path} (another run keeps taking it)"])

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass


def is_rank_zero() -> bool:
    """Global rank 0 by the launcher's environment (the run dir's state is rank 0's to read and write)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@contextmanager
def claim(run_dir: str | Path) -> Iterator[None]:
    """Hold the run dir's lock for the block (rank 0 only; other ranks share rank 0's claim)."""
    if not is_rank_zero():
        yield
        return
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------------------
# records: a completed results.json is never replaced by a failed attempt
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# checkpoints: written atomically, checked before use
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# how a run starts in its directory
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Start:
    """Where a run starts: `ckpt` to resume from (None: fresh), or `skip` (the completed record it keeps)."""

    ckpt: str | None = None
    skip: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def earlier_run(run_dir: str | Path) -> str | None:
    """A phrase describing what an earlier run left in `run_dir` that a fresh start would lose (a completed record
    or checkpoints), or None."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / RESULTS)
    folder = run_dir / CHECKPOINTS
    ckpts = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    completed = record is not None and record.get("status", "completed") == "completed"
    if not completed and not ckpts:
        return None
    what = [f"a completed run (step {record.get('global_step')})"] if completed else []
    if record is not None and not completed:
        what.append(f"an {record.get('status')} run" if record.get("status") == "interrupted" else
                    f"a {record.get('status')} run")  # fmt: skip
    if ckpts:
        what.append(f"checkpoints/{', '.join(ckpts[:3])}{', ...' if len(ckpts) > 3 else ''}")
    return " and ".join(what)


def archive_earlier_run(run_dir: str | Path) -> Path | None:
    """A fresh start: move what an earlier run wrote (RUN_OUTPUTS: records, checkpoints, metrics, W&B files, eval
    outputs) into attempts/<time>/, so the new run starts clean (no stale last.ckpt, no doubled metrics) and nothing
    is lost. Hydra's files, logs and anything else in the directory stay."""
    run_dir = Path(run_dir)
    items = [p for p in run_dir.iterdir() if p.name in RUN_OUTPUTS or p.name.startswith(RUN_OUTPUT_PREFIXES)]
    if not items:
        return None
    dest = run_dir / ATTEMPTS / timestamp()
    dest.mkdir(parents=True)
    for item in items:
        shutil.move(str(item), dest / item.name)
    return dest


def fresh_starts(run_dir: str | Path) -> int:
    """How many times this run dir was started over (the earlier attempts' folders in attempts/): a new W&B run each."""
    folder = Path(run_dir) / ATTEMPTS
    return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0


def plan_start(cfg: Mapping[str, Any], run_dir: str | Path, requeued: str | None = None) -> Start:
    """Decide, before any compute, where this run starts (rank 0 holds the lock; other ranks read the same files).

    `ckpt_path`: null = a fresh start, refused when the run dir holds an earlier run unless `fresh=true` (which moves
    it to attempts/); `last` = the newest intact checkpoint of this run (refused when there is none); `auto` = what a
    resubmitted sweep wants: a completed run is kept (skipped), a checkpoint is resumed, else a fresh start; a path =
    that checkpoint, checked first. `requeued`: the checkpoint a requeued job's marker names (wins over ckpt_path)."""
    run_dir = Path(run_dir)
    value, fresh = cfg.get("ckpt_path"), bool(cfg.get("fresh"))
    if fresh and value not in (None, ""):
        raise ConfigError([f"fresh=true starts over and ckpt_path={value} resumes: choose one"])
    if requeued:
        problem = checkpoint_problem(requeued)
        if problem is None:
            return Start(ckpt=requeued, notes=[f"requeue: resuming from {requeued}"])
        value = "last"  # the marker's checkpoint is damaged: fall back like ckpt_path=last
    if value in (None, ""):
        what = earlier_run(run_dir)
        if what and not fresh:
            raise ConfigError(
                [f"run_dir={run_dir} holds {what}: resume it with ckpt_path=last, keep it (a sweep resubmitted) "
                 "with ckpt_path=auto, or start over with fresh=true (its files move to attempts/)"]
            )  # fmt: skip
        moved = archive_earlier_run(run_dir) if is_rank_zero() else None  # a failed record, logs: kept, moved aside
        return Start(notes=[f"fresh start: the earlier attempt's files are in {moved}"] if moved else [])
    if value in ("last", "auto"):
        record = read_json(run_dir / RESULTS)
        if value == "auto" and record is not None and record.get("status", "completed") == "completed":
            return Start(skip=record, notes=[f"ckpt_path=auto: {run_dir} completed earlier; kept (fresh=true reruns)"])
        ckpt, skipped = newest_intact_checkpoint(run_dir)
        notes = [f"resume: skipping {s}" for s in skipped]
        if ckpt is not None:
            step = checkpoint_step(ckpt)
            return Start(ckpt=str(ckpt), notes=[*notes, f"resume: from {ckpt} (step {step})"])
        if skipped:
            where = run_dir / CHECKPOINTS
            raise ConfigError([f"ckpt_path={value}: no intact checkpoint in {where}: " + "; ".join(skipped)])
        if value == "last":
            raise ConfigError(
                [f"ckpt_path=last: {run_dir / CHECKPOINTS} holds no checkpoint to resume (drop ckpt_path to start "
                 "this run, or use ckpt_path=auto to resume-or-start)"]
            )  # fmt: skip
        return plan_start({**cfg, "ckpt_path": None}, run_dir)
    problem = checkpoint_problem(value)
    if problem is not None:
        raise ConfigError([f"ckpt_path={value} {problem}"])
    return Start(ckpt=str(value))
