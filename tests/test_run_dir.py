"""One run directory, one writer, nothing lost (lightning_ralora/run/rundir.py): records are never replaced by a worse
attempt, checkpoints are written atomically and checked before a resume (against torch.load itself), a second run
into a busy directory is refused, a full disk leaves no loadable-looking partial checkpoint, and every bad resume
request is refused before compute with the completed record untouched."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.io import recover_replaced, replace_with_staged, staging_path
from lightning_ralora.run.checkpoints import checkpoint_problem, newest_intact_checkpoint
from lightning_ralora.run.record import write_record
from lightning_ralora.run.rundir import RunLock, lock_owner_stale, plan_start

FAST = ["debug=fast", "wandb.mode=disabled"]


def cli(run: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.train", f"hydra.run.dir={run}", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under `run` except Hydra's own (which Hydra rewrites for each command)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed debug=fast run with a checkpoint after every step (the template copied by the tests)."""
    run = tmp_path_factory.mktemp("completed") / "run"
    out = cli(run, *FAST, "callbacks.checkpoint.every_n_train_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# --------------------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------------------
def test_a_completed_record_is_never_replaced_by_a_failed_or_interrupted_attempt(tmp_path: Path) -> None:
    write_record(tmp_path, {"status": "failed", "error": "first try"})
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"  # nothing better yet
    write_record(tmp_path, {"status": "completed", "global_step": 12})
    for status in ("failed", "interrupted", "requeued", "skipped"):
        write_record(tmp_path, {"status": status})
        assert json.loads((tmp_path / "results.json").read_text())["global_step"] == 12
    write_record(tmp_path, {"status": "completed", "global_step": 24})  # a completed re-run replaces it...
    attempts = sorted(p.name.split("-", 2)[-1] for p in (tmp_path / "attempts").iterdir())
    # ...and every attempt stays readable: the 5 non-completed ones and the replaced completed record
    assert attempts == sorted(["failed.json", "interrupted.json", "requeued.json", "skipped.json", "failed.json",
                               "completed.json"])  # fmt: skip
    assert json.loads((tmp_path / "results.json").read_text())["global_step"] == 24
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_sweep_summary_lists_its_own_jobs_only(tmp_path: Path, monkeypatch, capsys) -> None:
    """Two sweeps write into one multirun dir at the same time: each summary counts the jobs carrying its id, with
    each job's latest record (a job re-run by this sweep after another sweep's completed record: its own attempt)."""
    from lightning_ralora.run.record import SWEEP_ID_ENV, print_sweep_summary, records_of_sweep

    for sweep, jobs in (("A", {"j1": "completed", "j2": "failed"}), ("B", {"j3": "completed", "j1": "failed"})):
        monkeypatch.setenv(SWEEP_ID_ENV, sweep)
        for job, status in jobs.items():
            write_record(tmp_path / job, {"status": status, "error": "boom" if status == "failed" else None})
    mine = records_of_sweep(tmp_path, "A")
    assert {p.name: r["status"] for p, r in mine.items()} == {"j1": "completed", "j2": "failed"}
    theirs = records_of_sweep(tmp_path, "B")
    assert {p.name: r["status"] for p, r in theirs.items()} == {"j3": "completed", "j1": "failed"}
    monkeypatch.setenv(SWEEP_ID_ENV, "A")
    assert print_sweep_summary(tmp_path) == 1
    err = capsys.readouterr().err
    assert f"sweep {tmp_path}: 1 completed, 1 not" in err and "j3" not in err


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------
def _loads(path: Path) -> bool:
    try:
        torch.load(path, weights_only=False, map_location="cpu")
    except Exception:  # noqa: BLE001 - any failure to load is the reference's "unusable"
        return False
    return True


def test_checkpoint_check_agrees_with_torch_load_on_truncations(completed_run: Path, tmp_path: Path) -> None:
    """At 0 bytes, 1 byte, every 7% of the file and 1 byte short, the check says unusable exactly where torch.load
    fails; on the intact file it says usable."""
    data = (completed_run / "checkpoints" / "last.ckpt").read_bytes()
    cuts = sorted({0, 1, len(data) - 1, *(len(data) * k // 14 for k in range(1, 14))})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(data[:cut])
        problem = checkpoint_problem(path)
        assert (problem is None) == _loads(path), (cut, problem)
        assert problem is not None, cut
    whole = tmp_path / "whole.ckpt"
    whole.write_bytes(data)
    assert checkpoint_problem(whole) is None and _loads(whole)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(os.urandom(4096))
    assert checkpoint_problem(noise) is not None and not _loads(noise)
    assert checkpoint_problem(tmp_path / "absent.ckpt") == "not found"


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_which(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 3}, ckpts / "step3.ckpt")
    time.sleep(0.01)
    (ckpts / "last.ckpt").write_bytes((ckpts / "step3.ckpt").read_bytes()[:100])  # newer, truncated
    found, skipped = newest_intact_checkpoint(tmp_path)
    assert found == ckpts / "step3.ckpt" and len(skipped) == 1 and "last.ckpt is" in skipped[0]
    start = plan_start({"ckpt_path": "last"}, tmp_path)
    assert start.ckpt == str(ckpts / "step3.ckpt")
    assert any("skipping" in n and "last.ckpt" in n for n in start.notes)
    (ckpts / "step3.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"ckpt_path=last: no intact checkpoint in .*step3.ckpt is empty"):
        plan_start({"ckpt_path": "last"}, tmp_path)


# --------------------------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------------------------
def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path: Path, monkeypatch) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = socket.gethostname()
        (tmp_path / ".lock").write_text(json.dumps({"host": here, "pid": holder.pid, "started": "t0"}))
        with pytest.raises(ConfigError, match=rf"run_dir={tmp_path} is in use by another run \(host {here}, pid "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert lock_owner_stale({"host": here, "pid": holder.pid}, 0.0) == f"its process {holder.pid} is gone"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert "earlier attempt of SLURM job 77" in lock_owner_stale({"host": "node9", "pid": 1, "slurm_job_id": "77"}, 0)
    assert lock_owner_stale({"host": "node9", "pid": 1, "slurm_job_id": "78"}, 10.0) is None  # alive elsewhere
    assert "no heartbeat" in lock_owner_stale({"host": "node9", "pid": 1}, 1e4)
    lock = RunLock(tmp_path)
    lock.acquire()  # the dead holder's lock is taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


class SlowSteps(L.Callback):
    """Test helper: each training step takes `seconds` longer, so a second run can start while the first runs."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


@pytest.mark.slow
def test_two_concurrent_runs_into_one_dir_one_is_refused_and_metrics_are_not_duplicated(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = [*FAST, f"+callbacks.slow._target_={__name__}.SlowSteps", "+callbacks.slow.seconds=1.0"]
    first = subprocess.Popen(
        [sys.executable, "-m", "lightning_ralora.cli.train", f"hydra.run.dir={run}", *job],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    deadline = time.time() + 120
    while not (run / ".lock").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = cli(run, *job)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"run_dir={run} is in use by another run" in lines[0], second.stderr
    metrics = list(run.rglob("metrics.csv"))
    assert len(metrics) == 1
    rows = [r.split(",") for r in metrics[0].read_text().splitlines()]
    header, body = rows[0], rows[1:]
    keyed = [(r[header.index("step")], r[header.index("train/loss")]) for r in body if r[header.index("train/loss")]]
    assert len(keyed) == len(set(keyed)) > 0  # every logged training step once
    assert json.loads((run / "results.json").read_text())["status"] == "completed"


# --------------------------------------------------------------------------------------------------------------
# bad resume requests: refused before compute, nothing written
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("same_command", "holds a completed run (step 12) and checkpoints/"),
        ("missing_path", "ckpt_path=/nonexistent/last.ckpt not found"),
        ("empty_file", "is empty (0 bytes)"),
        ("truncated_last", "ckpt_path=last: no intact checkpoint in"),
        ("directory_not_checkpoint", "is a directory without meta.pt and .metadata"),
        ("fresh_and_resume", "fresh=true starts over and ckpt_path=last resumes: choose one"),
    ],
)
def test_bad_resume_requests_exit_2_with_one_line_and_leave_the_completed_run_untouched(
    completed_run: Path, tmp_path: Path, case: str, expected: str
) -> None:
    run = copy_run(completed_run, tmp_path / "run")
    overrides = {
        "same_command": [],
        "missing_path": ["ckpt_path=/nonexistent/last.ckpt"],
        "empty_file": [f"ckpt_path={tmp_path / 'empty.ckpt'}"],
        "truncated_last": ["ckpt_path=last"],
        "directory_not_checkpoint": [f"ckpt_path={tmp_path}"],
        "fresh_and_resume": ["fresh=true", "ckpt_path=last"],
    }[case]
    (tmp_path / "empty.ckpt").write_bytes(b"")
    if case == "truncated_last":
        for ckpt in (run / "checkpoints").glob("*.ckpt"):
            ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(run)
    out = cli(run, *FAST, "callbacks.checkpoint.every_n_train_steps=1", *overrides)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert snapshot(run) == before  # results.json byte-identical, no attempt, no checkpoint, no lock left


@pytest.mark.slow
def test_fresh_moves_the_earlier_run_aside_and_last_is_this_runs_newest(completed_run: Path, tmp_path: Path) -> None:
    run = copy_run(completed_run, tmp_path / "run")
    earlier = json.loads((run / "results.json").read_text())
    out = cli(run, *FAST, "callbacks.checkpoint.every_n_train_steps=1", "fresh=true")
    assert out.returncode == 0, out.stderr[-3000:]
    moved = [p for p in (run / "attempts").iterdir() if p.is_dir()]
    assert len(moved) == 1 and json.loads((moved[0] / "results.json").read_text()) == earlier
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no stale last.ckpt, no -v1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12
    rerun = json.loads((run / "results.json").read_text())
    assert rerun["status"] == "completed"
    assert rerun["wandb"]["id"] == earlier["wandb"]["id"] + "-r1"  # a new W&B run, not appended to the old one


# --------------------------------------------------------------------------------------------------------------
# sharded checkpoints: staged beside their name and renamed in (io.replace_with_staged, io.recover_replaced)
# --------------------------------------------------------------------------------------------------------------
def _sharded(folder: Path, step: int) -> Path:
    """A stand-in for a distributed checkpoint directory: two shard files and the two metadata files."""
    folder.mkdir(parents=True)
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"):
        (folder / name).write_text(f"{name} of step {step}")
    return folder


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.mark.parametrize("old", ["directory", "file", "none"])
def test_a_staged_checkpoint_replaces_the_old_one_whole(tmp_path: Path, old: str) -> None:
    """The staged directory takes the name with every file as written; the old checkpoint (a sharded directory, a
    single file, or none) is gone, and nothing is left beside it."""
    target = tmp_path / "last.ckpt"
    if old == "directory":
        _sharded(target, 4)
    elif old == "file":
        target.write_text("a one-file checkpoint")
    staged = _sharded(staging_path(target), 5)
    want = _contents(staged)
    replace_with_staged(target, staged)
    assert _contents(target) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_recovery_drops_an_unfinished_save_and_restores_a_set_aside_checkpoint(tmp_path: Path) -> None:
    """What a kill leaves: mid-write (a staged copy, the old one in place): the staged copy is removed, the old one
    kept; between the two renames (the old one set aside, the new one still staged): the old one comes back under its
    name (no staged copy is trusted: nothing marks it finished); a set-aside copy whose name was filled is removed."""
    mid_write, between = _sharded(tmp_path / "step=4.ckpt", 4), tmp_path / "last.ckpt"
    _sharded(staging_path(mid_write), 5)
    _sharded(tmp_path / ".last.ckpt.old", 4)
    _sharded(staging_path(between), 5)
    done = _sharded(tmp_path / "step=6.ckpt", 6)
    _sharded(tmp_path / ".step=6.ckpt.old", 5)
    notes = recover_replaced(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert set(_contents(between).values()) == {f"{n} of step 4" for n in ("__0_0.distcp", "__1_0.distcp",
                                                                           ".metadata", "meta.pt")}  # fmt: skip
    assert "step 4" in _contents(mid_write)["meta.pt"] and "step 6" in _contents(done)["meta.pt"]
    assert len(notes) == 3 and any("restored" in n and "last.ckpt" in n for n in notes)


# --------------------------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------------------------
def _mount_namespace() -> list[str] | None:
    """A command prefix that runs a shell in a private mount namespace (root, or an unprivileged user namespace),
    or None where neither is allowed."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if shutil.which("unshare") and probe.returncode == 0:
            return prefix
    return None


FULL_DISK = """
set -u
mount -t tmpfs -o size={size}k tmpfs {mnt} || exit 3
{python} -m lightning_ralora.cli.train hydra.run.dir={mnt}/run {overrides} > {out}/first.log 2>&1
echo $? > {out}/first.rc
{python} - <<'PY' > {out}/after_full.json
import json, pathlib
from lightning_ralora.run.checkpoints import checkpoint_problem
run = pathlib.Path("{mnt}/run")
files = {{str(p.relative_to(run)): p.stat().st_size for p in run.rglob("*") if p.is_file()}}
folder = run / "checkpoints"
ckpts = {{p.name: checkpoint_problem(p) for p in folder.iterdir()}} if folder.exists() else {{}}
print(json.dumps({{"files": files, "checkpoints": ckpts}}))
PY
mount -o remount,size=65536k {mnt}
{python} -m lightning_ralora.cli.train hydra.run.dir={mnt}/run {overrides} ckpt_path=auto > {out}/resume.log 2>&1
echo $? > {out}/resume.rc
cp -r {mnt}/run {out}/run
"""


@pytest.mark.slow
@pytest.mark.parametrize(("writer", "size_kib"), [("ours", 1200), ("ours", 500), ("lightning", 500)])
def test_a_full_disk_leaves_no_partial_checkpoint_under_a_valid_name_and_the_resume_works(
    tmp_path: Path, writer: str, size_kib: int
) -> None:
    """The run dir is a small tmpfs; a checkpoint is ~0.7 MB. At 1.2 MB the first checkpoint fits and the second
    does not: our writer keeps the first intact and `ckpt_path=auto` resumes from it. At 0.5 MB not even the first
    fits: our writer leaves no checkpoint file at all (the resume starts afresh), while Lightning's own writer (the
    control, `trainer.plugins=[]`) copies its $TMPDIR file in place and leaves a truncated last.ckpt under its valid
    name, which the resume refuses by name instead of loading."""
    prefix = _mount_namespace()
    if prefix is None:
        pytest.skip("no private mount namespace here (needs root or unprivileged user namespaces)")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    overrides = [*FAST, "callbacks.checkpoint.every_n_train_steps=1"]
    if writer == "lightning":
        overrides.append("+trainer.plugins=[]")
    script = FULL_DISK.format(size=size_kib, mnt=mnt, out=out, python=sys.executable, overrides=" ".join(overrides))
    done = subprocess.run([*prefix, "bash", "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "after_full.json").read_text())
    assert int((out / "first.rc").read_text()) != 0, (out / "first.log").read_text()[-3000:]  # the disk filled up
    resume_rc, resume_log = int((out / "resume.rc").read_text()), (out / "resume.log").read_text()
    if writer == "lightning":
        assert state["checkpoints"]["last.ckpt"] is not None, state  # a partial file under the valid name
        assert resume_rc == 2 and "last.ckpt is" in resume_log.strip().splitlines()[-1], resume_log[-3000:]
        return
    assert not [f for f in state["files"] if f.endswith(".tmp")], state
    assert state["checkpoints"] == ({"last.ckpt": None} if size_kib == 1200 else {}), state  # intact, or none
    assert resume_rc == 0, resume_log[-3000:]
    assert json.loads((out / "run" / "results.json").read_text())["global_step"] == 12
    assert ("resume: from" in resume_log) == (size_kib == 1200)
