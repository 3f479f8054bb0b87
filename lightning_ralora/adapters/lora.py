"""LoRA with rsLoRA scaling (docs/maths.md §1). LoRA+ is an optimizer-side change (`optimizer_groups` in
modules/adapter_module.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ralora.adapters.base import (
    AdapterLayer,
    BlockTerm,
    add_product,
    kaiming_uniform_,
    single_term,
)
from lightning_ralora.adapters.registry import BenchmarkEntry, register_variant
from lightning_ralora.adapters.schema import LayerSpec, LowRankConfig, doc, pos_number_or_none, raise_problems


@dataclass
class LoRAConfig(LowRankConfig):
    """LoRA (rsLoRA, LoRA+): ΔW = s·B A with s = alpha/r, alpha/sqrt(r) (rslora) or an explicit scale."""

    kind = "lora"
    rslora: bool = doc("rsLoRA: scale alpha/sqrt(r) instead of alpha/r", False)
    scale: float | None = doc("explicit scale s whatever r (SDS-LoRA paper: s = 2); null: alpha/r, alpha/sqrt(r)", None)

    def validate(self) -> list[str]:
        """Low-rank fields plus rslora a bool and scale a positive number or null."""
        problems = super().validate()
        if not isinstance(self.rslora, bool):
            problems.append(f"{self.f('rslora')} must be true or false, got {self.rslora!r}")
        return problems + pos_number_or_none(self.scale, self.f("scale"), "alpha/r")

    def to_spec(self) -> LayerSpec:
        """The uniform LoRA LayerSpec."""
        return self.layer_spec(rslora=bool(self.rslora), scale=None if self.scale is None else float(self.scale))


class LoRALinear(AdapterLayer):
    """ΔW = s·B A with A (r x n) Kaiming-uniform, B (m x r) zeros; s = α/r, α/√r with rsLoRA, or an explicit
    `scale` (the SDS-LoRA paper fixes s = 2 for LoRA whatever r is)."""

    kind = "lora"
    b_side = ("lora_B",)

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__(base, dropout)
        cfg = LoRAConfig(r=r, alpha=alpha, dropout=dropout, rslora=bool(rslora), scale=scale)
        raise_problems(cfg.validate() + cfg.shape_problems(self.in_features, self.out_features))
        self.r, self.alpha, self.rslora = r, float(alpha), bool(rslora)
        self.explicit_scale = None if scale is None else float(scale)
        self.scaling = self.explicit_scale or self.alpha / (math.sqrt(r) if rslora else r)
        fk = self._factory()
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, **fk)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **fk))

    def update(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """s·B A x; into `out` by one addmm_ with s as alpha (no tokens x out temporary), see `add_product`."""
        return add_product(out, F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @property
    def equivalent_rank(self) -> int:
        return min(self.r, self.in_features, self.out_features)

    @property
    def expected_num_trainable(self) -> int:
        return self.r * (self.in_features + self.out_features)

    def spec(self) -> LayerSpec:
        return self._spec(rslora=self.rslora, scale=self.explicit_scale)

    @classmethod
    def from_spec(cls, base: nn.Linear, spec: LayerSpec) -> LoRALinear:
        return cls(base, spec.r, spec.alpha, dropout=spec.dropout, rslora=spec.rslora, scale=spec.scale)

    def block_terms(
        self, view: str, grads: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, list[BlockTerm]] | None:
        """One dense term B A (the same factors in every view)."""
        f = self._view_tensors(view, ("lora_B", "lora_A"), grads)
        return None if f is None else (float(self.scaling), [single_term(*f)])


register_variant(
    "lora",
    LoRAConfig,
    LoRALinear,
    benchmark=BenchmarkEntry({"r": 16, "alpha": 32.0}, "our LoRA r=16"),
)
