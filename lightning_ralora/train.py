"""Hydra entry point: `lightning-ralora-train [overrides]` (or `python -m lightning_ralora.train`).

The configs ship in the package (lightning_ralora/conf, CONF_DIR); add your own config directory with
`hydra.searchpath=[file:///path/to/my_conf]`. The pieces a run is built from live in run.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from .callbacks.divergence import Diverged
from .cluster import in_hydra_multirun, objective_value
from .config import ConfigError, validate_config
from .evaluation.runner import prepare_training_eval, run_test_stage
from .gid_profile import gid_main, profile_gid
from .io import write_json_atomic
from .methods import apply_method_settings
from .run import (
    CONF_DIR,
    RunIdentity,
    SweepSummary,
    build_callbacks,
    build_loggers,
    build_module,
    check_resume_identity,
    compose_config,
    config_error_exit,
    failure_record,
    finish_wandb,
    log_run_files,
    peak_memory,
    rank_digests,
    resolve_ckpt,
    results_record,
    run_names,
    summary,
    trainer_kwargs,
    variant_callbacks,
    wandb_mode,
)

__all__ = [
    "CONF_DIR",
    "build_callbacks",
    "build_loggers",
    "build_module",
    "compose_config",
    "gid_main",
    "main",
    "profile_gid",
    "rank_digests",
    "resolve_ckpt",
    "results_record",
    "run_names",
    "train",
    "variant_callbacks",
    "wandb_mode",
    "write_json_atomic",
]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, fit, validate once more, and write results.json. Returns the results dict. A resume
    (`ckpt_path`, a requeue) must carry the checkpoint's identity (else a ConfigError naming the changed keys) and
    continues its W&B run."""
    from .modules.adapter_module import read_plan

    cfg = apply_method_settings(cfg)
    validate_config(cfg)
    eval_jobs = prepare_training_eval(cfg)  # bad eval data or suites fail here, before any training
    run_dir = Path(cfg.run_dir)
    ckpt = resolve_ckpt(cfg, run_dir)
    identity = check_resume_identity(cfg, ckpt)  # a changed identity key fails here, before any compute
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("deterministic"):
        torch.use_deterministic_algorithms(True)
    L.seed_everything(cfg.seed, workers=True)
    start = time.time()
    module = build_module(cfg, run_dir)
    datamodule = module.task.datamodule()
    ok = False
    trainer = L.Trainer(
        **trainer_kwargs(cfg),
        callbacks=[*build_callbacks(cfg), RunIdentity(identity)],
        logger=build_loggers(cfg, identity),
        default_root_dir=str(run_dir),
        deterministic=bool(cfg.get("deterministic")),
    )
    try:
        if ckpt:  # Lightning reveals ckpt_path only after configure_model: the structure must be known before
            module.plan = read_plan(ckpt)
        fit_start = time.time()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        fit_stats = {"fit_time_s": time.time() - fit_start, **peak_memory()}
        digests = rank_digests(module)
        final = trainer.validate(module, datamodule=datamodule, verbose=False)
        eval_metrics = run_test_stage(trainer, module, eval_jobs, cfg.eval, run_dir) if eval_jobs else None
        results = results_record(cfg, trainer, module, final, digests, time.time() - start, fit_stats, identity)
        if eval_metrics is not None:
            results["eval"] = eval_metrics
        if cfg.get("export"):  # every rank: under FSDP2 the merge gathers the shards; rank 0 writes
            results["export_dir"] = str(module.export(run_dir / "export"))
        if trainer.is_global_zero:
            write_json_atomic(run_dir / "results.json", results)
            log_run_files(trainer, run_dir, module)
            print(summary(results, run_dir), flush=True)
        ok = True
        return results
    finally:
        finish_wandb(exit_code=0 if ok else 1)


def run_job(cfg: DictConfig, prog: str = "lightning-ralora-train") -> dict[str, Any]:
    """`train(cfg)`, with failures recorded: the run dir gets results.json with `status` failed or diverged and the
    error. Inside a multirun the record is returned and the sweep goes on; a single run exits 2 on a config error
    (nothing written), 1 on divergence, and re-raises a crash (exit 1)."""
    multirun = in_hydra_multirun()
    try:
        return train(cfg)
    except Exception as err:
        if isinstance(err, ConfigError) and not multirun:
            config_error_exit(prog, err)
        record = failure_record(cfg, err)
        if multirun:
            print(f"{prog}: job failed ({record['status']}): {record['error']}", file=sys.stderr, flush=True)
            return record
        if isinstance(err, Diverged):
            print(f"{prog}: {err}", file=sys.stderr, flush=True)
            sys.exit(1)
        raise


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    """One job; returns the task's objective (`task.objective.metric`) for Hydra's sweepers (Optuna); NaN for a
    failed job."""
    results = run_job(cfg)
    if results.get("status", "completed") != "completed":
        return float("nan")
    return objective_value(cfg.task, results["final_metrics"])


def main() -> None:
    """`lightning-ralora-train [overrides]`: one training run (or a sweep with -m) from the Hydra configs; a sweep
    with a failed job exits 1 after its summary."""
    _hydra_main()
    if SweepSummary.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
