"""Sparse events from callbacks (SDS refreshes, alignment measurements) go straight to the loggers."""

from __future__ import annotations

import lightning as L


def log_event(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log once, on rank 0, at `step`. Not `pl_module.log`: Lightning re-sends an on_step value logged from a
    callback hook on every later step of the epoch, and `log_every_n_steps` would drop events between its steps.
    Use the step label Lightning gives the optimizer step's `train/loss` (completed optimizer steps − 1)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
