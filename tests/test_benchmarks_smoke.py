"""Smoke test of the benchmark suite: `python -m benchmarks.run --quick` end to end (no timing assertions)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")


@pytest.mark.slow
def test_quick_suite_writes_every_section_and_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`benchmarks.run.main` with the CLI's --quick arguments, in this process (the suite's imports are mostly the
    test session's already); the global state it sets (threads, log levels, the bench task) is put back."""
    from benchmarks.common import TARGETS
    from benchmarks.harness import BenchLMTask
    from benchmarks.run import SECTIONS, main
    from lightning_ralora.tasks import TASKS

    out = tmp_path / "bench.json"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    had_task = BenchLMTask.name in TASKS
    try:
        main(["--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if not had_task:
            TASKS.pop(BenchLMTask.name, None)
    stdout = capsys.readouterr().out
    data = json.loads(out.read_text())

    for key in ("torch", "device", "host", "date", "threads"):
        assert key in data["environment"]
    assert set(data["sections"]) == set(SECTIONS)
    for name, section in data["sections"].items():
        assert section["figures"], f"section {name} has no figures"
        for fig in section["figures"]:
            for q in ("median", "q1", "q3"):
                v = fig["ratio"][q]
                assert math.isfinite(v) and v > 0, f"{fig['key']}: {q} = {v}"
    measured = {f["target_id"] for s in data["sections"].values() for f in s["figures"] if f["target_id"]}
    assert measured == set(TARGETS)
    table = out.with_suffix(".md").read_text()
    assert "| figure | measured ratio (spread) | target | met? |" in table
    for target in TARGETS.values():
        assert target["text"] in table and target["text"] in stdout
    for figures in data["figures"].values():
        assert figures["met"] in (True, False, None)


def test_paired_ratios_and_round_robin() -> None:
    from benchmarks.common import paired_ratio, round_robin

    calls: list[str] = []
    times = round_robin({"a": lambda: calls.append("a") or 2.0, "b": lambda: calls.append("b") or 1.0}, 3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating start
    r = paired_ratio(times["a"], times["b"])
    assert r["median"] == r["q1"] == r["q3"] == r["ratio_of_medians"] == 2.0 and r["n"] == 3


def test_cli_rejects_unknown_section() -> None:
    from benchmarks.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--sections", "layer,nope"])


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("lora", {}),
        ("ralora", {"n_blocks": 4, "scale": None}),
        ("gralora", {"k": 2}),
        ("gralora", {"k": 2, "hybrid_r": 4}),
        ("sds", {}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_update_matches_dense_with_gradients(kind: str, kw: dict, dtype: torch.dtype) -> None:
    """The fast paths (addmm_/baddbmm_ into the base output, `_AddBlocks`) give the dense ΔW reference's output
    and gradients (input and factors); a bf16 base takes the add_ fallback with fp32 factors."""
    from benchmarks.variants import _Holder, prepare_layers
    from lightning_ralora.adapters.registry import VARIANTS

    torch.manual_seed(0)
    layer = VARIANTS[kind].layer.from_spec(
        torch.nn.Linear(16, 24).to(dtype), VARIANTS[kind].config(r=8, alpha=16.0, **kw).to_spec()
    )
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    prepare_layers(_Holder(layer))
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 24, dtype=dtype)
    layer(x).backward(g)
    got = [x.grad, *(p.grad for p in layer.adapter_parameters())]
    x.grad = None
    layer.zero_grad()
    w = layer.base.weight.float() + layer.delta_weight()
    ref = x.float() @ w.T + layer.base.bias.float()
    ref.backward(g.float())
    want = [x.grad, *(p.grad for p in layer.adapter_parameters())]
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert layer(x).dtype == dtype and all(p.dtype == torch.float32 for p in layer.adapter_parameters())
    torch.testing.assert_close(layer(x).float(), ref, rtol=tol, atol=tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_roofline_counts_every_product_lora_and_sds_add() -> None:
    """benchmarks/roofline.py's terms against hand counts: LoRA adds six rank-r products (two forward, dB, dh, dA,
    dX) = 2·t·r·(3n + 3m) FLOPs; SDS-LoRA after its switch the work of ten (its Q's get no gradient) = 2·t·r·(5n + 5m),
    in six products (the two forward ones, dh and dX of rank 2r); an accumulating product reads and writes its
    output."""
    from benchmarks.roofline import Term, terms

    t, n, m, r = 7, 5, 3, 2
    assert sum(term.flops for term in terms("lora", t, n, m, r)) == 2 * t * r * (3 * n + 3 * m)
    assert sum(term.flops for term in terms("sds", t, n, m, r)) == 2 * t * r * (5 * n + 5 * m)
    assert [term.inner for term in terms("sds", t, n, m, r) if term.accumulate] == [2 * r, 2 * r]  # y and dX once
    assert Term("y", t, r, m, accumulate=True).bytes == 4 * (t * r + r * m + 2 * t * m)
    assert Term("h", t, n, r).bytes == 4 * (t * n + n * r + t * r)


def test_roofline_cli_reports_bounds_and_measured_ratios(tmp_path: Path) -> None:
    """A tiny run of `python -m benchmarks.roofline`: both variants, bounds >= 1 and measured ratios for each."""
    from benchmarks.roofline import main

    main(
        [
            "--tokens",
            "8",
            "--shapes",
            "16x24",
            "--r",
            "2",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    (res,) = json.loads((tmp_path / "r.json").read_text())
    for variant in ("lora", "sds"):
        assert res[variant]["bound_ratio"] > 1 and res[variant]["measured_ratio"]["median"] > 0
        assert len(res[variant]["terms"]) == 6
    assert res["sds_vs_lora"]["n"] == 2
    assert set(res["by_hand"]) == {"lora_in_place", "lora_summed"}
    assert res["fused_vs_lora"]["n"] == res["sds_vs_by_products"]["n"] == 2


def test_roofline_fused_lora_function_equals_the_layer_under_autograd() -> None:
    """The fused candidate (`_FusedLoRA`: base and LoRA as one node, dX accumulated by one addmm_) gives our LoRA
    layer's output and its x, A and B gradients (B non-zero, so every product counts)."""
    from benchmarks.roofline import FusedLoRA
    from lightning_ralora.adapters.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 20, bias=False).requires_grad_(False), r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(9, 12, requires_grad=True), torch.randn(9, 20)
    results = []
    for module in (layer, FusedLoRA(layer)):
        y = module(x)
        grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
        results.append((y, *grads))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)
    assert results[0][3].abs().sum() > 0


def test_roofline_sds_by_products_equals_the_switched_layer() -> None:
    """The product-by-product SDS update the roofline times beside the layer gives the switched layer's output and
    gradients (so the two time the same maths)."""
    from benchmarks.roofline import SDSByProducts
    from lightning_ralora.adapters.sds import SDSLoRALinear

    torch.manual_seed(0)
    layer = SDSLoRALinear(torch.nn.Linear(12, 20, bias=False).requires_grad_(False), r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.reparameterize()
    x, g = torch.randn(9, 12, requires_grad=True), torch.randn(9, 20)
    results = []
    for module in (layer, SDSByProducts(layer)):
        y = module(x)
        results.append((y, *torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)
