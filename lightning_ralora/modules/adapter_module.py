"""One LightningModule for every variant: builds the backbone, applies the adapter plan, trains any task."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lightning_ralora.adapters.attach import attachment, attachments
from lightning_ralora.adapters.inject import adapter_layers
from lightning_ralora.adapters.plan import AdapterPlan, uniform_plan
from lightning_ralora.adapters.registry import adapter_config
from lightning_ralora.core.io import write_json_atomic
from lightning_ralora.core.secrets import redact
from lightning_ralora.modules.backbone import (
    adapter_sites,
    block_module_names,
    env_global_rank,
    host_bytes,
    load_backbone,
    load_backbone_rank0,
)
from lightning_ralora.modules.distributed import FSDP2Strategy, enable_activation_checkpointing
from lightning_ralora.tasks import TASKS

PLAN_KEY = "adapter_plan"


def lora_plus_b_params(model: nn.Module) -> list[nn.Parameter]:
    """The B-side factors of every adapter in `model`, as each attachment finds them (ours: `AdapterLayer.b_side`;
    peft: its `lora_B`)."""
    found = {id(p): p for attach in attachments() for p in attach.b_side_parameters(model)}
    return list(found.values())


def optimizer_groups(model: nn.Module, lr: float, lr_ratio_B: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: everything at `lr`, and with LoRA+ (`lr_ratio_B` != 1)
    the B-side factors the variants declare at `lr_ratio_B`·lr."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lr_ratio_B == 1.0:
        return [{"params": trainable, "lr": lr}]
    b_ids = {id(p) for p in lora_plus_b_params(model) if p.requires_grad}
    if not b_ids:
        raise ValueError(
            f"adapter.lr_ratio_B={lr_ratio_B} (LoRA+) but no adapter in the model declares B-side factors; "
            "set adapter.lr_ratio_B=1.0"
        )
    return [
        {"params": [p for p in trainable if id(p) not in b_ids], "lr": lr},
        {"params": [p for p in trainable if id(p) in b_ids], "lr": lr * lr_ratio_B},
    ]


def checkpoint_metadata_file(ckpt_path: str | Path) -> Path:
    """The file holding a checkpoint's non-tensor state: the file itself, or `<dir>/meta.pt` of a distributed
    (FSDP2, sharded) checkpoint directory, which Lightning's ModelParallelStrategy writes beside the shards."""
    path = Path(ckpt_path)
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        path = path / _METADATA_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory without {_METADATA_FILENAME}")
    return path


def read_plan(ckpt_path: str | Path) -> AdapterPlan | None:
    """The adapter plan stored in a Lightning checkpoint, single-file or sharded directory (None if it has none)."""
    ckpt = torch.load(checkpoint_metadata_file(ckpt_path), map_location="cpu", weights_only=True, mmap=True)
    return AdapterPlan.from_dict(ckpt[PLAN_KEY]) if ckpt.get(PLAN_KEY) else None


def _batch_size(batch: Any) -> int:
    """Examples in a batch of any task (token ids, pixel values, a plain tensor), as Lightning counts them."""
    from lightning.pytorch.utilities.data import extract_batch_size

    return extract_batch_size(batch)


