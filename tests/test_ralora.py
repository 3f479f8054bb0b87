"""RaLoRALinear (docs/maths.md §3) against independent references: a per-block loop, LoRALinear, the parameter
formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_ralora.adapters import LoRALinear, RaLoRALinear
from lightning_ralora.adapters.schema import LayerSpec

OUT, IN = 24, 32


def _random_factors(layer: RaLoRALinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def _loop_reference(layer: RaLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The definition, block by block: chunk i of the input goes through B_i A_i into chunk i of the output."""
    n = layer.n_blocks
    chunks = x.chunk(n, dim=-1)
    outs = [chunks[i] @ layer.lora_A[i].T @ layer.lora_B[i].T for i in range(n)]
    return layer.base(x) + layer.scaling * torch.cat(outs, dim=-1)


@pytest.mark.parametrize("n_blocks", [1, 2, 4, 8])
def test_forward_equals_per_block_loop(n_blocks: int) -> None:
    torch.manual_seed(0)
    layer = RaLoRALinear(nn.Linear(IN, OUT), r=3, n_blocks=n_blocks, alpha=6)
    _random_factors(layer)
    x = torch.randn(2, 5, IN)
    torch.testing.assert_close(layer(x), _loop_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_blocks", [1, 2, 4, 8])
def test_param_count_equals_lora_at_same_rank(n_blocks: int) -> None:
    r = 4
    ra = RaLoRALinear(nn.Linear(IN, OUT), r=r, n_blocks=n_blocks, alpha=8)
    lo = LoRALinear(nn.Linear(IN, OUT), r=r, alpha=8)
    assert ra.num_trainable == lo.num_trainable == r * (IN + OUT) == ra.expected_num_trainable
    assert ra.lora_A.shape == (n_blocks, r, IN // n_blocks)
    assert ra.lora_B.shape == (n_blocks, OUT // n_blocks, r)


@pytest.mark.parametrize(("r", "n_blocks"), [(2, 1), (2, 2), (2, 4), (3, 8), (5, 4)])
def test_delta_weight_block_diagonal_with_rank_n_r(r: int, n_blocks: int) -> None:
    layer = RaLoRALinear(nn.Linear(IN, OUT), r=r, n_blocks=n_blocks, alpha=2 * r)
    _random_factors(layer, seed=r + n_blocks)
    dw = layer.delta_weight().detach()
    assert dw.shape == (OUT, IN)
    bo, bi = OUT // n_blocks, IN // n_blocks
    for i in range(n_blocks):
        for j in range(n_blocks):
            block = dw[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            if i == j:
                ref = layer.scaling * layer.lora_B[i].detach() @ layer.lora_A[i].detach()
                torch.testing.assert_close(block, ref, rtol=1e-6, atol=1e-6)
            else:
                assert torch.count_nonzero(block) == 0, f"off-diagonal block ({i}, {j}) is not exactly zero"
    expected = min(n_blocks * min(r, bo, bi), OUT, IN)
    assert int(torch.linalg.matrix_rank(dw)) == expected == layer.equivalent_rank


def test_n_blocks_1_is_exactly_lora() -> None:
    torch.manual_seed(3)
    base = nn.Linear(IN, OUT)
    torch.manual_seed(7)
    lo = LoRALinear(base, r=4, alpha=8)
    torch.manual_seed(7)
    ra = RaLoRALinear(base, r=4, n_blocks=1, alpha=8)
    # the same RNG state draws the same A (the init law with fan-in in/1 is LoRA's)
    assert torch.equal(ra.lora_A[0], lo.lora_A)
    with torch.no_grad():
        lo.lora_B.copy_(torch.randn_like(lo.lora_B))
        ra.lora_A.copy_(lo.lora_A[None])
        ra.lora_B.copy_(lo.lora_B[None])
    x = torch.randn(3, 7, IN)
    assert torch.equal(ra(x), lo(x))
    torch.testing.assert_close(ra.delta_weight(), lo.delta_weight(), rtol=0, atol=1e-7)
    assert ra.equivalent_rank == lo.equivalent_rank


@pytest.mark.parametrize("n_blocks", [1, 4])
def test_init_law_and_step0(n_blocks: int) -> None:
    torch.manual_seed(0)
    layer = RaLoRALinear(nn.Linear(256, 128), r=16, n_blocks=n_blocks, alpha=16)
    bound = 1 / math.sqrt(256 // n_blocks)
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound  # uniform on the full interval, not a narrower one
    torch.testing.assert_close(a.var(), torch.tensor(bound**2 / 3), rtol=0.1, atol=0)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_scale_default_and_explicit() -> None:
    assert RaLoRALinear(nn.Linear(IN, OUT), r=4, n_blocks=2, alpha=16).scaling == 4.0
    layer = RaLoRALinear(nn.Linear(IN, OUT), r=4, n_blocks=2, alpha=16, scale=2.0)
    assert layer.scaling == 2.0
    spec = layer.spec()
    assert spec == LayerSpec(kind="ralora", r=4, alpha=16.0, dropout=0.0, n_blocks=2, scale=2.0)
    rebuilt = RaLoRALinear.from_spec(nn.Linear(IN, OUT), spec)
    assert rebuilt.scaling == 2.0 and rebuilt.n_blocks == 2
    assert RaLoRALinear.from_spec(nn.Linear(IN, OUT), LayerSpec(kind="ralora", r=4, alpha=16)).scaling == 4.0


def test_update_is_one_batched_contraction(monkeypatch) -> None:
    """No Python loop over blocks: the update touches the factors through whole-tensor ops only."""
    layer = RaLoRALinear(nn.Linear(IN, OUT), r=2, n_blocks=4, alpha=4)
    _random_factors(layer)
    calls = []
    real_bmm = torch.bmm

    def counting_bmm(*args, **kwargs):
        calls.append(args[0].shape)
        return real_bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    layer.update(torch.randn(5, IN))
    assert len(calls) == 2 and all(s[0] == 4 for s in calls)


def test_gradients_flow_to_every_block() -> None:
    layer = RaLoRALinear(nn.Linear(IN, OUT), r=2, n_blocks=4, alpha=4)
    _random_factors(layer)
    layer(torch.randn(6, IN)).pow(2).sum().backward()
    for i in range(4):
        assert layer.lora_A.grad[i].abs().sum() > 0 and layer.lora_B.grad[i].abs().sum() > 0
    assert layer.base.weight.grad is None


@pytest.mark.parametrize(
    ("n_blocks", "match"),
    [
        (3, "must divide both out_features=24 and in_features=32"),
        (16, "must divide both"),
        (0, "positive integer"),
        (-2, "positive integer"),
        (2.0, "positive integer"),
        (True, "positive integer"),
    ],
)
def test_bad_n_blocks(n_blocks, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RaLoRALinear(nn.Linear(IN, OUT), r=2, n_blocks=n_blocks, alpha=4)


def test_bad_rank_and_scale() -> None:
    with pytest.raises(ValueError, match="adapter.r must be a positive integer"):
        RaLoRALinear(nn.Linear(IN, OUT), r=0, n_blocks=2, alpha=4)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        RaLoRALinear(nn.Linear(IN, OUT), r=2, n_blocks=2, alpha=4, scale=-1.0)


def test_merge_with_blocks_matches_unmerged_output() -> None:
    layer = RaLoRALinear(nn.Linear(IN, OUT), r=3, n_blocks=8, alpha=6, scale=0.5)
    _random_factors(layer)
    x = torch.randn(4, IN)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
