"""A task is data + loss + metrics. The LightningModule calls only this interface, so every variant
trains on every task the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_ralora.adapters.schema import pos_int


class Task:
    """Base task. Subclasses set `name`, `families` and implement `datamodule`, `loss`."""

    name: str = ""
    families: tuple[str, ...] = ("causal_lm",)
    reports_gap: bool = False  # True: log val/gap_closed = 1 − val_loss/val_loss_at_step0
    # (metric, "maximize" | "minimize") a hyperparameter sweep optimises; conf/task/<name>.yaml `objective` matches
    objective: tuple[str, str] = ("val/loss", "minimize")
    # names of the modules the task adds or re-initialises (a classification head): trained in full, kept in
    # adapter-only checkpoints and exported; matched as module-name suffixes, the outermost match wins
    head_modules: tuple[str, ...] = ()
    # True: the task loads `model.tokenizer` (as `self.tokenizer`), which generation suites decode with
    loads_tokenizer: bool = False

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int = 0) -> None:
        self.cfg, self.model_cfg, self.seed = dict(cfg), dict(model_cfg), seed

    @classmethod
    def validate(cls, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
        """Problems with the task config, each naming its field; checked before any model is built."""
        problems = []
        if model_cfg.get("family") not in cls.families:
            family = model_cfg.get("family")
            problems.append(f"model.family={family!r} does not fit task={cls.name!r}; allowed: {list(cls.families)}")
        return problems + pos_int(cfg.get("batch_size"), "task.batch_size")

    def extra_model_config(self) -> dict[str, Any]:
        """Config fields the task imposes on the backbone (e.g. num_labels, pad_token_id)."""
        return {}

    def prepare(self, backbone: nn.Module) -> None:
        """Called once with the un-adapted backbone (the planted task builds its teacher here)."""

    def datamodule(self) -> L.LightningDataModule:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self) -> nn.Module | None:
        """A torchmetrics MetricCollection updated by `update_metrics` on validation batches, or None."""
        return None

    def update_metrics(self, metrics: nn.Module, model: nn.Module, batch: Any) -> None:
        """Feed one validation batch to the metric collection."""

    def summary(self) -> dict[str, Any]:
        """Task facts for results.json (e.g. planted effective ranks)."""
        return {}
