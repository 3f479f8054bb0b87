"""The parts of a run that train.py orchestrates: config composition, loggers, callbacks, the results record and
the end-of-run summary. The Hydra configs ship inside the package (CONF_DIR); the sweep configs of the paper tables
(experiments/<paper>/<table>/<name>.yaml) are registered as `experiment=<name>` when this module is imported."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import hydra
import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict

from .catalog import register_experiments
from .config import ConfigError
from .secrets import HYDRA_FILES, config_secrets, redact, redact_yaml_file

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
register_experiments()
T = TypeVar("T")


def compose_config(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> DictConfig:
    """The config the CLI composes from the package's conf/ with these overrides (outside a Hydra run: `run_dir`,
    if given, replaces the `${hydra:runtime.output_dir}` it would get, `overrides` the `${hydra:overrides.task}`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.overrides = list(overrides)
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
    return cfg


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity (identity.py): hash, label `<variant>-<model>-<task>-<hash>`, the identity overrides and
    keys; what results.json, the checkpoint and W&B carry."""
    from .identity import identity_hash, identity_keys, identity_overrides, run_label

    keys = identity_keys(cfg)
    digest = identity_hash(keys)
    return {"hash": digest, "label": run_label(cfg, digest), "overrides": identity_overrides(cfg), "keys": keys}


def run_names(cfg: DictConfig, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """W&B naming from the run identity: group = `<experiment>/<label>` (the seeds of one config), name =
    `<label>-seed<N>`, id stable per (identity, seed) so a resumed run continues its W&B run (a run started over in
    its dir, `fresh_starts` in the identity, gets a new one: `<id>-r<N>`); tags: seed, variant,
    model, task, experiment, `id:<hash>` and the identity overrides (secrets redacted, then cut to 64 characters)."""
    from .identity import wandb_id
    from .secrets import config_secrets

    identity = identity or run_identity(cfg)
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


def build_loggers(cfg: DictConfig, identity: Mapping[str, Any] | None = None) -> list:
    """Instantiate every `logger.<name>` entry (`_target_` yamls in conf/logger/); the W&B logger gets its mode,
    the run's group/name/id/tags and the resolved config once (with the identity) here, `resume="allow"` (a
    resumed run continues its W&B run), and is left out with `wandb.mode=disabled`. Secrets are redacted from what
    W&B gets: config, tags and the command line it records (secrets.py)."""
    from .secrets import wandb_init_with_redacted_argv

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
            identity = identity or run_identity(cfg)
            config = OmegaConf.to_container(cfg, resolve=True)
            config["identity"] = {k: identity[k] for k in ("hash", "label", "overrides")}
            extra = {"mode": mode, "config": redact(config), "resume": "allow", **run_names(cfg, identity)}
            wandb_init_with_redacted_argv()
        loggers.append(hydra.utils.instantiate(node, _partial_=True)(**extra))  # `config` is instantiate's own arg
    return loggers


def variant_callbacks(adapter_cfg: Mapping[str, Any]) -> list[L.Callback]:
    """The schedules the variant declares in the registry (GID warm-up, SDS switch/refresh, ...)."""
    from .adapters.registry import variant_callbacks as declared

    cfg = OmegaConf.to_container(adapter_cfg, resolve=True) if isinstance(adapter_cfg, DictConfig) else adapter_cfg
    return declared(dict(cfg))


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks, a progress bar if enabled, and the schedules the adapter needs."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.trainer.get("enable_progress_bar", True):
        # a terminal gets a live bar; a log file (CI, SLURM) one line every 50 steps instead of thousands
        callbacks.append(L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50))
    from .cluster import stop_callbacks  # SIGTERM/SIGINT/SIGUSR1 -> checkpoint, record, requeue (docs/cluster.md)

    return callbacks + variant_callbacks(cfg.adapter) + stop_callbacks()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.trainer` as Trainer arguments; entries with a `_target_` (strategy, profiler, ...) are instantiated. Unless
    `trainer.plugins` is set: checkpoints are written atomically (rundir.AtomicCheckpointIO) and, inside SLURM,
    Lightning's own requeue is off (cluster.StopOnSignal owns the signals)."""
    from .cluster import slurm_plugins
    from .rundir import AtomicCheckpointIO

    raw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs = {k: hydra.utils.instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in raw.items()}
    if "plugins" not in kwargs:
        kwargs["plugins"] = [AtomicCheckpointIO(), *slurm_plugins()]
    return kwargs


