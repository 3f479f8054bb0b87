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

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lightning_ralora.adapters.base import (
    AdapterLayer,
    BlockTerm,
    autocast_dtype,
    eager_apply,
    kaiming_uniform_,
    single_term,
)
from lightning_ralora.adapters.registry import BenchmarkEntry, register_variant
from lightning_ralora.adapters.schema import (
    CallbackSpec,
    LayerSpec,
    LowRankConfig,
    doc,
    is_pos_int,
    nonneg_int,
    pos_int,
    power_of_two,
    raise_problems,
)

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

    def rank_limits(self) -> dict[str, int]:
        """r (the total rank: k x k blocks of rank r/k on (out/k) x (in/k) chunks, so r/k <= min(out, in)/k) and the
        dense hybrid_r."""
        extra = {"hybrid_r": self.hybrid_r} if is_pos_int(self.hybrid_r) else {}
        return {**super().rank_limits(), **extra}

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
        """s·ΔW x, grid and hybrid together (`_GridUpdate`), accumulated into `out` in place; into a fresh tensor
        (then added) when `out` is absent or not a contiguous 2-D tensor of the compute dtype: the adapter's, or
        under autocast autocast's (factors cast to it, as autocast casts them for its own products)."""
        amp = autocast_dtype(x)
        dtype = amp or self.gralora_A.dtype
        lead = x.shape[:-1]
        # no reshape node for a 2-D x: a view between x and `_GridUpdate` makes autograd add x's two gradients
        # (base and adapter) out of place
        x2 = (x if x.dim() == 2 else x.reshape(-1, self.in_features)).to(dtype).contiguous()
        factors = [self.gralora_A, self.gralora_B, *((self.hybrid_A, self.hybrid_B) if self.hybrid_r > 0 else ())]
        factors = [f.to(dtype) for f in factors] + [None, None] * (self.hybrid_r == 0)
        direct = out is not None and out.dim() == 2 and out.dtype == dtype and out.is_contiguous()
        with torch.autocast(x.device.type, enabled=False) if amp else contextlib.nullcontext():
            y = out if direct else x2.new_zeros(x2.shape[0], self.out_features)
            y = _grid_update(y, x2, *factors, self.scaling)
        if out is not None:
            return y if direct else out.add_(y.view_as(out))
        return y.view(*lead, self.out_features)

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


class _GridUpdate(torch.autograd.Function):
    """out (M x m) += s·ΔW x, the dense hybrid folded into the grid's two batched products (A_h's column chunks as
    extra rows of each input chunk's A, summed over chunks; B_h's row chunks as extra columns of each output chunk's
    B), so x and `out` are each passed over once per direction, as in LoRA."""

    @staticmethod
    def forward(
        ctx: Any,
        out: torch.Tensor,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        hA: torch.Tensor | None,
        hB: torch.Tensor | None,
        s: float,
    ) -> torch.Tensor:
        k, _, rb, nb = A.shape
        M, mb, g = x.shape[0], B.shape[2], k * rb
        c = g + (0 if hA is None else hA.shape[0])
        # a[j] = [A_ij]_i stacked over i, then A_h's chunk j: (j, c, n/k); b[i] = [B_ij]_j, then B_h's chunk i
        a = A.new_empty(k, c, nb)
        a[:, :g].view(k, k, rb, nb).copy_(A.transpose(0, 1))
        b = B.new_empty(k, mb, c)
        b[:, :, :g].view(k, mb, k, rb).copy_(B.permute(0, 2, 1, 3))
        if hA is not None:
            a[:, g:].copy_(hA.view(-1, k, nb).transpose(0, 1))
            b[:, :, g:].copy_(hB.view(k, mb, -1))
        hj = torch.bmm(x.view(M, k, nb).transpose(0, 1), a.transpose(1, 2))  # (j, M, c)
        hi = _regroup(hj, k, rb)  # (i, M, c): grid columns j-major -> i-major, hybrid summed over j
        out.view(M, k, mb).transpose(0, 1).baddbmm_(hi, b.transpose(1, 2), alpha=s)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, a, b, hi)
        ctx.s, ctx.rb = s, rb
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, hi = ctx.saved_tensors
        k, c, nb = a.shape
        (M, n), mb, rb, g = x.shape, b.shape[1], ctx.rb, k * ctx.rb
        gv = gout.reshape(M, k, mb).transpose(0, 1)  # (i, M, m/k), a view when gout is contiguous
        need = ctx.needs_input_grad  # (out, x, A, B, hA, hB, s)
        gx = gA = gB = ghA = ghB = None
        if need[3] or need[5]:
            gb = torch.bmm(hi.transpose(1, 2), gv).mul_(ctx.s)  # (i, c, m/k)
            gB = gb[:, :g].view(k, k, rb, mb).transpose(2, 3).contiguous() if need[3] else None
            ghB = gb[:, g:].transpose(1, 2).reshape(k * mb, c - g) if need[5] else None
        if need[1] or need[2] or need[4]:
            ghj = _regroup(torch.bmm(gv, b).mul_(ctx.s), k, rb)  # (j, M, c): i-major -> j-major, hybrid over i
            if need[1]:
                gx = x.new_empty(M, n)
                torch.bmm(ghj, a, out=gx.view(M, k, nb).transpose(0, 1))
            if need[2] or need[4]:
                ga = torch.bmm(ghj.transpose(1, 2), x.view(M, k, nb).transpose(0, 1))  # (j, c, n/k)
                gA = ga[:, :g].view(k, k, rb, nb).transpose(0, 1).contiguous() if need[2] else None
                ghA = ga[:, g:].transpose(0, 1).reshape(c - g, n) if need[4] else None
        return gout, gx, gA, gB, ghA, ghB, None


_grid_update = eager_apply(_GridUpdate)  # already one fused pass


def _regroup(h: torch.Tensor, k: int, rb: int) -> torch.Tensor:
    """(p, M, k·rb + h') -> (q, M, k·rb + h'): the grid columns [p, :, q·rb + t] move to [q, :, p·rb + t] (the swap
    between per-input-chunk and per-output-chunk order), and the last h' (hybrid) columns are summed over p and
    repeated for every q."""
    g = k * rb
    M, c = h.shape[1], h.shape[2]
    r = h.new_empty(k, M, c)
    r[:, :, :g].view(k, M, k, rb).copy_(h[:, :, :g].view(k, M, k, rb).permute(2, 1, 0, 3))
    if c > g:
        torch.sum(h[:, :, g:], 0, out=r[0, :, g:])
        r[1:, :, g:].copy_(r[0, :, g:])
    return r


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
