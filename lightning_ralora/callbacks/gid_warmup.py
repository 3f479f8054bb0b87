"""GID warm-up: estimate each target's gradient intrinsic dimensionality and fix the RaLoRA plan before training.

Runs in `setup` (after the process group exists, before `configure_model` injects adapters and before DDP/FSDP
wrapping), so the adapter structure is decided once, identically on every rank. The maths is in rank/.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_ralora.adapters.inject import target_shapes
from lightning_ralora.adapters.plan import AdapterPlan
from lightning_ralora.adapters.schema import pos_int, raise_problems
from lightning_ralora.core.io import write_json_atomic
from lightning_ralora.core.signals import Interrupted, stop_agreed
from lightning_ralora.rank.estimate import estimate_gid, spearman, warmup_train_mode
from lightning_ralora.rank.plots import plot_cumulative_energy, plot_gid
from lightning_ralora.rank.rules import build_gralora_plan, build_ralora_plan, validate_ralora_cfg


def rank_shard(loader: Iterable[Any], rank: int, world: int, n: int) -> Iterator[Any]:
    """This rank's warm-up batches: global indices rank, rank+world, ... (at most n of them).

    Every rank iterates the same (not yet distributed-sampled) loader, so the ranks' shards are disjoint and
    together are the first n·world batches: the all-reduced mean equals a one-process mean over those batches.
    """
    if n <= 0:
        return
    taken = 0
    for i, batch in enumerate(loader):
        if i % world == rank:
            yield batch
            taken += 1
            if taken == n:
                return


def _batch_size(loader: Any, batch: Any) -> int | None:
    bs = getattr(loader, "batch_size", None)
    if bs:
        return int(bs)
    try:
        from lightning.pytorch.utilities.data import extract_batch_size

        return int(extract_batch_size(batch))
    except Exception:  # a batch of unknown structure just leaves the size unrecorded
        return None


def _versus_planted(pl_module: L.LightningModule, plan: AdapterPlan) -> dict[str, Any]:
    """When the task planted known updates (task=planted), each layer's planted erank and the Spearman rank
    correlation with the estimate, so the estimate can be judged against the truth."""
    planted = getattr(getattr(pl_module, "task", None), "planted", None)
    if not planted:
        return {}
    names = [n for n in plan.entries if n in planted]
    rho = spearman([plan.entries[n].erank for n in names], [planted[n]["erank"] for n in names])
    return {"planted_erank": {n: planted[n]["erank"] for n in names}, "spearman_erank_vs_planted": rho}


class GIDWarmup(L.Callback):
    """Build `pl_module.plan` from N warm-up gradients per rank (docs/maths.md §2–§4) and write gid.json / gid.png.

    `batches` is used only when the adapter config has no `gid_batches` (the config value wins). The plan is
    skipped when the adapter needs no GID, when the module already has a plan (e.g. read from a checkpoint),
    when `trainer.ckpt_path` is set (resume), and outside `fit`. Note: during `setup` Lightning exposes only a
    path assigned as `trainer.ckpt_path = ...`; a `fit(ckpt_path=...)` argument is not visible until after
    `configure_model`, so a resuming caller must set `pl_module.plan` (from the checkpoint) before `fit`.
    """

    def __init__(self, batches: int = 8) -> None:
        super().__init__()
        raise_problems(pos_int(batches, "adapter.gid_batches"), "GIDWarmup: ")  # the schema's rule and sentence
        self.batches = batches
        self.seconds: float | None = None
        self._stats: dict[str, Any] | None = None
        self._summary: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or getattr(pl_module, "plan", None) is not None:
            return
        cfg = dict(pl_module.adapter_cfg)
        if not cfg.get("needs_gid", False):
            return
        if trainer.ckpt_path:
            return  # resuming: the module rebuilds the plan stored in the checkpoint
        problems = validate_ralora_cfg(cfg)  # the registry's schema: refused before the warm-up's compute
        if problems:
            raise ValueError("invalid RaLoRA adapter config: " + "; ".join(problems))
        pl_module.plan = self.estimate_plan(trainer, pl_module, cfg)
        if trainer.is_global_zero:
            self._write_and_log(trainer, pl_module, pl_module.plan)

    def results_summary(self) -> dict[str, Any]:
        """What results.json records about the warm-up (cost and sample size)."""
        return {"seconds": self.seconds, **self._summary}

    # --- steps --------------------------------------------------------------------------------
    def _train_loader(self, trainer: L.Trainer) -> Any:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        source = getattr(trainer.fit_loop, "_data_source", None)  # dataloaders passed to fit() directly
        if source is not None and source.is_defined():
            return source.dataloader()
        raise RuntimeError("GIDWarmup needs a training dataloader (a datamodule or train_dataloaders in fit)")

    def estimate_plan(self, trainer: L.Trainer, pl_module: L.LightningModule, cfg: dict[str, Any]) -> AdapterPlan:
        """Run the warm-up on this rank's shard (each target's fp32 sum reduced to one owner rank), build the plan
        and make it identical on every rank. With `model.load_on_rank0` only rank 0 holds the weights, so rank 0
        runs all N x world batches alone while the others wait for its plan."""
        n = int(cfg.get("gid_batches", self.batches))
        rank, world = trainer.global_rank, trainer.world_size
        alone = bool(getattr(pl_module, "load_on_rank0", False)) and world > 1
        plan_dict = None
        if rank == 0 or not alone:
            plan = self._estimate(trainer, pl_module, cfg, *((0, 1, n * world) if alone else (rank, world, n)))
            plan.meta.update(gid_N_per_rank=n, world_size=world, gid_rank0_only=alone)
            plan_dict = plan.to_dict()
        # the statistics are identical on every rank (all-reduced / gathered); broadcasting rank 0's plan also
        # removes any doubt about last-bit differences near a block-count boundary (and makes the timings agree)
        plan = AdapterPlan.from_dict(trainer.strategy.broadcast(plan_dict, src=0))
        summary = ("gid_N_per_rank", "gid_batches_total", "gid_batch_size", "world_size", "gid_rank0_only")
        summary += ("gid_sum_bytes_per_rank", "gid_peak_memory_bytes")
        self._summary = {k: plan.meta.get(k) for k in summary}
        return plan

    def _estimate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, cfg: dict[str, Any], rank: int, world: int, n: int
    ) -> AdapterPlan:
        """The warm-up over batches rank, rank+world, ... (n of them) of the training loader; `world` = 1 means
        this process alone (no collective)."""
        device = trainer.strategy.root_device
        pl_module.to(device)
        backbone = pl_module.backbone
        loader = self._train_loader(trainer)
        seen: dict[str, Any] = {}

        def batches() -> Iterator[Any]:
            for i, batch in enumerate(rank_shard(loader, rank, world, n)):
                # a stop signal ends the warm-up at a batch boundary (nothing to keep: a resume recomputes it);
                # every rank runs the same count of batches here, so the check may be a collective
                if stop_agreed(trainer.strategy if world > 1 else None):
                    raise Interrupted("gid_warmup", i)
                if "batch_size" not in seen:
                    seen["batch_size"] = _batch_size(loader, batch)
                yield move_data_to_device(batch, device)

        info: dict[str, Any] = {}
        cuda = [device.index or 0] if device.type == "cuda" else []
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        # fork the RNG: shuffling and dropout here must not shift the adapter init or the data order of training
        # the training forward's autocast (bf16), except fp16 AMP: without its loss scaler, small gradients
        # would underflow, so the warm-up runs in fp32 there
        fp16_amp = str(trainer.precision).startswith("16")
        ctx = contextlib.nullcontext() if fp16_amp else trainer.precision_plugin.forward_context()
        # train mode (dropout active), as the RaLoRA authors' warm-up; every submodule's mode is restored after
        with torch.random.fork_rng(devices=cuda), ctx, warmup_train_mode(backbone) as mode:
            stats = estimate_gid(
                backbone,
                batches(),
                lambda model, batch: pl_module.training_loss(batch),
                pl_module.targets,
                world_reduce=world > 1,
                info=info,
            )
        self.seconds = time.perf_counter() - t0
        if info.get("batches_total", 0) < n * world:
            rank_zero_warn(
                f"GID warm-up used {info.get('batches_total')} batches in total, fewer than "
                f"adapter.gid_batches x world = {n} x {world}: the training dataloader is shorter"
            )
        plan = self.build_plan(stats, target_shapes(backbone, pl_module.targets), cfg)
        plan.meta.update(
            gid_batches_total=info.get("batches_total"),
            gid_batch_size=seen.get("batch_size"),
            gid_seconds=self.seconds,
            gid_sums_sharded=info.get("sharded"),
            gid_sum_bytes_per_rank=info.get("sum_bytes_per_rank"),
            gid_peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None,
            gid_train_mode=mode["train_mode"],
            gid_dropout_modules_active=mode["dropout_modules_active"],
            gid_dropout_config=mode["dropout_config"],
            gid_precision="32-true" if fp16_amp else str(trainer.precision),
            gid_stats={k: v.to_dict(with_sigma=False) for k, v in stats.items()},
        )
        self._stats = stats
        return plan

    def build_plan(self, stats: dict[str, Any], shapes: dict[str, tuple[int, int]], cfg: dict[str, Any]) -> AdapterPlan:
        """The plan from the all-reduced GID statistics (RaLoRA's rule; subclasses choose another)."""
        return build_ralora_plan(stats, shapes, cfg)

    def _write_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, plan: AdapterPlan) -> None:
        """Rank 0: run_dir/gid.json, gid.png, gid_energy.png, and the plot plus a table to any W&B logger."""
        run_dir = getattr(pl_module, "run_dir", None)
        png = None
        if run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            blob = {
                **plan.to_dict(),
                "N": plan.meta.get("gid_N_per_rank"),
                "batches_total": plan.meta.get("gid_batches_total"),
                "batch_size": plan.meta.get("gid_batch_size"),
                "world_size": plan.meta.get("world_size"),
                "seconds": plan.meta.get("gid_seconds"),
                "train_mode": plan.meta.get("gid_train_mode"),
                "dropout_modules_active": plan.meta.get("gid_dropout_modules_active"),
                "dropout_config": plan.meta.get("gid_dropout_config"),
                **_versus_planted(pl_module, plan),
            }
            write_json_atomic(run_dir / "gid.json", blob)  # never leave a half-written gid.json behind
            try:
                png = plot_gid(plan, run_dir / "gid.png")
                if self._stats:
                    plot_cumulative_energy(self._stats, run_dir / "gid_energy.png")
            except Exception as e:  # a plotting failure must not stop training
                rank_zero_warn(f"GIDWarmup: could not draw gid.png ({type(e).__name__}: {e})")
        self._log_wandb(trainer, plan, png)

    @staticmethod
    def _log_wandb(trainer: L.Trainer, plan: AdapterPlan, png: Path | None) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except Exception:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        columns = ["module", "type", "out", "in", "erank", "importance", "r", "n_blocks", "scale", "notes"]
        data = [
            [
                name,
                name.rsplit(".", 1)[-1],
                e.shape[0],
                e.shape[1],
                e.erank,
                e.importance,
                e.spec.r,
                e.spec.n_blocks,
                e.spec.scale,
                "; ".join(e.notes),
            ]
            for name, e in plan.entries.items()
        ]
        for lg in loggers:
            try:
                lg.log_table("gid/layers", columns=columns, data=data)
                if png is not None:
                    lg.log_image("gid/plan", [str(png)])
            except Exception as e:  # logging is best effort
                rank_zero_warn(f"GIDWarmup: could not log to W&B ({type(e).__name__}: {e})")


class GraLoRAAutoWarmup(GIDWarmup):
    """GID-aligned GraLoRA (`adapter=gralora adapter.k=auto`): the same warm-up, each layer's k from its GID
    (rank.rules.build_gralora_plan); skipped, as GIDWarmup, when a plan exists or the run resumes."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or getattr(pl_module, "plan", None) is not None or trainer.ckpt_path:
            return
        cfg = dict(pl_module.adapter_cfg)
        if cfg.get("kind") != "gralora" or cfg.get("k") != "auto":
            return
        pl_module.plan = self.estimate_plan(trainer, pl_module, cfg)
        if trainer.is_global_zero:
            self._write_and_log(trainer, pl_module, pl_module.plan)

    def build_plan(self, stats: dict[str, Any], shapes: dict[str, tuple[int, int]], cfg: dict[str, Any]) -> AdapterPlan:
        """The k=auto plan: RaLoRA's block-count rule on the grid size."""
        return build_gralora_plan(stats, shapes, cfg)