def resolve_ckpt(cfg: DictConfig, run_dir: Path):
    """Where this run starts (rundir.plan_start): the checkpoint to resume from, or a completed run to keep. A job
    requeued on SIGUSR1 resumes from the checkpoint its <run_dir>/requeue.json names, whatever ckpt_path says; a
    bad `ckpt_path` (missing, truncated, no checkpoint for `last`) is a ConfigError before any compute."""
    from .cluster import requeued_ckpt
    from .rundir import plan_start

    return plan_start(
        {"ckpt_path": cfg.get("ckpt_path"), "fresh": cfg.get("fresh", False)}, run_dir, requeued_ckpt(run_dir)
    )


def build_module(cfg: DictConfig, run_dir: Path | None = None):
    """The AdapterModule a composed config describes (backbone built, adapters not yet injected)."""
    from .modules.adapter_module import AdapterModule

    parts = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "task", "adapter", "optim"))
    return AdapterModule(*parts, seed=cfg.seed, run_dir=str(run_dir) if run_dir else None)


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, torch.Tensor)) and torch.tensor(v).numel() == 1
    }


def _gather(value: Any) -> list[Any]:
    """One entry per rank (a single entry outside torch.distributed)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def rank_digests(module) -> dict[str, list[str]]:
    """SHA-256 per rank of the adapter structure and of the adapter tensors (parameters and buffers such as
    SDS's Q's): equal digests prove every rank built, and ended with, the same adapters."""
    structure = hashlib.sha256(json.dumps(module.structure()["layers"], sort_keys=True).encode())
    state = hashlib.sha256()
    for name, layer in module.adapter_layers().items():
        for key, tensor in layer.state_dict().items():
            if not key.startswith("base."):
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                state.update(f"{name}.{key}".encode() + full.detach().cpu().float().numpy().tobytes())
    return {"structure": _gather(structure.hexdigest()), "adapter_state": _gather(state.hexdigest())}


def peak_memory() -> dict[str, Any]:
    """The run's peak memory: the GPU's `max_memory_allocated` on CUDA, else the process's peak resident set size
    (what `sds_overhead` compares between LoRA and SDS-LoRA runs of one machine)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_max_allocated"}
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_bytes": int(rss_kib) * 1024, "peak_memory_kind": "cpu_max_rss"}


