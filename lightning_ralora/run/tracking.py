"""W&B: the mode, the group/name/id/tags a run gets from its identity, closing the run, and the run files uploaded as
an artifact."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from lightning_ralora.core.secrets import config_secrets, redact
from lightning_ralora.run.identity import identity_record


def run_names(cfg: DictConfig, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """W&B naming from the run identity: group = `<experiment>/<label>` (the seeds of one config), name =
    `<label>-seed<N>`, id stable per (identity, seed) so a resumed run continues its W&B run (a run started over in
    its dir, `fresh_starts` in the identity, gets a new one: `<id>-r<N>`); tags: seed, variant,
    model, task, experiment, `id:<hash>` and the identity overrides (secrets redacted, then cut to 64 characters)."""
    from lightning_ralora.run.identity import wandb_id

    identity = identity or identity_record(cfg)
    label = identity["label"]
    group = f"{cfg.get('experiment_name', 'default')}/{label}"
    tags = [f"seed:{cfg.seed}", cfg.adapter.name, cfg.model.name, cfg.task.name, f"id:{identity['hash']}"]
    tags += [str(cfg.get("experiment_name", "default")), *map(str, cfg.wandb.get("tags") or [])]
    tags += identity.get("overrides", [])
    run_id = wandb_id(group, cfg.seed) + (f"-r{identity['fresh_starts']}" if identity.get("fresh_starts") else "")
    names = {"group": group, "name": f"{label}-seed{cfg.seed}", "id": run_id, "job_type": "train"}
    names = redact({**names, "tags": tags}, extra=config_secrets(cfg))
    return {**names, "tags": list(dict.fromkeys(t[:64] for t in names["tags"]))}


def wandb_mode(cfg: DictConfig) -> str:
    """`wandb.mode` if set, else the `WANDB_MODE` environment variable, else online with credentials
    (`WANDB_API_KEY`) and offline without (never prompts)."""
    if cfg.wandb.get("mode"):
        return str(cfg.wandb.mode)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def finish_wandb(exit_code: int = 0, preempted: bool = False) -> None:
    """Close the W&B run even on failure (exit code 1 marks it failed in W&B; `preempted`, a run stopped by a signal,
    is marked preempting, so W&B shows it as preempted, not crashed), so the next job of a multirun starts a fresh
    one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            if preempted:
                wandb.run.mark_preempting()
            wandb.finish(exit_code=exit_code)


def log_run_files(trainer: L.Trainer, run_dir: Path, module) -> None:
    """To W&B (when a W&B logger is active): results.json, gid.json, eval.json and gid_profile.json as one `run`
    artifact, and the per-layer adapter structure as a table (every variant: kind, shape, rank, blocks)."""
    runs = [lg.experiment for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
    if not runs:
        return
    import wandb

    run = runs[0]
    artifact = wandb.Artifact(f"run-{run.id}", type="run")
    for name in ("results.json", "gid.json", "eval.json", "gid_profile.json"):
        if (run_dir / name).is_file():
            artifact.add_file(str(run_dir / name))
    run.log_artifact(artifact)
    layers = module.structure().get("layers") or {}
    columns = sorted({k for spec in layers.values() for k in spec if not isinstance(spec[k], (dict, list))})
    rows = [[name, *(spec.get(c) for c in columns)] for name, spec in layers.items()]
    if rows:
        run.log({"structure": wandb.Table(columns=["module", *columns], data=rows)})
