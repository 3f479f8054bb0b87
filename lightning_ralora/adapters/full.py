"""Full fine-tuning as a variant: no adapter layer, every backbone weight trains (the reference of the alignment
metrics, docs/maths.md §7)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_ralora.adapters.plan import AdapterPlan
from lightning_ralora.adapters.registry import Attachment, register_variant
from lightning_ralora.adapters.schema import AdapterConfig


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning: every backbone parameter trains (the reference for alignment metrics)."""

    kind = "full"

    def validate(self) -> list[str]:
        """dtype as every kind; lr_ratio_B (LoRA+) is undefined here and must stay 1.0."""
        problems = [p for p in super().validate() if not p.startswith(self.f("lr_ratio_B"))]
        if self.lr_ratio_B != 1.0:
            problems.append(
                f"{self.f('lr_ratio_B')}={self.lr_ratio_B!r} is LoRA+ (a faster learning rate for the B-side "
                "factors), undefined for full fine-tuning; remove it or set 1.0"
            )
        return problems


class TrainEverything(Attachment):
    """Every backbone parameter trainable; nothing to inject, merge or count beside the backbone itself."""

    name = "full"
    trains_backbone = True
    alignment = "target_weights"  # G is each target's weight.grad (and Ĝ = G)

    def attach(
        self,
        backbone: nn.Module,
        targets: list[str],
        full_modules: list[str],
        adapter_cfg: Mapping[str, Any],
        plan: AdapterPlan | None,
    ) -> nn.Module:
        """requires_grad on every parameter."""
        for p in backbone.parameters():
            p.requires_grad_(True)
        return backbone

    def rebuild(
        self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any], plan: AdapterPlan | None
    ) -> None:
        """The skeleton already has the trained structure."""

    def merge(self, model: nn.Module) -> nn.Module:
        """Nothing to fold: the weights are the trained ones."""
        return model

    def adapter_params(self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any]) -> int:
        """No adapter parameters (the backbone's own are counted as trainable, `trains_backbone`)."""
        return 0


register_variant("full", FullConfig, attach=TrainEverything())
