"""The variant registry (as peft's `register_peft_method`): every adapter kind declares itself once.

A variant is registered with `register_variant(kind, config=..., layer=..., benchmark=..., attach=...)`:

- ``config``: its typed schema (an `AdapterConfig` dataclass with per-field docs) owning `validate()`, the per-layer
  `shape_problems(in, out)` (also run by the layer constructor), `to_spec()` (the uniform LayerSpec), `callbacks()`
  (Lightning callbacks as lazy import paths + kwargs) and `needs_plan`;
- ``layer``: its AdapterLayer class (None for the kinds that build none, ``full`` and ``peft``), which owns its
  B-side factors (`b_side`, for LoRA+) and its blockwise diagnostics terms (`block_terms`);
- ``benchmark``: a small default spec (config kwargs) and a description for benchmarks/variants.py;
- ``attach``: how it meets the backbone (an `Attachment`: train every weight, wrap with peft, ...); a
  variant with a layer class leaves it None and is injected (`attach.INJECT`).

Adding a variant is one adapter file (layer + config + `register_variant`) imported by adapters/__init__.py, one
yaml in conf/adapter/, one line in tests/adapter_cases.py: validation, the module, the memory plan and the
callbacks ask the registry. Out-of-tree variants are imported through `import_plugins` (``plugins`` config key or the
``LIGHTNING_RALORA_PLUGINS`` environment variable, comma-separated module names; tests/toy_variant.py is one).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from lightning_ralora.adapters.base import AdapterLayer
from lightning_ralora.adapters.plan import AdapterPlan
from lightning_ralora.adapters.schema import AdapterConfig, LayerSpec

PLUGINS_ENV = "LIGHTNING_RALORA_PLUGINS"


@dataclass(frozen=True)
class BenchmarkEntry:
    """A variant's benchmark default: config kwargs for a small spec, a description, and an optional `prepare`
    run on every built layer (e.g. SDS: switch to the SDS phase) with a torch.Generator."""

    config: Mapping[str, Any]
    description: str = ""
    prepare: Callable[[AdapterLayer, Any], None] | None = None


class Attachment:
    """How one kind of adapter meets a backbone. The class attributes say what the rest of the run may assume; the
    methods do the work (`attach` for training, `rebuild` + `merge` for export, `adapter_params` for the memory plan).
    """

    name: ClassVar[str] = ""
    # the layers are built from a per-target LayerSpec plan (AdapterPlan): GID callback, checkpoint or uniform config
    uses_plan: ClassVar[bool] = False
    # every backbone weight trains (full FT): checkpoints keep the whole state, the memory plan counts it trainable
    trains_backbone: ClassVar[bool] = False
    # where GradientAlignment reads the gradient G: adapter_layers | target_weights | none
    alignment: ClassVar[str] = "adapter_layers"
    alignment_note: ClassVar[str] = ""  # why GradientAlignment measures nothing (alignment "none")

    def attach(
        self,
        backbone: nn.Module,
        targets: list[str],
        full_modules: list[str],
        adapter_cfg: Mapping[str, Any],
        plan: AdapterPlan | None,
    ) -> nn.Module:
        """Make `backbone` trainable as the variant says; returns the model to train (peft returns its wrapper).
        `full_modules` (task head, fresh modules, model.trainable_modules) train in full beside the adapter."""
        raise NotImplementedError

    def rebuild(
        self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any], plan: AdapterPlan | None
    ) -> None:
        """Give a fresh meta-device skeleton the trained model's structure, so a gathered (FSDP2) state dict loads."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """The plain backbone with the adapter folded into its weights (for export)."""
        raise NotImplementedError

    def b_side_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The B-side factors of this attachment's adapters in `model` (LoRA+ trains them at lr_ratio_B x lr)."""
        return []

    def adapter_params(self, skeleton: nn.Module, targets: list[str], adapter_cfg: Mapping[str, Any]) -> int:
        """Trainable adapter parameters the config adds to `targets` of a meta-device skeleton (memory plan)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Variant:
    """What one adapter kind is: its config schema, its layer class (if any), its benchmark entry and how it meets
    the backbone (None: its layers are injected, `attach.INJECT`)."""

    kind: str
    config: type[AdapterConfig]
    layer: type[AdapterLayer] | None = None
    benchmark: BenchmarkEntry | None = None
    description: str = ""
    attach: Attachment | None = None

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
    attach: Attachment | None = None,
) -> Variant:
    """Register an adapter kind; a second registration of the same kind is an error unless `replace`. A kind without
    a layer class must say how it meets the backbone (`attach`)."""
    if not kind or not isinstance(kind, str):
        raise ValueError(f"register_variant: kind must be a non-empty string, got {kind!r}")
    if kind in VARIANTS and not replace and VARIANTS[kind].config is not config:
        raise ValueError(f"register_variant: adapter kind {kind!r} is already registered ({VARIANTS[kind]})")
    if config.kind != kind:
        raise ValueError(f"register_variant: {config.__name__}.kind={config.kind!r} differs from kind={kind!r}")
    if layer is not None and layer.kind != kind:
        raise ValueError(f"register_variant: {layer.__name__}.kind={layer.kind!r} differs from kind={kind!r}")
    if layer is None and attach is None:
        raise ValueError(f"register_variant: kind {kind!r} has no layer class; give attach= (how it meets a backbone)")
    if benchmark is not None and not isinstance(benchmark, BenchmarkEntry):
        benchmark = BenchmarkEntry(config=dict(benchmark))
    description = description or (config.__doc__ or "").strip().splitlines()[0]
    variant = Variant(kind, config, layer, benchmark, description, attach)
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