class AdapterModule(L.LightningModule):
    """Backbone + adapter + task. Adapters are injected in `configure_model`, i.e. after callbacks' `setup`
    (where the GID warm-up builds the plan) and before DDP/FSDP wrapping."""

    def __init__(
        self,
        model_cfg: Mapping[str, Any],
        task_cfg: Mapping[str, Any],
        adapter_cfg: Mapping[str, Any],
        optim_cfg: Mapping[str, Any],
        seed: int = 0,
        run_dir: str | None = None,
        plan: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        hparams = {"model_cfg": model_cfg, "task_cfg": task_cfg, "adapter_cfg": adapter_cfg, "optim_cfg": optim_cfg}
        # in every checkpoint (secrets redacted); not to the loggers: W&B gets the resolved config once (run/build.py)
        self.save_hyperparameters(redact({**hparams, "seed": seed}), logger=False)
        self.model_cfg, self.adapter_cfg, self.optim_cfg = dict(model_cfg), dict(adapter_cfg), dict(optim_cfg)
        self.run_dir = Path(run_dir) if run_dir else None
        self.task = TASKS[task_cfg["name"]](task_cfg, model_cfg, seed)
        # from_pretrained returns an eval-mode model: train in train mode (dropout on); validation switches to eval
        # model.load_on_rank0 (FSDP2): only rank 0 reads the pretrained weights, the others build a meta skeleton
        # (a GID warm-up then runs on rank 0 alone, callbacks/gid_warmup.py)
        self.load_on_rank0 = bool(self.model_cfg.get("load_on_rank0")) and bool(self.model_cfg.get("pretrained"))
        load = load_backbone_rank0 if self.load_on_rank0 else load_backbone
        self.backbone, fresh = load(self.model_cfg, self.task.extra_model_config())
        self.loaded_bytes = host_bytes(self.backbone)  # bytes of pretrained/initial weights this rank holds
        self.backbone.train()
        self.task.prepare(self.backbone)
        if fresh:
            rank_zero_warn(
                f"model.pretrained={self.model_cfg['pretrained']!r} lacks {fresh}: initialised fresh, so they train "
                "in full beside the adapters and are saved in every checkpoint"
            )
        sites = adapter_sites(self.backbone, self.model_cfg, self.adapter_cfg, self.task.head_modules, fresh)
        self.full_modules, self.targets = sites.full, list(sites.targets)
        self.plan: AdapterPlan | None = AdapterPlan.from_dict(plan) if plan else None
        self.adapted = False
        self.sharded = False  # set by `_shard` (FSDP2): parameters are DTensor shards from then on
        self.metrics = self.task.metrics()
        self.val_loss = MeanMetric()  # exact mean over the whole validation set, synced across ranks
        self.val_loss0: float | None = None
        self.strict_loading = False  # checkpoints of pretrained backbones hold only the trainable state

    # --- structure ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.adapter_cfg["kind"]

    def configure_model(self) -> None:
        """Apply the adapter once, as its variant attaches (adapters/attach.py): our layers from the plan (GID
        callback, checkpoint or the uniform config), peft's wrapper, or every weight trainable."""
        if self.adapted:
            return
        attach = attachment(self.kind)
        if attach.uses_plan and self.plan is None:
            self.plan = self._plan()
        self.backbone = attach.attach(self.backbone, self.targets, self.full_modules, self.adapter_cfg, self.plan)
        self.adapted = True
        mesh = getattr(self, "device_mesh", None)
        if self.load_on_rank0 and mesh is None:
            raise ValueError("model.load_on_rank0=true needs a sharded strategy (trainer=fsdp2 or trainer=hsdp)")
        full = self.backbone.state_dict() if self.load_on_rank0 and env_global_rank() == 0 else {}
        if mesh is not None:  # FSDP2 through Lightning's ModelParallelStrategy
            self._shard(mesh)
        if self.load_on_rank0:
            self._broadcast_from_rank0(full)

    def _broadcast_from_rank0(self, full: dict[str, torch.Tensor]) -> None:
        """After fully_shard: the other ranks allocate their shards and receive rank 0's weights (adapters and
        buffers included), so no rank but 0 ever holds the full pretrained state dict."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if dist.get_rank() != 0:
            self.backbone.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.backbone, full, options=options)
        for buf in self.backbone.buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
            dist.broadcast(buf, src=0)

    def _plan(self) -> AdapterPlan:
        """The plan stored in the checkpoint being resumed, else the uniform plan of the config (a variant whose
        plan comes from its callback, e.g. the GID warm-up, has none here: an error)."""
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
        plan = read_plan(ckpt_path) if ckpt_path else None
        if plan is not None:
            return plan
        schema = adapter_config(self.adapter_cfg)
        if schema.needs_plan:
            needed = ", ".join(c.target for c in schema.callbacks()) or "a plan-building callback"
            raise RuntimeError(
                f"adapter={self.adapter_cfg['name']} needs a plan from its callback ({needed}) "
                "or a checkpoint; none was given"
            )
        return uniform_plan(self.backbone, self.targets, schema.to_spec(), self.adapter_cfg["name"])

    def _shard(self, mesh) -> None:
        """fully_shard each block (`block_module_names`), then the root, on the strategy's mesh and options
        (FSDP2Strategy: HSDP mesh, mixed precision, activation checkpointing; plain ModelParallelStrategy: dp)."""
        from torch.distributed.fsdp import fully_shard

        strategy = self._trainer.strategy if self._trainer is not None else None
        kwargs: dict[str, Any] = {}
        if isinstance(strategy, FSDP2Strategy):
            dp, kwargs = strategy.shard_mesh(), strategy.fully_shard_kwargs()
            if strategy.activation_checkpointing:
                enable_activation_checkpointing(self.backbone)
        else:
            dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        names = block_module_names(self.backbone)
        blocks = [m for m in self.backbone.modules() if type(m).__name__ in names]
        if not blocks:
            rank_zero_warn(f"FSDP2: no block of {type(self.backbone).__name__} found; sharding only the root")
        for block in blocks:
            fully_shard(block, mesh=dp, **kwargs)
        fully_shard(self.backbone, mesh=dp, **kwargs)
        self.sharded = True

    def adapter_layers(self):
        return adapter_layers(self.backbone)

    def param_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        return {"trainable_params": trainable, "total_params": sum(p.numel() for p in self.backbone.parameters())}

    def structure(self) -> dict[str, Any]:
        """Adapter structure summary for results.json."""
        out: dict[str, Any] = {"variant": self.adapter_cfg["name"], "kind": self.kind, **self.param_counts()}
        if self.plan is not None:
            out["plan_meta"] = self.plan.meta
        out["layers"] = {name: layer.summary() for name, layer in self.adapter_layers().items()}
        return out

    # --- training -----------------------------------------------------------------------------
    def training_loss(self, batch: Any) -> torch.Tensor:
        """The task loss of the backbone on one batch (also used by the GID warm-up before adapters exist)."""
        return self.task.loss(self.backbone, batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self.training_loss(batch)
        self.val_loss.update(loss.detach(), weight=_batch_size(batch))
        if self.metrics is not None:
            self.task.update_metrics(self.metrics, self.backbone, batch)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", val_loss, prog_bar=True)
        if self.metrics is not None:
            self.log_dict({f"val/{k}": v for k, v in self.metrics.compute().items()})
            self.metrics.reset()
        if self.task.reports_gap and self.val_loss0:
            self.log("val/gap_closed", 1.0 - val_loss / self.val_loss0, prog_bar=True)

    # --- evaluation: Lightning's test stage (evaluation/runner.py `run_test_stage`) --------------------------
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the test loader is one dummy batch per rank; generation runs at epoch end."""

    def on_test_epoch_end(self) -> None:
        """Every rank runs the runner's `eval_hook` (its shard of the suites) inside the strategy's process group."""
        hook = getattr(self, "eval_hook", None)
        if hook is not None:
            hook(self)

    def _write_loaded_bytes(self) -> None:
        """<run_dir>/load_bytes.json: bytes of backbone weights each rank held after loading (a collective)."""
        import torch.distributed as dist

        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, self.loaded_bytes)
        if dist.get_rank() == 0:
            blob = {"loaded_bytes_per_rank": per_rank, "load_on_rank0": self.load_on_rank0}
            write_json_atomic(self.run_dir / "load_bytes.json", blob)

    @torch.no_grad()
    def _mean_val_loss(self) -> float:
        total, count = 0.0, 0
        for batch in self.trainer.datamodule.val_dataloader():
            batch = L.pytorch.utilities.move_data_to_device(batch, self.device)
            n = _batch_size(batch)
            total += float(self.training_loss(batch)) * n
            count += n
        return total / max(1, count)

    def on_fit_start(self) -> None:
        if self.sharded and self.run_dir is not None:  # FSDP2: what each rank materialised when loading
            self._write_loaded_bytes()
        if self.task.reports_gap and self.val_loss0 is None:
            was_training = self.backbone.training
            self.backbone.eval()
            self.val_loss0 = self._mean_val_loss()
            self.backbone.train(was_training)
        counts = self.param_counts()
        for logger in self.loggers:
            logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)

    def configure_optimizers(self):
        """The optimizer of `optim` (its `_target_`, called with the `optimizer_groups`, LoRA+ included; AdamW
        with no weight decay when there is none) and the per-step schedule of `optim.scheduler` (cosine to
        `min_lr_ratio`·lr when there is none), warming up `warmup_steps`, else `warmup_ratio` x the total steps."""
        from hydra.utils import instantiate

        cfg = dict(self.optim_cfg)
        schedule = {k: cfg.pop(k, None) for k in ("scheduler", "warmup_steps", "warmup_ratio", "min_lr_ratio")}
        if "_target_" not in cfg:  # a hand-made dict or a checkpoint from before the `_target_` yamls
            cfg = {"_target_": "torch.optim.AdamW", "weight_decay": 0.0, **cfg}
        groups = optimizer_groups(self.backbone, cfg["lr"], float(self.adapter_cfg.get("lr_ratio_B", 1.0)))
        opt = instantiate({**cfg, "_partial_": True}, _convert_="all")(groups)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(schedule["warmup_steps"] or round((schedule["warmup_ratio"] or 0.0) * total))
        if schedule["scheduler"]:
            factory = instantiate({**schedule["scheduler"], "_partial_": True}, _convert_="all")
            sched = factory(opt, num_warmup_steps=warmup, num_training_steps=total)
        else:
            sched = get_cosine_with_min_lr_schedule_with_warmup(
                opt, warmup, total, min_lr_rate=schedule["min_lr_ratio"] or 0.0
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints and export ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PLAN_KEY] = self.plan.to_dict() if self.plan is not None else None
        checkpoint["val_loss0"] = self.val_loss0
        # the base comes from the hub: keep the rest (all of it when every backbone weight trains)
        if self.model_cfg.get("pretrained") and not attachment(self.kind).trains_backbone:
            keep = {f"backbone.{n}" for n, p in self.backbone.named_parameters() if p.requires_grad}
            for name, layer in self.adapter_layers().items():  # adapter buffers too (SDS's Q's and phase)
                keep |= {f"backbone.{name}.{k}" for k in layer.state_dict() if not k.startswith("base.")}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_loss0 = checkpoint.get("val_loss0")
        if self.plan is None and checkpoint.get(PLAN_KEY):
            self.plan = AdapterPlan.from_dict(checkpoint[PLAN_KEY])

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path, **kwargs: Any) -> AdapterModule:
        """Rebuild the module with the adapter structure stored in the checkpoint, then load its weights."""
        plan = read_plan(ckpt_path)
        return cls.load_from_checkpoint(ckpt_path, plan=plan.to_dict() if plan else None, weights_only=True, **kwargs)

    def unsharded_backbone(self) -> nn.Module:
        """A plain CPU copy of the FSDP2-sharded backbone, adapters included: the same structure rebuilt on the
        meta device, filled from the gathered full state dict (a collective: call it on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model, _ = load_backbone(self.model_cfg, self.task.extra_model_config(), meta=True)
        # the adapted structure before the gather, so a variant that cannot be unsharded stops before a collective
        attachment(self.kind).rebuild(model, self.targets, self.adapter_cfg, self.plan)
        state = get_model_state_dict(self.backbone, options=StateDictOptions(full_state_dict=True))
        model.to_empty(device="cpu")
        model.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, assign=True)
        for name, buf in self.backbone.named_buffers():  # non-persistent buffers (rotary inv_freq) too
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.detach().cpu().clone()
        return model.train(self.backbone.training)

    def merged_backbone(self) -> nn.Module:
        """A plain transformers model with every adapter folded into its weights (under FSDP2 a collective)."""
        model = self.unsharded_backbone() if self.sharded else copy.deepcopy(self.backbone)
        return attachment(self.kind).merge(model)

    def export(self, path: str | Path) -> Path:
        """Write the merged model with `save_pretrained` (loadable by `AutoModel*.from_pretrained`); rank 0 writes,
        and under FSDP2 every rank must call it (the merge gathers the shards)."""
        path = Path(path)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank != 0 and not self.sharded:  # under FSDP2 every rank joins the gather; only rank 0 writes
            return path
        merged = self.merged_backbone()
        if rank != 0:
            return path
        merged.save_pretrained(path)
        for preprocessor in (getattr(self.task, "tokenizer", None), getattr(self.task, "processor", None)):
            if preprocessor is not None:  # the tokenizer, or an image task's processor
                preprocessor.save_pretrained(path)
        return path
