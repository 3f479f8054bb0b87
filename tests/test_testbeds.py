"""Claims test beds: planted profiles, ceilings against brute-force fits of the real adapter layers, the
layer-local loss against its closed-form gradient, GID accuracy, and the RaLoRA claim and its control."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ralora.adapters import LayerSpec
from lightning_ralora.adapters.registry import get_variant
from lightning_ralora.modules.adapter_module import AdapterModule
from lightning_ralora.reporting.gid_profile import profile_gid
from lightning_ralora.reporting.tables.aggregate import aggregate, columns, rows
from lightning_ralora.reporting.tables.model import Run
from lightning_ralora.reporting.tables.render import Table
from lightning_ralora.reporting.tables.spec import TABLES
from lightning_ralora.run.job import train
from lightning_ralora.run.record import RunRecord
from lightning_ralora.tasks.planted import PlantedTask
from lightning_ralora.tasks.planted_profiles import best_size, ceiling, planted_update
from tests.conftest import make_cfg


def _update(profile: str, seed: int = 0, d: int = 64) -> torch.Tensor:
    return planted_update(d, d, profile, torch.Generator().manual_seed(seed))


def test_representable_shares_match_the_issue_at_d64_r8() -> None:
    """decay: LoRA keeps (1 − e^{−2})/(1 − e^{−16}) exactly; n = 2 blocks about 0.454. flat: LoRA r/d exactly,
    blocks 0.239 / 0.216 / 0.130 at n = 2, 4, 8 (random draws: within 0.03)."""
    decay, flat = _update("decay"), _update("flat")
    assert ceiling(decay, "lora", 8) == pytest.approx((1 - math.exp(-2)) / (1 - math.exp(-16)), abs=1e-6)
    assert ceiling(decay, "lora", 8) == pytest.approx(0.865, abs=1e-3)
    assert ceiling(decay, "blocks2", 8) == pytest.approx(0.454, abs=0.03)
    assert ceiling(flat, "lora", 8) == pytest.approx(0.125, abs=1e-6)
    for n, share in ((2, 0.239), (4, 0.216), (8, 0.130)):
        assert ceiling(flat, f"blocks{n}", 8) == pytest.approx(share, abs=0.03)
    block = _update("block")  # 8 blocks of rank 4 (total 4r): 4 blocks of rank r represent it, 2 half, LoRA a quarter
    assert [ceiling(block, s, 8) for s in ("blocks4", "blocks2", "lora")] == pytest.approx([1.0, 0.5, 0.25])
    assert ceiling(_update("low"), "lora", 8) == pytest.approx(1.0)
    assert ceiling(_update("skewed"), "lora", 8) == pytest.approx(1.0)


def _fit(kind: str, delta: torch.Tensor, lf: torch.Tensor, steps: int = 1500, **spec: int) -> float:
    """Brute force: Adam on a real adapter layer's factors, minimising ‖(ΔW* − ΔW) L‖²; the share reached."""
    torch.manual_seed(0)
    base = nn.Linear(delta.shape[1], delta.shape[0], bias=False).double()
    layer = get_variant(kind).layer.from_spec(base, LayerSpec(kind=kind, alpha=1.0, **spec)).double()
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:  # B = 0 at init: start every factor small and random so no block is stuck
        nn.init.normal_(p, std=0.1)
    opt = torch.optim.Adam(params, lr=0.02)
    target = (delta @ lf).norm() ** 2
    for _ in range(steps):
        opt.zero_grad()
        loss = ((delta - layer.delta_weight()) @ lf).norm() ** 2 / target
        loss.backward()
        opt.step()
    return 1.0 - float(loss.detach())


@pytest.mark.parametrize(
    ("structure", "kind", "spec"),
    [
        ("lora", "lora", {"r": 2}),
        ("blocks2", "ralora", {"r": 2, "n_blocks": 2}),
        ("grid2", "gralora", {"r": 2, "k": 2}),
    ],
)
@pytest.mark.parametrize("correlated", [False, True])
def test_ceiling_equals_brute_force_fit_of_the_adapter(structure: str, kind: str, spec: dict, correlated: bool) -> None:
    """The closed form (or, for the grid on correlated inputs, the block-coordinate fit) equals the best share a
    gradient fit of the real adapter layer reaches, in ‖ΔW‖² and in ‖ΔW X‖² with correlated inputs."""
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    lf = torch.eye(8, dtype=torch.float64)
    if correlated:
        lf = torch.randn(8, 8, generator=gen, dtype=torch.float64) + 2 * torch.eye(8, dtype=torch.float64)
    cov = lf @ lf.T if correlated else None
    closed = ceiling(delta, structure, 2, cov)
    assert closed == pytest.approx(_fit(kind, delta, lf, **spec), abs=2e-3)


