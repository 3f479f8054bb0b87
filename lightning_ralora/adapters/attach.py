"""How a variant meets the backbone: the default attachment (inject our adapter layers into the targets) and the
lookup every caller uses.

Every registered variant carries one `registry.Attachment`: a variant with a layer class and none of its own is
injected (`INJECT`); full fine-tuning (adapters/full.py) trains every weight; peft (adapters/peft_lora.py) wraps the
backbone. AdapterModule, the memory plan and the alignment callback ask `attachment(kind)` what to do instead of
branching on the kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_ralora.adapters.inject import adapter_layers, inject, merge_all
from lightning_ralora.adapters.plan import AdapterPlan
from lightning_ralora.adapters.registry import VARIANTS, Attachment, get_variant, spec_from_cfg
from lightning_ralora.adapters.schema import LayerSpec


def adapter_dtype(adapter_cfg: Mapping[str, Any]) -> torch.dtype | None:
    """`adapter.dtype`; null (default): at least fp32 whatever the base dtype, as the papers' adapters train."""
    name = adapter_cfg.get("dtype")
    return getattr(torch, name) if name else None


class InjectLayers(Attachment):
    """Our AdapterLayers swapped in for the target linears (`inject`), from the plan's per-target specs."""

    name = "inject"
    uses_plan = True

    def attach(
        self,
        backbone: nn.Module,
        targets: list[str],
        full_modules: list[str],
        adapter_cfg: Mapping[str, Any],
        plan: AdapterPlan | None,
    ) -> nn.Module:
        """Inject the plan's layers (adapter.compile: their forward runs the compiled update); full modules train."""
        layers = inject(backbone, targets, _specs(plan, adapter_cfg), dtype=adapter_dtype(adapter_cfg))
        compiled = bool(adapter_cfg.get("compile", False))
        for layer in layers.values():
            layer.compiled = compiled
        for name in full_modules:
            backbone.get_submodule(name).requires_grad_(True)
        return backbone

    def rebuild(
        self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any], plan: AdapterPlan | None
    ) -> None:
        """The plan's layers injected on the meta device."""
        with torch.device("meta"):
            inject(skeleton, targets, _specs(plan, adapter_cfg), dtype=adapter_dtype(adapter_cfg))

    def merge(self, model: nn.Module) -> nn.Module:
        """Every adapter merged and the plain base linears put back (`merge_all`)."""
        return merge_all(model)

    def b_side_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The factors each AdapterLayer declares as its B side (`AdapterLayer.b_side`)."""
        return [p for layer in adapter_layers(model).values() for p in layer.b_side_parameters()]

    def adapter_params(self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any]) -> int:
        """The uniform spec of the config injected on the meta device (in place), its layers' trainable counts."""
        with torch.device("meta"):
            layers = inject(skeleton, targets, spec_from_cfg(adapter_cfg), dtype=torch.float32)
        return sum(layer.num_trainable for layer in layers.values())


def _specs(plan: AdapterPlan | None, adapter_cfg: Mapping[str, Any]) -> dict[str, LayerSpec]:
    """The plan's {target: LayerSpec}; a plan is required to inject."""
    if plan is None:
        raise ValueError(f"adapter.kind={adapter_cfg.get('kind')!r} injects its layers from a plan; none was given")
    return plan.specs()


INJECT = InjectLayers()


def attachment(kind: Any) -> Attachment:
    """How adapter kind `kind` meets the backbone: its registered attachment, else `INJECT` (a layer variant);
    a ValueError naming `adapter.kind` when the kind is not registered."""
    return get_variant(kind).attach or INJECT


def attachments() -> list[Attachment]:
    """Every distinct attachment of the registered variants, `INJECT` first."""
    found: list[Attachment] = [INJECT]
    for variant in VARIANTS.values():
        if variant.attach is not None and all(variant.attach is not a for a in found):
            found.append(variant.attach)
    return found
