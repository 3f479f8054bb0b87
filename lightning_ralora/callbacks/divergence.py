"""Divergence guard: a non-finite loss, gradient or checkpoint tensor stops the run with `Diverged` before the bad
state can reach the weights or a checkpoint, so `checkpoints/last.ckpt` stays the last good one."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch


class Diverged(RuntimeError):
    """Training produced a non-finite value: `step` is the trainer's global_step (optimizer steps done, the
    logging step of the bad batch), `what` names the value ("loss", "gradient of <param>", ...)."""

    def __init__(self, step: int, what: str, value: float | None = None, last_checkpoint: str | None = None):
        self.step, self.what, self.value, self.last_checkpoint = int(step), what, value, last_checkpoint
        shown = f" ({value})" if value is not None else ""
        super().__init__(
            f"diverged at step {self.step}: non-finite {what}{shown}; last good checkpoint: {last_checkpoint or 'none'}"
        )

    def __reduce__(self):  # picklable with its attributes (spawned DDP workers send exceptions back)
        return type(self), (self.step, self.what, self.value, self.last_checkpoint)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One fused max-|x| over all tensors (NaN propagates; unlike a 2-norm it cannot overflow on finite values)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, ord=math.inf)
    return torch.stack([n.float().to(norms[0].device) for n in norms]).max()


def _float_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating tensor nested in dicts/lists (a checkpoint's state or optimizer state)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, _local(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _float_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _first_bad(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, float] | None:
    """The first (name, max|x|) whose tensor has a NaN/inf (only run once a fused check has failed)."""
    for name, t in named:
        if not torch.isfinite(t).all():
            return name, float(_max_abs([t]))
    return None


class DivergenceGuard(L.Callback):
    """Raise `Diverged` on a non-finite loss (before backward), gradient (before the optimizer step) or tensor in a
    checkpoint about to be written. All ranks agree on the decision (one all-reduced flag), so none hangs."""

    def _raise_if(self, trainer: L.Trainer, local_bad: bool, kind: str, what: str, value: float | None) -> None:
        """Raise on every rank when any rank saw a non-finite value (a collective: every rank calls it)."""
        if trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            if not local_bad:
                what, value = f"{kind} on another rank", None
            raise Diverged(trainer.global_step, what, value, self.last_good_checkpoint(trainer))

    @staticmethod
    def last_good_checkpoint(trainer: L.Trainer) -> str | None:
        """The newest checkpoint file a ModelCheckpoint has written (or found on resume), if any."""
        for cb in trainer.checkpoint_callbacks:
            for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
                if path and Path(path).is_file():
                    return str(path)
            dirpath = getattr(cb, "dirpath", None)
            if dirpath and (Path(dirpath) / "last.ckpt").is_file():
                return str(Path(dirpath) / "last.ckpt")
        return None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """A NaN/inf loss stops the run before its backward pass (and so before any update)."""
        loss = loss.detach()
        bad = not bool(torch.isfinite(loss).all())
        self._raise_if(trainer, bad, "loss", "loss", float(loss.float().mean()) if bad else None)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """A NaN/inf gradient stops the run before the optimizer applies it (runs inside the step's closure).
        Skipped under fp16 AMP with a GradScaler, which skips such steps itself."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        named = [(n, _local(p.grad)) for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None]
        bad = bool(named) and not bool(torch.isfinite(_max_abs([g for _, g in named])))
        first = _first_bad(named) if bad else None
        what, value = (f"gradient of {first[0]}", first[1]) if first else ("gradient", None)
        self._raise_if(trainer, bad, "gradient", what, value)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Last line of defence: no checkpoint with a NaN/inf weight, buffer or optimizer state is written (catches
        values that did not come through a gradient, e.g. a callback's SVD refresh)."""
        named = [
            *_float_tensors(checkpoint.get("state_dict", {}), "weight"),
            *_float_tensors(checkpoint.get("optimizer_states", []), "optimizer state"),
        ]
        bad = bool(named) and not bool(torch.isfinite(_max_abs([t for _, t in named])))
        first = _first_bad(named) if bad else None
        what, value = (
            (f"{first[0].replace('.', ' ', 1)} in the checkpoint", first[1]) if first else ("checkpoint", None)
        )
        self._raise_if(trainer, bad, "checkpoint tensor", what, value)