@pytest.fixture
def layer_module(tmp_path: Path) -> AdapterModule:
    cfg = make_cfg(tmp_path, ["task.loss=layer"])
    return AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)


def test_layer_loss_gradient_depends_on_the_layers_own_update_only(layer_module: AdapterModule) -> None:
    """On the un-adapted backbone, ∂L/∂W of each target is −2/(N·m) (ΔW*·D) X Xᵀ (X its teacher inputs, unscaled):
    the closed form of the layer's own MSE term, so no other layer's update enters its gradient."""
    task, backbone = layer_module.task, layer_module.backbone
    batch = torch.randint(0, 320, (2, 8))
    for p in backbone.parameters():
        p.requires_grad_(False)
    weights = {n: backbone.get_submodule(n).weight.requires_grad_(True) for n in task.planted}
    task.loss(backbone, batch).backward()
    inputs = task.teacher_inputs(batch)
    for name, w in weights.items():
        x = inputs[name].reshape(-1, w.shape[1])
        if name in task.scales:
            x = x / task.scales[name]
        delta = task.deltas[name]  # ΔW*·D: the update the layer sees on unscaled inputs
        d = task.scales[name] if name in task.scales else torch.ones(w.shape[1])
        expected = -2.0 / (x.shape[0] * w.shape[0]) * (delta @ x.T) @ (x * d)
        torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-7)


def test_task_loss_is_validated_with_one_clear_error() -> None:
    """task.loss must be kl or layer; a string task.objective (the sweep objective node) names task.loss."""
    cfg = {"profiles": ["low"], "seq_len": 4, "train_size": 4, "val_size": 4, "strength": 0.5, "batch_size": 2}
    model = {"family": "causal_lm"}
    assert PlantedTask.validate({**cfg, "loss": "layer"}, model) == []
    (bad,) = PlantedTask.validate({**cfg, "loss": "mse"}, model)
    assert "task.loss must be one of ['kl', 'layer']" in bad
    (bad,) = PlantedTask.validate({**cfg, "objective": "layer"}, model)
    assert "task.loss=kl|layer" in bad


def test_gid_follows_planted_erank_on_the_layer_loss(tmp_path: Path) -> None:
    """`lightning-ralora-gid adapter=ralora task=planted task.loss=layer`: Spearman ρ(estimated, planted erank)
    ≥ 0.8 with the default profiles (measured 0.868)."""
    cfg = make_cfg(tmp_path, ["adapter=ralora", "task.loss=layer"], fast=False)
    result = profile_gid(cfg)
    assert result["spearman_erank_vs_planted"] >= 0.8
    for method in ("svdvals", "gram"):  # both singular-value paths, ρ and bias against the planted erank
        acc = result["accuracy"][method]
        assert acc["spearman"] >= 0.8 and acc["layers"] == len(result["layers"])
        planted = {n: d["planted_erank"] for n, d in result["layers"].items()}
        bias = sum(d["erank_by_method"][method] - planted[n] for n, d in result["layers"].items()) / len(planted)
        assert acc["bias"] == pytest.approx(bias)


def _by_profile(results: dict, key: str) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for rec in results["task_summary"]["planted"].values():
        by.setdefault(rec["profile"], []).append(rec[key])
    return {p: sum(v) / len(v) for p, v in by.items()}


