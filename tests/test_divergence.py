"""The divergence guard: a NaN/inf loss or gradient stops the run at the right step and no
checkpoint with non-finite weights or optimizer state is written."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_ralora.callbacks.divergence import Diverged, DivergenceGuard
from lightning_ralora.modules.adapter_module import AdapterModule, read_plan
from lightning_ralora.run.job import run_job, train
from tests.conftest import make_cfg

NAN_FROM = 5  # the planted NaN appears at global_step 5 (steps 0-4 are finite)


def fake_trainer(step: int) -> SimpleNamespace:
    """What the guard reads from a Trainer: one process, no checkpoints, full precision."""
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    return SimpleNamespace(
        global_step=step, strategy=strategy, checkpoint_callbacks=[], precision_plugin=SimpleNamespace()
    )


def test_nan_loss_raises_with_step():
    guard, trainer = DivergenceGuard(), fake_trainer(7)
    guard.on_before_backward(trainer, nn.Linear(2, 2), torch.tensor(0.5))  # finite: nothing
    with pytest.raises(Diverged, match=r"diverged at step 7: non-finite loss \(nan\); last good checkpoint: none"):
        guard.on_before_backward(trainer, nn.Linear(2, 2), torch.tensor(float("nan")))


def test_inf_gradient_raises_naming_the_parameter():
    guard, trainer, model = DivergenceGuard(), fake_trainer(3), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    guard.on_before_optimizer_step(trainer, model, None)  # finite gradients: nothing
    model[1].weight.grad[0, 1] = float("inf")
    with pytest.raises(Diverged) as err:
        guard.on_before_optimizer_step(trainer, model, None)
    assert (err.value.step, err.value.what, err.value.value) == (3, "gradient of 1.weight", float("inf"))
    copy = pickle.loads(pickle.dumps(err.value))  # spawned workers send it back pickled
    assert (copy.step, copy.what, str(copy)) == (3, "gradient of 1.weight", str(err.value))


def test_frozen_and_missing_gradients_are_ignored():
    model = nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    model.bias.grad = torch.full((2,), float("nan"))  # frozen: not the optimizer's business
    DivergenceGuard().on_before_optimizer_step(fake_trainer(0), model, None)  # weight.grad is None: nothing


def test_gradient_check_skipped_under_fp16_grad_scaler():
    """fp16 AMP's GradScaler skips steps with inf gradients by design: no divergence."""
    trainer, model = fake_trainer(0), nn.Linear(2, 2)
    trainer.precision_plugin = SimpleNamespace(scaler=object())
    model.weight.grad = torch.full((2, 2), float("inf"))
    DivergenceGuard().on_before_optimizer_step(trainer, model, None)


def test_any_rank_stops_every_rank():
    """Under DDP the flag is reduced with `any`: a rank with a finite loss raises too (and hangs nowhere)."""
    trainer = fake_trainer(4)
    trainer.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: True)  # another rank: NaN
    with pytest.raises(Diverged, match="non-finite loss on another rank"):
        DivergenceGuard().on_before_backward(trainer, nn.Linear(2, 2), torch.tensor(1.0))


def test_no_checkpoint_with_non_finite_optimizer_state():
    good = {"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}]}
    DivergenceGuard().on_save_checkpoint(fake_trainer(2), nn.Linear(2, 2), good)
    bad = {**good, "optimizer_states": [{"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}}]}
    with pytest.raises(Diverged, match="optimizer state 0.state.0.exp_avg_sq in the checkpoint"):
        DivergenceGuard().on_save_checkpoint(fake_trainer(2), nn.Linear(2, 2), bad)


@pytest.fixture
def nan_from_step(monkeypatch: pytest.MonkeyPatch) -> int:
    """The training loss becomes NaN from global_step NAN_FROM on (validation and earlier steps untouched)."""
    step = AdapterModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= NAN_FROM else loss

    monkeypatch.setattr(AdapterModule, "training_step", poisoned)
    return NAN_FROM


def diverging_cfg(run_dir: Path):
    """debug=fast on the planted task, a checkpoint every step, no W&B."""
    return make_cfg(run_dir, ["callbacks.checkpoint.every_n_train_steps=1", "wandb.mode=disabled"])


def assert_last_ckpt_good(run_dir: Path, below_step: int) -> None:
    """checkpoints/last.ckpt loads with weights_only=True, predates the bad step, and holds only finite tensors."""
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt"], ckpts  # no other (bad) checkpoint was written beside it
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < ckpt["global_step"] < below_step + 1
    tensors = [t for t in ckpt["state_dict"].values() if t.is_floating_point()]
    for state in ckpt["optimizer_states"]:
        tensors += [t for s in state["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
    read_plan(run_dir / "checkpoints" / "last.ckpt")  # the resume path reads it too


def test_nan_loss_stops_training_keeping_last_good_checkpoint(tmp_path: Path, nan_from_step: int):
    with pytest.raises(Diverged) as err:
        train(diverging_cfg(tmp_path))
    assert err.value.step == nan_from_step and err.value.what == "loss"
    assert str(tmp_path / "checkpoints" / "last.ckpt") in str(err.value)
    assert_last_ckpt_good(tmp_path, nan_from_step)


def test_guard_off_lets_nan_through(tmp_path: Path, nan_from_step: int):
    """`callbacks.divergence=null` switches it off: the run ends normally (with NaN weights)."""
    train(make_cfg(tmp_path, ["callbacks.divergence=null", "wandb.mode=disabled", "trainer.max_steps=7"]))
    assert (tmp_path / "results.json").is_file()


def test_diverged_run_records_status(tmp_path: Path, nan_from_step: int):
    """`run_job` writes results.json with status diverged and exits 1 in a single run."""
    with pytest.raises(SystemExit) as exit_:
        run_job(diverging_cfg(tmp_path))
    assert exit_.value.code == 1
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "diverged" and record["diverged_at_step"] == nan_from_step
    assert f"diverged at step {nan_from_step}: non-finite loss" in record["error"]
    assert_last_ckpt_good(tmp_path, nan_from_step)
