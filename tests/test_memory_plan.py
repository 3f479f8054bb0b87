"""The memory model (lightning_ralora/memory_plan.py): counts, sharding, errors, and its peak against the tensor
bytes a real CPU training step allocates (within 15 %)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_ralora.config import ConfigError
from lightning_ralora.memory_plan import plan, sharding
from lightning_ralora.run import compose_config

# the default tiny Llama scaled up so weights and activations are both measurable
TINY = [
    "debug=fast",
    "model.config.hidden_size=256",
    "model.config.intermediate_size=512",
    "model.config.num_hidden_layers=4",
]


class StorageBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storages: every op's outputs are counted once per storage and released when
    the storage is freed (a weakref finalizer), so the peak is tensor memory, not the process's RSS."""

    def __init__(self, tensors=()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        for t in tensors:
            self.add(t)

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self.add(t)
        return out


def measured_peak(overrides: list[str]) -> int:
    """Peak tensor bytes of one training step (forward, backward, AdamW step, zero_grad) of the real module."""
    from lightning_ralora.modules.adapter_module import optimizer_groups
    from lightning_ralora.run import build_module

    torch.manual_seed(0)
    module = build_module(compose_config(overrides, run_dir="/tmp/unused"))
    module.configure_model()
    batch = next(iter(module.task.datamodule().train_dataloader()))
    with torch.no_grad():
        module.training_loss(batch)  # builds the task's teacher (not part of the model's memory)
    opt = torch.optim.AdamW(optimizer_groups(module.backbone, 1e-3))
    with StorageBytes([*module.backbone.parameters(), *module.backbone.buffers(), batch]) as meter:
        module.training_loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return meter.peak


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_peak_matches_a_measured_cpu_step(adapter: str) -> None:
    overrides = [*TINY, f"adapter={adapter}"]
    predicted = plan(compose_config(overrides, run_dir="/tmp/unused"))["peak"]
    measured = measured_peak(overrides)
    assert abs(predicted - measured) / measured < 0.15, (adapter, predicted, measured)
