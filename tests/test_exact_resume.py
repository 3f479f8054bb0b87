"""Exact mid-epoch resume: a run interrupted at any optimizer step and resumed from its checkpoint ends with the
same weights, plan and SDS schedule as the uninterrupted run (the train loader checkpoints its position)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ralora.data.datamodule import ListDataModule, ResumableDataLoader
from lightning_ralora.run.job import train
from tests.conftest import make_cfg


class CrashAt(L.Callback):
    """Simulates a crash: raises before the first batch of optimizer step `step + 1` (step `step` is checkpointed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash after step {self.step}")


def _loader(n: int = 20, batch_size: int = 3, seed: int = 7, **kw: object) -> ResumableDataLoader:
    return ListDataModule(list(range(n)), [], batch_size, collate_fn=list, seed=seed, **kw).train_dataloader()


def _epoch(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [0, 2, 5, 6])
def test_restored_loader_yields_the_rest_of_the_epoch_then_the_same_next_epoch(num_workers: int, consumed: int) -> None:
    # reference, independent of the loader under test: the sampler's permutation cut into full batches
    def order(epoch: int) -> list[list[int]]:
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(7 * 100_003 + epoch)).tolist()
        return [perm[i : i + 3] for i in range(0, 18, 3)]  # drop_last: 6 batches of 3

    first = _loader(num_workers=num_workers)
    assert _epoch(first, 0) == order(0)
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it) for _ in range(consumed)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": consumed} and seen == order(1)[:consumed]

    fresh = _loader(num_workers=num_workers)  # a new process: sampler at epoch 0, no position
    fresh.load_state_dict(state)
    epoch = 1 if consumed < 6 else 2  # Lightning's set_epoch before the first batch (epoch 1 was finished)
    assert _epoch(fresh, epoch) == (order(1)[consumed:] if epoch == 1 else order(2))
    assert fresh.state_dict() == {"epoch": epoch, "batches": 6}
    assert _epoch(fresh, 3) == order(3)  # the skip is taken once


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_rewrap_keeps_the_loader_stateful_and_skips_within_the_rank_shard(rank: int) -> None:
    """Under DDP Lightning re-creates the loader around a DistributedSamplerWrapper (shuffle off for a custom
    sampler); the copy is still resumable, set_epoch reaches our sampler, and the skip acts on this rank's batches."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader

    def ddp_loader(state: dict | None = None) -> ResumableDataLoader:
        base = _loader(batch_size=2)
        wrapper = DistributedSamplerWrapper(base.sampler, num_replicas=2, rank=rank, shuffle=False)
        dl = _update_dataloader(base, wrapper)
        if state:
            dl.load_state_dict(state)
        _set_sampler_epoch(dl, 1)
        return dl

    perm = torch.randperm(20, generator=torch.Generator().manual_seed(7 * 100_003 + 1)).tolist()[rank::2]
    expected = [perm[i : i + 2] for i in range(0, 10, 2)]  # this rank's 10 indices in batches of 2
    dl = ddp_loader()
    assert isinstance(dl, ResumableDataLoader) and list(dl) == expected
    it = iter(dl)
    [next(it) for _ in range(2)]
    assert dl.state_dict() == {"epoch": 1, "batches": 2}
    assert list(ddp_loader(dl.state_dict())) == expected[2:]


def test_checkpointed_position_survives_the_lightning_round_trip(tmp_path: Path) -> None:
    """The fit loop stores the loader state in the checkpoint (Lightning calls it only on stateful loaders)."""
    cfg = ["adapter=lora", "task.train_size=40", "trainer.max_steps=7", "trainer.val_check_interval=5"]
    train(make_cfg(tmp_path, [*cfg, "callbacks.checkpoint.every_n_train_steps=7"]))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]


def _run(run_dir: Path, overrides: list[str], crash_at: int | None = None) -> dict:
    extra = (
        []
        if crash_at is None
        else [f"+callbacks.crash._target_={__name__}.CrashAt", f"+callbacks.crash.step={crash_at}"]
    )
    return train(make_cfg(run_dir, [*overrides, *extra]))


def _adapter_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if "lora_" in k or "Q_" in k}


# 40 sequences / batch 8 = 5 optimizer steps per epoch (3 with accumulate_grad_batches=2); the crash is strictly
# inside an epoch; a checkpoint (last.ckpt) after every step, so the last one written is the crash step's
CASES = {
    "lora": (["adapter=lora"], 3),
    "lora_accumulate": (["adapter=lora", "trainer.accumulate_grad_batches=2"], 4),
    "ralora": (["adapter=ralora", "adapter.gid_batches=2"], 7),
    "sds_lora": (["adapter=sds_lora", "adapter.warmup_steps=2", "adapter.K=2"], 7),
}


# 10 deterministic steps with a checkpoint after each: the run every mid-epoch crash/resume test compares with
MID_EPOCH_RUN = [
    "task.train_size=40",
    "trainer.max_steps=10",
    "trainer.val_check_interval=3",
    "callbacks.checkpoint.every_n_train_steps=1",
    "deterministic=true",
]


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, case: str) -> None:
    adapter, crash_at = CASES[case]
    common = [*adapter, *MID_EPOCH_RUN]
    full = _run(tmp_path / "full", common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "resumed", common, crash_at=crash_at)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == crash_at
    assert 0 < ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] < 5  # mid-epoch
    # the crash callback was part of the interrupted run's config (its identity): the resume drops it on purpose
    resumed = _run(tmp_path / "resumed", [*common, "ckpt_path=last", "resume.allow_changes=[callbacks.crash]"])

    untimed = [
        {k: v for k, v in r["plan"]["meta"].items() if k != "gid_seconds"} if r["plan"] else None
        for r in (full, resumed)
    ]
    assert untimed[0] == untimed[1] and (resumed["plan"] or {}).get("entries") == (full["plan"] or {}).get("entries")
    assert resumed["callbacks"].get("SDSSchedule") == full["callbacks"].get("SDSSchedule")
    if case == "sds_lora":  # switch after step 2; refreshes where t % (int(K t / T) + 1) == 0 (docs/maths.md §6)
        assert full["callbacks"]["SDSSchedule"]["switch_step"] == 2
        assert full["callbacks"]["SDSSchedule"]["refresh_log"] == [3, 4, 6, 8]
    if case == "ralora":
        assert full["plan"]["entries"]
    a, b = _adapter_state(tmp_path / "full"), _adapter_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(b[k], a[k]), k
    assert resumed["adapter_state_digest_per_rank"] == full["adapter_state_digest_per_rank"]
