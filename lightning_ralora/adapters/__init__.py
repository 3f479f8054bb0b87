"""Adapter layers (pure PyTorch). Every variant implements the AdapterLayer contract of docs/maths.md §0 and registers
itself in `registry.VARIANTS` (layer class, typed config schema, callbacks, benchmark entry, how it attaches); the
kinds without layers, full fine-tuning and peft, register their `Attachment` instead."""

from lightning_ralora.adapters import registry
from lightning_ralora.adapters.attach import attachment
from lightning_ralora.adapters.base import AdapterLayer, BlockTerm
from lightning_ralora.adapters.full import FullConfig
from lightning_ralora.adapters.gralora import GraLoRAConfig, GraLoRALinear
from lightning_ralora.adapters.inject import (
    adapter_layers,
    find_modules,
    find_targets,
    freeze,
    inject,
    linear_names,
    merge_all,
)
from lightning_ralora.adapters.lora import LoRAConfig, LoRALinear
from lightning_ralora.adapters.peft_lora import PeftConfig
from lightning_ralora.adapters.ralora import RaLoRAConfig, RaLoRALinear
from lightning_ralora.adapters.registry import VARIANTS, Attachment, get_variant, import_plugins, register_variant
from lightning_ralora.adapters.schema import AdapterConfig, LayerSpec, LowRankConfig
from lightning_ralora.adapters.sds import SDSConfig, SDSLoRALinear

# {kind: layer class}: a live view of the registry, so variants registered later (plugins) appear too
ADAPTER_CLASSES = registry.LAYER_CLASSES

__all__ = [
    "ADAPTER_CLASSES",
    "VARIANTS",
    "AdapterConfig",
    "AdapterLayer",
    "Attachment",
    "BlockTerm",
    "FullConfig",
    "GraLoRAConfig",
    "GraLoRALinear",
    "LayerSpec",
    "LoRAConfig",
    "LoRALinear",
    "LowRankConfig",
    "PeftConfig",
    "RaLoRAConfig",
    "RaLoRALinear",
    "SDSConfig",
    "SDSLoRALinear",
    "adapter_layers",
    "attachment",
    "find_modules",
    "find_targets",
    "freeze",
    "get_variant",
    "import_plugins",
    "inject",
    "linear_names",
    "merge_all",
    "register_variant",
]
