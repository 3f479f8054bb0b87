"""docs/maths.md §0 contract, checked for every adapter configuration in tests/adapter_cases.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_ralora.adapters import ADAPTER_CLASSES, LayerSpec, inject
from tests.adapter_cases import CASES, IN, OUT, Case

ids = [c.name for c in CASES]


def _base(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def _randomise(layer) -> None:
    """Give the update non-zero factors (B starts at zero, which would make every check trivial)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _trained_layer(case: Case, seed: int = 0):
    layer = case.build(_base(seed))
    _randomise(layer)
    case.prepare(layer)
    return layer


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_step0_output_equals_base(case: Case) -> None:
    base = _base()
    ref = nn.Linear(IN, OUT)
    ref.load_state_dict(base.state_dict())
    layer = case.build(base)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_forward_equals_dense_formula(case: Case) -> None:
    layer = _trained_layer(case)
    assert torch.count_nonzero(layer.delta_weight()) > 0
    x = torch.randn(7, IN)
    w = layer.base.weight + layer.delta_weight()
    torch.testing.assert_close(layer(x), x @ w.T + layer.base.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32_base", "bf16_base"])
def test_bf16_autocast_forward_and_gradients_follow_the_dense_formula(case: Case, model_dtype: torch.dtype) -> None:
    """Under bf16 autocast (Lightning's bf16-mixed; on CPU here) with an fp32 or bf16 base: the output and the
    gradients of x and of every fp32 factor equal fp32 autograd through W + ΔW within bf16 rounding (2 %)."""
    layer = _trained_layer(case)
    layer.base.to(model_dtype)
    x = torch.randn(3, 5, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape)
    y.float().backward(g)
    factors = dict(layer.named_parameters())
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = {n: p.detach().float().clone().requires_grad_(p.requires_grad) for n, p in factors.items()}
    with torch.nn.utils.stateless._reparametrize_module(layer, ref_w):
        w = ref_w["base.weight"] + layer.delta_weight()
        ref = ref_x @ w.T + ref_w["base.bias"]
    ref.backward(g)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.float(), ref.detach(), rtol=0, atol=0.02 * scale)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0.02 * ref_x.grad.abs().max().item())
    for name, p in factors.items():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            tol = 0.02 * ref_w[name].grad.abs().max().item()
            torch.testing.assert_close(p.grad, ref_w[name].grad, rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_compiled_update_equals_eager(case: Case) -> None:
    """adapter.compile: the torch.compile'd update gives the eager output and gradients (x and every factor)."""
    layer = _trained_layer(case)
    x = torch.randn(3, 5, IN, requires_grad=True)
    g = torch.randn(3, 5, OUT)
    results = []
    for compiled in (False, True):
        layer.compiled = compiled
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y.backward(g)
        results.append([y.detach(), x.grad, *(p.grad for p in layer.adapter_parameters())])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_adapter_compile_key_compiles_every_layer_and_keeps_the_output() -> None:
    """`adapter.compile=true` reaches every injected layer; the model's logits equal the eager model's."""
    from lightning_ralora.modules.adapter_module import AdapterModule
    from lightning_ralora.run.compose import compose_config

    outputs = []
    for flag in ("false", "true"):
        cfg = compose_config(["debug=fast", "adapter=gralora", f"adapter.compile={flag}"], run_dir="/tmp/unused")
        torch.manual_seed(0)
        module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
        module.configure_model()
        layers = module.adapter_layers().values()
        assert layers and all(layer.compiled == (flag == "true") for layer in layers)
        _randomise_all(module.backbone)
        ids = torch.arange(24).view(2, 12)
        outputs.append(module.backbone(input_ids=ids).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def _randomise_all(model: nn.Module) -> None:
    from lightning_ralora.adapters import adapter_layers

    for layer in adapter_layers(model).values():
        _randomise(layer)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_merge_unmerge_round_trip(case: Case) -> None:
    layer = _trained_layer(case)
    x = torch.randn(4, IN)
    w0 = layer.base.weight.clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        nn.functional.linear(x, layer.base.weight, layer.base.bias), before, rtol=1e-5, atol=1e-5
    )
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_num_trainable_equals_formula(case: Case) -> None:
    layer = case.build(_base())
    by_hand = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert layer.num_trainable == by_hand == case.params_formula(OUT, IN) == layer.expected_num_trainable
    assert layer.equivalent_rank >= 1


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_only_adapter_parameters_change(case: Case) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, IN), nn.ReLU(), nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 3))
    spec = case.build(nn.Linear(IN, OUT)).spec()
    layers = inject(model, ["2"], spec)
    layer = layers["2"]
    _randomise(layer)
    case.prepare(layer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"2.{n}" for n, p in layer.named_parameters() if not n.startswith("base.")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(8, IN)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_spec_rebuilds_same_structure(case: Case) -> None:
    layer = _trained_layer(case)
    spec = LayerSpec.from_dict(json.loads(json.dumps(layer.spec().to_dict())))
    rebuilt = ADAPTER_CLASSES[spec.kind].from_spec(_base(), spec)
    assert {n: p.shape for n, p in rebuilt.state_dict().items()} == {n: p.shape for n, p in layer.state_dict().items()}
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(5, IN)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)


def test_save_load_in_fresh_process_gives_identical_outputs(tmp_path) -> None:
    x = torch.randn(6, IN)
    saved = {}
    for case in CASES:
        layer = _trained_layer(case)
        torch.save({"spec": layer.spec().to_dict(), "state": layer.state_dict()}, tmp_path / f"{case.name}.pt")
        saved[case.name] = layer(x).detach()
    torch.save({"x": x, "out": saved}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from lightning_ralora.adapters import ADAPTER_CLASSES, LayerSpec
        exp = torch.load(r"{tmp_path / "expected.pt"}")
        for name, out in exp["out"].items():
            blob = torch.load(r"{tmp_path}" + "/" + name + ".pt")
            spec = LayerSpec.from_dict(blob["spec"])
            layer = ADAPTER_CLASSES[spec.kind].from_spec(nn.Linear({IN}, {OUT}), spec)
            layer.load_state_dict(blob["state"])
            assert torch.equal(layer(exp["x"]), out), name
        print("checked", len(exp["out"]))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"checked {len(CASES)}" in res.stdout
