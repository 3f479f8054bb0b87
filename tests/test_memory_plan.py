"""The memory model (reporting/memory_plan.py): counts, sharding, errors, and its peak against the tensor
bytes a real CPU training step allocates (within 15 %)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_ralora.cli.plan_memory import main as plan_memory_main
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.reporting.memory_plan import estimate_memory, sharding
from lightning_ralora.run.compose import compose_config

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
        self.add_all(tensors)

    def add_all(self, tensors) -> None:
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
    from lightning_ralora.run.build import build_module

    torch.manual_seed(0)
    module = build_module(compose_config(overrides, run_dir="/tmp/unused"))
    module.configure_model()
    batch = next(iter(module.task.datamodule().train_dataloader()))
    with torch.no_grad():
        module.training_loss(batch)  # builds the task's teacher (not part of the model's memory)
    opt = torch.optim.AdamW(optimizer_groups(module.backbone, 1e-3))
    teacher = [*module.task.teacher.parameters(), *module.task.teacher.buffers()]
    with StorageBytes([*module.backbone.parameters(), *module.backbone.buffers(), batch]) as meter:
        held = meter.now
        meter.add_all(teacher)
        teacher_bytes = meter.now - held  # task=planted's teacher: constant, not part of the run's model memory
        module.training_loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return meter.peak - teacher_bytes


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_peak_matches_a_measured_cpu_step(adapter: str) -> None:
    overrides = [*TINY, f"adapter={adapter}"]
    predicted = estimate_memory(compose_config(overrides, run_dir="/tmp/unused"))["peak"]
    measured = measured_peak(overrides)
    assert abs(predicted - measured) / measured < 0.15, (adapter, predicted, measured)


def test_llama3_8b_offline_counts_and_sharding() -> None:
    """The shipped 8B config plans offline (ARCH table): LoRA r=8 on the 7 projections has 20,971,520 parameters;
    FSDP2 on 2 x 8 GPUs shards over 16, HSDP over one node's 8, DDP replicates."""
    base = ["experiment=sds_math_llama", "trainer=fsdp2", "trainer.devices=8", "trainer.num_nodes=2"]
    lora = estimate_memory(compose_config([*base, "adapter=lora"], run_dir="/tmp/unused"))
    assert lora["params"]["adapter"] == 20_971_520 and lora["params"]["total"] == 8_030_261_248
    assert lora["sharding"]["shard"] == 16
    assert lora["bytes"]["frozen_weights"] == pytest.approx(8_030_261_248 * 2 / 16)
    full = estimate_memory(compose_config([*base, "adapter=full"], run_dir="/tmp/unused"))
    assert full["bytes"]["optimizer_state"] == pytest.approx(2 * 8_030_261_248 * 2 / 16)
    assert (
        sharding({"devices": 8, "num_nodes": 2, "strategy": {"_target_": "x.FSDP2Strategy", "hsdp": True}})["shard"]
        == 8
    )
    assert sharding({"devices": 8, "num_nodes": 2, "strategy": "ddp"})["shard"] == 1


def test_gid_warmup_shards_its_fp32_sums_over_the_ranks() -> None:
    """One device holds every target's fp32 sum (26 GiB for LLaMA3-8B) beside the full model; 2 x 8 ranks hold
    each about 1/16 of them (at most one target more, the owner balance); load_on_rank0 puts them all on rank 0."""
    base = ["experiment=sds_math_llama", "adapter=ralora"]
    one = estimate_memory(compose_config(base, run_dir="/tmp/unused"))
    sums = one["params"]["targets"] * 4
    assert sums / 2**30 == pytest.approx(26.0, abs=0.1)
    assert one["gid_warmup"] > sums + one["params"]["total"] * 2
    many = [*base, "trainer=fsdp2", "trainer.devices=8", "trainer.num_nodes=2"]
    sixteen = estimate_memory(compose_config(many, run_dir="/tmp/unused"))
    owned = sums - (one["gid_warmup"] - sixteen["gid_warmup"])  # the busiest rank's sums
    largest = 4096 * 14336 * 4  # gate/up_proj's fp32 sum
    assert sums / 16 <= owned <= sums / 16 + largest
    rank0 = estimate_memory(compose_config([*many, "+model.load_on_rank0=true"], run_dir="/tmp/unused"))
    assert rank0["gid_warmup"] == one["gid_warmup"]


@pytest.mark.parametrize(
    ("override", "field"),
    [("trainer.devices=auto", "trainer.devices"), ("model.pretrained=nobody/nothing", "model.pretrained")],
)
def test_bad_input_names_the_field(override: str, field: str) -> None:
    cfg = compose_config(["experiment=sds_math_llama", override], run_dir="/tmp/unused")
    with pytest.raises(ConfigError, match=field):
        estimate_memory(cfg)


def test_cli_writes_json(tmp_path, monkeypatch, capsys) -> None:
    import json
    import sys

    monkeypatch.setattr(sys, "argv", ["lightning-ralora-plan-memory", f"hydra.run.dir={tmp_path}", "--json"])
    plan_memory_main()
    written = json.loads((tmp_path / "plan_memory.json").read_text())
    assert json.loads(capsys.readouterr().out)["peak"] == written["peak"] > 0


def test_gid_warmup_prediction_matches_a_measured_cpu_warmup() -> None:
    """The plan's GID warm-up bytes (one process: full model, every fp32 sum, one batch) within 15 % of the tensor
    bytes estimate_gid allocates at its peak on the tiny Llama."""
    from lightning_ralora.rank.estimate import estimate_gid
    from lightning_ralora.run.build import build_module

    overrides = [*TINY, "adapter=ralora"]
    predicted = estimate_memory(compose_config(overrides, run_dir="/tmp/unused"))["gid_warmup"]
    torch.manual_seed(0)
    module = build_module(compose_config(overrides, run_dir="/tmp/unused"))
    batch = next(iter(module.task.datamodule().train_dataloader()))
    with torch.no_grad():
        module.training_loss(batch)  # builds the task's teacher (not part of the model's memory)
    teacher = [*module.task.teacher.parameters(), *module.task.teacher.buffers()]
    with StorageBytes([*module.backbone.parameters(), *module.backbone.buffers(), batch]) as meter:
        held = meter.now
        meter.add_all(teacher)
        teacher_bytes = meter.now - held
        estimate_gid(module.backbone, [batch], lambda m, b: module.training_loss(b), module.targets)
    measured = meter.peak - teacher_bytes
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)
