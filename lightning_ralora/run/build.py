"""Building a run from its composed config: the module, the loggers, the callbacks (configured ones, the variant's
schedules, the stop-signal handler), the Trainer arguments and where the run starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from lightning_ralora.adapters import registry
from lightning_ralora.core.secrets import redact, wandb_init_with_redacted_argv
from lightning_ralora.modules.adapter_module import AdapterModule
from lightning_ralora.run.checkpoints import AtomicCheckpointIO
from lightning_ralora.run.cluster import requeued_ckpt, slurm_plugins, stop_callbacks
from lightning_ralora.run.identity import IDENTITY_KEY, identity_record
from lightning_ralora.run.rundir import plan_start
from lightning_ralora.run.tracking import run_names, wandb_mode


def build_loggers(cfg: DictConfig, identity: Mapping[str, Any] | None = None) -> list:
    """Instantiate every `logger.<name>` entry (`_target_` yamls in conf/logger/); the W&B logger gets its mode,
    the run's group/name/id/tags and the resolved config once (with the identity) here, `resume="allow"` (a
    resumed run continues its W&B run), and is left out with `wandb.mode=disabled`. Secrets are redacted from what
    W&B gets: config, tags and the command line it records (secrets.py)."""
    loggers: list = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        extra: dict[str, Any] = {}
        if str(node._target_).endswith("WandbLogger"):
            mode = wandb_mode(cfg)
            if mode == "disabled":
                continue
            os.environ.setdefault("WANDB_SILENT", "true")
            identity = identity or identity_record(cfg)
            config = OmegaConf.to_container(cfg, resolve=True)
            config["identity"] = {k: identity[k] for k in ("hash", "label", "overrides")}
            extra = {"mode": mode, "config": redact(config), "resume": "allow", **run_names(cfg, identity)}
            wandb_init_with_redacted_argv()
        loggers.append(hydra.utils.instantiate(node, _partial_=True)(**extra))  # `config` is instantiate's own arg
    return loggers


def variant_callbacks(adapter_cfg: Mapping[str, Any]) -> list[L.Callback]:
    """The schedules the variant declares in the registry (GID warm-up, SDS switch/refresh, ...)."""
    cfg = OmegaConf.to_container(adapter_cfg, resolve=True) if isinstance(adapter_cfg, DictConfig) else adapter_cfg
    return registry.variant_callbacks(dict(cfg))


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks, a progress bar if enabled, and the schedules the adapter needs."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.trainer.get("enable_progress_bar", True):
        # a terminal gets a live bar; a log file (CI, SLURM) one line every 50 steps instead of thousands
        callbacks.append(L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50))
    return callbacks + variant_callbacks(cfg.adapter) + stop_callbacks()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.trainer` as Trainer arguments; entries with a `_target_` (strategy, profiler, ...) are instantiated. Unless
    `trainer.plugins` is set: checkpoints are written atomically (checkpoints.AtomicCheckpointIO) and, inside SLURM,
    Lightning's own requeue is off (cluster.StopOnSignal owns the signals)."""
    raw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs = {k: hydra.utils.instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in raw.items()}
    if "plugins" not in kwargs:
        kwargs["plugins"] = [AtomicCheckpointIO(), *slurm_plugins()]
    return kwargs


def resolve_ckpt(cfg: DictConfig, run_dir: Path):
    """Where this run starts (rundir.plan_start): the checkpoint to resume from, or a completed run to keep. A job
    requeued on SIGUSR1 resumes from the checkpoint its <run_dir>/requeue.json names, whatever ckpt_path says; a
    bad `ckpt_path` (missing, truncated, no checkpoint for `last`) is a ConfigError before any compute."""
    return plan_start(
        {"ckpt_path": cfg.get("ckpt_path"), "fresh": cfg.get("fresh", False)}, run_dir, requeued_ckpt(run_dir)
    )


def build_module(cfg: DictConfig, run_dir: Path | None = None):
    """The AdapterModule a composed config describes (backbone built, adapters not yet injected)."""
    parts = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "task", "adapter", "optim"))
    return AdapterModule(*parts, seed=cfg.seed, run_dir=str(run_dir) if run_dir else None)


class RunIdentity(L.Callback):
    """Writes the run identity into every checkpoint (key `run_identity`), so a resume can check it (identity.py)."""

    def __init__(self, identity: Mapping[str, Any]) -> None:
        self.identity = {"hash": identity["hash"], "label": identity["label"], "keys": dict(identity["keys"])}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:

        checkpoint[IDENTITY_KEY] = self.identity
