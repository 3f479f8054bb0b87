"""Gradient-alignment logging (docs/maths.md §7) as a Lightning callback: schedules `lightning_ralora.diagnostics`.

The measured optimizer steps are number k·every_n_steps (1-based), i.e. `(trainer.global_step + 1) % every_n_steps
== 0` while the step is being taken. They go straight to the loggers (rank 0) at step k·every_n_steps − 1, the
label Lightning gives that step's `train/loss`, whatever `trainer.log_every_n_steps` is.

On a logging step the callback attaches a `FullGradientCapture` to every adapter layer in `on_train_batch_start`
of the window's first micro-batch (so all `accumulate_grad_batches` micro-batches are captured), and in
`on_before_optimizer_step` (gradients accumulated, DDP-averaged, not yet clipped) it averages G over ranks,
divides out a fp16 GradScaler's scale, computes the metrics, logs them and detaches. Between logging steps no hook
is registered. Where G comes from is the variant's attachment (`Attachment.alignment`): full fine-tuning needs no
hook (G is each target's `weight.grad` and Ĝ = G); peft's layers are not measured.
FSDP2: factors and gradients are gathered with `full_tensor()` (a collective, same order on every rank); untested.

Cost: during a logging step one fp32 m x n G per measured layer is held until `on_before_optimizer_step` (all
linear targets of an 8B Llama: ~26 GB; restrict with `layers` on big models). The metrics take ~10-50 ms per
4096-wide layer on an H100; `full_erank` adds ~1 s per layer. The measured time is logged as `align/cost_s`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_ralora.adapters.attach import attachment
from lightning_ralora.adapters.base import AdapterLayer
from lightning_ralora.adapters.inject import adapter_layers
from lightning_ralora.adapters.registry import VARIANTS, Attachment
from lightning_ralora.callbacks._logging import log_event
from lightning_ralora.diagnostics import METHODS, FullGradientCapture, effective_gradient, layer_metrics
from lightning_ralora.diagnostics.structure import dense


def _kind(pl_module: L.LightningModule) -> str | None:
    cfg = getattr(pl_module, "adapter_cfg", None)
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get("kind")
    return getattr(cfg, "kind", None)


def _attachment(pl_module: L.LightningModule) -> Attachment | None:
    """How the module's adapter kind meets the backbone; None without a (registered) kind."""
    kind = _kind(pl_module)
    return attachment(kind) if kind in VARIANTS else None


