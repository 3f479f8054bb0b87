"""GID over training: the windowed full-gradient erank per layer equals the erank of the frozen weight's own
autograd gradient summed over the same steps; the schedule, results.json and the csv follow every_n_steps."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from lightning_ralora.callbacks.gid_tracker import GIDOverTraining
from lightning_ralora.rank.spectra import effective_rank
from lightning_ralora.run.job import train
from tests.conftest import make_cfg

TARGET = "model.layers.0.self_attn.q_proj"
EVERY, WINDOW = 4, 2


class AutogradReference(L.Callback):
    """Lets one target's frozen base weight collect its gradient (not in the optimizer) over each window."""

    def __init__(self) -> None:
        self.gid: dict[int, float] = {}

    def _weight(self, pl_module: L.LightningModule):
        return pl_module.backbone.get_submodule(TARGET).base.weight

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._weight(pl_module).requires_grad_(True)  # after configure_optimizers: never updated

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (trainer.global_step + 1) % EVERY == EVERY - WINDOW + 1:  # the first step of a window
            self._weight(pl_module).grad = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (trainer.global_step + 1) % EVERY == 0:
            self.gid[trainer.global_step + 1] = float(effective_rank(self._weight(pl_module).grad.float()))


def test_gid_over_training_matches_autograd_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = AutogradReference()
    monkeypatch.setattr("lightning_ralora.run.job.build_callbacks", _with(reference))
    overrides = ["callbacks=gid_over_training", f"callbacks.gid_over_training.every_n_steps={EVERY}"]
    overrides += [f"callbacks.gid_over_training.window={WINDOW}", "task.loss=layer", "wandb.mode=disabled"]
    results = train(make_cfg(tmp_path, overrides))  # debug=fast: 12 steps
    summary = results["callbacks"]["GIDOverTraining"]
    assert sorted(summary["layers"]) == [4, 8, 12] == sorted(reference.gid)
    for step, gid in reference.gid.items():
        assert summary["layers"][step][TARGET] == pytest.approx(gid, rel=1e-4)
    rows = list(csv.DictReader((tmp_path / "gid_over_training.csv").open()))
    assert {int(r["step"]) for r in rows} == {4, 8, 12} and (tmp_path / "gid_over_training.png").is_file()


def _with(extra: L.Callback):
    from lightning_ralora.run.build import build_callbacks

    return lambda cfg: [*build_callbacks(cfg), extra]


def test_window_schedule_and_bad_values() -> None:
    cb = GIDOverTraining(every_n_steps=5, window=2)
    assert [s + 1 for s in range(12) if cb.in_window(s)] == [4, 5, 9, 10]
    with pytest.raises(ValueError, match="window"):
        GIDOverTraining(every_n_steps=2, window=3)
