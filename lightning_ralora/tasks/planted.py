"""The embedded default task: distil a teacher = base model + planted updates ΔW* on the targets.

Each target gets a planted update of a profile with a known best structure (tasks/planted_profiles.py), so the
true per-layer structure is known and GID estimates and adapter structures can be checked against it. Inputs are
seeded random token sequences. `task.loss`: `kl` (default) is KL(teacher ‖ student) on next-token distributions;
`layer` is layer-local: Σ over targets of the MSE between the student layer and the teacher layer on the teacher's
input to that layer, so each layer's gradient depends on its own ΔW* only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ralora.adapters import AdapterLayer
from lightning_ralora.adapters.inject import find_targets
from lightning_ralora.adapters.schema import is_int, pos_number
from lightning_ralora.data.datamodule import BuiltInSetup, ListDataModule
from lightning_ralora.rank.spectra import effective_rank
from lightning_ralora.tasks.base import Task
from lightning_ralora.tasks.planted_profiles import (
    PROFILES,
    ceiling,
    ceiling_panel,
    input_scale,
    outlier_channels,
    planted_update,
    structure_of,
)

LOSSES = ("kl", "layer")


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
        if cfg.get("loss", "kl") not in LOSSES:
            problems.append(f"task.loss must be one of {list(LOSSES)}, got {cfg.get('loss')!r}")
        if isinstance(cfg.get("objective"), str):
            problems.append(
                f"task.objective is the sweep objective {{metric, direction}}, got {cfg['objective']!r}: "
                f"the planted loss is task.loss={'|'.join(LOSSES)}"
            )
        for key in ("seq_len", "train_size", "val_size"):
            if not (is_int(cfg.get(key)) and cfg[key] >= 2):
                problems.append(f"task.{key} must be an integer >= 2, got {cfg.get(key)!r}")
        for key in ("rank", "blocks"):
            if not (is_int(cfg.get(key, 8)) and cfg.get(key, 8) >= 1):
                problems.append(f"task.{key} must be an integer >= 1, got {cfg.get(key)!r}")
        return (
            problems
            + pos_number(cfg.get("strength"), "task.strength")
            + pos_number(cfg.get("outlier_scale", 1.0), "task.outlier_scale")
        )

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int = 0) -> None:
        super().__init__(cfg, model_cfg, seed)
        self.teacher: nn.Module | None = None
        self.student: nn.Module | None = None  # the backbone given to prepare (adapted in place later)
        self.planted: dict[str, dict[str, Any]] = {}
        self.deltas: dict[str, torch.Tensor] = {}  # the effective ΔW*·D per target (fp32, CPU): ceilings
        self.scales: dict[str, torch.Tensor] = {}  # input channel scale D of the outlier targets (layer loss)
        self.loss_kind = str(self.cfg.get("loss", "kl"))

    def prepare(self, backbone: nn.Module) -> None:
        """Build the teacher: a frozen copy of the backbone with ΔW* added to every target weight."""
        gen = torch.Generator().manual_seed(self.cfg.get("plant_seed", 1234) + self.seed)
        targets = find_targets(backbone, self.cfg.get("target_modules") or self.model_cfg["target_modules"])
        teacher = copy.deepcopy(backbone).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        profiles = list(self.cfg["profiles"])
        r, n_blocks = int(self.cfg.get("rank", 8)), int(self.cfg.get("blocks", 8))
        for i, name in enumerate(targets):
            lin = teacher.get_submodule(name)
            profile = profiles[i % len(profiles)]
            delta = planted_update(lin.out_features, lin.in_features, profile, gen, rank=r, n_blocks=n_blocks)
            delta = delta * float(self.cfg["strength"]) * lin.weight.detach().float().norm()
            with torch.no_grad():
                lin.weight.add_(delta.to(lin.weight.dtype))
            sigma = torch.linalg.svdvals(delta)
            erank = float(effective_rank(sigma))
            self.planted[name] = {"profile": profile, "erank": erank, "norm": float(delta.norm())}
            if profile == "outlier":
                channels = outlier_channels(lin.in_features, gen)
                self.scales[name] = input_scale(lin.in_features, channels, float(self.cfg.get("outlier_scale", 10.0)))
                self.planted[name]["outlier_channels"] = channels
                delta = delta * self.scales[name]  # the update the layer-local loss sees on unit-scale inputs
            self.deltas[name] = delta
        self.teacher, self.student = teacher, backbone

    def _sequences(self, n: int, offset: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.cfg.get("data_seed", 0) + offset)
        vocab = int(self.cfg.get("vocab_size") or self.model_cfg["config"]["vocab_size"])
        return torch.randint(0, vocab, (n, self.cfg["seq_len"]), generator=gen)

    def _splits(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self._sequences(self.cfg["train_size"], 0)), list(self._sequences(self.cfg["val_size"], 10_000))

    def datamodule(self) -> L.LightningDataModule:
        """Seeded random token sequences, built in `setup` on every process (nothing to prepare)."""
        source = BuiltInSetup(self._splits)
        return ListDataModule(None, None, self.cfg["batch_size"], collate_fn=torch.stack, seed=self.seed, source=source)

    def _teacher_on(self, batch: torch.Tensor) -> nn.Module:
        assert self.teacher is not None, "PlantedTask.prepare() must run before loss()"
        if next(self.teacher.parameters()).device != batch.device:
            self.teacher.to(batch.device)
        return self.teacher

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "layer":
            return sum(self.layer_losses(model, batch).values())
        teacher = self._teacher_on(batch)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch).logits.float()
        s_logits = model(input_ids=batch).logits.float()
        vocab = s_logits.shape[-1]
        return F.kl_div(
            F.log_softmax(s_logits.reshape(-1, vocab), -1),
            F.log_softmax(t_logits.reshape(-1, vocab), -1),
            log_target=True,
            reduction="batchmean",
        )

    @torch.no_grad()
    def teacher_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """{target: the teacher's input to that layer on `batch`}, times D on the outlier targets."""
        teacher = self._teacher_on(batch)
        inputs: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                inputs[name] = args[0]

            return hook

        handles = [teacher.get_submodule(n).register_forward_pre_hook(keep(n)) for n in self.planted]
        try:
            teacher(input_ids=batch)
        finally:
            for h in handles:
                h.remove()
        return {n: x * self.scales[n].to(x.device, x.dtype) if n in self.scales else x for n, x in inputs.items()}

    def layer_losses(self, model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """{target: MSE(student layer(x), teacher layer(x))} on the teacher's inputs x (`teacher_inputs`): the
        student layers run on the teacher's inputs, so no gradient crosses layers."""
        root = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the backbone
        out = {}
        for name, x in self.teacher_inputs(batch).items():
            with torch.no_grad():
                y_t = self.teacher.get_submodule(name)(x).float()
            out[name] = F.mse_loss(root.get_submodule(name)(x).float(), y_t)
        return out

    @torch.no_grad()
    def per_target_gap(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Each target's layer-local gap closed on the validation set, 1 − MSE_now / MSE_at_ΔW=0, measured on the
        backbone given to prepare (adapted in place since; MSE_at_ΔW=0 is the mean of (ΔW*·D x)²), and the
        second moment E[x xᵀ] of each target's (unscaled) inputs, for the ceilings in the same metric."""
        assert self.student is not None, "PlantedTask.prepare() must run before per_target_gap()"
        device = next(self.student.parameters()).device
        was = self.student.training
        self.student.eval()
        now: dict[str, float] = {}
        base: dict[str, float] = {}
        cov: dict[str, torch.Tensor] = {}
        try:
            for batch in self._sequences(self.cfg["val_size"], 10_000).split(int(self.cfg["batch_size"])):
                batch = batch.to(device)
                for name, v in self.layer_losses(self.student, batch).items():
                    now[name] = now.get(name, 0.0) + float(v) * len(batch)
                for name, x in self.teacher_inputs(batch).items():
                    x = x / self.scales[name].to(x.device, x.dtype) if name in self.scales else x
                    x = x.reshape(-1, x.shape[-1]).double().cpu()
                    mse = (x @ self.deltas[name].double().T).pow(2).mean()
                    base[name] = base.get(name, 0.0) + float(mse) * len(batch)
                    cov[name] = cov.get(name, 0.0) + x.T @ x / len(x)
        finally:
            self.student.train(was)
        return {n: 1.0 - now[n] / base[n] if base.get(n) else float("nan") for n in now}, cov

    def summary(self) -> dict[str, Any]:
        """Per target: profile, erank, norm and the ceiling panel at task.rank as shares of ‖ΔW*‖²; after training
        also its layer-local gap closed, the panel on the validation inputs (the gap's metric) and the ceiling of
        the structure it was adapted with."""
        r = int(self.cfg.get("rank", 8))
        layers = self._adapter_layers()
        gaps: dict[str, float] = {}
        cov: dict[str, torch.Tensor] = {}
        error = None
        if layers:
            try:
                gaps, cov = self.per_target_gap()
            except Exception as e:  # e.g. a sharded (FSDP) backbone whose layers cannot run alone
                error = f"{type(e).__name__}: {e}"
        planted = {}
        for name, info in self.planted.items():
            rec = {**info, "ceilings": ceiling_panel(self.deltas[name], r)}
            if name in gaps:
                rec["gap_closed"] = gaps[name]
                rec["ceilings_on_inputs"] = ceiling_panel(self.deltas[name], r, cov[name])
            found = structure_of(layers[name].summary()) if name in layers else None
            if found is not None:
                rec["structure"] = found[0]
                rec["ceiling"] = ceiling(self.deltas[name], *found, cov.get(name))
            planted[name] = rec
        return {"planted": planted, "loss": self.loss_kind, "rank": r, "per_target_error": error}

    def _adapter_layers(self) -> dict[str, Any]:
        if self.student is None:
            return {}
        return {n: m for n in self.planted if isinstance(m := self.student.get_submodule(n), AdapterLayer)}
