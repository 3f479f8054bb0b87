"""GraLoRA / Hybrid GraLoRA (docs/maths.md §5), each property checked against an independent reference
(peft, linalg)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import GraloraConfig, get_peft_model
from torch import nn

from lightning_ralora.adapters import GraLoRALinear, LayerSpec, inject
from lightning_ralora.adapters.gralora import load_peft_gralora_state, to_peft_gralora_state

IN, OUT = 16, 24


class Tiny(nn.Module):
    """A one-linear model for peft to wrap."""

    def __init__(self, n: int = IN, m: int = OUT) -> None:
        super().__init__()
        self.proj = nn.Linear(n, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _pair(r: int, k: int, h: int, alpha: float = 8.0, n: int = IN, m: int = OUT, seed: int = 0):
    """Our layer and peft's GraLoRA on identical copies of one base linear."""
    torch.manual_seed(seed)
    model = Tiny(n, m)
    ours = GraLoRALinear(copy.deepcopy(model.proj), r=r, k=k, alpha=alpha, hybrid_r=h)
    cfg = GraloraConfig(r=r, gralora_k=k, hybrid_r=h, alpha=alpha, target_modules=["proj"])
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    return ours, peft_model, peft_model.base_model.model.proj


def _randomise(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _peft_adapter_params(peft_layer: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in peft_layer.named_parameters() if n.startswith("gralora_")]


CONFIGS = [(4, 2, 0), (4, 2, 2), (8, 4, 0), (8, 4, 4), (4, 1, 0)]  # (r, k, hybrid_r)
cfg_ids = [f"r{r}-k{k}-h{h}" for r, k, h in CONFIGS]


@pytest.mark.parametrize(("r", "k", "h"), CONFIGS, ids=cfg_ids)
def test_parameter_count_matches_formula_and_peft(r: int, k: int, h: int) -> None:
    ours, peft_model, _ = _pair(r, k, h)
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    assert ours.num_trainable == (r + h) * (IN + OUT) == peft_trainable == ours.expected_num_trainable
    # GraLoRA keeps LoRA's parameter count: k^2 blocks of (r/k)(m/k + n/k)
    assert k * k * (r // k) * (IN // k + OUT // k) == r * (IN + OUT)


@pytest.mark.parametrize(("r", "k", "h"), CONFIGS, ids=cfg_ids)
def test_scale_follows_peft(r: int, k: int, h: int) -> None:
    ours, _, peft_layer = _pair(r, k, h, alpha=12.0)
    assert ours.scaling == peft_layer.scaling["default"] == 12.0 / (r + h)


def test_init_law_kaiming_fan_in_n_over_k_and_zero_b() -> None:
    torch.manual_seed(0)
    n, m, r, k = 256, 64, 16, 4
    layer = GraLoRALinear(nn.Linear(n, m), r=r, k=k, alpha=32, hybrid_r=4)
    bound = 1 / math.sqrt(n // k)
    a = layer.gralora_A.detach()
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound  # uniform on (-bound, bound): the extremes are reached
    assert abs(a.var().item() - bound**2 / 3) < 0.1 * bound**2 / 3
    assert layer.hybrid_A.abs().max() <= 1 / math.sqrt(n)
    assert torch.count_nonzero(layer.gralora_B) == 0 and torch.count_nonzero(layer.hybrid_B) == 0


@pytest.mark.parametrize(("r", "k", "h"), [(4, 2, 0), (8, 4, 0), (4, 2, 3), (8, 2, 2)])
def test_blocks_have_rank_r_over_k_whole_has_rank_kr(r: int, k: int, h: int) -> None:
    n, m = 32, 48
    layer = GraLoRALinear(nn.Linear(n, m).double(), r=r, k=k, alpha=2 * r, hybrid_r=h)
    _randomise(layer.adapter_parameters(), seed=3)
    dw = layer.delta_weight().detach()
    mb, nb = m // k, n // k
    grid = layer.gralora_B.detach() @ layer.gralora_A.detach()  # (k, k, m/k, n/k): the granular part per block
    for i in range(k):
        for j in range(k):
            assert torch.linalg.matrix_rank(grid[i, j]) <= r // k
            if h == 0:
                assert torch.linalg.matrix_rank(dw[i * mb : (i + 1) * mb, j * nb : (j + 1) * nb]) == r // k
    assert torch.linalg.matrix_rank(dw) == k * r + h == layer.equivalent_rank
    # plain LoRA of the same rank would be capped at r + h: GraLoRA's grid multiplies the expressive rank by k
    assert k * r + h > r + h or k == 1


@pytest.mark.parametrize(("r", "k", "h"), CONFIGS, ids=cfg_ids)
@pytest.mark.parametrize("shape", [(5, IN), (3, 7, IN)], ids=["2d", "3d"])
def test_peft_to_ours_same_outputs(r: int, k: int, h: int, shape: tuple[int, ...]) -> None:
    ours, peft_model, peft_layer = _pair(r, k, h)
    _randomise(_peft_adapter_params(peft_layer), seed=1)
    state = {n: t for n, t in peft_layer.state_dict().items() if n.startswith("gralora_")}
    load_peft_gralora_state(ours, state)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.delta_weight(), peft_layer.get_delta_weight("default"), rtol=1e-5, atol=1e-5)
    # and back: the mapping is a bijection on peft's layout
    back = to_peft_gralora_state(ours)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize(("r", "k", "h"), CONFIGS, ids=cfg_ids)
def test_ours_to_peft_same_outputs_and_merge(r: int, k: int, h: int) -> None:
    ours, peft_model, peft_layer = _pair(r, k, h)
    _randomise(ours.adapter_parameters(), seed=2)
    result = peft_layer.load_state_dict(to_peft_gralora_state(ours), strict=False)
    assert not result.unexpected_keys
    assert {k for k in result.missing_keys if k.startswith("gralora_")} == set()
    x = torch.randn(4, 6, IN)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(peft_model(x), expected, rtol=1e-5, atol=1e-5)
        peft_layer.merge()
        ours.merge()
        torch.testing.assert_close(peft_layer.get_base_layer().weight, ours.base.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_model(x), expected, rtol=1e-5, atol=1e-5)


def test_saved_peft_keys_without_adapter_name_round_trip() -> None:
    ours, _, peft_layer = _pair(4, 2, 2)
    _randomise(ours.adapter_parameters(), seed=4)
    saved = to_peft_gralora_state(ours, adapter_name=None)
    assert set(saved) == {"gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight"}
    other = GraLoRALinear(nn.Linear(IN, OUT), r=4, k=2, alpha=8, hybrid_r=2)
    load_peft_gralora_state(other, saved)
    torch.testing.assert_close(other.delta_weight(), ours.delta_weight(), rtol=0, atol=0)


@pytest.mark.parametrize(("r", "k", "h"), [(4, 2, 0), (8, 4, 2)])
def test_one_sgd_step_stays_equal_to_peft(r: int, k: int, h: int) -> None:
    """Same gradients as peft (through the layout map): an optimizer step keeps the two models equal."""
    ours, peft_model, peft_layer = _pair(r, k, h)
    _randomise(_peft_adapter_params(peft_layer), seed=5)
    load_peft_gralora_state(ours, {n: t for n, t in peft_layer.state_dict().items() if n.startswith("gralora_")})
    x, y = torch.randn(8, IN), torch.randn(8, OUT)
    for model, params in ((ours, ours.adapter_parameters()), (peft_model, _peft_adapter_params(peft_layer))):
        opt = torch.optim.SGD(params, lr=0.1)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    peft_state = {n: t for n, t in peft_layer.state_dict().items() if n.startswith("gralora_")}
    for key, value in to_peft_gralora_state(ours).items():
        torch.testing.assert_close(value, peft_state[key], rtol=1e-5, atol=1e-6)


FUSED = [(4, 1, 2), (4, 2, 2), (8, 4, 4), (4, 4, 6), (8, 2, 0), (8, 4, 0)]  # (r, k, hybrid_r): k ∈ {1, 2, 4}


@pytest.mark.parametrize(("r", "k", "h"), FUSED, ids=[f"r{r}-k{k}-h{h}" for r, k, h in FUSED])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("shape", [(5, IN), (3, 7, IN)], ids=["2d", "3d"])
def test_fused_grid_and_hybrid_match_dense_reference(r: int, k: int, h: int, p: float, shape: tuple) -> None:
    """The fused grid (+ hybrid) products give x Wᵀ + drop(x) ΔWᵀ and its input and parameter gradients, ΔW from
    `delta_weight` (the block einsum) under autograd; `update` alone (no base output) gives x ΔWᵀ."""
    torch.manual_seed(0)
    layer = GraLoRALinear(nn.Linear(IN, OUT), r=r, k=k, alpha=6.0, hybrid_r=h, dropout=p).train()
    _randomise(layer.adapter_parameters(), seed=3)
    names, params = zip(*((n, q) for n, q in layer.named_parameters() if q.requires_grad), strict=True)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], OUT)
    torch.manual_seed(1)
    y = layer(x)
    got = torch.autograd.grad(y, [x, *params], g)
    torch.manual_seed(1)  # the same dropout mask
    xd = nn.functional.dropout(x, p, training=True) if p > 0 else x
    ref = nn.functional.linear(x, layer.base.weight, layer.base.bias) + xd @ layer.delta_weight().t()
    want = torch.autograd.grad(ref, [x, *params], g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", *names), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(layer.update(x), x @ layer.delta_weight().t(), rtol=1e-5, atol=1e-5)


ERRORS = [
    (dict(r=6, k=4, n=16, m=24), "adapter.k=4 must divide adapter.r=6"),
    (dict(r=4, k=2, n=15, m=24), "adapter.k=2 must divide in_features=15"),
    (dict(r=4, k=2, n=16, m=25), "adapter.k=2 must divide out_features=25"),
    (dict(r=4, k=0, n=16, m=24), "adapter.k must be a positive integer, got 0"),
    (dict(r=4, k=-2, n=16, m=24), "adapter.k must be a positive integer, got -2"),
    (dict(r=0, k=2, n=16, m=24), "adapter.r must be a positive integer, got 0"),
    (dict(r=4, k=2, n=16, m=24, h=-1), "adapter.hybrid_r must be a non-negative integer, got -1"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=["k|r", "k|in", "k|out", "k=0", "k<0", "r=0", "h<0"])
def test_error_messages(args: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        GraLoRALinear(nn.Linear(args["n"], args["m"]), r=args["r"], k=args["k"], alpha=8, hybrid_r=args.get("h", 0))
    assert message in str(err.value)


def test_all_problems_reported_in_one_error() -> None:
    with pytest.raises(ValueError) as err:
        GraLoRALinear(nn.Linear(15, 25), r=6, k=4, alpha=8)
    text = str(err.value)
    for part in ("must divide adapter.r=6", "must divide in_features=15", "must divide out_features=25"):
        assert part in text


def test_bad_spec_leaves_model_unchanged() -> None:
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 15))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="must divide out_features=15"):
        inject(model, ["0", "2"], LayerSpec(kind="gralora", r=4, alpha=8, k=2))
    assert all(isinstance(m, nn.Linear | nn.ReLU) for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_rejects_mismatched_peft_state() -> None:
    ours = GraLoRALinear(nn.Linear(IN, OUT), r=4, k=2, alpha=8)
    hybrid = GraLoRALinear(nn.Linear(IN, OUT), r=4, k=2, alpha=8, hybrid_r=2)
    with pytest.raises(KeyError, match="needs"):
        load_peft_gralora_state(ours, to_peft_gralora_state(hybrid))
    wrong_k = GraLoRALinear(nn.Linear(IN, OUT), r=4, k=4, alpha=8)
    with pytest.raises(ValueError, match="do not fit this layer"):
        load_peft_gralora_state(ours, to_peft_gralora_state(wrong_k))
