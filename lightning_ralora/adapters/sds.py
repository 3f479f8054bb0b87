"""SDS-LoRA (docs/maths.md §6): structurally decoupled singular values.

Warm-up phase (the first T_w optimizer steps): plain LoRA, ΔW = s·B A. At the switch, `reparameterize()` takes the
rank-r SVD s·B A = U Σ Vᵀ and sets Q_B = U, Q_A = V, B = UΣ/(2s), A = ΣVᵀ/(2s), so the output is unchanged. From then
on ΔW = s·(B Q_Aᵀ + Q_B A) with the orthonormal bases Q_A (n x r), Q_B (m x r) held as buffers (constant in backward),
so ∂L/∂B = s·G Q_A and ∂L/∂A = s·Q_Bᵀ G: the singular values of B and A no longer scale their gradients.
`refresh()` recomputes Q_A, Q_B in place from QR of Aᵀ and B (positive diag R); `refresh_due` is the paper's schedule.

Every change is an in-place `copy_` into the same Parameter/buffer objects (DDP keeps syncing them) and every
decomposition is made deterministic (sign conventions below), so all data-parallel ranks, which hold identical
factors, reach identical results. Under FSDP2 the factors are DTensor shards: each decomposition gathers them
(`full_tensor()`, a collective in module order on every rank), computes on the full factors, and writes back only
this rank's shard (`_write`). The phase lives in the persistent buffer `switched`, so a checkpoint restores it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_ralora.adapters.base import (
    AdapterLayer,
    BlockTerm,
    add_product,
    autocast_dtype,
    dense,
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
    nonneg_int,
    pos_int,
    raise_problems,
)


@dataclass
class SDSConfig(LowRankConfig):
    """SDS-LoRA: LoRA warm-up, then ΔW = s·(B Q_Aᵀ + Q_B A) with QR-refreshed bases; s = alpha/sqrt(r)."""

    kind = "sds"
    ranks_must_fit = True
    alpha: float = doc("scale s = alpha/sqrt(r) (paper default alpha = 4, as rsLoRA)", 4.0)
    warmup_steps: int = doc("optimizer steps of plain LoRA before the SVD switch", 10)
    K: int = doc("refresh schedule: K phases, Q's refreshed every i-th step in phase i", 5)

    def validate(self) -> list[str]:
        """Low-rank fields plus warmup_steps >= 0 and K > 0 (the SDSSchedule callback's arguments)."""
        return super().validate() + schedule_problems(self.warmup_steps, self.K, self.prefix)

    def shape_problems(self, in_features: int, out_features: int) -> list[str]:
        """r <= min(in, out): Q_A (in x r) and Q_B (out x r) need r orthonormal columns."""
        return [
            p + " (SDS-LoRA: Q_A (in x r) and Q_B (out x r) need r orthonormal columns)"
            for p in self.rank_problems(in_features, out_features)
        ]

    def to_spec(self) -> LayerSpec:
        """The uniform SDS LayerSpec."""
        return self.layer_spec()

    def callbacks(self) -> list[CallbackSpec]:
        """SDSSchedule(warmup_steps, K): the switch and the QR refreshes."""
        kwargs = {"warmup_steps": int(self.warmup_steps), "K": int(self.K)}
        return [CallbackSpec("lightning_ralora.callbacks.sds_schedule:SDSSchedule", kwargs)]


def schedule_problems(warmup_steps: Any, K: Any, prefix: str = "adapter") -> list[str]:
    """Problems of the SDS schedule arguments (shared by SDSConfig and the SDSSchedule callback)."""
    return nonneg_int(warmup_steps, f"{prefix}.warmup_steps") + pos_int(K, f"{prefix}.K")


def refresh_due(t: int, total_steps: int, K: int) -> bool:
    """SDS QR-refresh schedule: refresh at step t of T iff t mod (floor(K·t/T) + 1) == 0 (every (i+1)-th in phase i)."""
    if total_steps <= 0 or K <= 0:
        raise ValueError(f"refresh_due needs total_steps > 0 and K > 0, got total_steps={total_steps}, K={K}")
    return t % (K * t // total_steps + 1) == 0


def refresh_steps(total_steps: int, K: int, warmup_steps: int = 0) -> list[int]:
    """Optimizer steps t with warmup_steps < t < T after which the schedule refreshes (what SDSSchedule does).

    t = T is left out on purpose: no optimizer step follows it, so a refresh there would only perturb the final ΔW.
    """
    return [t for t in range(warmup_steps + 1, total_steps) if refresh_due(t, total_steps, K)]


def _positive_qr(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR with diag(R) ≥ 0 (zeros count as positive), which makes it unique for full column rank."""
    q, r = torch.linalg.qr(m, mode="reduced")
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d, r * d.unsqueeze(-1)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (an FSDP2 shard) is gathered, a plain tensor returned as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _write(dst: torch.Tensor, value: torch.Tensor) -> None:
    """`dst.copy_(value)` in place; a DTensor `dst` takes only this rank's slice of `value` (no communication)."""
    value = value.to(dst.dtype)
    if isinstance(dst, DTensor):
        value = distribute_tensor(value.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(value)


def _lowrank_fro(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left·rightᵀ‖_F without forming the product: sqrt(Σ (leftᵀleft) ⊙ (rightᵀright)), O((m+n)·r²)."""
    return math.sqrt(max(float(((left.T @ left) * (right.T @ right)).sum()), 0.0))


class _SDSUpdate(torch.autograd.Function):
    """out += s·(x Aᵀ Q_Bᵀ + x Q_A Bᵀ) in place as one rank-2r product: h = [x Aᵀ, x Q_A] (t x 2r),
    out += s h [Q_B, B]ᵀ. Each pass over a tokens-wide tensor happens once instead of twice (out in forward, dY and dX
    in backward: about 2 points of a 4096² step on CPU). Saved for backward: x and h₂ = x Q_A, as product by product
    (neither h nor the concatenated factors are kept)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Q_A: torch.Tensor,
                Q_B: torch.Tensor, s: float) -> torch.Tensor:  # fmt: skip
        h2 = x @ Q_A
        out.addmm_(torch.cat([x @ A.t(), h2], dim=1), torch.cat([Q_B, B], dim=1).t(), alpha=s)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, Q_A, Q_B, h2)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B, Q_A, Q_B, h2 = ctx.saved_tensors
        r, (need_x, need_a, need_b) = A.shape[0], ctx.needs_input_grad[1:4]
        dh = torch.mm(g, torch.cat([Q_B, B], dim=1)).mul_(ctx.s) if need_x or need_a else None
        dx = torch.mm(dh, torch.cat([A, Q_A.t()])) if need_x else None
        da = torch.mm(dh[:, :r].t(), x) if need_a else None
        db = torch.mm(g.t(), h2).mul_(ctx.s) if need_b else None
        return g, dx, da, db, None, None, None


_sds_update_in_place = eager_apply(_SDSUpdate)


class SDSLoRALinear(AdapterLayer):
    """LoRA during warm-up, then ΔW = s·(B Q_Aᵀ + Q_B A) with frozen orthonormal Q's; s = α/√r (paper: α = 4)."""

    kind = "sds"
    b_side = ("lora_B",)

    def __init__(self, base: nn.Linear, r: int, alpha: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        cfg = SDSConfig(r=r, alpha=alpha, dropout=dropout)
        raise_problems(cfg.validate() + cfg.shape_problems(self.in_features, self.out_features))
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / math.sqrt(r)
        fk = self._factory()
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, **fk)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **fk))
        self.register_buffer("Q_A", torch.zeros(self.in_features, r, **fk))
        self.register_buffer("Q_B", torch.zeros(self.out_features, r, **fk))
        self.register_buffer("switched", torch.zeros((), dtype=torch.bool, device=fk["device"]))
        # Python mirror of `switched`, so forward never syncs with the device; kept in step by load_state_dict
        self._switched = False
        self.register_load_state_dict_post_hook(_sync_switched_flag)

    @property
    def is_switched(self) -> bool:
        """True after `reparameterize()` (the SDS phase), False during the LoRA warm-up."""
        return self._switched

    # --- forward ------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """s·B A x (warm-up) or s·(B Q_Aᵀ x + Q_B A x), accumulated into `out`: after the switch by `_SDSUpdate` (one
        rank-2r product) when `out` is 2-D and shares x's, the factors' and the Q's dtype, else product by product
        (`add_product`, autocast's dtypes). The Q's are buffers, so they get no gradient."""
        x = x.to(self.lora_A.dtype)
        factors = (self.lora_A, self.lora_B, self.Q_A, self.Q_B)
        if (
            self._switched
            and out is not None
            and out.dim() == x.dim() == 2
            and autocast_dtype(out) is None
            and all(t.dtype == out.dtype for t in (x, *factors))
        ):
            return _sds_update_in_place(out, x, *factors, self.scaling)
        y = add_product(out, F.linear(x, self.lora_A), self.Q_B if self._switched else self.lora_B, self.scaling)
        return y if not self._switched else add_product(y, x @ self.Q_A, self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        if not self._switched:
            return (self.lora_B @ self.lora_A) * self.scaling
        return (self.lora_B @ self.Q_A.T + self.Q_B @ self.lora_A) * self.scaling

    # --- phase changes --------------------------------------------------------------------------
    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch from warm-up LoRA to SDS form via the rank-r SVD of s·B A; the output is unchanged.

        The SVD is taken in fp64 through QRs of the thin factors (B = Q₁R₁, Aᵀ = Q₂R₂, s·R₁R₂ᵀ = U'ΣV'ᵀ,
        U = Q₁U', V = Q₂V'), never forming the m x n product. Sign convention, so every rank agrees: the
        largest-|·| entry of each column of U is positive (V's column flipped with it).
        """
        if self._switched:
            raise RuntimeError("SDSLoRALinear.reparameterize() called twice: the layer is already in the SDS phase")
        if self.merged:
            raise RuntimeError("SDSLoRALinear.reparameterize() on a merged layer: unmerge() first")
        s = self.scaling
        b, a = _full(self.lora_B).double(), _full(self.lora_A).double()
        q1, r1 = _positive_qr(b)
        q2, r2 = _positive_qr(a.T)
        u_small, sigma, vh_small = torch.linalg.svd(s * (r1 @ r2.T))
        u, v = q1 @ u_small, q2 @ vh_small.T
        idx = u.abs().argmax(dim=0)
        sign = torch.sign(u.gather(0, idx.unsqueeze(0)).squeeze(0))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        u, v = u * sign, v * sign
        _write(self.Q_B, u)
        _write(self.Q_A, v)
        _write(self.lora_B, u * (sigma / (2 * s)))
        _write(self.lora_A, (v * (sigma / (2 * s))).T)
        self.switched.fill_(True)
        self._switched = True

    @torch.no_grad()
    def refresh(self) -> float:
        """Recompute Q_A (QR of Aᵀ) and Q_B (QR of B) in place; returns ‖ΔW_after − ΔW_before‖_F / ‖ΔW_before‖_F.

        The relative jump is 0.0 when ΔW is zero before and after. Does not touch the optimizer state
        (docs/maths.md §6).
        """
        if not self._switched:
            raise RuntimeError("SDSLoRALinear.refresh() before reparameterize(): the layer is still in LoRA warm-up")
        if self.merged:
            raise RuntimeError("SDSLoRALinear.refresh() on a merged layer: unmerge() first")
        b, a = _full(self.lora_B).double(), _full(self.lora_A).double()
        qa_old, qb_old = _full(self.Q_A).double(), _full(self.Q_B).double()
        qa_new, _ = _positive_qr(a.T)
        qb_new, _ = _positive_qr(b)
        s = self.scaling
        # ΔW = s·[B, Q_B][Q_A, Aᵀ]ᵀ, so both norms come from thin factors
        before = s * _lowrank_fro(torch.cat([b, qb_old], 1), torch.cat([qa_old, a.T], 1))
        jump = s * _lowrank_fro(torch.cat([b, qb_new - qb_old], 1), torch.cat([qa_new - qa_old, a.T], 1))
        _write(self.Q_A, qa_new)
        _write(self.Q_B, qb_new)
        if before == 0.0:
            return 0.0 if jump == 0.0 else math.inf
        return jump / before

    # --- closed forms (diagnostics, tests) -------------------------------------------------------
    def factor_grads(self, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂L/∂A, ∂L/∂B) from the full gradient G = ∂L/∂W (m x n) in the current phase, without autograd.

        SDS phase: ∂L/∂A = s·Q_Bᵀ G, ∂L/∂B = s·G Q_A. Warm-up (LoRA): ∂L/∂A = s·Bᵀ G, ∂L/∂B = s·G Aᵀ.
        """
        s = self.scaling
        if self._switched:
            return s * (self.Q_B.T @ G), s * (G @ self.Q_A)
        return s * (self.lora_B.T @ G), s * (G @ self.lora_A.T)

    def effective_gradient(self, G: torch.Tensor) -> torch.Tensor:
        """Ĝ = J Jᵀ G, the change of ΔW per unit step along the factor gradients (docs/maths.md §7).

        SDS phase: s²(Q_B Q_Bᵀ G + G Q_A Q_Aᵀ); warm-up: s²(B Bᵀ G + G Aᵀ A).
        """
        grad_a, grad_b = self.factor_grads(G)
        s = self.scaling
        if self._switched:
            return s * (grad_b @ self.Q_A.T + self.Q_B @ grad_a)
        return s * (grad_b @ self.lora_A + self.lora_B @ grad_a)

    # --- contract ----------------------------------------------------------------------------------
    @property
    def equivalent_rank(self) -> int:
        """Bound on rank ΔW in the current phase: r in warm-up; 2r after the switch (B Q_Aᵀ and Q_B A are rank r each,
        and B, A drift away from the Q's between refreshes), capped by min(m, n)."""
        bound = 2 * self.r if self._switched else self.r
        return min(bound, self.in_features, self.out_features)

    @property
    def expected_num_trainable(self) -> int:
        """r(m + n): the same A, B as LoRA; Q_A, Q_B are buffers."""
        return self.r * (self.in_features + self.out_features)

    def spec(self) -> LayerSpec:
        return self._spec()

    @classmethod
    def from_spec(cls, base: nn.Linear, spec: LayerSpec) -> SDSLoRALinear:
        return cls(base, spec.r, spec.alpha, dropout=spec.dropout)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, switched={self._switched}"

    def block_terms(
        self, view: str, grads: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, list[BlockTerm]] | None:
        """One dense term; after the switch the Jacobian factors are (Q_B, Q_Aᵀ), the trained ones (B, A)."""
        if view == "jacobian" and self._switched:
            return float(self.scaling), [single_term(dense(self.Q_B), dense(self.Q_A).T)]
        f = self._view_tensors(view, ("lora_B", "lora_A"), grads)
        return None if f is None else (float(self.scaling), [single_term(*f)])


def _sync_switched_flag(module: Any, incompatible_keys: Any) -> None:
    """After load_state_dict, mirror the loaded `switched` buffer into the Python flag forward reads."""
    module._switched = bool(module.switched)


@torch.no_grad()
def _benchmark_switch(layer: AdapterLayer, gen: torch.Generator) -> None:
    """Benchmarks time the SDS phase: a small random B, then the switch."""
    if isinstance(layer, SDSLoRALinear) and not layer.is_switched:
        b = torch.randn(layer.lora_B.shape, generator=gen) * 1e-2
        layer.lora_B.copy_(b.to(layer.lora_B.device, layer.lora_B.dtype))
        layer.reparameterize()


register_variant(
    "sds",
    SDSConfig,
    SDSLoRALinear,
    benchmark=BenchmarkEntry(
        {"r": 16, "alpha": 4.0}, "our SDS-LoRA r=16 (SDS phase, after the switch)", prepare=_benchmark_switch
    ),
)
