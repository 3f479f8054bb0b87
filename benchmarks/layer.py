"""Section 1: forward + backward of one adapted linear, every variant against our LoRA, peft and the frozen floor."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.common import Env, Figure, calibrate_inner, call_sampler, ratio_figure, round_robin, summarize
from benchmarks.variants import DESCRIPTIONS, LAYER_VARIANTS, build_layer

FULL = {"tokens": 4096, "shapes": [(1024, 1024), (1024, 4096)]}  # (in, out)
QUICK = {"tokens": 64, "shapes": [(32, 32), (32, 128)]}


def _step_fn(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, autocast: torch.dtype | None = None) -> Any:
    """One forward + backward; gradients are dropped afterwards so no call pays for accumulation. With `autocast`
    the forward runs under `torch.autocast` of that dtype (Lightning's bf16-mixed), the backward outside it."""
    params = [p for p in layer.parameters() if p.requires_grad]
    amp = torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None)

    def step() -> None:
        with amp:
            y = layer(x)
        y.backward(grad_out.to(y.dtype))
        x.grad = None
        for p in params:
            p.grad = None

    return step


def run(env: Env) -> dict[str, Any]:
    """Time every layer variant on each shape (interleaved), and the ratios against the references."""
    sizes = QUICK if env.quick else FULL
    repeats = env.repeats.get("layer", 2 if env.quick else 15)
    min_sample_s = 0.001 if env.quick else 0.2
    tokens = sizes["tokens"]
    raw: dict[str, Any] = {}
    figures: list[Figure] = []
    params: dict[str, dict[str, int]] = {}
    for n_in, n_out in sizes["shapes"]:
        shape = f"{n_in}x{n_out}"
        torch.manual_seed(0)
        base = nn.Linear(n_in, n_out, bias=False).to(env.device, env.dtype)
        x = torch.randn(tokens, n_in, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_out = torch.randn(tokens, n_out, device=env.device, dtype=env.dtype)
        samplers = {}
        params[shape] = {}
        for variant in LAYER_VARIANTS:
            layer = build_layer(variant, base).train()
            params[shape][variant] = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            fn = _step_fn(layer, x, grad_out)
            samplers[variant] = call_sampler(fn, env, calibrate_inner(fn, env, min_sample_s))
        times = round_robin(samplers, repeats)
        raw[shape] = {
            "in": n_in,
            "out": n_out,
            "tokens": tokens,
            "times_s": {v: summarize(t) for v, t in times.items()},
        }
        sec = "layer"
        where = f"layer {n_in}→{n_out}"
        figures += [
            ratio_figure(
                f"layer/{shape}/ralora_vs_lora",
                sec,
                f"{where}: RaLoRA (4 blocks) / our LoRA",
                times,
                "ralora",
                "lora",
                "ralora_vs_lora",
            ),
            ratio_figure(
                f"layer/{shape}/gralora_vs_lora",
                sec,
                f"{where}: GraLoRA (k=2) / our LoRA",
                times,
                "gralora",
                "lora",
                "gralora_vs_lora",
            ),
            ratio_figure(
                f"layer/{shape}/gralora_vs_peft_gralora",
                sec,
                f"{where}: our GraLoRA / peft GraLoRA",
                times,
                "gralora",
                "peft_gralora",
                "gralora_vs_peft_gralora",
            ),
            ratio_figure(
                f"layer/{shape}/lora_vs_peft_lora", sec, f"{where}: our LoRA / peft LoRA", times, "lora", "peft_lora"
            ),
            ratio_figure(
                f"layer/{shape}/sds_vs_lora",
                sec,
                f"{where}: SDS-LoRA (SDS phase) / our LoRA",
                times,
                "sds",
                "lora",
                note="per call after the switch; the run average is under schedules",
            ),
            ratio_figure(
                f"layer/{shape}/peft_dora_vs_lora", sec, f"{where}: peft DoRA / our LoRA", times, "peft_dora", "lora"
            ),
            ratio_figure(
                f"layer/{shape}/lora_vs_floor", sec, f"{where}: our LoRA / frozen floor", times, "lora", "floor"
            ),
            ratio_figure(
                f"layer/{shape}/peft_lora_vs_floor",
                sec,
                f"{where}: peft LoRA / frozen floor",
                times,
                "peft_lora",
                "floor",
            ),
        ]
    equal = {
        s: len({p[v] for v in ("lora", "ralora", "gralora", "sds", "peft_lora", "peft_gralora")}) == 1
        for s, p in params.items()
    }
    return {
        "config": {
            "tokens": tokens,
            "shapes_in_out": sizes["shapes"],
            "repeats": repeats,
            "dtype": str(env.dtype),
            "variants": {v: DESCRIPTIONS[v] for v in LAYER_VARIANTS},
        },
        "trainable_params": params,
        "equal_trainable_params": equal,
        "raw": raw,
        "figures": figures,
    }
