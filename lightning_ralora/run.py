"""The parts of a run that train.py orchestrates: config composition, loggers, callbacks, the results record and
the end-of-run summary. The Hydra configs ship inside the package (CONF_DIR)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
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


def run_names(cfg: DictConfig) -> dict[str, Any]:
    """W&B grouping: group = variant-model-task, name = group-seed, tags include the seed."""
    group = f"{cfg.adapter.name}-{cfg.model.name}-{cfg.task.name}"
    tags = [f"seed:{cfg.seed}", cfg.adapter.name, cfg.model.name, cfg.task.name, *list(cfg.wandb.get("tags") or [])]
    return {"group": group, "name": f"{group}-seed{cfg.seed}", "job_type": "train", "tags": tags}


def wandb_mode(cfg: DictConfig) -> str:
    """Explicit `wandb.mode`, else online with credentials and offline without (never prompts)."""
    if cfg.wandb.get("mode"):
        return str(cfg.wandb.mode)
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def build_loggers(cfg: DictConfig) -> list:
    """Instantiate every `logger.<name>` entry (`_target_` yamls in conf/logger/); the W&B logger gets its mode and
    the run's group/name/tags/config here, and is left out with `wandb.mode=disabled`."""
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
            extra = {"mode": mode, "config": OmegaConf.to_container(cfg, resolve=True), **run_names(cfg)}
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
    from .cluster import requeue_callbacks  # SIGUSR1 -> checkpoint + requeue, inside SLURM (docs/cluster.md)

    return callbacks + variant_callbacks(cfg.adapter) + requeue_callbacks()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.trainer` as Trainer arguments; entries with a `_target_` (strategy, profiler, ...) are instantiated."""
    from .cluster import slurm_plugins

    raw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs = {k: hydra.utils.instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in raw.items()}
    plugins = slurm_plugins()  # inside SLURM: requeue by cluster.RequeueOnSignal, not by Lightning
    if plugins and "plugins" not in kwargs:
        kwargs["plugins"] = plugins
    return kwargs


def resolve_ckpt(cfg: DictConfig, run_dir: Path) -> str | None:
    """`ckpt_path`, with "last" meaning <run_dir>/checkpoints/last.ckpt when it exists (else a fresh start). A job
    requeued on SIGUSR1 resumes from the checkpoint its <run_dir>/requeue.json names, whatever ckpt_path says."""
    from .cluster import requeued_ckpt

    requeued = requeued_ckpt(run_dir)
    if requeued:
        return requeued
    if cfg.get("ckpt_path") == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    return cfg.get("ckpt_path")


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


def _gather(value: str) -> list[str]:
    """One entry per rank (a single entry outside torch.distributed)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    values: list[str] = [""] * torch.distributed.get_world_size()
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
) -> dict[str, Any]:
    """Everything results.json holds about a finished run (the one place its keys are defined). `fit_stats`: the
    training phase's own time and peak memory (`fit_time_s`, `peak_memory_*`), taken before validation and eval."""
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
        "wall_time_s": wall_time_s,
        **(fit_stats or peak_memory()),
        "host": socket.gethostname(),
        "wandb": run_names(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
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


def finish_wandb() -> None:
    """Close the W&B run even on failure, so the next job of a multirun starts a fresh one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def exit_on_config_error(prog: str, fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run `fn(cfg)`; a ConfigError becomes one message on stderr and exit code 2 (no traceback)."""
    try:
        return fn(cfg)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(2)
