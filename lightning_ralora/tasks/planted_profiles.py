"""Planted updates with a known best structure, and the best share of ‖ΔW*‖² each adapter structure can represent.

Profiles (unit Frobenius norm; r = the reference rank `task.rank`):
`low` rank 2 (≤ r/2, LoRA exact), `high` a slow decay over min(m, n)/2 directions (the old high-erank profile),
`block` n contiguous diagonal blocks of rank r/2 each (block-diagonal exact, LoRA not), `decay` σ_i = e^{−i/8}
(dense, erank ≈ 3r: the negative control for "erank > r ⇒ more blocks"), `flat` a random orthogonal matrix (full
rank), `outlier` dense rank-r with a few input channels that the layer-local inputs scale up (GraLoRA's case),
`skewed` rank r with σ from 1 to 1/100 (SDS-LoRA's anisotropic case).

Ceilings (docs/maths.md §3, §5, Eckart–Young per block): LoRA rank r keeps the top r of σ(ΔW*)²; RaLoRA with n
blocks of rank r each (its equal-parameter form, r(m+n)) the top r of each diagonal block; GraLoRA's k×k grid the
top r/k of every sub-block; SDS-LoRA (B Q_Aᵀ + Q_B A) any rank-2r matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

PROFILES = ("low", "high", "block", "decay", "flat", "outlier", "skewed")
DEFAULT_PROFILES = ("low", "block", "decay", "flat", "outlier", "skewed")
BLOCK_COUNTS = (2, 4, 8)  # the RaLoRA block counts of the ceiling panel (n = 1 is LoRA)
GRID_SIZES = (2, 4)  # the GraLoRA grid sizes of the ceiling panel


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """n×k with orthonormal columns, from the QR of a seeded Gaussian matrix."""
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def _from_spectrum(out_f: int, in_f: int, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """U diag(σ) Vᵀ with random orthonormal U, V."""
    k = len(sigma)
    return _orthonormal(out_f, k, gen) @ torch.diag(sigma.double()) @ _orthonormal(in_f, k, gen).T


def planted_update(
    out_f: int, in_f: int, profile: str, gen: torch.Generator, rank: int = 8, n_blocks: int = 8
) -> torch.Tensor:
    """A unit-Frobenius-norm ΔW* (fp32, out_f×in_f) of the named profile; `rank` is the reference adapter rank r."""
    k = min(out_f, in_f)
    if profile == "block":
        nb = math.gcd(math.gcd(out_f, in_f), n_blocks)
        bo, bi = out_f // nb, in_f // nb
        w = torch.block_diag(
            *[_from_spectrum(bo, bi, torch.ones(max(1, min(rank // 2, bo, bi))), gen) for _ in range(nb)]
        )
    elif profile == "low":
        w = _from_spectrum(out_f, in_f, torch.tensor([1.0, 0.5]), gen)
    elif profile == "high":
        w = _from_spectrum(out_f, in_f, 1.0 / torch.arange(1, k // 2 + 1, dtype=torch.float64).sqrt(), gen)
    elif profile == "decay":
        w = _from_spectrum(out_f, in_f, torch.exp(-torch.arange(k, dtype=torch.float64) / 8), gen)
    elif profile == "flat":
        w = _from_spectrum(out_f, in_f, torch.ones(k), gen)
    elif profile == "outlier":
        w = _from_spectrum(out_f, in_f, torch.exp(-torch.arange(min(rank, k), dtype=torch.float64) / 4), gen)
    elif profile == "skewed":
        n = min(rank, k)
        w = _from_spectrum(out_f, in_f, torch.logspace(0, -2, n, dtype=torch.float64) if n > 1 else torch.ones(1), gen)
    else:
        raise ValueError(f"task.profiles entries must be in {list(PROFILES)}, got {profile!r}")
    return (w / w.norm()).float()


def outlier_channels(in_f: int, gen: torch.Generator, count: int | None = None) -> list[int]:
    """The input channels an `outlier` target's inputs carry scaled up: max(1, in_f/32) seeded distinct indices."""
    count = count or max(1, in_f // 32)
    return sorted(int(i) for i in torch.randperm(in_f, generator=gen)[:count])


def input_scale(in_f: int, channels: list[int], factor: float) -> torch.Tensor:
    """The per-channel input scale D (ones, `factor` on the outlier channels): the layer sees x·D."""
    d = torch.ones(in_f)
    d[channels] = factor
    return d


# --------------------------------------------------------------------------------------------------------------
# ceilings: the best representable share of ‖ΔW*‖² per adapter structure at equal parameters
# --------------------------------------------------------------------------------------------------------------
def _chunks(n: int, parts: int) -> list[slice]:
    size = n // parts
    return [slice(i * size, (i + 1) * size) for i in range(parts)]


def _best_rank(y: torch.Tensor, proj: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k fit B·z of y (reduced-rank regression): the rank-k truncation of y·proj, proj = z⁺z the
    projection on z's rows."""
    fit = y @ proj
    u, s, vh = torch.linalg.svd(fit, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _proj(z: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(z) @ z


def ceiling(
    delta: torch.Tensor, structure: str, r: int, cov: torch.Tensor | None = None, sweeps: int = 30
) -> float | None:
    """Best share of ‖ΔW*‖² representable by `structure` at rank r: `lora`, `blocks<n>` (RaLoRA, n blocks of rank r),
    `grid<k>` (GraLoRA, k×k sub-blocks of rank r/k), `rank2r` (SDS-LoRA); None when the shape does not split.

    With `cov` = E[x xᵀ] of the layer's inputs the share is of ‖ΔW* X‖² (the metric of the layer-local gap closed):
    closed forms by reduced-rank regression, except `grid<k>` on correlated inputs, fitted by `sweeps` rounds of
    block-coordinate descent (a lower bound on the best share). Without `cov`, every form is closed (Eckart–Young).
    """
    m, n = delta.shape
    d = delta.double()
    if cov is None:
        lf = torch.eye(n, dtype=torch.float64)
    else:
        lam, vec = torch.linalg.eigh(cov.double())
        lf = vec * lam.clamp_min(0).sqrt()  # C = L Lᵀ: ‖ΔW X‖² ∝ ‖ΔW L‖²
    y = d @ lf
    total = float(y.norm() ** 2)
    if total == 0:
        return 1.0
    if structure in ("lora", "rank2r"):
        k = r if structure == "lora" else 2 * r
        return float((torch.linalg.svdvals(y)[:k] ** 2).sum()) / total
    if structure.startswith("blocks"):
        nb = int(structure[6:])
        if m % nb or n % nb:
            return None
        parts = zip(_chunks(m, nb), _chunks(n, nb), strict=True)
        return sum(float(_best_rank(y[o], _proj(lf[i]), r).norm() ** 2) for o, i in parts) / total
    if structure.startswith("grid"):
        k = int(structure[4:])
        if m % k or n % k or r % k:
            return None
        resid = 0.0
        projs = [_proj(lf[i]) for i in _chunks(n, k)]
        for o in _chunks(m, k):
            fits = [torch.zeros_like(y[o]) for _ in range(k)]
            for _ in range(1 if cov is None else sweeps):  # identity inputs: the sub-blocks are independent
                for j, proj in enumerate(projs):
                    fits[j] = _best_rank(y[o] - sum(fits) + fits[j], proj, r // k)
            resid += float((y[o] - sum(fits)).norm() ** 2)
        return 1.0 - resid / total
    raise ValueError(f"unknown structure {structure!r}")


def ceiling_panel(delta: torch.Tensor, r: int, cov: torch.Tensor | None = None) -> dict[str, float | None]:
    """The ceilings of LoRA, RaLoRA at each n in BLOCK_COUNTS, GraLoRA at each k in GRID_SIZES and SDS-LoRA: the
    oracle view of which structure could win."""
    names = ["lora", *(f"blocks{n}" for n in BLOCK_COUNTS), *(f"grid{k}" for k in GRID_SIZES), "rank2r"]
    return {s: ceiling(delta, s, r, cov) for s in names}


def structure_of(layer: Mapping[str, Any]) -> tuple[str, int] | None:
    """(structure, rank) of an adapter layer summary (results.json structure.layers[...]); None without a ceiling
    (Hybrid GraLoRA, DoRA, peft)."""
    kind, r = layer.get("kind"), layer.get("r")
    if r is None:
        return None
    if kind == "lora" or (kind == "ralora" and int(layer.get("n_blocks", 1)) == 1):
        return "lora", int(r)
    if kind == "ralora":
        return f"blocks{int(layer['n_blocks'])}", int(r)
    if kind == "gralora" and not layer.get("hybrid_r"):
        return f"grid{int(layer.get('k', 1))}", int(r)
    if kind == "sds":
        return "rank2r", int(r)
    return None


def best_size(
    delta: torch.Tensor, r: int, family: str, sizes: tuple[int, ...] = (1, 2, 4, 8), cov: torch.Tensor | None = None
) -> int:
    """The oracle structure by ceiling: the smallest block count (`family="blocks"`, n = 1 is LoRA) or grid size
    (`"grid"`) whose ceiling is within 1e-6 of the best of `sizes`; sizes that do not split the shape are skipped."""
    shares = {}
    for size in sizes:
        share = ceiling(delta, "lora" if family == "blocks" and size == 1 else f"{family}{size}", r, cov)
        if share is not None:
            shares[size] = share
    top = max(shares.values())
    return min(s for s, v in shares.items() if v >= top - 1e-6)
