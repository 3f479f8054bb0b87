"""GID estimator, block counts, RaLoRA-Pro budget, plans, profiler and the warm-up callback (docs/maths.md §2–§4).

Each property is checked against an independent reference: hand-computed numbers, numpy's SVD, plain autograd
on a copy of the model, a single-process mean for the multi-process all-reduce, a planted low-rank gradient.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ralora.adapters import RaLoRAConfig, RaLoRALinear, adapter_layers, inject
from lightning_ralora.adapters.plan import AdapterPlan
from lightning_ralora.adapters.registry import check_adapter
from lightning_ralora.callbacks.gid_warmup import GIDWarmup, rank_shard
from lightning_ralora.rank.estimate import (
    GIDStat,
    NonFiniteGradientError,
    assign_owners,
    estimate_gid,
    warmup_train_mode,
)
from lightning_ralora.rank.plots import plot_cumulative_energy, plot_gid
from lightning_ralora.rank.rules import allocate_ranks, blocks_for, build_ralora_plan, fit_blocks, validate_ralora_cfg
from lightning_ralora.rank.spectra import cumulative_energy, effective_rank, rank_for_energy, singular_values
from lightning_ralora.reporting.gid_profile import profile, spearman
from tests.helpers import adapter_cfg, mlp

PNG_MAGIC = b"\x89PNG"


_cfg = adapter_cfg  # an adapter yaml as composed, with overrides (interpolations resolved after them)


# --------------------------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 16, 64])
def test_erank_identity_is_n(n: int) -> None:
    assert abs(effective_rank(torch.eye(n)) - n) < 1e-4


@pytest.mark.parametrize("shape", [(20, 30), (64, 8), (1, 9)])
def test_erank_rank_one_is_one(shape) -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)
    assert abs(effective_rank(m) - 1.0) < 1e-3


def test_erank_of_singular_values_3_1() -> None:
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(h), abs=1e-9)
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(h), abs=1e-5)
    # zeros contribute 0·log 0 = 0
    assert effective_rank(torch.tensor([3.0, 1.0, 0.0, 0.0])) == pytest.approx(math.exp(h), abs=1e-9)


def test_erank_all_zero_is_one() -> None:
    assert effective_rank(torch.zeros(4, 6)) == 1.0
    assert effective_rank(torch.zeros(3)) == 1.0


@pytest.mark.parametrize("method", ["svdvals", "gram"])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (17, 17)])
def test_singular_values_match_numpy(method: str, shape) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = np.linalg.svd(g.numpy(), compute_uv=False)
    sv = singular_values(g, method)
    assert sv.dtype == torch.float32 and sv.shape == (min(shape),)
    np.testing.assert_allclose(sv.numpy(), ref, rtol=1e-4, atol=1e-4)


def _naive_gram_sigma(g: torch.Tensor) -> torch.Tensor:
    """The old `gram` method: fp32 Gram matrix, eigenvalues clamped at 0 (rounding noise kept as spectrum)."""
    g = g.float()
    gram = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0)


def _gram_cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rank4 = torch.randn(256, 4, generator=gen) @ torch.randn(4, 512, generator=gen)
    # full rank, condition number 1e6: singular values 1 .. 1e-6, geometric
    u = torch.linalg.qr(torch.randn(256, 256, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(512, 256, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -6, 256, dtype=torch.float64)
    return {"rank4": rank4, "rank4_tall": rank4.T.contiguous(), "ill_conditioned": ((u * s) @ v.T).float()}


GRAM_ERANK_TOL = 1e-3  # absolute erank tolerance of `gram` against the fp64 reference (measured gap ~1e-4)


@pytest.mark.parametrize("case", ["rank4", "rank4_tall", "ill_conditioned"])
def test_gram_erank_matches_fp64_svdvals(case: str) -> None:
    g = _gram_cases()[case]
    ref = effective_rank(torch.linalg.svdvals(g.double()))  # independent reference: fp64 SVD of the same input
    gram = effective_rank(singular_values(g, "gram"))
    assert gram == pytest.approx(ref, abs=GRAM_ERANK_TOL)
    assert effective_rank(singular_values(g, "svdvals")) == pytest.approx(ref, abs=GRAM_ERANK_TOL)
    # regression: the old fp32 clamp-at-0 formula is off by far more than the tolerance (4.13 vs 3.99 at rank 4)
    old_gap = abs(effective_rank(_naive_gram_sigma(g)) - ref)
    assert old_gap > 10 * GRAM_ERANK_TOL, old_gap
    if case.startswith("rank4"):
        assert int((singular_values(g, "gram") > 0).sum()) == 4  # the rank is revealed exactly


def test_cumulative_energy_hand_example() -> None:
    c = cumulative_energy(torch.tensor([1.0, 3.0]))  # order does not matter
    torch.testing.assert_close(c, torch.tensor([0.9, 1.0], dtype=torch.float64))
    assert rank_for_energy(torch.tensor([3.0, 1.0]), 0.9) == 1
    assert rank_for_energy(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.9) == 4
    assert torch.equal(cumulative_energy(torch.zeros(3)), torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# block counts and budget
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("erank", "r", "n_max", "expected"),
    [
        (7.9, 8, 8, 1),  # erank < r: plain LoRA
        (0.5, 8, 8, 1),  # clip below at 2^0
        (16.0, 8, 8, 2),  # exactly 2r
        (31.99, 8, 8, 2),  # floor
        (32.0, 8, 8, 4),
        (64.0, 8, 8, 8),
        (1000.0, 8, 8, 8),  # clip above at n_max
        (1000.0, 8, 1, 1),
        (400.0, 8, 16, 16),
        (3.0, 1, 4, 2),
    ],
)
def test_blocks_for(erank: float, r: int, n_max: int, expected: int) -> None:
    assert blocks_for(erank, r, n_max) == expected


def test_blocks_for_exact_boundary_from_erank() -> None:
    # erank(I_16) is 16 up to the last bit; it must reach 2 blocks of rank 8
    assert blocks_for(effective_rank(torch.eye(16)), 8, 8) == 2


@pytest.mark.parametrize("n_max", [0, 3, 6, 12, 2.0])
def test_blocks_for_rejects_non_power_of_two(n_max) -> None:
    with pytest.raises(ValueError, match=r"adapter\.n_max must be a power of two"):
        blocks_for(100.0, 8, n_max)


def test_fit_blocks_halving() -> None:
    assert fit_blocks(8, 64, 128) == (8, None)
    n, note = fit_blocks(8, 24, 36)  # 24 % 8 != 0 -> 4 divides both
    assert n == 4 and "halved to 4" in note and "n_blocks 8" in note
    assert fit_blocks(8, 3, 64)[0] == 1
    assert fit_blocks(1, 7, 5) == (1, None)


def test_allocate_ranks_hand_example() -> None:
    shapes = {"a": (8, 8), "b": (32, 32)}  # f = sqrt(16) = 4, sqrt(64) = 8
    imp = {"a": 1.0, "b": 3.0}  # alpha = 0.25, 0.75
    # P = (4 + 8)*4 = 48; r_a = floor(48*0.25/4) = 3; r_b = floor(48*0.75/8) = floor(4.5) = 4
    ranks, info = allocate_ranks(imp, shapes, r_ref=4, r_min=1, r_max=64, smoothing="sqrt")
    assert ranks == {"a": 3, "b": 4}
    assert info["budget_P"] == pytest.approx(48.0)
    assert info["alpha"] == pytest.approx({"a": 0.25, "b": 0.75})
    assert info["clipped"] == {}
    assert info["params_plan"] == 3 * 16 + 4 * 64
    assert info["params_uniform_lora_r_ref"] == 4 * 16 + 4 * 64
    ranks, info = allocate_ranks(imp, shapes, r_ref=4, r_min=4, r_max=4, smoothing="sqrt")
    assert ranks == {"a": 4, "b": 4}
    assert "r_min=4" in info["clipped"]["a"] and "b" not in info["clipped"]
    ranks, info = allocate_ranks(imp, shapes, r_ref=4, r_min=1, r_max=3, smoothing="sqrt")
    assert ranks == {"a": 3, "b": 3} and "r_max=3" in info["clipped"]["b"]
    # identity smoothing: P = (16 + 64)*4 = 320; r_a = floor(80/16) = 5, r_b = floor(240/64) = 3
    ranks, _ = allocate_ranks(imp, shapes, r_ref=4, r_min=1, r_max=64, smoothing="none")
    assert ranks == {"a": 5, "b": 3}


def test_allocate_ranks_never_below_one_and_zero_importance() -> None:
    shapes = {"a": (8, 8), "b": (8, 8)}
    ranks, info = allocate_ranks({"a": 0.0, "b": 1.0}, shapes, r_ref=2, r_min=1, r_max=64, smoothing="sqrt")
    assert ranks["a"] == 1 and "a" in info["clipped"]
    ranks, info = allocate_ranks({"a": 0.0, "b": 0.0}, shapes, r_ref=2, r_min=1, r_max=64, smoothing="sqrt")
    assert ranks == {"a": 2, "b": 2} and info["fallback"]


def test_exact_budget_within_one_rank_unit_per_layer() -> None:
    g = torch.Generator().manual_seed(0)
    dims = [(64, 64), (128, 64), (64, 256), (96, 32), (256, 256), (32, 128)]
    shapes = {f"m{i}": s for i, s in enumerate(dims)}
    imp = {n: float(torch.rand(1, generator=g)) + 0.5 for n in shapes}
    ranks, info = allocate_ranks(imp, shapes, r_ref=8, r_min=1, r_max=10**6, smoothing="none")
    assert info["clipped"] == {}
    uniform = sum(8 * (m + n) for m, n in dims)
    plan = sum(ranks[k] * (m + n) for k, (m, n) in shapes.items())
    assert uniform - sum(m + n for m, n in dims) < plan <= uniform
    assert info["params_plan"] == plan and info["params_uniform_lora_r_ref"] == uniform


def test_allocate_ranks_errors() -> None:
    with pytest.raises(ValueError, match=r"adapter\.r_min \(9\) must be <= adapter\.r_max \(4\)"):
        allocate_ranks({"a": 1.0}, {"a": (4, 4)}, r_ref=2, r_min=9, r_max=4)
    with pytest.raises(ValueError, match=r"adapter\.smoothing must be one of \['sqrt', 'none'\]"):
        allocate_ranks({"a": 1.0}, {"a": (4, 4)}, r_ref=2, r_min=1, r_max=4, smoothing="log")


# --------------------------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------------------------
def _stat(erank: float, importance: float, shape) -> GIDStat:
    return GIDStat(erank=erank, importance=importance, sigma=torch.ones(3), grad_norm=1.0, shape=shape)


SHAPES = {"l0.q": (64, 64), "l0.up": (128, 64), "l1.q": (64, 64), "l1.odd": (24, 36)}
STATS = {
    "l0.q": _stat(5.0, 1.0, (64, 64)),
    "l0.up": _stat(40.0, 4.0, (128, 64)),
    "l1.q": _stat(300.0, 2.0, (64, 64)),
    "l1.odd": _stat(100.0, 1.0, (24, 36)),
}


def test_ralora_plan_blocks_from_erank() -> None:
    plan = build_ralora_plan(STATS, SHAPES, _cfg("ralora", r=4, r_ref=8, alpha=16))
    e = plan.entries
    assert plan.variant == "ralora" and list(e) == list(SHAPES)
    assert {n: x.spec.r for n, x in e.items()} == dict.fromkeys(SHAPES, 4)
    # erank/r = 1.25 -> 1; 10 -> 8; 75 -> 8 (n_max); 25 -> 16 clipped to 8, halved to 4 for (24, 36)
    assert {n: x.spec.n_blocks for n, x in e.items()} == {"l0.q": 1, "l0.up": 8, "l1.q": 8, "l1.odd": 4}
    assert any("halved to 4" in s for s in e["l1.odd"].notes)
    assert all(x.spec.kind == "ralora" and x.spec.scale == 16 / 8 for x in e.values())
    assert e["l0.up"].erank == 40.0 and e["l0.up"].importance == 4.0 and e["l0.up"].shape == (128, 64)
    uniform = sum(8 * (m + n) for m, n in SHAPES.values())
    assert plan.meta["params_uniform_lora_r_ref"] == uniform
    assert plan.meta["params_plan"] == sum(4 * (m + n) for m, n in SHAPES.values())
    assert plan.meta["budget_P"] is None


def test_ralora_pro_and_ls_lora_share_ranks() -> None:
    cfg = dict(r_ref=8, r_min=2, r_max=32, smoothing="sqrt", alpha=16)
    pro = build_ralora_plan(STATS, SHAPES, _cfg("ralora_pro", **cfg))
    ls = build_ralora_plan(STATS, SHAPES, _cfg("ls_lora", **cfg))
    ranks, info = allocate_ranks(
        {n: s.importance for n, s in STATS.items()}, SHAPES, r_ref=8, r_min=2, r_max=32, smoothing="sqrt"
    )
    assert {n: x.spec.r for n, x in pro.entries.items()} == ranks == {n: x.spec.r for n, x in ls.entries.items()}
    assert all(x.spec.n_blocks == 1 for x in ls.entries.values())
    for n, x in pro.entries.items():
        expected, _ = fit_blocks(blocks_for(STATS[n].erank, ranks[n], 8), *SHAPES[n])
        assert x.spec.n_blocks == expected
    assert pro.meta["budget_P"] == pytest.approx(info["budget_P"])
    assert pro.meta["params_plan"] == info["params_plan"] == sum(ranks[n] * sum(SHAPES[n]) for n in SHAPES)
    assert pro.meta["params_uniform_lora_r_ref"] == sum(8 * sum(s) for s in SHAPES.values())
    # per-layer scale option
    per_layer = build_ralora_plan(STATS, SHAPES, _cfg("ralora_pro", scale="alpha/r_l", **cfg))
    assert all(x.spec.scale == pytest.approx(16 / x.spec.r) for x in per_layer.entries.values())


@pytest.mark.parametrize(
    ("scale", "uniform", "gid"),
    [("alpha/r_ref", 2.0, 2.0), ("alpha/r_l", None, 8.0), (None, None, None), (3.0, 3.0, 3.0)],
)
def test_one_scale_rule_for_the_uniform_and_the_gid_plan(scale, uniform, gid) -> None:
    """RaLoRAConfig.layer_scale is the scale of both plans: alpha/r_ref (16/8); alpha/r_l at the layer's rank (a
    uniform plan leaves it to the layer's own alpha/r); null; a number."""
    cfg = RaLoRAConfig(name="ralora", r=4, r_ref=8, alpha=16, scale=scale)
    assert cfg.layer_scale() == uniform and cfg.to_spec().scale == uniform
    assert cfg.layer_scale(2) == gid
    if scale in ("alpha/r_ref", "alpha/r_l"):  # the scale rules a GID plan accepts
        plan = build_ralora_plan(STATS, SHAPES, _cfg("ralora_pro", r_ref=8, alpha=16, scale=scale))
        assert all(x.spec.scale == cfg.layer_scale(x.spec.r) for x in plan.entries.values())


