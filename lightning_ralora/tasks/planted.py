"""The embedded default task: distil a teacher = base model + planted low-rank updates ΔW* on the targets.

Each target gets a planted update with a chosen singular spectrum (low effective rank, high effective rank,
or block-local), so the true per-layer structure is known and GID estimates can be checked against it.
Inputs are seeded random token sequences; the loss is KL(teacher ‖ student) on next-token distributions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.inject import find_targets
from ..adapters.schema import is_int, pos_number
from ..data.datamodule import ListDataModule
from ..rank.spectra import effective_rank
from .base import Task

PROFILES = ("low", "high", "block")


def planted_update(out_f: int, in_f: int, profile: str, gen: torch.Generator, n_blocks: int = 4) -> torch.Tensor:
    """A unit-Frobenius-norm ΔW* with the named spectrum: `low` rank 2, `high` a slow decay over
    min(m, n)/2 directions, `block` block-diagonal with one rank-1 block per diagonal block."""
    k = min(out_f, in_f)
    if profile == "block":
        nb = math.gcd(math.gcd(out_f, in_f), n_blocks)
        w = torch.zeros(out_f, in_f)
        bo, bi = out_f // nb, in_f // nb
        for i in range(nb):
            u, v = torch.randn(bo, 1, generator=gen), torch.randn(1, bi, generator=gen)
            w[i * bo : (i + 1) * bo, i * bi : (i + 1) * bi] = u @ v / (u.norm() * v.norm())
        return w / w.norm()
    if profile == "low":
        sigma = torch.tensor([1.0, 0.5])
    elif profile == "high":
        sigma = 1.0 / torch.arange(1, k // 2 + 1, dtype=torch.float32).sqrt()
    else:
        raise ValueError(f"task.profiles entries must be in {list(PROFILES)}, got {profile!r}")
    u, _ = torch.linalg.qr(torch.randn(out_f, len(sigma), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(in_f, len(sigma), generator=gen))
    w = u @ torch.diag(sigma) @ v.T
    return w / w.norm()


class PlantedTask(Task):
    """Planted-update distillation (`task=planted`); reports `gap_closed = 1 − loss/loss_at_step0`."""

    name = "planted"
    objective = ("val/gap_closed", "maximize")
    families = ("causal_lm",)
    reports_gap = True

    @classmethod
    def validate(cls, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
        problems = super().validate(cfg, model_cfg)
        bad = [p for p in cfg.get("profiles", []) if p not in PROFILES]
        if bad or not cfg.get("profiles"):
            problems.append(f"task.profiles must be a non-empty list of {list(PROFILES)}, got {cfg.get('profiles')!r}")
        for key in ("seq_len", "train_size", "val_size"):
            if not (is_int(cfg.get(key)) and cfg[key] >= 2):
                problems.append(f"task.{key} must be an integer >= 2, got {cfg.get(key)!r}")
        return problems + pos_number(cfg.get("strength"), "task.strength")

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int = 0) -> None:
        super().__init__(cfg, model_cfg, seed)
        self.teacher: nn.Module | None = None
        self.planted: dict[str, dict[str, Any]] = {}

    def prepare(self, backbone: nn.Module) -> None:
        """Build the teacher: a frozen copy of the backbone with ΔW* added to every target weight."""
        gen = torch.Generator().manual_seed(self.cfg.get("plant_seed", 1234) + self.seed)
        targets = find_targets(backbone, self.cfg.get("target_modules") or self.model_cfg["target_modules"])
        teacher = copy.deepcopy(backbone).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        profiles = list(self.cfg["profiles"])
        for i, name in enumerate(targets):
            lin = teacher.get_submodule(name)
            profile = profiles[i % len(profiles)]
            delta = planted_update(lin.out_features, lin.in_features, profile, gen)
            delta = delta * float(self.cfg["strength"]) * lin.weight.detach().float().norm()
            with torch.no_grad():
                lin.weight.add_(delta.to(lin.weight.dtype))
            sigma = torch.linalg.svdvals(delta)
            self.planted[name] = {
                "profile": profile,
                "erank": float(effective_rank(sigma)),
                "norm": float(delta.norm()),
            }
        self.teacher = teacher

    def _sequences(self, n: int, offset: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.cfg.get("data_seed", 0) + offset)
        vocab = int(self.cfg.get("vocab_size") or self.model_cfg["config"]["vocab_size"])
        return torch.randint(0, vocab, (n, self.cfg["seq_len"]), generator=gen)

    def datamodule(self) -> L.LightningDataModule:
        train = self._sequences(self.cfg["train_size"], 0)
        val = self._sequences(self.cfg["val_size"], 10_000)
        return ListDataModule(list(train), list(val), self.cfg["batch_size"], collate_fn=torch.stack, seed=self.seed)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None, "PlantedTask.prepare() must run before loss()"
        if next(self.teacher.parameters()).device != batch.device:
            self.teacher.to(batch.device)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=batch).logits.float()
        s_logits = model(input_ids=batch).logits.float()
        vocab = s_logits.shape[-1]
        return F.kl_div(
            F.log_softmax(s_logits.reshape(-1, vocab), -1),
            F.log_softmax(t_logits.reshape(-1, vocab), -1),
            log_target=True,
            reduction="batchmean",
        )

    def summary(self) -> dict[str, Any]:
        return {"planted": self.planted}
