"""FSDP2 for many nodes: Lightning's ModelParallelStrategy with the data-parallel size taken from the world size,
plus the sharding options `AdapterModule._shard` applies (HSDP mesh, mixed precision, activation checkpointing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_ralora.core.io import save_staged

MIXED_PRECISION = (None, "bfloat16", "float16", "float32")


def _dtype_problem(field: str, value: Any) -> list[str]:
    return [] if value in MIXED_PRECISION else [f"{field} must be one of {MIXED_PRECISION}, got {value!r}"]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (fully_shard) over every rank: data_parallel_size = world size / tensor_parallel_size (nodes x devices),
    not a per-node count. `hsdp`: shard within groups of `shard_size` ranks (default: the devices of one node) and
    replicate across them (a 2-D mesh). `param_dtype`/`reduce_dtype`: FSDP2's MixedPrecisionPolicy (e.g. bf16
    parameters, fp32 gradient reduction). `activation_checkpointing`: recompute each block in backward."""

    def __init__(
        self,
        hsdp: bool = False,
        shard_size: int | None = None,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        kwargs.setdefault("data_parallel_size", "auto")
        super().__init__(**kwargs)
        problems = _dtype_problem("strategy.param_dtype", param_dtype) + _dtype_problem(
            "strategy.reduce_dtype", reduce_dtype
        )
        if shard_size is not None and (
            isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1
        ):
            problems.append(f"strategy.shard_size must be a positive integer or null, got {shard_size!r}")
        if problems:
            raise ValueError("FSDP2Strategy: " + "; ".join(problems))
        self.hsdp, self.shard_size = bool(hsdp), shard_size
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.activation_checkpointing = bool(activation_checkpointing)
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        """ "auto" data-parallel size: every rank of every node (ModelParallelStrategy's "auto" is num_nodes)."""
        if self._data_parallel_size == "auto":
            tp = 1 if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
            self._data_parallel_size = self.num_nodes * self.num_processes // tp
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is written whole beside its name and renamed in once every rank has finished, so a
        kill mid-save (SLURM's time-out, a preemption) leaves the previous one intact. (Lightning writes the shards
        into the existing directory, so a kill there leaves old metadata over a mix of old and new shards.)"""
        if not self._save_distributed_checkpoint or storage_options is not None or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        write_shards = super().save_checkpoint
        path = Path(self.broadcast(str(filepath)))
        save_staged(path, lambda staged: write_shards(checkpoint, staged), self.barrier, self.is_global_zero)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """With strict_loading off, a sharded checkpoint holding part of the model (adapter-only, of a pretrained
        backbone) loads the tensors it has and the optimizers; the rest stays as built (the frozen base: hub)."""
        import torch.distributed.checkpoint as dcp
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if self.lightning_module.strict_loading or not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in stored}
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        self.model.load_state_dict(model_state, strict=False)
        for idx, optimizer in enumerate(self.optimizers):  # as Lightning: each optimizer's state, then set
            optim_state = {f"optimizer_{idx}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            options = StateDictOptions(cpu_offload=True)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optim_state[f"optimizer_{idx}"], options=options
            )
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    def shard_mesh(self):
        """The mesh fully_shard gets: the data-parallel mesh, or with `hsdp` a 2-D (replicate, shard) mesh."""
        dp = self.device_mesh["data_parallel"]
        if not self.hsdp:
            return dp
        from torch.distributed.device_mesh import init_device_mesh

        shard = self.shard_size or self.num_processes
        if dp.size() % shard:
            raise ValueError(f"strategy.shard_size={shard} does not divide the data-parallel size {dp.size()}")
        return init_device_mesh(
            self.root_device.type, (dp.size() // shard, shard), mesh_dim_names=("replicate", "shard")
        )

    def fully_shard_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every fully_shard call (mixed precision, resharding)."""
        out: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward}
        if self.param_dtype or self.reduce_dtype:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            out["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=getattr(torch, self.param_dtype) if self.param_dtype else None,
                reduce_dtype=getattr(torch, self.reduce_dtype) if self.reduce_dtype else None,
            )
        return out


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward (transformers' non-reentrant gradient checkpointing)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"strategy.activation_checkpointing=true but {type(model).__name__} does not support gradient checkpointing"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