def test_plan_round_trip_builds_layers_with_formula_params() -> None:
    model = nn.ModuleDict({n.replace(".", "_"): nn.Linear(s[1], s[0]) for n, s in SHAPES.items()})
    shapes = {n.replace(".", "_"): s for n, s in SHAPES.items()}
    stats = {n.replace(".", "_"): s for n, s in STATS.items()}
    plan = build_ralora_plan(stats, shapes, _cfg("ralora_pro", r_min=1, r_max=64))
    plan = AdapterPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    layers = inject(model, list(shapes), plan.specs())
    for name, layer in layers.items():
        assert isinstance(layer, RaLoRALinear)
        assert layer.n_blocks == plan.entries[name].spec.n_blocks
        assert layer.num_trainable == plan.entries[name].spec.r * sum(shapes[name])
    assert sum(x.num_trainable for x in layers.values()) == plan.meta["params_plan"]


def test_validate_ralora_cfg() -> None:
    for name in ("ralora", "ralora_pro", "ls_lora"):
        assert validate_ralora_cfg(_cfg(name)) == []
    bad = _cfg("ralora_pro", n_max=6, r_min=16, r_max=4, gid_batches=0, smoothing="log", scale="alpha", r=0, r_ref=-1)
    problems = validate_ralora_cfg(bad)
    text = "\n".join(problems)
    for needle in (
        "adapter.n_max must be a power of two",
        "adapter.r_min (16) must be <= adapter.r_max (4)",
        "adapter.gid_batches must be a positive integer, got 0",
        "adapter.smoothing must be one of ['sqrt', 'none']",
        "adapter.scale='alpha' is not a GID plan's scale rule (needs_gid: true); allowed: ['alpha/r_ref', 'alpha/r_l']",
        "adapter.r must be a positive integer, got 0",
        "adapter.r_ref must be a positive integer, got -1",
    ):
        assert needle in text, f"missing: {needle}\n{text}"
    assert len(problems) == 7
    # one validator: the registry's schema (absent keys take its defaults; unknown keys are named)
    assert validate_ralora_cfg(bad) == check_adapter({**bad, "needs_gid": True})
    assert validate_ralora_cfg({"name": "ralora", "r": 8}) == []
    assert validate_ralora_cfg({"name": "ralora", "r": 8, "rnak": 4})[0].startswith("adapter.rnak is not a field")
    with pytest.raises(ValueError, match="invalid RaLoRA adapter config"):
        build_ralora_plan(STATS, SHAPES, bad)


