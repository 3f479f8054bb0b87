"""Swap the target nn.Linear layers of a model for adapter layers, from a spec or a per-module plan."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lightning_ralora.adapters.base import AdapterLayer
from lightning_ralora.adapters.registry import LAYER_CLASSES
from lightning_ralora.adapters.schema import LayerSpec

SpecSource = LayerSpec | Mapping[str, LayerSpec] | Callable[[str, nn.Linear], LayerSpec]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every plain nn.Linear in the model (what target patterns may match); the frozen linear
    inside an adapter layer is not one, so injecting twice cannot wrap a layer twice."""
    adapted = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, AdapterLayer) and n.rpartition(".")[0] not in adapted
    ]


def _matches(name: str, target_modules: Iterable[str] | str) -> bool:
    """peft semantics: a string is a full-match regex; a list matches a name equal to or ending in `.item`."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _inside(name: str, roots: Iterable[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def find_targets(model: nn.Module, target_modules: Iterable[str] | str, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the linear layers matched by `target_modules`, outside the `exclude` subtrees (modules trained in
    full, such as a task head); a clear error when none match."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("adapter.target_modules is empty: give module-name suffixes or a regex")
        _check_entries(model, target_modules)
    else:
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"adapter.target_modules={target_modules!r} is not a valid regular expression ({err}); allowed: a "
                "regex that full-matches module names, or a list of module-name suffixes"
            ) from None
    exclude = list(exclude)
    names = [n for n in linear_names(model) if _matches(n, target_modules) and not _inside(n, exclude)]
    if not names:
        convs = [n for n, m in model.named_modules() if _is_conv1d(m) and _matches(n, target_modules)]
        if convs:
            raise ValueError(
                f"adapter.target_modules={target_modules!r} matches transformers Conv1D layers {convs[:4]} "
                "(GPT-2 style); only torch.nn.Linear is supported"
            )
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)})
        raise ValueError(
            f"adapter.target_modules={target_modules!r} matches no linear layer. "
            f"Linear layer names in this model end in: {suffixes}"
        )
    return names


def _check_entries(model: nn.Module, entries: list[str]) -> None:
    """A list entry that matches modules of the model, none of them nn.Linear (an embedding, a norm, a block, a
    GPT-2 Conv1D), is a mistake, not a no-op: refuse it, naming what it matches and the linear suffixes."""
    linear = linear_names(model)
    for entry in entries:
        if any(_matches(n, [entry]) for n in linear):
            continue
        hits = [(n, type(m).__name__) for n, m in model.named_modules() if n and _matches(n, [entry])]
        convs = [n for n, m in model.named_modules() if _is_conv1d(m) and _matches(n, [entry])]
        if convs:
            raise ValueError(
                f"adapter.target_modules entry {entry!r} matches transformers Conv1D layers {convs[:4]} (GPT-2 "
                "style); only torch.nn.Linear is supported"
            )
        if hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
            shown = ", ".join(f"{n} ({t})" for n, t in hits[:3]) + (f", +{len(hits) - 3} more" if len(hits) > 3 else "")
            raise ValueError(
                f"adapter.target_modules entry {entry!r} matches no linear layer, only {shown}; adapters wrap "
                f"torch.nn.Linear layers, whose names end in: {suffixes}"
            )


def target_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of the named linears (what plans and shape checks read)."""
    shapes = {}
    for name in names:
        linear = model.get_submodule(name)
        shapes[name] = (int(linear.out_features), int(linear.in_features))
    return shapes


def find_modules(model: nn.Module, patterns: Iterable[str] | str) -> list[str]:
    """Names of the modules (any type) matched by `patterns` with the target semantics, outermost only."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and _matches(name, patterns) and not _inside(name, found):
            found.append(name)
    return found


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def inject(
    model: nn.Module,
    target_modules: Iterable[str] | str,
    spec: SpecSource,
    registry: Mapping[str, type[AdapterLayer]] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, AdapterLayer]:
    """Freeze the model, then replace every matched linear by the adapter its spec names.

    `spec` is one LayerSpec for all targets, a {module name: LayerSpec} plan, or a callable. Adapter tensors are
    `dtype`, by default at least fp32 whatever the base dtype. Returns {qualified name: adapter layer} in model order.
    """
    registry = LAYER_CLASSES if registry is None else registry
    targets = find_targets(model, target_modules)
    specs: dict[str, LayerSpec] = {}
    for name in targets:
        base = model.get_submodule(name)
        if isinstance(spec, LayerSpec):
            specs[name] = spec
        elif isinstance(spec, Mapping):
            if name not in spec:
                raise ValueError(f"adapter plan has no entry for target module {name!r}")
            specs[name] = spec[name]
        else:
            specs[name] = spec(name, base)
        if specs[name].kind not in registry:
            raise ValueError(f"adapter kind {specs[name].kind!r} unknown; allowed: {sorted(registry)}")
    # build every layer before touching the model, so a bad spec leaves it unchanged
    built, problems = {}, []
    for name in targets:
        try:
            built[name] = registry[specs[name].kind].from_spec(model.get_submodule(name), specs[name])
            if dtype is not None:
                built[name].set_adapter_dtype(dtype)
        except ValueError as err:
            problems.append(f"{name}: {err}")
    if problems:
        raise ValueError("adapter does not fit these target modules:\n  " + "\n  ".join(problems))
    freeze(model)
    for name, layer in built.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return built


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """{qualified name of the wrapped linear: adapter layer} for every adapter in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def merge_all(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base linears back (for export)."""
    for name, layer in adapter_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model
