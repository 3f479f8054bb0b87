"""GID-aligned GraLoRA (`adapter=gralora_auto`, i.e. `adapter=gralora adapter.k=auto`): the rule
against a brute-force search, a valid plan on every shipped model config, and an exact resume from the stored plan."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_ralora.adapters import adapter_layers
from lightning_ralora.adapters.gralora import GraLoRAConfig
from lightning_ralora.adapters.inject import find_targets, inject
from lightning_ralora.modules.backbone import build_backbone
from lightning_ralora.rank.estimate import GIDStat
from lightning_ralora.rank.rules import build_gralora_plan, grid_for
from lightning_ralora.run.compose import CONF_DIR
from tests.conftest import make_cfg
from tests.test_exact_resume import MID_EPOCH_RUN, _adapter_state, _run

MODELS = sorted(OmegaConf.load(Path(CONF_DIR) / "debug" / "rehearsal.yaml").rehearsal.models)


def _reference_k(erank: float, r: int, m: int, n: int, k_max: int, r_min: int) -> int:
    """The largest power of two k <= k_max with k·r <= erank (or k = 1) that divides r, m, n with r/k >= r_min."""
    ok = [
        k
        for k in (2**i for i in range(int(math.log2(k_max)) + 1))
        if (k == 1 or k * r <= erank + 1e-9) and not (r % k or m % k or n % k) and r // k >= r_min
    ]
    return max(ok)


@pytest.mark.parametrize("erank", [0.0, 3.0, 8.0, 15.9, 16.0, 40.0, 64.0, 500.0])
@pytest.mark.parametrize(("r", "m", "n"), [(8, 64, 64), (8, 32, 64), (4, 48, 96), (16, 4096, 14336), (6, 64, 64)])
@pytest.mark.parametrize(("k_max", "r_min"), [(8, 1), (8, 2), (4, 1), (2, 4)])
def test_grid_rule_matches_a_brute_force_search(erank: float, r: int, m: int, n: int, k_max: int, r_min: int) -> None:
    k, note = grid_for(erank, r, m, n, k_max, r_min)
    assert k == _reference_k(erank, r, m, n, k_max, r_min)
    unconstrained = min(k_max, max(1, 2 ** math.floor(math.log2(max(erank, 1e-9) / r) + 1e-9)))
    assert (note is None) == (k == unconstrained)


def test_k_auto_config_needs_the_warmup_plan() -> None:
    cfg = GraLoRAConfig(name="gralora_auto", r=8, k="auto", k_max=8, block_r_min=2)
    assert cfg.validate() == [] and cfg.needs_plan and cfg.shape_problems(30, 64) == []
    assert [c.target for c in cfg.callbacks()] == ["lightning_ralora.callbacks.gid_warmup:GraLoRAAutoWarmup"]
    with pytest.raises(ValueError, match="no uniform spec"):
        cfg.to_spec()
    bad = GraLoRAConfig(r=8, k="auto", k_max=6, block_r_min=0).validate()
    assert any("adapter.k_max" in p for p in bad) and any("adapter.block_r_min" in p for p in bad)
    assert not GraLoRAConfig(r=8, k=2).needs_plan and GraLoRAConfig(r=8, k=2).callbacks() == []


@pytest.mark.parametrize("model", MODELS)
def test_k_auto_builds_a_valid_plan_on_every_shipped_model_config(tmp_path: Path, model: str) -> None:
    """Every target of the model's tiny rehearsal config gets a k by the rule, the layers build from the plan, and
    each keeps LoRA's parameter count r(m + n)."""
    cfg = make_cfg(tmp_path, ["debug=rehearsal", f"model={model}", "adapter=gralora_auto", "adapter.r=8"], fast=False)
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True))
    targets = find_targets(backbone, cfg.adapter.target_modules or cfg.model.target_modules)
    shapes = {t: (backbone.get_submodule(t).out_features, backbone.get_submodule(t).in_features) for t in targets}
    eranks = [1.0, 9.0, 17.0, 33.0, 70.0]  # k = 1, 1, 2, 4, 8 before the shape constraints
    stats = {
        t: GIDStat(erank=eranks[i % 5], importance=1.0, sigma=torch.ones(1), grad_norm=1.0)
        for i, t in enumerate(targets)
    }
    adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
    plan = build_gralora_plan(stats, shapes, adapter)
    for t, (m, n) in shapes.items():
        assert plan.entries[t].spec.k == _reference_k(stats[t].erank, 8, m, n, 8, adapter["block_r_min"]), t
    assert {e.spec.k for e in plan.entries.values()} - {1}  # some layer gets a grid on every model
    inject(backbone, targets, plan.specs())
    for name, layer in adapter_layers(backbone).items():
        assert layer.k == plan.entries[name].spec.k
        assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 8 * sum(shapes[name])


def test_k_auto_is_resumed_exactly_from_its_checkpointed_plan(tmp_path: Path) -> None:
    """A run interrupted mid-epoch and resumed rebuilds the stored plan (no second warm-up) and ends with the
    uninterrupted run's plan and weights."""
    common = [
        "adapter=gralora_auto",
        "adapter.r=8",
        "adapter.block_r_min=1",
        "adapter.gid_batches=2",
        "task.loss=layer",
        *MID_EPOCH_RUN,
    ]
    full = _run(tmp_path / "full", common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "resumed", common, crash_at=7)
    resumed = _run(tmp_path / "resumed", [*common, "ckpt_path=last", "resume.allow_changes=[callbacks.crash]"])
    assert {e["spec"]["k"] for e in full["plan"]["entries"].values()} - {1}  # the planted eranks give grids
    assert resumed["plan"]["entries"] == full["plan"]["entries"]
    meta = [{k: v for k, v in r["plan"]["meta"].items() if k != "gid_seconds"} for r in (full, resumed)]
    assert meta[0] == meta[1] and meta[0]["rule"] == "gralora_auto"
    a, b = _adapter_state(tmp_path / "full"), _adapter_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and any("gralora_A" in k for k in a)
    for k in a:
        assert torch.equal(b[k], a[k]), k
