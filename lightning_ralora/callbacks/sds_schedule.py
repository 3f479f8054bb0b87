"""SDS-LoRA schedule (docs/maths.md §6): the warm-up switch and the QR refreshes, as a Lightning callback.

The maths lives in `lightning_ralora.adapters.sds`; this callback only decides *when*:

- after optimizer step t == warmup_steps: `reparameterize()` every SDS layer and reset all optimizer state (every
  parameter of every optimizer, a trained task head included, as the paper does), so the warm-up's moments do not
  leak into the main stage;
- after every later optimizer step t with `refresh_due(t, T, K)` (and t < T): `refresh()` every SDS layer. A refresh
  does NOT reset the optimizer state (docs/maths.md §6). T = trainer.max_steps, or
  trainer.estimated_stepping_batches when max_steps is -1.

On each refresh step it logs `sds/refreshes` (refreshes so far) and `sds/refresh_jump` (mean over the SDS layers of
‖ΔW_after − ΔW_before‖_F / ‖ΔW_before‖_F, over the layers where ΔW was nonzero before) straight to the trainer's
loggers (see `_log_event` for why).

Steps are counted as optimizer steps (`trainer.global_step`), so with gradient accumulation the callback acts only on
the batch whose step advanced the counter. Changes are in-place copies into the same Parameter/buffer objects, so
DDP keeps syncing them; the decompositions are deterministic and every rank holds the same (DDP-averaged) factors,
so all ranks stay identical without communication. The callback's state (phase, refresh steps, jumps) is saved in
the checkpoint, so a resumed run refreshes on exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch

from lightning_ralora.adapters import SDSLoRALinear, adapter_layers
from lightning_ralora.adapters.sds import refresh_due, schedule_problems
from lightning_ralora.callbacks._logging import log_event


class SDSSchedule(L.Callback):
    """Switch SDS layers out of LoRA warm-up after `warmup_steps` optimizer steps, then QR-refresh them on schedule."""

    def __init__(self, warmup_steps: int = 10, K: int = 5) -> None:
        problems = schedule_problems(warmup_steps, K)  # the adapter schema's own rules
        if problems:
            raise ValueError("SDSSchedule: " + "; ".join(problems))
        self.warmup_steps = warmup_steps
        self.K = K
        self.switched = False
        self.switch_step: int | None = None
        self.refresh_log: list[int] = []  # optimizer steps after which a refresh ran
        self.jump_log: list[float] = []  # mean relative jump over the SDS layers, one per refresh
        self.total_steps: int | None = None
        self._last_step: int | None = None

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _layers(pl_module: L.LightningModule) -> list[SDSLoRALinear]:
        return [m for m in adapter_layers(pl_module).values() if isinstance(m, SDSLoRALinear)]

    @staticmethod
    def _total_steps(trainer: L.Trainer) -> int:
        """T of the refresh schedule: max_steps if set, else Lightning's estimate of the optimizer steps."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return int(trainer.estimated_stepping_batches)

    def _switch(self, trainer: L.Trainer, layers: list[SDSLoRALinear], step: int) -> None:
        """Reparameterize every SDS layer and reset all optimizer state."""
        for layer in layers:
            if not layer.is_switched:
                layer.reparameterize()
        for opt in trainer.optimizers:
            opt.state.clear()
        self.switched = True
        self.switch_step = step

    def _refresh(self, trainer: L.Trainer, layers: list[SDSLoRALinear], step: int) -> None:
        jumps = [layer.refresh() for layer in layers]
        finite = [j for j in jumps if math.isfinite(j)]  # inf: ΔW was zero before the refresh (relative jump undefined)
        mean_jump = sum(finite) / len(finite) if finite else 0.0
        self.refresh_log.append(step)
        self.jump_log.append(mean_jump)
        log_event(
            trainer,
            {"sds/refreshes": float(len(self.refresh_log)), "sds/refresh_jump": mean_jump},
            trainer.global_step - 1,
        )

    # --- hooks -------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = self._total_steps(trainer)
        if self.total_steps is not None and self.total_steps != total:
            warnings.warn(
                f"SDSSchedule: the refresh schedule was built for T={self.total_steps} steps, this run has T={total}; "
                "the remaining refreshes follow the new T",
                stacklevel=1,
            )
        self.total_steps = total
        self._last_step = trainer.global_step
        layers = self._layers(pl_module)
        if not layers:
            warnings.warn("SDSSchedule: the model has no SDS-LoRA layer; the callback does nothing", stacklevel=1)
            return
        phases = {layer.is_switched for layer in layers}
        if len(phases) > 1:
            raise RuntimeError("SDSSchedule: some SDS layers are switched and some are not; the checkpoint is corrupt")
        layers_switched = phases.pop()
        if self.switched and not layers_switched:
            raise RuntimeError(
                "SDSSchedule: callback state says the switch happened, but the SDS layers are in warm-up "
                "(was the model state restored from the same checkpoint?)"
            )
        if layers_switched and not self.switched:
            # model restored without this callback's state: keep the layers' phase, never reset the optimizer again
            warnings.warn(
                "SDSSchedule: the SDS layers are already switched but the callback has no record of it (checkpoint "
                "without SDSSchedule state?); continuing in the SDS phase, earlier refreshes are not in refresh_log",
                stacklevel=1,
            )
            self.switched = True
        if not self.switched and trainer.global_step >= self.warmup_steps:
            # warmup_steps == 0, or a run started past the warm-up: switch before the next step
            self._switch(trainer, layers, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self._last_step = step
        layers = self._layers(pl_module)
        if not layers:
            return
        if not self.switched:
            if step >= self.warmup_steps:
                self._switch(trainer, layers, step)
            return
        assert self.total_steps is not None
        if step < self.total_steps and refresh_due(step, self.total_steps, self.K):
            self._refresh(trainer, layers, step)

    # --- checkpointing -------------------------------------------------------------------------------
    def results_summary(self) -> dict[str, Any]:
        """What results.json keeps: when the switch happened, every refresh step and its relative ΔW jump."""
        return {
            **self.state_dict(),
            "refreshes": len(self.refresh_log),
            "mean_jump": sum(self.jump_log) / len(self.jump_log) if self.jump_log else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "K": self.K,
            "switched": self.switched,
            "switch_step": self.switch_step,
            "refresh_log": list(self.refresh_log),
            "jump_log": list(self.jump_log),
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["warmup_steps"], state_dict["K"]) != (self.warmup_steps, self.K):
            warnings.warn(
                f"SDSSchedule: checkpoint has warmup_steps={state_dict['warmup_steps']}, K={state_dict['K']}; "
                f"this run uses warmup_steps={self.warmup_steps}, K={self.K}",
                stacklevel=1,
            )
        self.switched = bool(state_dict["switched"])
        self.switch_step = state_dict["switch_step"]
        self.refresh_log = list(state_dict["refresh_log"])
        self.jump_log = [float(j) for j in state_dict["jump_log"]]
        self.total_steps = state_dict["total_steps"]


def optimizer_state_is_empty(optimizers: list[torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> bool:
    """True when no optimizer holds state for any of `params` (what the switch guarantees)."""
    return all(len(opt.state.get(p, {})) == 0 for opt in optimizers for p in params)