def test_numeric_scale_is_refused_for_a_gid_plan_by_the_schema() -> None:
    """adapter=ralora adapter.scale=2.0: a number is a uniform plan's scale; the config check (the registry) and the
    plan builder refuse it with the same sentence."""
    cfg = _cfg("ralora", scale=2.0)
    expected = "adapter.scale=2.0 is not a GID plan's scale rule (needs_gid: true)"
    assert [p for p in check_adapter(cfg) if expected in p], check_adapter(cfg)
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_ralora_plan(STATS, SHAPES, cfg)
    assert check_adapter({**cfg, "needs_gid": False}) == []  # a uniform plan takes a numeric scale


def test_plots_write_png(tmp_path) -> None:
    plan = build_ralora_plan(STATS, SHAPES, _cfg("ralora_pro"))
    stats = {n: GIDStat(s.erank, s.importance, torch.linspace(3, 0.1, 20), 1.0, s.shape) for n, s in STATS.items()}
    for path in (plot_gid(plan, tmp_path / "gid.png"), plot_cumulative_energy(stats, tmp_path / "energy.png")):
        assert path.read_bytes()[:4] == PNG_MAGIC


# --------------------------------------------------------------------------------------------------------------
# estimation
# --------------------------------------------------------------------------------------------------------------
def _tiny(seed: int = 0) -> nn.Sequential:
    return mlp(6, 5, 3, seed=seed)


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _batches(n: int, seed: int = 0, d_in: int = 6, d_out: int = 3, bs: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, d_in, generator=g), torch.randn(bs, d_out, generator=g)) for _ in range(n)]


