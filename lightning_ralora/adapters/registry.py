"""The variant registry (as peft's `register_peft_method`): every adapter kind declares itself once.

A variant is registered with `register_variant(kind, config=..., layer=..., benchmark=...)`:

- ``config``: its typed schema (an `AdapterConfig` dataclass with per-field docs) owning `validate()`, the per-layer
  `shape_problems(in, out)` (also run by the layer constructor), `to_spec()` (the uniform LayerSpec), `callbacks()`
  (Lightning callbacks as lazy import paths + kwargs) and `needs_plan`;
- ``layer``: its AdapterLayer class (None for config-only kinds such as ``full`` and ``peft``), which owns its
  B-side factors (`b_side`, for LoRA+) and its blockwise diagnostics terms (`block_terms`);
- ``benchmark``: a small default spec (config kwargs) and a description for benchmarks/variants.py.

Adding a variant is one adapter file (layer + config + `register_variant`), one yaml, one line in
tests/adapter_cases.py. Out-of-tree variants are imported through `import_plugins` (``plugins`` config key or the
``LIGHTNING_RALORA_PLUGINS`` environment variable, comma-separated module names).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_ralora.adapters.base import AdapterLayer, LayerSpec
from lightning_ralora.adapters.schema import AdapterConfig, LowRankConfig, doc

PLUGINS_ENV = "LIGHTNING_RALORA_PLUGINS"


@dataclass(frozen=True)
class BenchmarkEntry:
    """A variant's benchmark default: config kwargs for a small spec, a description, and an optional `prepare`
    run on every built layer (e.g. SDS: switch to the SDS phase) with a torch.Generator."""

    config: Mapping[str, Any]
    description: str = ""
    prepare: Callable[[AdapterLayer, Any], None] | None = None


@dataclass(frozen=True)
class Variant:
    """What one adapter kind is: its config schema, its layer class (if any) and its benchmark entry."""

    kind: str
    config: type[AdapterConfig]
    layer: type[AdapterLayer] | None = None
    benchmark: BenchmarkEntry | None = None
    description: str = ""

    def parse(self, cfg: Mapping[str, Any]) -> AdapterConfig:
        """The typed config from a plain mapping (unknown keys ignored; see `check`)."""
        return self.config.from_cfg(cfg)

    def check(self, cfg: Mapping[str, Any]) -> list[str]:
        """Every problem of an adapter config of this kind: unknown keys, then the schema's own rules."""
        return [*self.config.unknown_keys(cfg), *self.parse(cfg).validate()]


VARIANTS: dict[str, Variant] = {}


def register_variant(
    kind: str,
    config: type[AdapterConfig],
    layer: type[AdapterLayer] | None = None,
    benchmark: BenchmarkEntry | Mapping[str, Any] | None = None,
    description: str = "",
    replace: bool = False,
) -> Variant:
    """Register an adapter kind; a second registration of the same kind is an error unless `replace`."""
    if not kind or not isinstance(kind, str):
        raise ValueError(f"register_variant: kind must be a non-empty string, got {kind!r}")
    if kind in VARIANTS and not replace and VARIANTS[kind].config is not config:
        raise ValueError(f"register_variant: adapter kind {kind!r} is already registered ({VARIANTS[kind]})")
    if config.kind != kind:
        raise ValueError(f"register_variant: {config.__name__}.kind={config.kind!r} differs from kind={kind!r}")
    if layer is not None and layer.kind != kind:
        raise ValueError(f"register_variant: {layer.__name__}.kind={layer.kind!r} differs from kind={kind!r}")
    if benchmark is not None and not isinstance(benchmark, BenchmarkEntry):
        benchmark = BenchmarkEntry(config=dict(benchmark))
    variant = Variant(kind, config, layer, benchmark, description or (config.__doc__ or "").strip().splitlines()[0])
    VARIANTS[kind] = variant
    return variant


def unregister_variant(kind: str) -> None:
    """Remove a registered kind (for tests and plugins that re-register)."""
    VARIANTS.pop(kind, None)


