"""RaLoRA's block-diagonal low-rank update (docs/maths.md §3): n_l LoRA blocks on contiguous input/output chunks.

ΔW = s·blockdiag(B_1 A_1, …, B_n A_n) with A_i ∈ R^{r×(in/n)}, B_i ∈ R^{(out/n)×r}. The parameter count is
r(out+in) for every n, while the equivalent rank grows to min(n·r, out, in). n = 1 is exactly LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ralora.adapters.base import AdapterLayer, BlockTerm, add_blocks, add_product, kaiming_uniform_
from lightning_ralora.adapters.registry import BenchmarkEntry, register_variant
from lightning_ralora.adapters.schema import (
    CallbackSpec,
    LayerSpec,
    LowRankConfig,
    doc,
    is_number,
    is_pos_int,
    one_of,
    pos_int,
    power_of_two,
    raise_problems,
)

PLAN_RULES = ("ralora", "ralora_pro", "ls_lora")  # adapter.name: the GID plan rule (rank.rules.build_ralora_plan)
SMOOTHINGS = ("sqrt", "none")
SCALE_RULES = ("alpha/r_ref", "alpha/r_l")


@dataclass
class RaLoRAConfig(LowRankConfig):
    """RaLoRA family (RaLoRA, RaLoRA-Pro, LS-LoRA): block-diagonal LoRA, per-layer ranks/blocks from the GID warm-up."""

    kind = "ralora"
    needs_gid: bool = doc("the GIDWarmup callback builds the per-layer plan before training", False)
    r_ref: int | None = doc("reference rank: scale alpha/r_ref and budget P of RaLoRA-Pro; null: r", None)
    n_blocks: int = doc("block count of a uniform plan (needs_gid: false); the GID plan chooses n_l itself", 1)
    n_max: int = doc("largest block count (a power of two)", 8)
    r_min: int = doc("RaLoRA-Pro/LS-LoRA rank floor after allocation", 1)
    r_max: int = doc("RaLoRA-Pro/LS-LoRA rank ceiling after allocation", 64)
    smoothing: str = doc("budget dimension smoothing f: sqrt (paper) | none (exact parameter budget)", "sqrt")
    scale: Any = doc("adapter scale: alpha/r_ref | alpha/r_l | a positive number | null (alpha/r)", "alpha/r_ref")
    gid_batches: int = doc("warm-up batches per rank for the GID (and importance) estimate", 8)

    def validate(self) -> list[str]:
        """Low-rank fields plus the RaLoRA-family rules (plan rule name, ranks, n_max, smoothing, scale rule)."""
        problems = super().validate()
        if self.needs_gid:
            problems += one_of(self.name, self.f("name") + " (the GID plan rule)", PLAN_RULES)
        for key in ("r_ref", "r_min", "r_max"):
            value = getattr(self, key)
            if not (key == "r_ref" and value is None):
                problems += pos_int(value, self.f(key))
        if is_pos_int(self.r_min) and is_pos_int(self.r_max) and self.r_min > self.r_max:
            problems.append(f"{self.f('r_min')} ({self.r_min}) must be <= {self.f('r_max')} ({self.r_max})")
        problems += pos_int(self.n_blocks, self.f("n_blocks"))
        problems += power_of_two(self.n_max, self.f("n_max"))
        problems += one_of(self.smoothing, self.f("smoothing"), SMOOTHINGS)
        if self.needs_gid and self.scale not in SCALE_RULES:  # the plan writes each layer's scale from a rule
            problems.append(
                f"{self.f('scale')}={self.scale!r} is not a GID plan's scale rule (needs_gid: true); allowed: "
                f"{list(SCALE_RULES)} (a number or null only with needs_gid: false, a uniform plan)"
            )
        elif not (self.scale is None or self.scale in SCALE_RULES or (is_number(self.scale) and self.scale > 0)):
            problems.append(
                f"{self.f('scale')} must be a positive number, null (alpha/r) or one of {list(SCALE_RULES)}, "
                f"got {self.scale!r}"
            )
        problems += pos_int(self.gid_batches, self.f("gid_batches"))
        return problems

    def rank_limits(self) -> dict[str, int]:
        """r (every block's rank; the GID plan keeps n_l·r <= erank <= min(out, in)); for the budget rules
        (ralora_pro, ls_lora) also r_ref (null: r, checked as r), the base rank the budget P redistributes, and the
        floor r_min. r_max is not refused: the plan clips each layer's rank to min(out, in) (rules.allocate_ranks)."""
        limits = super().rank_limits()
        if self.needs_gid and self.name in ("ralora_pro", "ls_lora"):
            limits.update({k: v for k, v in (("r_ref", self.r_ref), ("r_min", self.r_min)) if is_pos_int(v)})
        return limits

    def shape_problems(self, in_features: int, out_features: int) -> list[str]:
        """n_blocks must divide both dimensions (a GID plan halves n_l until it does)."""
        nb = self.n_blocks
        if not is_pos_int(nb) or (out_features % nb == 0 and in_features % nb == 0):
            return []
        return [
            f"{self.f('n_blocks')}={nb} must divide both out_features={out_features} and in_features={in_features} "
            "(the plan halves n_l until it does; see rank.rules.fit_blocks)"
        ]

    def layer_scale(self, r_l: int | None = None) -> float | None:
        """The scale a layer of rank `r_l` gets under the `scale` rule, for the uniform plan (`to_spec`, r_l None)
        and the GID plan (rank.rules.build_ralora_plan) alike: alpha/r_ref (r_ref null: r); alpha/r_l (a uniform
        plan: None, the layer's own alpha/r); an explicit number; or None (alpha/r)."""
        if self.scale == "alpha/r_ref":
            return float(self.alpha) / float(self.r_ref if self.r_ref is not None else self.r)
        if self.scale == "alpha/r_l" and r_l is not None:
            return float(self.alpha) / float(r_l)
        if self.scale in (None, "alpha/r_l"):
            return None
        return float(self.scale)

    def to_spec(self) -> LayerSpec:
        """The uniform plan's spec (used when no GID plan is needed)."""
        return self.layer_spec(n_blocks=int(self.n_blocks), scale=self.layer_scale())

    def callbacks(self) -> list[CallbackSpec]:
        """GIDWarmup(batches=gid_batches) when the plan comes from the GID warm-up."""
        if not self.needs_gid:
            return []
        return [CallbackSpec("lightning_ralora.callbacks.gid_warmup:GIDWarmup", {"batches": int(self.gid_batches)})]

    @property
    def needs_plan(self) -> bool:
        """needs_gid: the layers are built from the GID callback's plan (or a checkpoint's)."""
        return bool(self.needs_gid)


class RaLoRALinear(AdapterLayer):
    """Block-diagonal LoRA: ΔW = s·blockdiag(B_i A_i), input split into `n_blocks` contiguous chunks.

    Factors are stored batched: `lora_A` (n, r, in/n) and `lora_B` (n, out/n, r), and the update is one
    batched contraction (bmm over the block axis), never a Python loop over blocks.

    Init law: every A_i ~ U(-1/√(in/n), 1/√(in/n)), i.e. nn.Linear's Kaiming-uniform (a=√5) with the
    block's own fan-in in/n, so A_i x_i has the variance LoRA's A x has; B_i = 0, so ΔW = 0 at step 0.
    With n = 1 this draws exactly the numbers LoRALinear draws from the same RNG state.

    Scale: s = alpha/r unless `scale` is given (RaLoRA uses alpha/r_ref for every layer, docs/maths.md §3).
    """

    kind = "ralora"
    b_side = ("lora_B",)

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        n_blocks: int,
        alpha: float,
        dropout: float = 0.0,
        scale: float | None = None,
    ) -> None:
        super().__init__(base, dropout)
        cfg = RaLoRAConfig(r=r, n_blocks=n_blocks, alpha=alpha, dropout=dropout, scale=scale)
        raise_problems(cfg.validate() + cfg.shape_problems(self.in_features, self.out_features), "RaLoRA: ")
        m, n = self.out_features, self.in_features
        self.r, self.n_blocks, self.alpha = r, n_blocks, float(alpha)
        self.explicit_scale = None if scale is None else float(scale)
        self.scaling = self.alpha / r if scale is None else float(scale)
        fk = self._factory()
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(n_blocks, r, n // n_blocks, **fk)))
        self.lora_B = nn.Parameter(torch.zeros(n_blocks, m // n_blocks, r, **fk))

    def update(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """s·blockdiag(B_i A_i)·x as two batched contractions over the block axis on strided views of x and of
        `out` (no permute copies; see `add_blocks`)."""
        x = x.to(self.lora_A.dtype)
        nb = self.n_blocks
        if nb == 1:  # plain LoRA: the same kernels as LoRALinear, so outputs match it bit for bit
            return add_product(out, F.linear(x, self.lora_A[0]), self.lora_B[0], self.scaling)
        lead = x.shape[:-1]
        xb = x.reshape(-1, nb, self.in_features // nb).transpose(0, 1)  # (n, M, in/n), a view
        h = torch.bmm(xb, self.lora_A.transpose(1, 2))  # (n, M, r)
        y = add_blocks(out, h, self.lora_B, self.scaling, self.out_features)
        return y if out is not None else y.view(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """Dense block-diagonal ΔW (off-diagonal blocks exactly zero), differentiable in the factors."""
        blocks = torch.matmul(self.lora_B, self.lora_A) * self.scaling  # (n, out/n, in/n)
        return torch.block_diag(*blocks.unbind(0))

    @property
    def equivalent_rank(self) -> int:
        return min(self.n_blocks * self.r, self.out_features, self.in_features)

    @property
    def expected_num_trainable(self) -> int:
        return self.r * (self.in_features + self.out_features)

    def spec(self) -> LayerSpec:
        return self._spec(n_blocks=self.n_blocks, scale=self.explicit_scale)

    @classmethod
    def from_spec(cls, base: nn.Linear, spec: LayerSpec) -> RaLoRALinear:
        return cls(base, spec.r, spec.n_blocks, spec.alpha, dropout=spec.dropout, scale=spec.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_blocks={self.n_blocks}, scaling={self.scaling:g}"

    def block_terms(
        self, view: str, grads: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, list[BlockTerm]] | None:
        """The diagonal of an n x n grid: block i is B_i A_i."""
        f = self._view_tensors(view, ("lora_B", "lora_A"), grads)
        if f is None:
            return None
        idx = torch.arange(self.n_blocks, device=f[0].device)
        return float(self.scaling), [BlockTerm((self.n_blocks, self.n_blocks), idx, idx, f[0], f[1])]


register_variant(
    "ralora",
    RaLoRAConfig,
    RaLoRALinear,
    benchmark=BenchmarkEntry({"r": 16, "alpha": 32.0, "n_blocks": 4, "scale": None}, "our RaLoRA r=16, 4 blocks"),
)
