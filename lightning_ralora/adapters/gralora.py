"""GraLoRA and Hybrid GraLoRA (docs/maths.md §5): a k x k grid of independent low-rank blocks, plus an optional
dense LoRA.

Block (i, j) of ΔW (output chunk i, input chunk j) is s·B_ij A_ij with A_ij ∈ R^{(r/k)x(n/k)}, B_ij ∈ R^{(m/k)x(r/k)}.
The factors are stored stacked as `gralora_A` (k, k, r/k, n/k) and `gralora_B` (k, k, m/k, r/k), indexed [i, j], so
the forward pass is two batched einsums (no Python loop over blocks). Hybrid GraLoRA adds s·B_h A_h with rank h
(`hybrid_A` (h, n), `hybrid_B` (m, h)); following peft's GraLoRA, s = alpha/(r + h) for both parts.

peft stores the same numbers in a different layout; `to_peft_gralora_state` / `load_peft_gralora_state` map between
the two (peft's `gralora_A` (k, n/k, r) holds A_ij^T at [j, :, i·r/k:(i+1)·r/k]; its `gralora_B` (k, r, m/k) holds
B_ij^T at [i, j·r/k:(j+1)·r/k, :]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, BlockTerm, LayerSpec, add_blocks, add_product, kaiming_uniform_, single_term
from .registry import BenchmarkEntry, register_variant
from .schema import CallbackSpec, LowRankConfig, doc, is_pos_int, nonneg_int, pos_int, power_of_two, raise_problems

AUTO = "auto"  # adapter.k=auto: each layer's k from the GID warm-up (rank.rules.build_gralora_plan)


@dataclass
class GraLoRAConfig(LowRankConfig):
    """GraLoRA / Hybrid GraLoRA: a k x k grid of rank-r/k blocks (+ a dense rank-hybrid_r LoRA); s = alpha/(r + h)."""

    kind = "gralora"
    k: Any = doc("grid size; must divide r, in_features and out_features of every target; auto: per layer from GID", 2)
    hybrid_r: int = doc("extra dense (shared) LoRA rank; > 0 is Hybrid GraLoRA", 0)
    k_max: int = doc("k=auto: largest grid size (a power of two)", 8)
    block_r_min: int = doc("k=auto: smallest block rank r/k (k is halved until r/k reaches it)", 2)
    gid_batches: int = doc("k=auto: warm-up batches per rank for the GID estimate", 8)

    def validate(self) -> list[str]:
        """Low-rank fields plus k > 0 dividing r (or auto, with k_max, block_r_min, gid_batches) and hybrid_r >= 0."""
        if self.k == AUTO:
            problems = super().validate() + power_of_two(self.k_max, self.f("k_max"))
            for key in ("block_r_min", "gid_batches"):
                problems += pos_int(getattr(self, key), self.f(key))
            return problems + nonneg_int(self.hybrid_r, self.f("hybrid_r"))
        problems = super().validate() + pos_int(self.k, self.f("k"))
        if is_pos_int(self.k) and is_pos_int(self.r) and self.r % self.k:
            problems.append(f"{self.f('k')}={self.k} must divide {self.f('r')}={self.r} (each block gets rank r/k)")
        return problems + nonneg_int(self.hybrid_r, self.f("hybrid_r"))

    def shape_problems(self, in_features: int, out_features: int) -> list[str]:
        """k must divide in_features and out_features of the target (k=auto: the plan halves k until it does)."""
        if not is_pos_int(self.k):
            return []
        return [
            f"{self.f('k')}={self.k} must divide {side}={size} of the target layer"
            for side, size in (("in_features", in_features), ("out_features", out_features))
            if size % self.k
        ]

    def to_spec(self) -> LayerSpec:
        """The uniform GraLoRA LayerSpec (k=auto has none: its plan comes from the GID warm-up)."""
        if self.k == AUTO:
            raise ValueError(f"{self.f('k')}=auto has no uniform spec: the GID warm-up builds the per-layer plan")
        return self.layer_spec(k=int(self.k), hybrid_r=int(self.hybrid_r))

    def callbacks(self) -> list[CallbackSpec]:
        """k=auto: GraLoRAAutoWarmup(batches=gid_batches), which builds the per-layer k plan before training."""
        if self.k != AUTO:
            return []
        target = "lightning_ralora.callbacks.gid_warmup:GraLoRAAutoWarmup"
        return [CallbackSpec(target, {"batches": int(self.gid_batches)})]

    @property
    def needs_plan(self) -> bool:
        """k=auto: the layers are built from the warm-up's plan (or a checkpoint's)."""
        return self.k == AUTO


def check_gralora_shape(r: int, k: int, in_features: int, out_features: int, hybrid_r: int = 0) -> None:
    """Validate a GraLoRA configuration for one layer, collecting every problem into one ValueError."""
    cfg = GraLoRAConfig(r=r, k=k, hybrid_r=hybrid_r)
    raise_problems(cfg.validate() + cfg.shape_problems(in_features, out_features), "GraLoRA: ")


class GraLoRALinear(AdapterLayer):
    """ΔW = s·[B_ij A_ij]_{i,j<k} (+ s·B_h A_h); A's Kaiming-uniform with fan-in n/k (n for A_h), B's zeros."""

    kind = "gralora"
    b_side = ("gralora_B", "hybrid_B")

    def __init__(self, base: nn.Linear, r: int, k: int, alpha: float, hybrid_r: int = 0, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        cfg = GraLoRAConfig(r=r, k=k, alpha=alpha, hybrid_r=hybrid_r, dropout=dropout)
        raise_problems(cfg.validate() + cfg.shape_problems(self.in_features, self.out_features), "GraLoRA: ")
        self.r, self.k, self.hybrid_r, self.alpha = r, k, hybrid_r, float(alpha)
        self.scaling = self.alpha / (r + hybrid_r)  # peft's GraLoRA convention (docs/maths.md §5)
        fk = self._factory()
        rb, nb, mb = r // k, self.in_features // k, self.out_features // k
        # every A_ij is (r/k) x (n/k): same law as nn.Linear(n/k, r/k), i.e. U(±1/sqrt(n/k)), as peft
        self.gralora_A = nn.Parameter(kaiming_uniform_(torch.empty(k, k, rb, nb, **fk), fan_in=nb))
        self.gralora_B = nn.Parameter(torch.zeros(k, k, mb, rb, **fk))
        if hybrid_r > 0:
            self.hybrid_A = nn.Parameter(kaiming_uniform_(torch.empty(hybrid_r, self.in_features, **fk)))
            self.hybrid_B = nn.Parameter(torch.zeros(self.out_features, hybrid_r, **fk))

    def update(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """s·ΔW x as two batched products over the grid, on strided views of x and `out` (no permute copies of
        them): h_j = [A_ij]_i x_j per input chunk j, then out_i = Σ_j B_ij h_ij = [B_ij]_j [h_ij]_j per output
        chunk i; only the (tokens x k·r) intermediate is regrouped from j-major to i-major."""
        x = x.to(self.gralora_A.dtype)
        k, rb, lead = self.k, self.r // self.k, x.shape[:-1]
        xs = x.reshape(-1, k, self.in_features // k).transpose(0, 1)  # (j, M, n/k), a view
        a = self.gralora_A.transpose(0, 1).reshape(k, k * rb, -1)  # (j, i·r/k, n/k): a weight-sized copy
        h = torch.bmm(xs, a.transpose(1, 2))  # (j, M, i·r/k)
        h = h.view(k, -1, k, rb).permute(2, 1, 0, 3).reshape(k, -1, k * rb)  # (i, M, j·r/k)
        b = self.gralora_B.transpose(1, 2).reshape(k, -1, k * rb)  # (i, m/k, j·r/k)
        y = add_blocks(out, h, b, self.scaling, self.out_features)
        if self.hybrid_r > 0:
            y = add_product(y, F.linear(x.reshape(-1, self.in_features), self.hybrid_A), self.hybrid_B, self.scaling)
        return y if out is not None else y.view(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        blocks = torch.einsum("ijmr,ijrn->imjn", self.gralora_B, self.gralora_A)  # (k, m/k, k, n/k)
        dw = blocks.reshape(self.out_features, self.in_features)
        if self.hybrid_r > 0:
            dw = dw + self.hybrid_B @ self.hybrid_A
        return dw * self.scaling

    @property
    def equivalent_rank(self) -> int:
        """min(k·r + h, m, n): ΔW is a sum of k² blocks of rank r/k (k·r in all) plus the rank-h dense part."""
        return min(self.k * self.r + self.hybrid_r, self.in_features, self.out_features)

    @property
    def expected_num_trainable(self) -> int:
        """(r + h)(m + n): the grid has k²·(r/k)(m/k + n/k) = r(m + n), as LoRA of rank r; the hybrid part h(m + n)."""
        return (self.r + self.hybrid_r) * (self.in_features + self.out_features)

    def spec(self) -> LayerSpec:
        return self._spec(k=self.k, hybrid_r=self.hybrid_r)

    @classmethod
    def from_spec(cls, base: nn.Linear, spec: LayerSpec) -> GraLoRALinear:
        return cls(base, spec.r, spec.k, spec.alpha, hybrid_r=spec.hybrid_r, dropout=spec.dropout)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, hybrid_r={self.hybrid_r}"

    def block_terms(
        self, view: str, grads: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, list[BlockTerm]] | None:
        """The full k x k grid (factors stored [i, j]), plus a 1 x 1 term for the hybrid dense part."""
        f = self._view_tensors(view, ("gralora_B", "gralora_A"), grads)
        if f is None:
            return None
        k = self.k
        ar = torch.arange(k, device=f[0].device)
        B, A = f[0].reshape(k * k, *f[0].shape[2:]), f[1].reshape(k * k, *f[1].shape[2:])
        terms = [BlockTerm((k, k), ar.repeat_interleave(k), ar.repeat(k), B, A)]
        if self.hybrid_r > 0:
            h = self._view_tensors(view, ("hybrid_B", "hybrid_A"), grads)
            if h is None:
                return None
            terms.append(single_term(*h))
        return float(self.scaling), terms


register_variant(
    "gralora",
    GraLoRAConfig,
    GraLoRALinear,
    benchmark=BenchmarkEntry({"r": 16, "alpha": 32.0, "k": 2}, "our GraLoRA r=16, k=2"),
)


def _peft_keys(adapter_name: str | None) -> tuple[str, str, str, str]:
    sfx = "" if adapter_name is None else f".{adapter_name}"
    return (
        f"gralora_A{sfx}",
        f"gralora_B{sfx}",
        f"gralora_A_general{sfx}.weight",
        f"gralora_B_general{sfx}.weight",
    )


@torch.no_grad()
def to_peft_gralora_state(layer: GraLoRALinear, adapter_name: str | None = "default") -> dict[str, torch.Tensor]:
    """This layer's factors in peft's GraLoRA layout, keyed as peft's layer names them (for `load_state_dict`).

    With `adapter_name=None` the keys carry no adapter name, as in a saved peft adapter file.
    """
    k, rb = layer.k, layer.r // layer.k
    key_a, key_b, key_ha, key_hb = _peft_keys(adapter_name)
    # ours A[i, j] (r/k, n/k) -> peft A[j, :, i-th r/k slice]: permute to (j, n/k, i, r/k)
    a = layer.gralora_A.permute(1, 3, 0, 2).reshape(k, layer.in_features // k, k * rb)
    # ours B[i, j] (m/k, r/k) -> peft B[i, j-th r/k slice, :]: permute to (i, j, r/k, m/k)
    b = layer.gralora_B.permute(0, 1, 3, 2).reshape(k, k * rb, layer.out_features // k)
    state = {key_a: a.clone(), key_b: b.clone()}
    if layer.hybrid_r > 0:
        state[key_ha] = layer.hybrid_A.detach().clone()
        state[key_hb] = layer.hybrid_B.detach().clone()
    return state


@torch.no_grad()
def load_peft_gralora_state(layer: GraLoRALinear, state: dict[str, torch.Tensor]) -> None:
    """Copy peft GraLoRA factors (keys as from `to_peft_gralora_state`, with or without adapter name) into `layer`."""
    found = {}
    for key, value in state.items():
        parts = key.split(".")
        name = parts[0]
        if name in ("gralora_A_general", "gralora_B_general"):
            if parts[-1] != "weight":
                raise KeyError(f"unexpected peft GraLoRA key {key!r}")
            name += ".weight"
        elif name not in ("gralora_A", "gralora_B"):
            raise KeyError(f"unexpected peft GraLoRA key {key!r}")
        if name in found:
            raise KeyError(f"peft GraLoRA state holds more than one adapter for {name!r}; pass one adapter's keys")
        found[name] = value
    wanted = {"gralora_A", "gralora_B"} | (
        {"gralora_A_general.weight", "gralora_B_general.weight"} if layer.hybrid_r > 0 else set()
    )
    if set(found) != wanted:
        raise KeyError(
            f"peft GraLoRA state has {sorted(found)}; this layer (hybrid_r={layer.hybrid_r}) needs {sorted(wanted)}"
        )
    k, rb = layer.k, layer.r // layer.k
    nb, mb = layer.in_features // k, layer.out_features // k
    a, b = found["gralora_A"], found["gralora_B"]
    if tuple(a.shape) != (k, nb, k * rb) or tuple(b.shape) != (k, k * rb, mb):
        raise ValueError(
            f"peft GraLoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit this layer "
            f"(k={k}, r={layer.r}, in={layer.in_features}, out={layer.out_features}): "
            f"expected A{(k, nb, k * rb)} B{(k, k * rb, mb)}"
        )
    layer.gralora_A.copy_(a.reshape(k, nb, k, rb).permute(2, 0, 3, 1))  # (j, n/k, i, r/k) -> (i, j, r/k, n/k)
    layer.gralora_B.copy_(b.reshape(k, k, rb, mb).permute(0, 1, 3, 2))  # (i, j, r/k, m/k) -> (i, j, m/k, r/k)
    if layer.hybrid_r > 0:
        layer.hybrid_A.copy_(found["gralora_A_general.weight"])
        layer.hybrid_B.copy_(found["gralora_B_general.weight"])
