"""A signal never loses a run: SIGTERM (SLURM's cancel, time limit, preemption) in fit, in validation or in the GID
warm-up stops the run at its next safe point with a checkpoint and a record, exits 128 + the signal, and the resume
ends at the same adapter weights as a run never interrupted; inside a sweep the interrupted job is recorded, the
summary printed and later jobs not started. Through the real CLI (python -m lightning_ralora.cli.train)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest

pytestmark = pytest.mark.slow

# RaLoRA: a GID warm-up (2 batches) fixes the structure, which the resume must take from the checkpoint;
# debug=fast: 12 steps of batch 8 over 64 planted sequences, validation every 6 steps (2 batches of 8)
COMMON = ["debug=fast", "adapter=ralora", "adapter.gid_batches=2", "deterministic=true", "wandb.mode=disabled"]


class SignalOnce(L.Callback):
    """Test helper (a `callbacks.<name>` entry): send this process `sig` once, at a reproducible point of `phase`:
    after training step `step` (fit), before validation batch 1 of the validation after step `step` (validation),
    or when the GID warm-up draws its batch `step` (gid_warmup). `once_file` is created when it fires, so the same
    config (the same run identity) resumes without a second signal."""

    def __init__(self, phase: str, step: int, once_file: str, sig: str = "SIGTERM") -> None:
        self.phase, self.step, self.once, self.sig = phase, step, Path(once_file), getattr(signal, sig)

    def _fire(self) -> None:
        if not self.once.exists():
            self.once.write_text(self.phase)
            os.kill(os.getpid(), self.sig)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.phase != "gid_warmup" or stage != "fit":
            return
        dm, fire, step = trainer.datamodule, self._fire, self.step
        make = dm.train_dataloader

        def first_loader_signals(*args: Any, **kwargs: Any) -> Any:  # the warm-up draws the first loader
            loader = make(*args, **kwargs)
            dm.train_dataloader = make

            class Signalling:
                def __iter__(self):
                    for i, batch in enumerate(loader):
                        if i == step:
                            fire()
                        yield batch

                def __len__(self) -> int:
                    return len(loader)

                def __getattr__(self, name: str) -> Any:
                    return getattr(loader, name)

            return Signalling()

        dm.train_dataloader = first_loader_signals

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.phase == "fit" and trainer.global_step == self.step:
            self._fire()

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx, *a) -> None:
        if self.phase == "validation" and trainer.global_step == self.step and batch_idx == 1:
            self._fire()


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]
    return subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.train", *flags, *(a for a in args if not a.startswith("-"))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


def signal_at(phase: str, step: int, once: Path) -> list[str]:
    entry = "+callbacks.stop"
    return [f"{entry}._target_={__name__}.SignalOnce", f"{entry}.phase={phase}", f"{entry}.step={step}",
            f"{entry}.once_file={once}"]  # fmt: skip


def results(run: Path) -> dict[str, Any]:
    return json.loads((run / "results.json").read_text())


# a random step in each phase (seeded: a failure names its step), fit steps strictly inside the run
STEPS = {"fit": random.Random(11).randint(2, 11), "validation": 6, "gid_warmup": 1}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("phase", list(STEPS))
def test_sigterm_records_checkpoints_and_the_resume_matches_an_uninterrupted_run(
    tmp_path: Path, phase: str, seed: int
) -> None:
    step = STEPS[phase]
    once = tmp_path / "fired"
    once.write_text("already")  # the reference run carries the same callback (same identity), disarmed
    job = [*COMMON, f"seed={seed}", *signal_at(phase, step, once)]
    reference = cli(f"hydra.run.dir={tmp_path / 'reference'}", *job)
    assert reference.returncode == 0, reference.stderr[-3000:]
    once.unlink()

    run = tmp_path / "run"
    first = cli(f"hydra.run.dir={run}", *job)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]  # 143, as a shell reports it
    assert "Traceback" not in first.stderr and once.read_text() == phase
    record = results(run)
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM" and record["phase"] == phase
    attempts = sorted((run / "attempts").glob("*-interrupted.json"))
    assert len(attempts) == 1 and json.loads(attempts[0].read_text())["phase"] == phase
    assert not (run / ".lock").exists() and not list(run.rglob(".*.tmp"))
    if phase == "gid_warmup":  # nothing trained yet: no checkpoint; the same command starts it again
        assert record["global_step"] == step and record["checkpoint"] is None
        assert not list((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else True
        resumed = cli(f"hydra.run.dir={run}", *job)
    else:  # a checkpoint at the step the signal came after, loadable; ckpt_path=last resumes it
        import torch

        assert record["global_step"] == step and record["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
        assert torch.load(record["checkpoint"], weights_only=False, map_location="cpu")["global_step"] == step
        resumed = cli(f"hydra.run.dir={run}", *job, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done, ref = results(run), results(tmp_path / "reference")
    assert done["status"] == "completed" and done["global_step"] == ref["global_step"] == 12
    assert done["plan"]["entries"] == ref["plan"]["entries"]
    assert done["adapter_state_digest_per_rank"] == ref["adapter_state_digest_per_rank"]
    assert len(list((run / "attempts").glob("*-interrupted.json"))) == 1  # the stopped attempt is kept


def test_sigterm_in_a_sweep_records_the_job_prints_the_summary_and_starts_no_later_job(tmp_path: Path) -> None:
    once = tmp_path / "fired"
    sweep = tmp_path / "sweep"
    job = [*COMMON, *signal_at("fit", 5, once), f"hydra.sweep.dir={sweep}"]
    # the signal fires in the first job that reaches step 5 after the marker is gone: job 2 (seed 1)
    once.write_text("armed later")
    reference = cli(f"hydra.run.dir={tmp_path / 'reference'}", *job, "seed=1")
    assert reference.returncode == 0, reference.stderr[-3000:]
    first_job = cli("-m", *job, "seed=0")  # job 1 of the sweep, alone, so the marker can be armed for job 2
    assert first_job.returncode == 0, first_job.stderr[-3000:]
    once.unlink()

    out = cli("-m", *job, "seed=0,1,2", "ckpt_path=auto")
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    dirs = {p.name: p for p in sweep.rglob("seed*") if p.is_dir()}
    assert set(dirs) == {"seed0", "seed1"}  # seed 2 never started
    stopped = results(dirs["seed1"])
    assert (stopped["status"], stopped["global_step"]) == ("interrupted", 5)
    assert results(dirs["seed0"])["status"] == "completed"
    summary = out.stderr[out.stderr.index(f"sweep {sweep}") :]
    assert "stopped by SIGTERM, later jobs not started" in summary
    assert "skipped" in summary and "interrupted" in summary and "seed2" not in summary

    again = cli("-m", *job, "seed=0,1,2", "ckpt_path=auto")  # the sweep resubmitted
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sweep {sweep}: 3 completed, 0 not" in again.stderr
    done = results(dirs["seed1"])
    assert done["adapter_state_digest_per_rank"] == results(tmp_path / "reference")["adapter_state_digest_per_rank"]
    assert results(next(sweep.rglob("seed2")))["status"] == "completed"


@pytest.mark.parametrize(("sig", "status"), [("SIGINT", "interrupted"), ("SIGUSR1", "interrupted")])
def test_sigint_and_sigusr1_outside_slurm_record_the_run_and_exit_128_plus_the_signal(
    tmp_path: Path, sig: str, status: str
) -> None:
    """Ctrl+C used to exit 1 with no record; SIGUSR1 outside SLURM (no requeue command) is a plain stop."""
    run, once = tmp_path / "run", tmp_path / "fired"
    out = cli(f"hydra.run.dir={run}", "debug=fast", "wandb.mode=disabled", *signal_at("fit", 3, once),
              f"+callbacks.stop.sig={sig}")  # fmt: skip
    assert out.returncode == 128 + getattr(signal, sig), out.stderr[-3000:]
    record = results(run)
    assert (record["status"], record["signal"], record["global_step"]) == (status, sig, 3)
    assert record["resume"] == "the same command with ckpt_path=last" and "Traceback" not in out.stderr


@pytest.mark.multiprocess
def test_sigterm_under_fsdp2_saves_a_whole_sharded_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    """FSDP2 on two ranks, SIGTERM to rank 0 after step 5 (the ranks agree to stop at the same step): last.ckpt is a
    complete sharded directory of step 5 (staged and renamed in, nothing left beside it) and `ckpt_path=last` ends
    with the uninterrupted run's weights."""
    from lightning_ralora.run.checkpoints import checkpoint_problem, checkpoint_step

    once = tmp_path / "fired"
    once.write_text("already")
    job = ["debug=fast", "trainer=fsdp2", "adapter=lora", "wandb.mode=disabled", "trainer.max_steps=8",
           "task.train_size=64", "task.val_size=16", *signal_at("fit", 5, once)]  # fmt: skip
    reference = cli(f"hydra.run.dir={tmp_path / 'reference'}", *job)
    assert reference.returncode == 0, reference.stderr[-3000:]
    once.unlink()
    run = tmp_path / "run"
    first = cli(f"hydra.run.dir={run}", *job)
    assert first.returncode != 0 and "Traceback" not in first.stderr, first.stderr[-3000:]
    record = results(run)
    assert (record["status"], record["signal"], record["global_step"]) == ("interrupted", "SIGTERM", 5)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and checkpoint_problem(last) is None and checkpoint_step(last) == 5
    assert [p.name for p in last.parent.iterdir() if p.name.startswith(".")] == []
    resumed = cli(f"hydra.run.dir={run}", *job, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done, ref = results(run), results(tmp_path / "reference")
    assert done["status"] == "completed" and done["global_step"] == ref["global_step"] == 8
    assert done["adapter_state_digest_per_rank"] == ref["adapter_state_digest_per_rank"]