class GradientAlignment(L.Callback):
    """Every `every_n_steps` optimizer steps, log cos_F(G, Ĝ), gradient/stable ranks and κ of each adapted layer.

    Keys: ``align/<layer>/<metric>`` (if `per_layer`) and ``align/mean/<metric>`` (mean over layers), plus
    ``align/cost_s`` (wall time of the measurement). `layers` is a regex (re.search) on the layer names inside
    `pl_module.backbone`. `method` picks the effective-gradient path (auto/closed/generic); `full_erank` adds
    erank(G) (one m x n SVD per layer). `summary` keeps, per mean metric, the mean over logging steps and the last
    value; it is saved in checkpoints and returned by `results_summary()` for results.json.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        layers: str | None = None,
        method: str = "auto",
        per_layer: bool = True,
        full_erank: bool = False,
    ) -> None:
        problems = []
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            problems.append(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {method!r}")
        if layers is not None:
            try:
                re.compile(layers)
            except re.error as e:
                problems.append(f"layers must be a regular expression, got {layers!r} ({e})")
        if problems:
            raise ValueError("GradientAlignment: " + "; ".join(problems))
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.method = method
        self.per_layer = per_layer
        self.full_erank = full_erank
        self._captures: dict[str, FullGradientCapture] = {}
        self._measured_step: int | None = None
        self._warned: set[str] = set()
        self.logged_steps: list[int] = []  # 1-based optimizer step numbers that were measured
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._layer_sums: dict[str, dict[str, float]] = {}  # per layer and metric: sum and count over logging steps
        self._layer_counts: dict[str, dict[str, int]] = {}

    # --- schedule ----------------------------------------------------------------------------------
    def is_logging_step(self, global_step: int) -> bool:
        """True when the optimizer step being taken at `trainer.global_step` is measured."""
        return (global_step + 1) % self.every_n_steps == 0

    def _root(self, pl_module: L.LightningModule) -> nn.Module:
        return getattr(pl_module, "backbone", pl_module)

    def _selected(self, names: list[str]) -> list[str]:
        if self.layers is None:
            return names
        return [n for n in names if re.search(self.layers, n)]

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(msg)

    def _adapter_layers(self, pl_module: L.LightningModule) -> dict[str, AdapterLayer]:
        found = adapter_layers(self._root(pl_module))
        return {n: found[n] for n in self._selected(list(found))}

    def _full_targets(self, pl_module: L.LightningModule) -> dict[str, nn.Linear]:
        root = self._root(pl_module)
        out = {}
        for name in self._selected(list(getattr(pl_module, "targets", []) or [])):
            mod = root.get_submodule(name)
            if isinstance(mod, nn.Linear) and mod.weight.requires_grad:
                out[name] = mod
        return out

    # --- hooks -----------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_logging_step(trainer.global_step) or self._captures:
            return
        if self._measured_step == trainer.global_step:
            return
        for name, layer in self._adapter_layers(pl_module).items():
            self._captures[name] = FullGradientCapture(layer).attach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if not self.is_logging_step(step) or self._measured_step == step:
            self._detach()
            return
        self._measured_step = step
        start = time.perf_counter()
        try:
            per_layer = self._measure(trainer, pl_module)
        finally:
            self._detach()
        if not per_layer:
            return
        metrics = self._aggregate(per_layer)
        self._record_layers(per_layer)
        metrics["align/cost_s"] = time.perf_counter() - start
        self.logged_steps.append(step + 1)
        for key, value in metrics.items():
            if key.startswith("align/mean/") or key == "align/cost_s":
                self._record(key, value)
        to_log = metrics if self.per_layer else {k: v for k, v in metrics.items() if not self._is_layer_key(k)}
        log_event(trainer, to_log, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._detach()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._detach()

    # --- measurement -------------------------------------------------------------------------------
    def _detach(self) -> None:
        for cap in self._captures.values():
            cap.detach()
        self._captures = {}

    @staticmethod
    def _is_layer_key(key: str) -> bool:
        return key.startswith("align/") and not key.startswith("align/mean/") and key != "align/cost_s"

    @staticmethod
    def _loss_scale(trainer: L.Trainer) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            return float(scaler.get_scale())
        return 1.0

    def layer_measurement(self, name: str, layer: nn.Module, G: torch.Tensor) -> dict[str, float]:
        """The metrics of one layer (a seam for tests and subclasses)."""
        out = layer_metrics(layer, G, method=self.method, full_erank=self.full_erank)
        return {**out, **self.gradient_deviation(layer, G)}

    def gradient_deviation(self, layer: nn.Module, G: torch.Tensor) -> dict[str, float]:
        """GraLoRA's gradient picture (its Fig. 3): how far the update direction Ĝ the adapter applies to W is from
        full fine-tuning's G. ``grad_dev`` = ‖Ĝ·‖G‖/‖Ĝ‖ − G‖/‖G‖ (0: the same direction); ``col_dev`` = the same
        deviation of the per-input-channel norms ‖G[:, j]‖ (the outlier channels' entanglement). 0 for full FT."""
        G = dense(G).float()
        if isinstance(layer, nn.Linear) and not isinstance(layer, AdapterLayer):
            return {"grad_dev": 0.0, "col_dev": 0.0}
        g_hat = dense(effective_gradient(layer, G, self.method)).float()
        out = {}
        for key, a, b in (("grad_dev", g_hat, G), ("col_dev", g_hat.norm(dim=0), G.norm(dim=0))):
            na, nb = float(a.norm()), float(b.norm())
            out[key] = float((a * (nb / na) - b).norm()) / nb if na > 0 and nb > 0 else float("nan")
        return out

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        if self._captures:
            scale = self._loss_scale(trainer)
            for name, cap in self._captures.items():  # same order on every rank: the module order
                layer = cap.layer
                G = cap.G
                if G is None:  # the layer did not run on this rank: contribute zeros, keep the collective aligned
                    w = layer.base.weight
                    G = torch.zeros(layer.out_features, layer.in_features, device=w.device, dtype=torch.float32)
                G = trainer.strategy.reduce(G, reduce_op="mean")
                if scale != 1.0:
                    G = G / scale
                if not torch.any(G != 0):
                    continue
                out[name] = self.layer_measurement(name, layer, G)
            return out
        attach = _attachment(pl_module)
        if attach is not None and attach.alignment == "target_weights":  # full fine-tuning
            for name, lin in self._full_targets(pl_module).items():
                grad = dense(lin.weight.grad)
                if grad is None:
                    continue
                out[name] = self.layer_measurement(name, lin, grad.float())
            if not out:
                self._warn_once(attach.name, "GradientAlignment: full fine-tuning but no target weight has a gradient")
            return out
        if attach is not None and attach.alignment == "none":
            self._warn_once(attach.name, f"GradientAlignment: {attach.alignment_note}")
        else:
            self._warn_once("none", "GradientAlignment: no adapter layer (or `layers` matches none); nothing measured")
        return out

    @staticmethod
    def _aggregate(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        pooled: dict[str, list[float]] = {}
        for name, vals in per_layer.items():
            for key, value in vals.items():
                metrics[f"align/{name}/{key}"] = float(value)
                if math.isfinite(value):
                    pooled.setdefault(key, []).append(float(value))
        for key, values in pooled.items():
            metrics[f"align/mean/{key}"] = sum(values) / len(values)
        return metrics

    # --- summary -----------------------------------------------------------------------------------
    def _record(self, key: str, value: float) -> None:
        if not math.isfinite(value):
            return
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + 1
        self._last[key] = value

    def _record_layers(self, per_layer: dict[str, dict[str, float]]) -> None:
        for name, vals in per_layer.items():
            sums, counts = self._layer_sums.setdefault(name, {}), self._layer_counts.setdefault(name, {})
            for key, value in vals.items():
                if math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1

    @property
    def layer_summary(self) -> dict[str, dict[str, float]]:
        """{layer: {metric: mean over logging steps}} (per-layer cells, e.g. cos_f per planted profile)."""
        return {n: {k: v / self._layer_counts[n][k] for k, v in sums.items()} for n, sums in self._layer_sums.items()}

    @property
    def summary(self) -> dict[str, dict[str, float]]:
        """{mean metric: {"mean": mean over logging steps, "last": last value, "count": logging steps}}."""
        return {
            k: {"mean": self._sums[k] / self._counts[k], "last": self._last[k], "count": self._counts[k]}
            for k in sorted(self._sums)
        }

    def results_summary(self) -> dict[str, Any]:
        """What results.json keeps: the summary, the measured steps and the schedule."""
        return {
            "every_n_steps": self.every_n_steps,
            "logged_steps": list(self.logged_steps),
            "metrics": self.summary,
            "layers": self.layer_summary,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": dict(self._sums),
            "counts": dict(self._counts),
            "last": dict(self._last),
            "logged_steps": list(self.logged_steps),
            "summary": self.summary,
            "layer_sums": {n: dict(v) for n, v in self._layer_sums.items()},
            "layer_counts": {n: dict(v) for n, v in self._layer_counts.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sums = {k: float(v) for k, v in state_dict.get("sums", {}).items()}
        self._counts = {k: int(v) for k, v in state_dict.get("counts", {}).items()}
        self._last = {k: float(v) for k, v in state_dict.get("last", {}).items()}
        self.logged_steps = [int(s) for s in state_dict.get("logged_steps", [])]
        sums, counts = state_dict.get("layer_sums", {}), state_dict.get("layer_counts", {})
        self._layer_sums = {n: {k: float(x) for k, x in v.items()} for n, v in sums.items()}
        self._layer_counts = {n: {k: int(x) for k, x in v.items()} for n, v in counts.items()}