def test_ralora_wins_on_block_and_lora_on_decay(tmp_path: Path) -> None:
    """The RaLoRA claim and its control on loss=layer, at equal parameters, for each of 2 seeds: GID-planned RaLoRA
    closes more of the gap than LoRA on `block` targets, LoRA more than RaLoRA on `decay` targets; each gap stays
    below its structure's ceiling. The claims table reads the same runs."""
    runs = []
    for seed in (0, 1):
        gaps = {}
        for adapter in ("lora", "ralora"):
            overrides = [f"adapter={adapter}", "task.loss=layer", f"seed={seed}", "trainer.max_steps=100"]
            overrides += ["trainer.val_check_interval=100", "task.train_size=512", "task.val_size=32"]
            overrides += ["task.batch_size=16", "callbacks.checkpoint.every_n_train_steps=1000"]
            res = train(make_cfg(tmp_path / f"{adapter}{seed}", overrides))
            for rec in res["task_summary"]["planted"].values():
                assert rec["gap_closed"] <= rec["ceiling"] + 0.02
            gaps[adapter] = _by_profile(res, "gap_closed")
            run = Run(tmp_path, RunRecord.from_dict(res), 0.0, res["model"], 8, adapter, seed, "claims", "planted")
            run.values = TABLES["claims"].extract(run)
            runs.append(run)
        assert gaps["ralora"]["block"] > gaps["lora"]["block"] + 0.05, gaps
        assert gaps["lora"]["decay"] > gaps["ralora"]["decay"] + 0.05, gaps
    cells = aggregate(TABLES["claims"], runs)
    ralora = cells[("tiny_llama", 8, "ralora")]
    assert ralora["verdict:block"].mean == 1.0 and ralora["verdict:decay"].mean == -1.0
    assert ralora["ceiling:block"].mean > cells[("tiny_llama", 8, "lora")]["ceiling:block"].mean