def _reference_mean_grads(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """Plain autograd on a copy, every parameter trainable: the mean of dL/dW over the batches."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    ws = [ref.get_submodule(n).weight for n in names]
    total = [torch.zeros_like(w) for w in ws]
    for b in batches:
        for t, g in zip(total, torch.autograd.grad(_mse(ref, b), ws), strict=True):
            t += g
    return {n: t / len(batches) for n, t in zip(names, total, strict=True)}


def test_estimate_gid_mean_gradient_and_restores_state() -> None:
    model = _tiny()
    batches = _batches(5)
    ref = _reference_mean_grads(model, batches, ["0", "2"])
    # a mixed initial state that must come back exactly
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = estimate_gid(model, batches, _mse, ["0", "2"], keep_grads=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model[0].weight.grad is None and model[2].weight.grad is None
    assert model[0].bias.grad is None  # non-targets never received gradients
    for name in ("0", "2"):
        st = stats[name]
        torch.testing.assert_close(st.grad, ref[name], rtol=1e-5, atol=1e-6)
        w = model.get_submodule(name).weight.detach()
        assert st.importance == pytest.approx(float((w * ref[name]).abs().mean()), rel=1e-5)
        assert st.grad_norm == pytest.approx(float(ref[name].norm()), rel=1e-5)
        np.testing.assert_allclose(st.sigma.numpy(), np.linalg.svd(ref[name].numpy(), compute_uv=False), rtol=1e-4)
        assert st.erank == pytest.approx(effective_rank(ref[name]), rel=1e-4)
        assert st.shape == tuple(w.shape) and st.warning is None
    assert "sigma" in stats["0"].to_dict() and "sigma" not in stats["0"].to_dict(with_sigma=False)


def test_estimate_gid_never_computes_singular_vectors(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("full SVD with vectors called")

    monkeypatch.setattr(torch.linalg, "svd", boom)
    monkeypatch.setattr(torch, "svd", boom)
    monkeypatch.setattr(torch.Tensor, "svd", boom, raising=False)
    for method in ("svdvals", "gram"):
        stats = estimate_gid(_tiny(), _batches(2), _mse, ["0", "2"], svd_method=method)
        assert stats["0"].erank >= 1.0


class _Planted(nn.Module):
    """Parallel d x d linears; layer k regresses onto x (W0_k + ΔW*_k)^T with rank(ΔW*_k) = planted[k]."""

    def __init__(self, planted: dict[str, int], d: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict({k: nn.Linear(d, d, bias=False) for k in planted})
        self.targets = {}
        for k, rank in planted.items():
            u = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
            v = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
            self.targets[k] = self.layers[k].weight.detach() + u @ v.T

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return sum((self.layers[k](batch) - batch @ w.T).pow(2).mean() for k, w in self.targets.items())


PLANTED = {"a": 2, "b": 6, "c": 16}


def test_planted_low_rank_gradient_erank_ordering() -> None:
    model = _Planted(PLANTED)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(256, 32, generator=g) for _ in range(4)]
    stats = estimate_gid(model, batches, lambda m, b: m.loss(b), [f"layers.{k}" for k in PLANTED])
    eranks = {k: stats[f"layers.{k}"].erank for k in PLANTED}
    assert eranks["a"] < eranks["b"] < eranks["c"]
    for k, rank in PLANTED.items():
        assert 0.7 * rank <= eranks[k] <= rank + 1e-3, eranks
    # and the block counts follow: r = 2, n_max = 8 -> 1 (erank ~2), 2 (~6), 4 (just under 16)
    assert [blocks_for(eranks[k], 2, 8) for k in PLANTED] == [1, 2, 4]


def test_non_finite_gradient_raises_naming_module() -> None:
    model = nn.ModuleDict({"ok": nn.Linear(4, 4), "bad": nn.Linear(4, 4)})
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def loss(m, x):
        return m["ok"](x).sum() + m["bad"](x).sum() * float("nan")

    with pytest.raises(NonFiniteGradientError, match="'bad'") as exc:
        estimate_gid(model, [torch.randn(3, 4)], loss, ["ok", "bad"])
    assert "'ok'" not in str(exc.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_all_zero_gradient_warns_and_reports_erank_one() -> None:
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "dead": nn.Linear(4, 4)})

    def loss(m, x):
        return m["used"](x).pow(2).sum() + 0.0 * m["dead"](x).sum()

    with pytest.warns(UserWarning, match="'dead' has an all-zero warm-up gradient"):
        stats = estimate_gid(model, [torch.randn(3, 4)], loss, ["used", "dead"])
    assert stats["dead"].erank == 1.0 and "dead" in stats["dead"].warning
    assert stats["used"].warning is None


def test_warmup_train_mode_activates_dropout_and_restores_mixed_modes() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 4)))
    model.eval()
    model[0].train()  # a mixed state must come back exactly, submodule by submodule
    before = {n: m.training for n, m in model.named_modules()}
    with warmup_train_mode(model) as record:
        assert all(m.training for m in model.modules())
    assert record == {"train_mode": True, "dropout_modules_active": 1, "dropout_config": {}}
    assert {n: m.training for n, m in model.named_modules()} == before


def test_zero_batches_and_bad_targets() -> None:
    with pytest.raises(ValueError, match=r"adapter\.gid_batches"):
        estimate_gid(_tiny(), [], _mse, ["0"])
    with pytest.raises(ValueError, match="has no 2-D .weight"):
        estimate_gid(_tiny(), _batches(1), _mse, ["1"])


def test_loss_error_still_restores_flags() -> None:
    model = _tiny()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def broken(m, b):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        estimate_gid(model, _batches(1), broken, ["0"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_rank_shard_partitions_global_batches() -> None:
    loader = list(range(20))
    shards = [list(rank_shard(loader, r, 3, 2)) for r in range(3)]
    assert shards == [[0, 3], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == list(range(6))
    assert list(rank_shard(range(4), 1, 2, 5)) == [1, 3]  # short loader: what is there
    assert list(rank_shard(range(4), 0, 1, 0)) == []


_DDP_WORKER = """
import sys, torch, torch.distributed as dist
from torch import nn
from lightning_ralora.rank.estimate import estimate_gid
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
shard = sys.argv[5] == "1"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
g = torch.Generator().manual_seed(0)
batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(3)]
mine = batches[rank::world][:2]  # rank_shard's rule; uneven on purpose: rank 0 gets 2 batches, rank 1 gets 1
def mse(m, b):
    return (m(b[0]) - b[1]).pow(2).mean()
