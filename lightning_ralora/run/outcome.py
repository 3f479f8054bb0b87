"""The record of how a training run ended (a `RunRecord`): built from the trainer and the module when it completed,
from the error when it failed, diverged or was stopped; with the per-rank digests and the peak memory it holds.
Kept apart from run/record.py so that reading records needs neither torch nor Lightning."""

from __future__ import annotations

import hashlib
import json
import resource
import socket
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_ralora.callbacks.divergence import Diverged
from lightning_ralora.core.secrets import redact
from lightning_ralora.core.signals import Interrupted
from lightning_ralora.run.identity import identity_record
from lightning_ralora.run.record import RunRecord
from lightning_ralora.run.tracking import run_names


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
) -> RunRecord:
    """The record of a finished run (the one place its keys and their order are set). `fit_stats`: the training
    phase's own time and peak memory (`fit_time_s`, `peak_memory_*`), taken before validation and eval; `identity`
    the run identity (computed here when not given)."""
    identity = identity or identity_record(cfg)
    return RunRecord.from_dict(
        {
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
            "data_encoded_per_rank": _gather(getattr(trainer.datamodule, "encoded_examples", None)),  # rows encoded
            "wall_time_s": wall_time_s,
            **(fit_stats or peak_memory()),
            "host": socket.gethostname(),
            "status": "completed",
            "identity": dict(identity),
            "wandb": run_names(cfg, identity),
            "config": redact(OmegaConf.to_container(cfg, resolve=True)),
        }
    )


def failure_record(cfg: DictConfig, err: BaseException) -> RunRecord:
    """The record of a run that did not complete: `status` failed, diverged, interrupted or requeued, the error (and
    the end of its traceback; for a signal the phase, step and checkpoint). Rank 0 keeps it in the run dir
    (RunRecord.save: attempts/, and results.json unless that holds a completed run), so tables and sweep
    summaries see it."""
    try:
        config: Any = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a config that does not even resolve: keep it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    status = "diverged" if isinstance(err, Diverged) else "failed"
    data: dict[str, Any] = {"status": status, "error": f"{type(err).__name__}: {err}"}
    if isinstance(err, Interrupted):
        hint = "the same command with ckpt_path=last" if err.ckpt else "the same command (nothing to resume yet)"
        hint = "the same command (requeued)" if err.requeued else hint
        data = {"status": err.status, "error": f"stopped by {err}", "signal": err.signum.name}
        data.update(phase=err.phase, global_step=err.step, checkpoint=err.ckpt, resume=hint)
    else:
        data["traceback"] = "".join(traceback.format_exception(err))[-4000:]
    data.update(
        variant=OmegaConf.select(cfg, "adapter.name", default=None),
        model=OmegaConf.select(cfg, "model.name", default=None),
        task=OmegaConf.select(cfg, "task.name", default=None),
        seed=OmegaConf.select(cfg, "seed", default=None),
        host=socket.gethostname(),
        config=config,
    )
    if isinstance(err, Diverged):
        data["diverged_at_step"] = err.step
    try:
        data["identity"] = identity_record(cfg)
        data["wandb"] = run_names(cfg, data["identity"])
    except Exception:
        pass
    record = RunRecord.from_dict(redact(data))
    run_dir = OmegaConf.select(cfg, "run_dir", default=None, throw_on_resolution_failure=False)
    if run_dir and rank_zero_only.rank == 0:
        try:
            record.save(run_dir)
        except OSError as io_err:  # a full disk: the earlier files stay intact, the error is what counts
            print(f"could not record the {record.status} run in {run_dir}: {io_err}", file=sys.stderr, flush=True)
    return record
