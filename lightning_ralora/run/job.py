"""One training job, from a composed config to its record: validate, claim the run dir, build (run/build.py), fit,
validate, evaluate, record (run/record.py), with every outcome (failure, divergence, stop signal) recorded. The
command line is lightning_ralora/cli/train.py."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from omegaconf import DictConfig

from lightning_ralora.callbacks.divergence import Diverged
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.signals import Interrupted, StopRequest, check_stop, install_stop_handlers
from lightning_ralora.evaluation.runner import prepare_training_eval, run_test_stage
from lightning_ralora.modules.adapter_module import read_plan
from lightning_ralora.run.build import (
    RunIdentity,
    build_callbacks,
    build_loggers,
    build_module,
    resolve_ckpt,
    trainer_kwargs,
)
from lightning_ralora.run.checkpoints import remove_stale_temporaries
from lightning_ralora.run.cluster import in_hydra_multirun
from lightning_ralora.run.compose import config_error_exit
from lightning_ralora.run.identity import check_resume_identity
from lightning_ralora.run.methods import apply_method_settings
from lightning_ralora.run.outcome import failure_record, peak_memory, rank_digests, results_record
from lightning_ralora.run.record import RunRecord, print_sweep_summary, summary
from lightning_ralora.run.rundir import claim, fresh_starts, is_rank_zero
from lightning_ralora.run.tracking import finish_wandb, log_run_files
from lightning_ralora.run.validate import validate_config


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, claim the run dir, build, fit, validate once more, and record results.json. Returns the results dict.
    Everything a user can get wrong is refused before compute (ConfigError): the config and data, a second run
    into the same dir, an earlier run there that was not asked to be resumed or started over, a bad checkpoint. A
    resume (`ckpt_path`, a requeue) must carry the checkpoint's identity and continues its W&B run. A stop signal
    raises `Interrupted` at the next safe point, with the checkpoint saved (cluster.StopOnSignal)."""
    install_stop_handlers()
    cfg = apply_method_settings(cfg)
    validate_config(cfg)
    eval_jobs = prepare_training_eval(cfg)  # bad eval data or suites fail here, before any training
    run_dir = Path(cfg.run_dir)
    with claim(run_dir):  # one writer per run dir (rank 0 holds the lock)
        recovered = remove_stale_temporaries(run_dir) if is_rank_zero() else []
        start = resolve_ckpt(cfg, run_dir)
        for note in [*recovered, *start.notes]:
            print(note, file=sys.stderr, flush=True)
        if start.skip is not None:  # ckpt_path=auto on a completed run: kept as it is
            if is_rank_zero():
                RunRecord(status="skipped", error="completed earlier; kept (ckpt_path=auto)").save(run_dir)
            return start.skip
        identity = check_resume_identity(cfg, start.ckpt)  # a changed identity key fails here, before any compute
        identity["fresh_starts"] = fresh_starts(run_dir)  # a run started over in its dir is a new W&B run
        return _fit_and_record(cfg, run_dir, start.ckpt, identity, eval_jobs)


def _fit_and_record(cfg: DictConfig, run_dir: Path, ckpt: str | None, identity, eval_jobs) -> dict[str, Any]:
    """The compute of `train`, in its claimed run dir: seed, build, fit, validate, evaluate, record."""
    check_stop("start")  # a signal before any compute (e.g. between the jobs of a sweep)
    if cfg.get("deterministic"):
        torch.use_deterministic_algorithms(True)
    L.seed_everything(cfg.seed, workers=True)
    start = time.time()
    module = build_module(cfg, run_dir)
    datamodule = module.task.datamodule()
    exit_code = 1
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
        record = results_record(cfg, trainer, module, final, digests, time.time() - start, fit_stats, identity)
        record.eval = eval_metrics
        if cfg.get("export"):  # every rank: under FSDP2 the merge gathers the shards; rank 0 writes
            record.export_dir = str(module.export(run_dir / "export"))
        if trainer.is_global_zero:
            record.save(run_dir)
            log_run_files(trainer, run_dir, module)
            print(summary(record, run_dir), flush=True)
        exit_code = 0
        return record.to_dict()
    except Interrupted as stop:
        exit_code = stop.exit_code
        raise
    finally:
        finish_wandb(exit_code=exit_code, preempted=exit_code > 128)


def run_job(cfg: DictConfig, prog: str = "lightning-ralora-train") -> dict[str, Any]:
    """`train(cfg)`, with every outcome recorded. A failure writes a record (`status` failed or diverged and the
    error; attempts/, and results.json unless that holds a completed run): inside a multirun it is returned and the
    sweep goes on; a single run exits 2 on a config error (nothing written), 1 on divergence, and re-raises a crash
    (exit 1). A stop signal records the job (interrupted or requeued, its step and checkpoint), requeues it under
    SLURM, prints the sweep's summary inside a multirun, and exits 128 + the signal: later jobs do not start."""
    install_stop_handlers()
    multirun = in_hydra_multirun()
    try:
        results = train(cfg)
    except Interrupted as stop:
        _record_stop(cfg, stop, prog, multirun)
    except (KeyboardInterrupt, SystemExit) as err:  # a second Ctrl+C, or an exit from inside Lightning
        if StopRequest.signum is None or (isinstance(err, SystemExit) and err.code in (None, 0, 2)):
            raise
        _record_stop(cfg, Interrupted("unknown (stopped at once)"), prog, multirun)
    except Exception as err:
        if isinstance(err, ConfigError) and not multirun:
            config_error_exit(prog, err)
        record = failure_record(cfg, err)
        if multirun:
            print(f"{prog}: job failed ({record.status}): {record.error}", file=sys.stderr, flush=True)
            return record.to_dict()
        if isinstance(err, Diverged):
            print(f"{prog}: {err}", file=sys.stderr, flush=True)
            sys.exit(1)
        raise
    if multirun and StopRequest.signum is not None:  # the signal came after this job's last safe point
        _stop_sweep(StopRequest.signum)
    return results


def _record_stop(cfg: DictConfig, stop: Interrupted, prog: str, multirun: bool) -> NoReturn:
    """Record an interrupted job, requeue it if asked, stop (the sweep too) with exit code 128 + the signal."""
    record = failure_record(cfg, stop)
    if stop.requeued and is_rank_zero():
        stop.requeue()
    print(f"{prog}: {record.error}; to resume: {record.resume}", file=sys.stderr, flush=True)
    if multirun:
        _stop_sweep(stop.signum)
    sys.exit(stop.exit_code)


def _stop_sweep(signum: signal.Signals) -> NoReturn:
    """Print this sweep's summary (its jobs so far) and end the sweep with exit code 128 + the signal."""
    from hydra.core.hydra_config import HydraConfig

    if is_rank_zero():
        print_sweep_summary(Path(str(HydraConfig.get().sweep.dir)), stopped_by=signum.name)
    sys.exit(128 + int(signum))
