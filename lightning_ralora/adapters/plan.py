"""The adapter plan: per target module, its shape, the LayerSpec to build, and why (GID statistics, notes).

The plan is data: saved in every checkpoint and results.json, and rebuilding adapters from it is
deterministic. Uniform variants (LoRA, GraLoRA, SDS) get a plan too, so every run is described the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lightning_ralora.adapters.schema import LayerSpec
from lightning_ralora.core.io import write_json_atomic


@dataclass
class PlanEntry:
    """One target module: its (out, in) shape, the spec to build, and the statistics behind it."""

    shape: tuple[int, int]
    spec: LayerSpec
    erank: float | None = None
    importance: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanEntry:
        return cls(
            shape=tuple(d["shape"]),
            spec=LayerSpec.from_dict(d["spec"]),
            erank=d.get("erank"),
            importance=d.get("importance"),
            notes=list(d.get("notes", [])),
        )


@dataclass
class AdapterPlan:
    """{module name: PlanEntry} plus run-level facts (variant, GID batches, budget, timings)."""

    variant: str
    entries: dict[str, PlanEntry]
    meta: dict[str, Any] = field(default_factory=dict)

    def specs(self) -> dict[str, LayerSpec]:
        return {name: e.spec for name, e in self.entries.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "entries": {n: e.to_dict() for n, e in self.entries.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterPlan:
        return cls(
            variant=d["variant"],
            entries={n: PlanEntry.from_dict(e) for n, e in d["entries"].items()},
            meta=dict(d.get("meta", {})),
        )

    def save_json(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | Path) -> AdapterPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def uniform_plan(model: nn.Module, targets: list[str], spec: LayerSpec, variant: str) -> AdapterPlan:
    """The same spec for every target (LoRA, rsLoRA, GraLoRA, SDS)."""
    entries = {}
    for name in targets:
        lin = model.get_submodule(name)
        entries[name] = PlanEntry(shape=(lin.out_features, lin.in_features), spec=spec)
    return AdapterPlan(variant=variant, entries=entries)
