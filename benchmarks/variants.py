"""The variants at equal trainable parameters, as layers (for the layer section) and as whole-model adapters.

Every variant has r(m+n) trainable parameters per target, with r = 16: LoRA r=16; RaLoRA r=16 with 4 blocks;
GraLoRA r=16, k=2; SDS-LoRA r=16; peft LoRA r=16; peft GraLoRA r=16, gralora_k=2. peft DoRA r=16 adds its
magnitude vector (m more per target). Scales follow each variant's recipe (alpha = 2r; SDS alpha = 4).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_ralora.adapters import (
    GraLoRALinear,
    LayerSpec,
    LoRALinear,
    RaLoRALinear,
    SDSLoRALinear,
    adapter_layers,
    inject,
)

RANK = 16
ALPHA = 32.0
N_BLOCKS = 4
GRALORA_K = 2
SDS_ALPHA = 4.0

OURS = ("lora", "ralora", "gralora", "sds")
PEFT = ("peft_lora", "peft_gralora", "peft_dora")
LAYER_VARIANTS = ("floor", *OURS, *PEFT)

DESCRIPTIONS = {
    "floor": "frozen nn.Linear, no adapter (backward for activations only)",
    "lora": f"our LoRA r={RANK}",
    "ralora": f"our RaLoRA r={RANK}, {N_BLOCKS} blocks",
    "gralora": f"our GraLoRA r={RANK}, k={GRALORA_K}",
    "sds": f"our SDS-LoRA r={RANK} (SDS phase, after the switch)",
    "peft_lora": f"peft LoRA r={RANK}",
    "peft_gralora": f"peft GraLoRA r={RANK}, gralora_k={GRALORA_K}",
    "peft_dora": f"peft DoRA r={RANK}",
}


def spec(variant: str) -> LayerSpec:
    """Our LayerSpec for one of OURS."""
    if variant == "lora":
        return LayerSpec(kind="lora", r=RANK, alpha=ALPHA)
    if variant == "ralora":
        return LayerSpec(kind="ralora", r=RANK, alpha=ALPHA, n_blocks=N_BLOCKS)
    if variant == "gralora":
        return LayerSpec(kind="gralora", r=RANK, alpha=ALPHA, k=GRALORA_K)
    if variant == "sds":
        return LayerSpec(kind="sds", r=RANK, alpha=SDS_ALPHA)
    raise ValueError(f"no LayerSpec for variant {variant!r}; ours are {list(OURS)}")


def peft_config(variant: str, target_modules: list[str]) -> Any:
    """The peft config of one of PEFT."""
    from peft import GraloraConfig, LoraConfig

    if variant == "peft_lora":
        return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules)
    if variant == "peft_dora":
        return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules, use_dora=True)
    if variant == "peft_gralora":
        return GraloraConfig(r=RANK, alpha=int(ALPHA), gralora_k=GRALORA_K, target_modules=target_modules)
    raise ValueError(f"no peft config for variant {variant!r}; peft variants are {list(PEFT)}")


@torch.no_grad()
def switch_sds(model: nn.Module, seed: int = 0) -> int:
    """Give every SDS layer a small random B and reparameterize it (the SDS phase); returns how many switched."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for layer in adapter_layers(model).values():
        if isinstance(layer, SDSLoRALinear) and not layer.is_switched:
            b = torch.randn(layer.lora_B.shape, generator=gen) * 1e-2
            layer.lora_B.copy_(b.to(layer.lora_B.device, layer.lora_B.dtype))
            layer.reparameterize()
            n += 1
    return n


class _Holder(nn.Module):
    """A one-linear model, so peft can adapt a bare layer (the layer is then called directly)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def build_layer(variant: str, base: nn.Linear) -> nn.Module:
    """A copy of `base` adapted by `variant` (or left bare and frozen for "floor"), on base's device and dtype."""
    base = copy.deepcopy(base)
    if variant == "floor":
        return base.requires_grad_(False)
    if variant in OURS:
        cls = {"lora": LoRALinear, "ralora": RaLoRALinear, "gralora": GraLoRALinear, "sds": SDSLoRALinear}[variant]
        layer = cls.from_spec(base, spec(variant))
        if variant == "sds":
            holder = _Holder(layer)
            switch_sds(holder)
        return layer
    from peft import get_peft_model

    model = get_peft_model(_Holder(base), peft_config(variant, ["lin"]))
    return model.base_model.model.lin.to(base.weight.device, base.weight.dtype)


def apply_to_model(model: nn.Module, variant: str, targets: list[str]) -> nn.Module:
    """Adapt `model`'s targets by `variant` (ours via inject, peft via get_peft_model); returns the model to train."""
    if variant in OURS:
        inject(model, targets, spec(variant))
        if variant == "sds":
            switch_sds(model)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(variant, list(targets)))


def trainable(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
