"""GID over training: re-estimate each adapted layer's gradient intrinsic dimensionality every N steps, without
touching the structure (the RaLoRA paper: GID rises quickly, then stabilises).

Over the `window` optimizer steps ending at every `every_n_steps`-th step, the full-weight gradient G = Σ g_outᵀ x of
each adapted layer (what ∂L/∂W0 would be, diagnostics/capture.py) is summed; its effective rank is that layer's GID
at that step, estimated as the GID warm-up does (erank of the accumulated gradient). Logged as `gid/<layer>` and
`gid/mean`, kept in results.json (`callbacks.GIDOverTraining`) and, at the end, written by rank 0 to
`<run_dir>/gid_over_training.csv` and `.png`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_ralora.adapters import adapter_layers
from lightning_ralora.callbacks._logging import log_event
from lightning_ralora.diagnostics.capture import FullGradientCapture
from lightning_ralora.rank.spectra import effective_rank


class GIDOverTraining(L.Callback):
    """Every `every_n_steps` steps: per-layer erank of the full gradient summed over the last `window` steps."""

    def __init__(self, every_n_steps: int = 50, window: int = 4) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GIDOverTraining: {name} must be a positive integer, got {value!r}")
        if window > every_n_steps:
            raise ValueError(f"GIDOverTraining: window={window} must be <= every_n_steps={every_n_steps}")
        self.every_n_steps, self.window = every_n_steps, window
        self._captures: dict[str, FullGradientCapture] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self.history: dict[int, dict[str, float]] = {}  # 1-based step -> {layer: GID}

    def in_window(self, global_step: int) -> bool:
        """True when the optimizer step taken at `global_step` falls in a measurement window."""
        return (global_step + 1) % self.every_n_steps >= self.every_n_steps - self.window + 1 or (
            (global_step + 1) % self.every_n_steps == 0
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.in_window(trainer.global_step) and not self._captures:
            layers = adapter_layers(getattr(pl_module, "backbone", pl_module))
            self._captures = {name: FullGradientCapture(layer).attach() for name, layer in layers.items()}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._captures:
            return
        for name, cap in self._captures.items():
            if cap.G is not None:
                self._sums[name] = self._sums.get(name, 0) + cap.G
            cap.reset()
        step = trainer.global_step + 1
        if step % self.every_n_steps:
            return
        self._detach()
        gid = {}
        for name, G in self._sums.items():  # the same module order on every rank
            G = trainer.strategy.reduce(G, reduce_op="mean")
            gid[name] = float(effective_rank(G))
        self._sums = {}
        if gid:
            self.history[step] = gid
            mean = sum(gid.values()) / len(gid)
            log_event(trainer, {"gid/mean": mean, **{f"gid/{n}": v for n, v in gid.items()}}, step=step - 1)

    def _detach(self) -> None:
        for cap in self._captures.values():
            cap.detach()
        self._captures = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detach()
        if trainer.is_global_zero and self.history and trainer.default_root_dir:
            self.write(Path(trainer.default_root_dir))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._detach()

    def write(self, run_dir: Path) -> None:
        """gid_over_training.csv (step, layer, gid) and a plot of every layer's GID against the step."""
        rows = [(step, name, gid) for step, layers in sorted(self.history.items()) for name, gid in layers.items()]
        with (run_dir / "gid_over_training.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("step", "layer", "gid"), *rows])
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = sorted(self.history)
        for name in self.history[steps[0]]:
            ax.plot(steps, [self.history[s].get(name, float("nan")) for s in steps], lw=0.8, alpha=0.6)
        ax.plot(steps, [sum(v.values()) / len(v) for v in (self.history[s] for s in steps)], "k-", lw=2, label="mean")
        ax.set(xlabel="optimizer step", ylabel="GID (erank of the windowed full gradient)", title="GID over training")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "gid_over_training.png", dpi=120)
        plt.close(fig)

    def results_summary(self) -> dict[str, Any]:
        """What results.json keeps: the schedule and the per-step mean and per-layer GIDs."""
        mean = {s: sum(v.values()) / len(v) for s, v in sorted(self.history.items())}
        return {"every_n_steps": self.every_n_steps, "window": self.window, "mean": mean, "layers": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"history": {int(k): dict(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): {n: float(x) for n, x in v.items()} for k, v in state_dict.get("history", {}).items()}