info = {}
stats = estimate_gid(model, mine, mse, ["0", "2"], keep_grads=True, info=info, shard_sums=shard)
blob = {"grads": {n: s.grad for n, s in stats.items()}, "erank": {n: s.erank for n, s in stats.items()}, "info": info}
torch.save(blob, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("shard", [True, False], ids=["sharded_sums", "all_reduced_sums"])
def test_all_reduce_matches_single_process_mean(tmp_path, shard: bool) -> None:
    """Two gloo processes, uneven shards: both end with the one-process mean over all 3 batches. Sharded sums:
    each target's fp32 sum lives on its owner only (the 5x6 weight's 120 bytes on rank 0, the 3x5 one's 60 bytes
    on rank 1), and the rank short of a batch joins the reduces with a zero contribution."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_WORKER, str(r), "2", str(port), str(tmp_path), str(int(shard))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert list(rank_shard(range(3), 0, 2, 2)) == [0, 2] and list(rank_shard(range(3), 1, 2, 2)) == [1]  # workers
    single = estimate_gid(_tiny(), _batches(3), _mse, ["0", "2"], keep_grads=True)
    per_rank = [4 * (5 * 6), 4 * (3 * 5)] if shard else [4 * (5 * 6 + 3 * 5)] * 2
    for rank in range(2):
        blob = torch.load(tmp_path / f"rank{rank}.pt")
        assert blob["info"] == {
            "batches_local": 2 - rank,
            "batches_total": 3,
            "world_size": 2,
            "sharded": shard,
            "sum_bytes_local": per_rank[rank],
            "sum_bytes_per_rank": per_rank,
        }
        for name in ("0", "2"):
            torch.testing.assert_close(blob["grads"][name], single[name].grad, rtol=1e-5, atol=1e-7)
            assert blob["erank"][name] == pytest.approx(single[name].erank, rel=1e-5)


def test_assign_owners_balances_bytes_deterministically() -> None:
    """Largest first to the least-loaded rank: hand-computed owners; every rank within one target of the mean."""
    sizes = {"q": 16, "k": 4, "v": 4, "o": 16, "up": 64, "down": 64}
    assert assign_owners(sizes, 2) == {"up": 0, "down": 1, "q": 0, "o": 1, "k": 0, "v": 1}
    assert assign_owners(sizes, 1) == dict.fromkeys(sizes, 0)
    owners = assign_owners(sizes, 3)
    loads = [sum(v for n, v in sizes.items() if owners[n] == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(sizes.values())


# --------------------------------------------------------------------------------------------------------------
# profiler
# --------------------------------------------------------------------------------------------------------------
def test_profile_writes_table_and_correlates_with_planted(tmp_path) -> None:
    model = _Planted(PLANTED)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(128, 32, generator=g) for _ in range(3)]
    targets = [f"layers.{k}" for k in PLANTED]
    planted = {f"layers.{k}": float(v) for k, v in PLANTED.items()}
    model.eval()  # the profiler must switch to train mode for the warm-up and give the eval mode back
    modes: list[bool] = []

    def loss(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        modes.append(m.training)
        return m.loss(b)

    res = profile(model, batches, loss, targets, tmp_path, planted_erank=planted)
    assert modes == [True] * 3 and not model.training
    assert res["train_mode"] is True and res["dropout_modules_active"] == 0
    assert res["spearman_erank_vs_planted"] == pytest.approx(1.0)
    assert res["batches"] == 3
    for name in targets:
        d = res["layers"][name]
        assert d["shape"] == [32, 32] and d["planted_erank"] == planted[name]
        assert d["energy"]["32"] == pytest.approx(1.0)
        assert 1 <= d["rank_for_0.9"] <= PLANTED[name.split(".")[-1]]
    md = (tmp_path / "gid_profile.md").read_text()
    assert "train mode)" in md.splitlines()[0]
    assert "| module | shape | erank | importance | C(1) |" in md and "r@0.9 | planted erank |" in md
    assert "Spearman rank correlation" in md and md.count("| layers.") == 3
    assert json.loads((tmp_path / "gid_profile.json").read_text())["layers"].keys() == set(targets)
    assert (tmp_path / "gid_profile.png").read_bytes()[:4] == PNG_MAGIC


def test_spearman_reference() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    x, y = [1.0, 2.0, 2.0, 5.0, 3.0], [2.0, 1.0, 4.0, 5.0, 3.0]
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert spearman([1.0], [2.0]) is None


# --------------------------------------------------------------------------------------------------------------
# the warm-up callback, with a minimal LightningModule exposing the interface the real module provides
# --------------------------------------------------------------------------------------------------------------
class _Module(L.LightningModule):
    def __init__(self, adapter_cfg: dict, run_dir: Path | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = mlp(16, 32, 16)
        self.targets = ["0", "2"]
        self.adapter_cfg = adapter_cfg
        self.run_dir = run_dir
        self.plan: AdapterPlan | None = None
        self.flags_at_configure: dict | None = None

    def training_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return (self.backbone(x) - y).pow(2).mean()

    def configure_model(self) -> None:
        self.flags_at_configure = {n: p.requires_grad for n, p in self.backbone.named_parameters()}
        if self.plan is not None and not adapter_layers(self.backbone):
            inject(self.backbone, self.targets, self.plan.specs())

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad] or [nn.Parameter(torch.zeros(1))])


class _Data(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 16, generator=g)
        self.ds = TensorDataset(x, x @ torch.randn(16, 16, generator=g))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=8, shuffle=True)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_gid_warmup_builds_plan_before_configure_model(tmp_path) -> None:
    cfg = _cfg("ralora", r=2, r_ref=2, gid_batches=3)
    module = _Module(cfg, tmp_path)
    before = {n: p.requires_grad for n, p in module.backbone.named_parameters()}
    # reference: the same batches a one-process run takes (shuffle draws from the RNG the callback forks)
    torch.manual_seed(123)
    ref_batches = list(rank_shard(_Data().train_dataloader(), 0, 1, 3))
    ref = estimate_gid(copy.deepcopy(module.backbone), ref_batches, _mse, module.targets)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(callbacks=[GIDWarmup()]).fit(module, datamodule=_Data())
    plan = module.plan
    assert plan is not None and plan.variant == "ralora"
    assert module.flags_at_configure == before  # GID left the flags as they were
    for name in module.targets:
        assert plan.entries[name].erank == pytest.approx(ref[name].erank, rel=1e-5)
        layer = module.backbone.get_submodule(name)
        assert isinstance(layer, RaLoRALinear) and layer.n_blocks == plan.entries[name].spec.n_blocks
    assert plan.meta["gid_N_per_rank"] == 3 and plan.meta["gid_batches_total"] == 3
    assert plan.meta["gid_batch_size"] == 8 and plan.meta["world_size"] == 1 and plan.meta["gid_seconds"] > 0
    blob = json.loads((tmp_path / "gid.json").read_text())
    assert blob["N"] == 3 and blob["batch_size"] == 8 and blob["seconds"] > 0
    assert AdapterPlan.from_dict(blob).specs() == plan.specs()
    assert (tmp_path / "gid.png").read_bytes()[:4] == PNG_MAGIC


def test_gid_warmup_with_dataloader_passed_to_fit() -> None:
    module = _Module(_cfg("ls_lora", gid_batches=2), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(callbacks=[GIDWarmup()]).fit(module, train_dataloaders=_Data().train_dataloader())
    assert module.plan is not None and module.plan.variant == "ls_lora"
    assert all(e.spec.n_blocks == 1 for e in module.plan.entries.values())


class _DropoutModule(_Module):
    """The minimal module with dropout in the backbone, put in eval mode, and a spy on the warm-up's loss."""

    def __init__(self, adapter_cfg: dict, run_dir: Path | None) -> None:
        super().__init__(adapter_cfg, run_dir)
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 16)).eval()
        self.targets = ["0", "2"]
        self.modes_in_loss: list[tuple[bool, bool]] = []
        self.mode_at_configure: bool | None = None

    def training_loss(self, batch) -> torch.Tensor:
        if self.plan is None:  # the warm-up (no adapters yet)
            self.modes_in_loss.append((self.backbone.training, self.backbone[1].training))
        return super().training_loss(batch)

    def configure_model(self) -> None:
        self.mode_at_configure = self.backbone.training
        super().configure_model()