def results_record(
    cfg: DictConfig,
    trainer: L.Trainer,
    module,
    final: Sequence[Mapping[str, Any]],
    digests: Mapping[str, list[str]],
    wall_time_s: float,
    fit_stats: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything results.json holds about a finished run (the one place its keys are defined). `fit_stats`: the
    training phase's own time and peak memory (`fit_time_s`, `peak_memory_*`), taken before validation and eval;
    `identity` the run identity (computed here when not given)."""
    identity = identity or run_identity(cfg)
    return {
        "variant": cfg.adapter.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "final_metrics": _floats({**trainer.callback_metrics, **(final[0] if final else {})}),
        **module.param_counts(),
        "structure": module.structure(),
        "plan": module.plan.to_dict() if module.plan is not None else None,
        "task_summary": module.task.summary(),
        "callbacks": {
            type(cb).__name__: cb.results_summary() for cb in trainer.callbacks if hasattr(cb, "results_summary")
        },
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "structure_digest_per_rank": digests["structure"],
        "adapter_state_digest_per_rank": digests["adapter_state"],
        "data_encoded_per_rank": _gather(getattr(trainer.datamodule, "encoded_examples", None)),  # rows each encoded
        "wall_time_s": wall_time_s,
        **(fit_stats or peak_memory()),
        "host": socket.gethostname(),
        "status": "completed",
        "identity": dict(identity),
        "wandb": run_names(cfg, identity),
        "config": redact(OmegaConf.to_container(cfg, resolve=True)),
    }


def summary(results: Mapping[str, Any], run_dir: Path) -> str:
    """A few lines for the end of a run: final val metrics (gap closed first), parameters, where the files are."""
    m = results.get("final_metrics", {})
    keys = sorted((k for k in m if k.startswith("val/")), key=lambda k: (k != "val/gap_closed", k))
    trainable, total = results.get("trainable_params", 0), results.get("total_params", 0)
    share = f" ({100 * trainable / total:.3f}%)" if total else ""
    lines = [
        f"{results['variant']} on {results['model']} / {results['task']}, seed {results['seed']}: "
        f"{results['global_step']} steps in {results['wall_time_s']:.1f} s",
        "  " + ("  ".join(f"{k} {m[k]:.4g}" for k in keys) or "no validation metrics"),
        f"  params: {trainable:,} trainable / {total:,} total{share}",
        f"  run dir: {run_dir.resolve()}",
        f"  results: {(run_dir / 'results.json').resolve()}",
    ]
    if results.get("export_dir"):
        lines.append(f"  export:  {results['export_dir']}")
    return "\n".join(lines)


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


class RunIdentity(L.Callback):
    """Writes the run identity into every checkpoint (key `run_identity`), so a resume can check it (identity.py)."""

    def __init__(self, identity: Mapping[str, Any]) -> None:
        self.identity = {"hash": identity["hash"], "label": identity["label"], "keys": dict(identity["keys"])}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        from .identity import IDENTITY_KEY

        checkpoint[IDENTITY_KEY] = self.identity


def check_resume_identity(cfg: DictConfig, ckpt: str | None) -> dict[str, Any]:
    """The run identity; when resuming, a ConfigError naming each identity key that differs from the checkpoint's
    (unless listed in `resume.allow_changes`)."""
    from .identity import checkpoint_identity, identity_changes

    identity = run_identity(cfg)
    if not ckpt:
        return identity
    stored = checkpoint_identity(ckpt)
    if stored is None:
        print(f"resume: {ckpt} carries no run identity (older checkpoint): not checked", file=sys.stderr)
        return identity
    allow = [str(k) for k in (OmegaConf.select(cfg, "resume.allow_changes", default=None) or [])]
    changes = identity_changes(stored.get("keys") or {}, identity["keys"], allow)
    if changes:
        raise ConfigError(
            [f"ckpt_path={ckpt} was trained under another config: {c} (keep the checkpoint's value, or allow the "
             f"change with resume.allow_changes=[{c.split(':', 1)[0]}])" for c in changes]
        )  # fmt: skip
    return identity


def failure_record(cfg: DictConfig, err: BaseException) -> dict[str, Any]:
    """The record of a run that did not complete: `status` failed, diverged, interrupted or requeued, the error (and
    the end of its traceback; for a signal the phase, step and checkpoint). Rank 0 keeps it in the run dir
    (rundir.write_record: attempts/, and results.json unless that holds a completed run), so tables and sweep
    summaries see it."""
    import traceback

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from .callbacks.divergence import Diverged
    from .cluster import Interrupted

    try:
        config: Any = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a config that does not even resolve: keep it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    status = "diverged" if isinstance(err, Diverged) else "failed"
    record: dict[str, Any] = {"status": status, "error": f"{type(err).__name__}: {err}"}
    if isinstance(err, Interrupted):
        hint = "the same command with ckpt_path=last" if err.ckpt else "the same command (nothing to resume yet)"
        hint = "the same command (requeued)" if err.requeued else hint
        record = {"status": err.status, "error": f"stopped by {err}", "signal": err.signum.name}
        record.update(phase=err.phase, global_step=err.step, checkpoint=err.ckpt, resume=hint)
    else:
        record["traceback"] = "".join(traceback.format_exception(err))[-4000:]
    record.update(
        variant=OmegaConf.select(cfg, "adapter.name", default=None),
        model=OmegaConf.select(cfg, "model.name", default=None),
        task=OmegaConf.select(cfg, "task.name", default=None),
        seed=OmegaConf.select(cfg, "seed", default=None),
        host=socket.gethostname(),
        config=config,
    )
    if isinstance(err, Diverged):
        record["diverged_at_step"] = err.step
    try:
        record["identity"] = run_identity(cfg)
        record["wandb"] = run_names(cfg, record["identity"])
    except Exception:
        pass
    record = redact(record)
    run_dir = OmegaConf.select(cfg, "run_dir", default=None, throw_on_resolution_failure=False)
    if run_dir and rank_zero_only.rank == 0:
        from .rundir import write_record

        try:
            write_record(run_dir, record)
        except OSError as io_err:  # a full disk: the earlier files stay intact, the error is what counts
            print(f"could not record the {record['status']} run in {run_dir}: {io_err}", file=sys.stderr, flush=True)
    return record


class RedactHydraFiles(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): Hydra writes `<run_dir>/.hydra/{config,hydra,overrides}.yaml` (and
    a sweep's `multirun.yaml`) before the job starts, secrets included; at job start, before the task runs, they
    are rewritten redacted."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hc = config.hydra
        found = config_secrets(config)
        if hc.output_subdir is not None:
            for name in HYDRA_FILES:
                redact_yaml_file(Path(str(hc.runtime.output_dir)) / str(hc.output_subdir) / name, found)
        if str(hc.mode) == "RunMode.MULTIRUN":
            redact_yaml_file(Path(str(hc.sweep.dir)) / "multirun.yaml", found)


class SweepSummary(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): after a multirun, one line per job of this sweep (its status and
    run dir, the error of a failed one); `failed` tells `main` to exit 1. The sweep's id (an environment variable
    its jobs inherit, on this machine or through SLURM) is in every record its jobs write, so a concurrent sweep
    into the same directory is not counted."""

    failed: int = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import uuid

        from .rundir import SWEEP_ID_ENV

        os.environ[SWEEP_ID_ENV] = uuid.uuid4().hex[:12]
        SweepSummary.failed = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.failed = print_sweep_summary(Path(str(config.hydra.sweep.dir)))


def print_sweep_summary(sweep_dir: Path, stopped_by: str | None = None) -> int:
    """Print this sweep's jobs (rundir.records_of_sweep) to stderr; returns how many did not complete."""
    from .rundir import SWEEP_ID_ENV, records_of_sweep

    lines, failed = [], 0
    for job, record in sorted(records_of_sweep(sweep_dir, os.environ.get(SWEEP_ID_ENV)).items()):
        status = record.get("status", "completed")
        failed += status not in ("completed", "skipped")
        error = f"  {record.get('error', '')}".splitlines()[0][:160] if record.get("error") else ""
        lines.append(f"  {status:<11} {job}{error}")
    stop = f"; stopped by {stopped_by}, later jobs not started" if stopped_by else ""
    done = sum(1 for line in lines if line.split()[0] in ("completed", "skipped"))
    print(f"sweep {sweep_dir}: {done} completed, {failed} not{stop}", file=sys.stderr, flush=True)
    print("\n".join(lines), file=sys.stderr, flush=True)
    return failed


def config_error_exit(prog: str, err: ConfigError) -> NoReturn:
    """One message on stderr and exit code 2 (no traceback)."""
    print(f"{prog}: {err}", file=sys.stderr)
    sys.exit(2)


def exit_on_config_error(prog: str, fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run `fn(cfg)`; a ConfigError becomes one message on stderr and exit code 2 (no traceback)."""
    try:
        return fn(cfg)
    except ConfigError as err:
        config_error_exit(prog, err)
