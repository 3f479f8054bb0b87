"""GradientAlignment with a real Lightning Trainer: logging steps, hook lifetime, accumulation, full FT, summary."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ralora.adapters import LayerSpec, adapter_layers, inject
from lightning_ralora.callbacks.alignment import GradientAlignment
from lightning_ralora.callbacks.sds_schedule import SDSSchedule
from lightning_ralora.run.compose import CONF_DIR
from tests.helpers import csv_rows, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(L.LightningModule):
    """Exposes what the lead's AdapterModule exposes: `backbone`, `targets`, `adapter_cfg`."""

    def __init__(self, kind: str = "lora", unfreeze_base: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = mlp(6, 16, 8, 2)
        self.targets = ["0", "2"]
        self.adapter_cfg = {"kind": kind, "name": kind}
        if kind != "full":
            inject(self.backbone, self.targets, LayerSpec(kind=kind, r=2, alpha=4))
            if unfreeze_base:  # reference W0 gradients, not optimised (the optimizer holds adapter params only)
                for layer in adapter_layers(self.backbone).values():
                    layer.base.weight.requires_grad_(True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.backbone(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        layers = adapter_layers(self.backbone)
        if layers:
            params = [p for layer in layers.values() for p in layer.adapter_parameters()]
        else:
            params = list(self.backbone.parameters())
        return torch.optim.SGD(params, lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return DataLoader(TensorDataset(x, torch.tanh(x[:, :2] * 2)), batch_size=4)


def _fit(tmp_path: Path, module: L.LightningModule, callbacks: list, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 9)
    kw.setdefault("log_every_n_steps", 3)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )
    trainer.fit(module, _loader())
    return trainer


class HookProbe(L.Callback):
    """Counts the hooks on every adapter layer after the alignment callback's batch-start and at batch end."""

    def __init__(self) -> None:
        self.at_start: list[tuple[int, int]] = []
        self.at_end: list[int] = []

    @staticmethod
    def _hooks(pl_module) -> int:
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
            for m in pl_module.backbone.modules()
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start.append((trainer.global_step, self._hooks(pl_module)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at_end.append(self._hooks(pl_module))


def test_logs_exactly_on_logging_steps_and_hooks_live_only_there(tmp_path: Path) -> None:
    align, probe = GradientAlignment(every_n_steps=3), HookProbe()
    _fit(tmp_path, Tiny("lora"), [align, probe], max_steps=9, log_every_n_steps=3)
    assert align.logged_steps == [3, 6, 9]
    rows = csv_rows(tmp_path)
    logged = [int(r["step"]) for r in rows if r.get("align/mean/cos_f")]
    assert logged == [2, 5, 8]  # Lightning records optimizer step k·n at step k·n - 1, with train/loss
    assert {int(r["step"]) for r in rows if r.get("train/loss")} >= set(logged)
    for r in rows:
        if r.get("align/mean/cos_f"):
            for layer in ("0", "2"):
                for metric in ("cos_f", "kappa", "srank_A", "srank_B", "erank_grad_A", "erank_grad_B"):
                    assert math.isfinite(float(r[f"align/{layer}/{metric}"]))
            assert 0 < float(r["align/mean/cos_f"]) <= 1
    # hooks: one forward hook per adapter layer during logging steps only, none after any optimizer step
    assert [(s, h) for s, h in probe.at_start if h] == [(2, 2), (5, 2), (8, 2)]
    assert len(probe.at_start) == 9 and not any(probe.at_end)
    assert align.summary["align/mean/cos_f"]["count"] == 3
    s = align.summary["align/mean/cos_f"]
    assert s["last"] == pytest.approx(float([r for r in rows if r.get("align/mean/cos_f")][-1]["align/mean/cos_f"]))
    assert "align/cost_s" in align.summary


class RecordingAlignment(GradientAlignment):
    """Keeps the G each layer was measured with (for the reference comparison)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: dict[tuple[int, str], torch.Tensor] = {}
        self._step = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._step = trainer.global_step
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def layer_measurement(self, name, layer, G):
        self.seen[(self._step, name)] = G.clone()
        return super().layer_measurement(name, layer, G)


class BaseGradReference(L.Callback):
    """Reads the unfrozen W0 gradients (the autograd reference), then clears them for the next window."""

    def __init__(self) -> None:
        self.grads: dict[tuple[int, str], torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, layer in adapter_layers(pl_module.backbone).items():
            self.grads[(trainer.global_step, name)] = layer.base.weight.grad.clone()
            layer.base.weight.grad = None


@pytest.mark.parametrize("accumulate", [1, 2])
def test_captured_G_equals_W0_gradient_with_accumulation(tmp_path: Path, accumulate: int) -> None:
    align, ref = RecordingAlignment(every_n_steps=2), BaseGradReference()
    trainer = _fit(
        tmp_path,
        Tiny("lora", unfreeze_base=True),
        [align, ref],
        max_steps=4,
        log_every_n_steps=2,
        accumulate_grad_batches=accumulate,
    )
    assert trainer.global_step == 4 and align.logged_steps == [2, 4]
    assert sorted(align.seen) == [(1, "0"), (1, "2"), (3, "0"), (3, "2")]
    for key, G in align.seen.items():
        torch.testing.assert_close(G, ref.grads[key], rtol=1e-5, atol=1e-7)


def test_full_finetuning_logs_cos_one(tmp_path: Path) -> None:
    align = GradientAlignment(every_n_steps=3, full_erank=True)
    _fit(tmp_path, Tiny("full"), [align], max_steps=6)
    assert align.logged_steps == [3, 6]
    rows = [r for r in csv_rows(tmp_path) if r.get("align/mean/cos_f")]
    assert [float(r["align/mean/cos_f"]) for r in rows] == [1.0, 1.0]
    assert all(float(r["align/0/erank_G"]) >= 1 for r in rows)


def test_layer_filter_sds_schedule_and_state_dict(tmp_path: Path) -> None:
    align = GradientAlignment(every_n_steps=3, layers=r"^2$", per_layer=False)
    _fit(tmp_path, Tiny("sds"), [SDSSchedule(warmup_steps=2, K=2), align], max_steps=6)
    rows = [r for r in csv_rows(tmp_path) if r.get("align/mean/cos_f")]
    assert len(rows) == 2 and not any(k.startswith("align/0/") or k.startswith("align/2/") for k in rows[0])
    assert align.summary["align/mean/cos_f"]["count"] == 2
    restored = GradientAlignment(every_n_steps=3)
    restored.load_state_dict(align.state_dict())
    assert restored.summary == align.summary and restored.logged_steps == [3, 6]
    assert align.results_summary()["metrics"] == align.summary


def test_measurements_are_logged_once_whatever_log_every_n_steps(tmp_path: Path) -> None:
    align = GradientAlignment(every_n_steps=3)
    _fit(tmp_path, Tiny("lora"), [align], max_steps=9, log_every_n_steps=2)
    logged = [int(r["step"]) for r in csv_rows(tmp_path) if r.get("align/mean/cos_f")]
    assert logged == [2, 5, 8]  # not dropped off the 2-step grid, and never repeated on later rows


def test_bad_arguments_are_collected() -> None:
    with pytest.raises(ValueError, match=r"every_n_steps must be a positive integer.*method must be one of"):
        GradientAlignment(every_n_steps=0, method="fast")


def test_hydra_config_instantiates_the_callback() -> None:
    cfg = OmegaConf.load(Path(CONF_DIR) / "callbacks" / "alignment.yaml")
    cb = instantiate(cfg.alignment)
    assert isinstance(cb, GradientAlignment) and cb.every_n_steps == 50


def test_callbacks_group_option_keeps_the_default_callbacks() -> None:
    """`callbacks=alignment` composes the default callbacks plus GradientAlignment (what train.py instantiates)."""
    from hydra import compose, initialize_config_dir

    from lightning_ralora.run.job import build_callbacks

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["callbacks=alignment", "callbacks.alignment.every_n_steps=10", "run_dir=x"])
    names = [type(cb).__name__ for cb in build_callbacks(cfg)]
    assert "GradientAlignment" in names and "ModelCheckpoint" in names
    (cb,) = [cb for cb in build_callbacks(cfg) if isinstance(cb, GradientAlignment)]
    assert cb.every_n_steps == 10
