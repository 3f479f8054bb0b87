"""Adapter layers (pure PyTorch). Every variant implements the AdapterLayer contract of docs/maths.md §0 and registers
itself in `registry.VARIANTS` (layer class, typed config schema, callbacks, benchmark entry)."""

from lightning_ralora.adapters import registry
from lightning_ralora.adapters.base import AdapterLayer, BlockTerm, LayerSpec
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
from lightning_ralora.adapters.ralora import RaLoRAConfig, RaLoRALinear
from lightning_ralora.adapters.registry import VARIANTS, get_variant, import_plugins, register_variant
from lightning_ralora.adapters.schema import AdapterConfig, LowRankConfig
from lightning_ralora.adapters.sds import SDSConfig, SDSLoRALinear

# {kind: layer class}: a live view of the registry, so variants registered later (plugins) appear too
ADAPTER_CLASSES = registry.LAYER_CLASSES

__all__ = [
    "ADAPTER_CLASSES",
    "VARIANTS",
    "AdapterConfig",
    "AdapterLayer",
    "BlockTerm",
    "GraLoRAConfig",
    "GraLoRALinear",
    "LayerSpec",
    "LoRAConfig",
    "LoRALinear",
    "LowRankConfig",
    "RaLoRAConfig",
    "RaLoRALinear",
    "SDSConfig",
    "SDSLoRALinear",
    "adapter_layers",
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