def test_gid_warmup_runs_in_train_mode_and_records_it(tmp_path) -> None:
    module = _DropoutModule(_cfg("ralora", r=2, r_ref=2, gid_batches=2), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(callbacks=[GIDWarmup()]).fit(module, datamodule=_Data())
    assert module.modes_in_loss == [(True, True)] * 2  # backbone and its dropout trained during the warm-up
    assert module.mode_at_configure is False  # the eval mode it had before the warm-up came back
    blob = json.loads((tmp_path / "gid.json").read_text())
    assert blob["train_mode"] is True and blob["dropout_modules_active"] == 1
    assert module.plan.meta["gid_train_mode"] is True and module.plan.meta["gid_dropout_modules_active"] == 1


@pytest.mark.parametrize("case", ["no_gid", "preset", "ckpt"])
def test_gid_warmup_skips(case: str, monkeypatch) -> None:
    cfg = _cfg("ralora") if case != "no_gid" else {"name": "lora", "kind": "lora", "r": 2, "alpha": 4}
    module = _Module(cfg, None)
    preset = AdapterPlan(variant="ralora", entries={})
    if case == "preset":
        module.plan = preset
    trainer = _trainer()
    if case == "ckpt":
        monkeypatch.setattr(type(trainer), "ckpt_path", property(lambda self: "last.ckpt"))
    called = []
    monkeypatch.setattr(GIDWarmup, "estimate_plan", lambda *a: called.append(1))
    GIDWarmup().setup(trainer, module, "fit")
    GIDWarmup().setup(trainer, _Module(_cfg("ralora"), None), "validate")
    assert called == []
    assert module.plan is (preset if case == "preset" else None)


def test_gid_warmup_rejects_bad_batches_and_cfg() -> None:
    with pytest.raises(ValueError, match=r"adapter\.gid_batches"):
        GIDWarmup(batches=0)
    module = _Module(_cfg("ralora", n_max=3), None)
    with pytest.raises(ValueError, match=r"adapter\.n_max must be a power of two"):
        GIDWarmup().setup(_trainer(), module, "fit")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_warmup_shards_sums_and_runs_on_rank0_alone_with_load_on_rank0(tmp_path, sft_file) -> None:
    """trainer=fsdp2, 2 ranks, RaLoRA on a hub directory. Every rank loading: the fp32 sums are split between the
    ranks (bytes per rank sum to every target's fp32 size, neither rank holds them all). model.load_on_rank0: rank 1
    loads nothing, rank 0 runs the whole warm-up (the same 2 x 2 batches) alone; the plans and the trained
    adapters agree."""
    import json

    from lightning_ralora.data.tokenizer import byte_tokenizer
    from lightning_ralora.modules.adapter_module import AdapterModule
    from tests.conftest import make_cfg, run_cli

    cfg = make_cfg(tmp_path)
    hub = tmp_path / "hub"
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    module.backbone.save_pretrained(hub)
    byte_tokenizer().save_pretrained(hub)
    common = ["debug=fast", "trainer=fsdp2", "task=sft", f"task.data_files={sft_file}", f"model.pretrained={hub}"]
    common += [f"model.tokenizer={hub}", "model.config=null", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    common += ["adapter=ralora", "adapter.gid_batches=2"]
    results = {}
    for run, extra in (("every", []), ("rank0", ["+model.load_on_rank0=true"])):
        res = run_cli(tmp_path / run, *common, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        results[run] = json.loads((tmp_path / run / "results.json").read_text())
    every, rank0 = (results[r]["plan"]["meta"] for r in ("every", "rank0"))
    target_bytes = 4 * sum(module.backbone.get_submodule(t).weight.numel() for t in module.targets)
    assert every["gid_sums_sharded"] and sum(every["gid_sum_bytes_per_rank"]) == target_bytes
    assert max(every["gid_sum_bytes_per_rank"]) < target_bytes
    assert rank0["gid_rank0_only"] and rank0["gid_sum_bytes_per_rank"] == [target_bytes]
    assert every["gid_batches_total"] == rank0["gid_batches_total"] == 4
    loaded = json.loads((tmp_path / "rank0" / "load_bytes.json").read_text())["loaded_bytes_per_rank"]
    assert loaded[1] == 0 and loaded[0] > 0
    a, b = (results[r]["plan"]["entries"] for r in ("every", "rank0"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["erank"] == pytest.approx(b[name]["erank"], rel=1e-4)
        assert a[name]["spec"] == b[name]["spec"]
    assert results["every"]["adapter_state_digest_per_rank"] == results["rank0"]["adapter_state_digest_per_rank"]
