"""A toy variant registered through the registry alone (tests/test_registry.py; also a CLI plugin module:
LIGHTNING_RALORA_PLUGINS=tests.toy_variant). ΔW = s·B A + diag(d): LoRA plus a trainable (unscaled) diagonal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ralora.adapters.base import AdapterLayer, BlockTerm, kaiming_uniform_, single_term
from lightning_ralora.adapters.registry import BenchmarkEntry, register_variant
from lightning_ralora.adapters.schema import LayerSpec, LowRankConfig, doc, raise_problems

KIND = "diag_lora"


@dataclass
class DiagLoRAConfig(LowRankConfig):
    """LoRA plus a trainable diagonal: ΔW = (alpha/r)·B A + diag(d)."""

    kind = KIND
    diag: bool = doc("train the diagonal d (false: plain LoRA)", True)

    def validate(self) -> list[str]:
        """Low-rank fields plus `diag` a bool."""
        problems = super().validate()
        if not isinstance(self.diag, bool):
            problems.append(f"{self.f('diag')} must be true or false, got {self.diag!r}")
        return problems

    def shape_problems(self, in_features: int, out_features: int) -> list[str]:
        """A toy rule: r must not exceed min(in, out)."""
        if isinstance(self.r, int) and self.r > min(in_features, out_features):
            return [
                f"{self.f('r')}={self.r} must be <= min(in_features, out_features)={min(in_features, out_features)}"
            ]
        return []

    def to_spec(self) -> LayerSpec:
        """The variant's own field travels in LayerSpec.extra."""
        return LayerSpec(
            kind=KIND, r=self.r, alpha=float(self.alpha), dropout=float(self.dropout), extra={"diag": self.diag}
        )


class DiagLoRALinear(AdapterLayer):
    """ΔW = s·B A + diag(d), d of length min(m, n) starting at zero."""

    kind = KIND
    b_side = ("lora_B",)

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, diag: bool = True) -> None:
        super().__init__(base, dropout)
        cfg = DiagLoRAConfig(r=r, alpha=alpha, dropout=dropout, diag=diag)
        raise_problems(cfg.validate() + cfg.shape_problems(self.in_features, self.out_features))
        self.r, self.alpha, self.diag = r, float(alpha), diag
        self.scaling = self.alpha / r
        fk = self._factory()
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, **fk)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **fk))
        if diag:
            self.diag_d = nn.Parameter(torch.zeros(min(self.in_features, self.out_features), **fk))

    @property
    def _k(self) -> int:
        return min(self.in_features, self.out_features)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        out = F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)
        if self.diag:
            k = self._k
            out = out + F.pad(x[..., :k] * self.diag_d, (0, self.out_features - k))
        return out

    def delta_weight(self) -> torch.Tensor:
        dw = (self.lora_B @ self.lora_A) * self.scaling
        if self.diag:
            k = self._k
            dw = dw + F.pad(torch.diag(self.diag_d), (0, self.in_features - k, 0, self.out_features - k))
        return dw

    @property
    def equivalent_rank(self) -> int:
        return self._k if self.diag else min(self.r, self._k)

    @property
    def expected_num_trainable(self) -> int:
        return self.r * (self.in_features + self.out_features) + (self._k if self.diag else 0)

    def spec(self) -> LayerSpec:
        return LayerSpec(kind=KIND, r=self.r, alpha=self.alpha, dropout=self.dropout_p, extra={"diag": self.diag})

    @classmethod
    def from_spec(cls, base: nn.Linear, spec: LayerSpec) -> DiagLoRALinear:
        return cls(base, spec.r, spec.alpha, dropout=spec.dropout, diag=bool(spec.extra.get("diag", True)))

    def block_terms(
        self, view: str, grads: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, list[BlockTerm]] | None:
        """LoRA's dense term, plus the diagonal as 1 x 1 blocks of an (m x n) grid. The diagonal is unscaled and
        has one trained factor: its Jacobian factors are B = 0 (no A side moves), A = 1/s; its factors d and 1/s."""
        f = self._view_tensors(view, ("lora_B", "lora_A"), grads)
        if f is None:
            return None
        s = float(self.scaling)
        terms = [single_term(*f)]
        if self.diag:
            k, dev = self._k, f[0].device
            idx = torch.arange(k, device=dev)
            if view == "jacobian":
                B, A = torch.zeros(k, 1, 1, device=dev), torch.full((k, 1, 1), 1.0 / s, device=dev)
            else:
                d = self._view_tensors(view, ("diag_d",), grads)
                if d is None:
                    return None
                A = (
                    torch.full((k, 1, 1), 1.0 / s, device=dev)
                    if view == "factors"
                    else torch.zeros(k, 1, 1, device=dev)
                )
                B = d[0].reshape(k, 1, 1)
            terms.append(BlockTerm((self.out_features, self.in_features), idx, idx, B.to(f[0].dtype), A.to(f[0].dtype)))
        return s, terms


def register() -> None:
    """(Re-)register the toy variant."""
    register_variant(
        KIND,
        DiagLoRAConfig,
        DiagLoRALinear,
        benchmark=BenchmarkEntry({"r": 4, "alpha": 8.0}, "toy LoRA + diagonal r=4"),
        replace=True,
    )


register()
