"""peft's LoRA family (LoRA, DoRA, PiSSA, ...) as a variant: the backbone wrapped by `peft.get_peft_model`.

peft is imported inside the methods that use it (an optional heavy dependency), so importing
lightning_ralora.adapters stays peft-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_ralora.adapters.attach import adapter_dtype
from lightning_ralora.adapters.inject import inject
from lightning_ralora.adapters.lora import LoRAConfig
from lightning_ralora.adapters.plan import AdapterPlan
from lightning_ralora.adapters.registry import Attachment, register_variant
from lightning_ralora.adapters.schema import LowRankConfig, doc


@dataclass
class PeftConfig(LowRankConfig):
    """peft's LoRA family (LoRA, DoRA, PiSSA, ...) through `peft.LoraConfig`."""

    kind = "peft"
    peft: dict[str, Any] = doc("extra peft.LoraConfig fields (use_dora, init_lora_weights, ...)", None)

    def validate(self) -> list[str]:
        """Low-rank fields (compile is refused: peft builds none of our layers) plus `peft` being a mapping of
        LoraConfig fields."""
        problems = super().validate()
        if self.compile is True:
            problems.append(f"{self.f('compile')}=true compiles our adapter layers; kind peft has none of them")
        if self.peft is not None and not isinstance(self.peft, Mapping):
            problems.append(f"{self.f('peft')} must be a mapping of peft.LoraConfig fields, got {self.peft!r}")
        return problems


class PeftWrap(Attachment):
    """The backbone wrapped by peft: its LoRA layers on the targets, the full modules as `modules_to_save`."""

    name = "peft"
    alignment = "none"
    alignment_note = "peft adapters are not AdapterLayers; nothing is measured"

    def attach(
        self,
        backbone: nn.Module,
        targets: list[str],
        full_modules: list[str],
        adapter_cfg: Mapping[str, Any],
        plan: AdapterPlan | None,
    ) -> nn.Module:
        """`get_peft_model` with a LoraConfig of r, alpha, dropout and the `peft` extras; peft's adapters are fp32
        (autocast_adapter_dtype) unless adapter.dtype says otherwise."""
        from peft import LoraConfig, get_peft_model

        cfg = adapter_cfg
        peft_cfg = LoraConfig(
            r=int(cfg["r"]),
            lora_alpha=float(cfg["alpha"]),
            lora_dropout=float(cfg.get("dropout", 0.0)),
            target_modules=list(targets),
            modules_to_save=list(full_modules) or None,
            **dict(cfg.get("peft") or {}),
        )
        model = get_peft_model(backbone, peft_cfg)
        dtype = adapter_dtype(cfg)
        if dtype is not None:
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(dtype)
        return model

    def rebuild(
        self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any], plan: AdapterPlan | None
    ) -> None:
        """Not supported: a sharded peft model is not unsharded here."""
        raise NotImplementedError("merge/export of a sharded peft model: use adapter kind lora (ours)")

    def merge(self, model: nn.Module) -> nn.Module:
        """peft's `merge_and_unload`."""
        return model.merge_and_unload()

    def b_side_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every peft LoRA layer's `lora_B`."""
        from peft.tuners.lora import LoraLayer

        return [p for m in model.modules() if isinstance(m, LoraLayer) for p in m.lora_B.parameters()]

    def adapter_params(self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any]) -> int:
        """As our LoRA of the same r on the same targets (injected on the meta device, in place), plus DoRA's
        magnitude vector (one entry per output feature) with peft.use_dora."""
        with torch.device("meta"):
            layers = inject(skeleton, targets, LoRAConfig.from_cfg(adapter_cfg).to_spec(), dtype=torch.float32)
        n = sum(layer.num_trainable for layer in layers.values())
        if (adapter_cfg.get("peft") or {}).get("use_dora"):
            n += sum(layer.base.out_features for layer in layers.values())
        return n


register_variant("peft", PeftConfig, attach=PeftWrap())