@pytest.mark.parametrize("n_blocks", [8, 2])
def test_oracle_argmax_over_n_agrees_with_the_closed_form(n_blocks: int) -> None:
    """`block` with n_b blocks of rank r/2 (total rank n_b·r/2): n ≤ n_b blocks of rank r represent min(1, 2n/n_b) of
    it, n > n_b less than all, so the oracle n is the smallest n ≥ n_b/2 (4 for n_b = 8, LoRA for n_b = 2); `low`
    is LoRA's; a k x k grid of rank r/k keeps r/k of each diagonal sub-block's rank (n_b/k)·r/2: min(1, 2/n_b) for
    every k ≤ n_b, so k = 1."""
    block = planted_update(64, 64, "block", torch.Generator().manual_seed(0), rank=8, n_blocks=n_blocks)
    for n in (2, 4, 8):  # n <= n_b: each chunk holds n_b/n whole blocks; n > n_b cuts them (less than all)
        share = ceiling(block, f"blocks{n}", 8)
        assert share == pytest.approx(min(1.0, 2 * n / n_blocks), abs=1e-6) if n <= n_blocks else share < 0.99
    assert best_size(block, 8, "blocks") == max(1, n_blocks // 2)
    for k in (2, 4, 8):
        share = ceiling(block, f"grid{k}", 8)
        assert share == pytest.approx(min(1.0, 2 / n_blocks), abs=1e-6) if k <= n_blocks else share < 0.99
    assert best_size(block, 8, "grid") == 1
    assert best_size(_update("low"), 8, "blocks") == 1


def _results(method: str, gaps: dict[str, float], cos: float, structure: str = "lora") -> dict:
    planted = {
        f"l{i}.{p}": {"profile": p, "gap_closed": g, "ceiling": 0.9, "structure": structure}
        for i, (p, g) in enumerate(gaps.items())
    }
    layers = {name: {"cos_f": cos} for name in planted}
    adapter = {"kind": "ralora", "needs_gid": method == "ralora", "n_blocks": int(structure[6:] or 1)}
    return {
        "task_summary": {"planted": planted},
        "callbacks": {"GradientAlignment": {"layers": layers}},
        "config": {"adapter": adapter},
    }


def test_claims_table_shows_cos_per_cell_and_verdicts_as_words() -> None:
    """cos:<profile> is the mean of the alignment callback's per-layer cos_f; verdicts read holds / does not hold /
    within noise in the markdown (numbers in the csv); other tables keep numeric cells."""
    runs = []
    for seed, eps in enumerate((0.0, 0.01)):
        for method, gaps, cos in (
            ("lora", {"block": 0.3, "decay": 0.8, "flat": 0.4}, 0.5),
            ("ralora", {"block": 0.6, "decay": 0.5, "flat": 0.4 + 2 * eps}, 0.7 + eps),
        ):
            record = RunRecord.from_dict(_results(method, gaps, cos))
            run = Run(Path("x"), record, 0.0, "tiny", 8, method, seed, "claims", "planted")
            run.values = TABLES["claims"].extract(run)
            runs.append(run)
    cells = aggregate(TABLES["claims"], runs)
    row = cells[("tiny", 8, "ralora")]
    assert row["cos:block"].mean == pytest.approx(0.705) and row["gap:block"].mean == pytest.approx(60.0)
    assert [row[f"verdict:{p}"].mean for p in ("block", "decay", "flat")] == [1.0, -1.0, 0.0]
    table = Table(
        TABLES["claims"], cells, columns(TABLES["claims"], cells), rows(TABLES["claims"], cells), runs, lambda *a: None
    )
    line = next(x for x in table.markdown().splitlines() if "| ralora" in x)
    assert "holds" in line and "does not hold" in line and "within noise" in line
    assert "verdict:block,1.0" in table.csv_text() and all(
        s.cell_text is None for k, s in TABLES.items() if k != "claims"
    )


def test_oracle_table_shows_the_best_fixed_structure_beside_the_gid_pick() -> None:
    """oracle_ralora holds, per profile, the gap and n of the fixed-n run that closes the most; the fixed runs are
    named by their n; the GID row keeps its own pick."""
    runs = []
    for name, n, gaps in (
        ("ralora", 4, {"block": 0.55, "decay": 0.5}),
        ("ralora", 1, {"block": 0.3, "decay": 0.86}),
        ("ralora", 2, {"block": 0.45, "decay": 0.6}),
        ("ralora", 8, {"block": 0.6, "decay": 0.3}),
    ):
        res = _results(name, gaps, 0.5, "lora" if n == 1 else f"blocks{n}")
        res["config"]["adapter"]["needs_gid"] = not runs  # the first run is the GID-planned one
        run = Run(Path("x"), RunRecord.from_dict(res), 0.0, "tiny", 8, name, 0, "claims_oracle", "planted")
        run.values = TABLES["claims_oracle"].extract(run)
        runs.append(run)
    assert [r.method for r in runs] == ["ralora", "ralora_n1", "ralora_n2", "ralora_n8"]
    cells = aggregate(TABLES["claims_oracle"], runs)
    oracle, gid = cells[("tiny", 8, "oracle_ralora")], cells[("tiny", 8, "ralora")]
    assert (oracle["gap:block"].mean, oracle["n:block"].mean) == pytest.approx((60.0, 8.0))
    assert (oracle["gap:decay"].mean, oracle["n:decay"].mean) == pytest.approx((86.0, 1.0))
    assert (gid["gap:block"].mean, gid["n:block"].mean) == pytest.approx((55.0, 4.0))


def test_gradient_deviation_against_the_closed_form_of_lora_at_init() -> None:
    """With B = 0, LoRA's step moves W along Ĝ ∝ G AᵀA: grad_dev and col_dev are the scale-matched relative
    deviations of Ĝ and of its column norms from G's; 0 for full fine-tuning; per-layer means survive a restart."""
    from lightning_ralora.adapters.lora import LoRALinear
    from lightning_ralora.callbacks.alignment import GradientAlignment

    torch.manual_seed(0)
    layer, G = LoRALinear(nn.Linear(16, 12), r=4, alpha=8), torch.randn(12, 16)
    A = layer.lora_A.detach()
    ref = G @ A.T @ A

    def dev(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a / a.norm() - b / b.norm()).norm() * b.norm() / b.norm())

    cb = GradientAlignment(every_n_steps=1)
    out = cb.gradient_deviation(layer, G)
    assert out["grad_dev"] == pytest.approx(dev(ref, G), rel=1e-4)
    assert out["col_dev"] == pytest.approx(dev(ref.norm(dim=0), G.norm(dim=0)), rel=1e-4)
    assert cb.gradient_deviation(nn.Linear(16, 12), G) == {"grad_dev": 0.0, "col_dev": 0.0}
    cb._record_layers({"a": {"cos_f": 0.2}})
    cb._record_layers({"a": {"cos_f": 0.4, "kappa": float("nan")}})
    again = GradientAlignment(every_n_steps=1)
    again.load_state_dict(cb.state_dict())
    assert again.results_summary()["layers"] == {"a": {"cos_f": pytest.approx(0.3)}}