def get_variant(kind: Any) -> Variant:
    """The registered variant of `kind`; a ValueError naming `adapter.kind` and the allowed kinds otherwise."""
    if kind not in VARIANTS:
        raise ValueError(f"adapter.kind={kind!r} is unknown; allowed: {sorted(VARIANTS)}")
    return VARIANTS[kind]


class _LayerClasses(Mapping[str, type[AdapterLayer]]):
    """{kind: layer class} of the registered variants that build layers: a live view of the registry."""

    def __getitem__(self, kind: str) -> type[AdapterLayer]:
        variant = VARIANTS.get(kind)
        if variant is None or variant.layer is None:
            raise KeyError(kind)
        return variant.layer

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, v in VARIANTS.items() if v.layer is not None])

    def __len__(self) -> int:
        return sum(1 for v in VARIANTS.values() if v.layer is not None)

    def __repr__(self) -> str:
        return f"ADAPTER_CLASSES({dict(self)!r})"


LAYER_CLASSES: Mapping[str, type[AdapterLayer]] = _LayerClasses()


def adapter_config(adapter_cfg: Mapping[str, Any]) -> AdapterConfig:
    """The typed config of a composed `adapter` mapping, by its kind."""
    return get_variant(adapter_cfg.get("kind")).parse(adapter_cfg)


def check_adapter(adapter_cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of an `adapter` mapping (unknown kind, unknown keys, field rules), one line each."""
    kind = adapter_cfg.get("kind")
    if kind not in VARIANTS:
        return [f"adapter.kind={kind!r} is unknown; allowed: {sorted(VARIANTS)}"]
    return VARIANTS[kind].check(adapter_cfg)


def spec_from_cfg(adapter_cfg: Mapping[str, Any]) -> LayerSpec:
    """The uniform LayerSpec an `adapter` mapping describes (layer kinds only)."""
    return adapter_config(adapter_cfg).to_spec()


def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def variant_callbacks(adapter_cfg: Mapping[str, Any]) -> list[Any]:
    """Instantiate the callbacks the configured variant needs (GID warm-up, SDS schedule, ...)."""
    return [_import_target(c.target)(**dict(c.kwargs)) for c in adapter_config(adapter_cfg).callbacks()]


def import_plugins(cfg: Mapping[str, Any] | None = None) -> list[str]:
    """Import the plugin modules that register out-of-tree variants: `cfg["plugins"]` (a list or a
    comma-separated string) and the LIGHTNING_RALORA_PLUGINS environment variable. Returns the module names."""
    names: list[str] = []
    for source in ((cfg or {}).get("plugins"), os.environ.get(PLUGINS_ENV)):
        if not source:
            continue
        items = source.split(",") if isinstance(source, str) else list(source)
        names += [str(n).strip() for n in items if str(n).strip() and str(n).strip() not in names]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"plugins: cannot import variant plugin module {name!r} ({err})") from err
    return names


# --------------------------------------------------------------------------------------------------------------
# config-only kinds: handled by AdapterModule, registered so validation is uniform
# --------------------------------------------------------------------------------------------------------------


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


@dataclass
class PeftConfig(LowRankConfig):
    """peft's LoRA family (LoRA, DoRA, PiSSA, ...) through `peft.LoraConfig`."""

    kind = "peft"
    peft: dict[str, Any] = doc("extra peft.LoraConfig fields (use_dora, init_lora_weights, ...)", None)

    def validate(self) -> list[str]:
        """Low-rank fields plus `peft` being a mapping of LoraConfig fields."""
        problems = super().validate()
        if self.peft is not None and not isinstance(self.peft, Mapping):
            problems.append(f"{self.f('peft')} must be a mapping of peft.LoraConfig fields, got {self.peft!r}")
        return problems


register_variant("full", FullConfig)
register_variant("peft", PeftConfig)

__all__ = [
    "LAYER_CLASSES",
    "PLUGINS_ENV",
    "VARIANTS",
    "BenchmarkEntry",
    "Variant",
    "adapter_config",
    "check_adapter",
    "get_variant",
    "import_plugins",
    "register_variant",
    "spec_from_cfg",
    "unregister_variant",
    "variant_callbacks",
]
