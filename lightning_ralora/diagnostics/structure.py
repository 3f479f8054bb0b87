"""Every adapter variant seen through one lens: ΔW = s·Σ_terms Σ_blocks E_ij(B_b A_b) on a grid of ΔW's blocks.

A *term* is a set of blocks (i, j) of a p x q grid of ΔW (blocks of (m/p) x (n/q)), each the product of a left
factor B_b ((m/p) x r_b) and a right factor A_b (r_b x (n/q)), stored batched. LoRA is one 1x1 term; RaLoRA is the
n x n grid's diagonal; GraLoRA is the full k x k grid (plus a 1x1 term for Hybrid GraLoRA's dense part).

Two views are taken of a layer:
- ``jacobian``: the factors J multiplies a parameter step with, i.e. ΔW's first-order change is
  s·Σ_b E_b(dB_b A_b + B_b dA_b). For LoRA-type layers these are the trained factors; for SDS-LoRA after its
  switch they are (Q_B, Q_Aᵀ), since ΔW = s(B Q_Aᵀ + Q_B A) with the Q's constant.
- ``factors`` / ``grads``: the trained factors themselves (B, A) and their gradients, in the same layout.

Nothing here changes a layer; every tensor is read detached (DTensor shards are gathered with ``full_tensor``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_ralora.adapters import GraLoRALinear, LoRALinear, RaLoRALinear, SDSLoRALinear


@dataclass
class BlockTerm:
    """Blocks (rows[b], cols[b]) of a p x q grid of ΔW, each B[b] @ A[b] (before the scale s)."""

    grid: tuple[int, int]
    rows: torch.Tensor  # (nb,) long: block-row index of each block
    cols: torch.Tensor  # (nb,) long: block-column index of each block
    B: torch.Tensor  # (nb, m/p, r_b)
    A: torch.Tensor  # (nb, r_b, n/q)


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached plain tensor (a DTensor shard, as under FSDP2, is gathered first: a collective on every rank)."""
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def _single(B: torch.Tensor, A: torch.Tensor) -> BlockTerm:
    z = torch.zeros(1, dtype=torch.long, device=B.device)
    return BlockTerm((1, 1), z, z, B.unsqueeze(0), A.unsqueeze(0))


def block_terms(
    layer: nn.Module, view: str, grads: Mapping[str, torch.Tensor] | None = None
) -> tuple[float, list[BlockTerm]] | None:
    """(s, terms) of a known adapter variant in the given view (``jacobian``, ``factors`` or ``grads``).

    For ``grads`` the gradients come from `grads` ({parameter name in the layer: tensor}) or else from p.grad.
    None when the variant is unknown (the generic paths then take over), or for ``grads`` when some factor has
    no gradient.
    """
    if view not in ("jacobian", "factors", "grads"):
        raise ValueError(f"block_terms view must be 'jacobian', 'factors' or 'grads', got {view!r}")
    s = float(layer.scaling) if hasattr(layer, "scaling") else 1.0

    def pick(*names: str) -> list[torch.Tensor] | None:
        if view != "grads":
            return [dense(getattr(layer, n)) for n in names]
        got = [dense(grads.get(n) if grads is not None else getattr(layer, n).grad) for n in names]
        if any(g is None for g in got):
            return None
        for n, g in zip(names, got, strict=True):
            if g.shape != getattr(layer, n).shape:
                raise ValueError(
                    f"gradient for {n!r} has shape {tuple(g.shape)}, the parameter {tuple(getattr(layer, n).shape)}"
                )
        return got

    kind = getattr(layer, "kind", None)  # a subclass with its own kind (and maybe its own ΔW) is not assumed known
    if isinstance(layer, SDSLoRALinear) and kind == SDSLoRALinear.kind:
        if view == "jacobian" and layer.is_switched:
            return s, [_single(dense(layer.Q_B), dense(layer.Q_A).T)]
        f = pick("lora_B", "lora_A")
        return None if f is None else (s, [_single(*f)])
    if isinstance(layer, LoRALinear) and kind == LoRALinear.kind:
        f = pick("lora_B", "lora_A")
        return None if f is None else (s, [_single(*f)])
    if isinstance(layer, RaLoRALinear) and kind == RaLoRALinear.kind:
        f = pick("lora_B", "lora_A")
        if f is None:
            return None
        idx = torch.arange(layer.n_blocks, device=f[0].device)
        return s, [BlockTerm((layer.n_blocks, layer.n_blocks), idx, idx, f[0], f[1])]
    if isinstance(layer, GraLoRALinear) and kind == GraLoRALinear.kind:
        f = pick("gralora_B", "gralora_A")
        if f is None:
            return None
        k = layer.k
        ar = torch.arange(k, device=f[0].device)
        B, A = f[0].reshape(k * k, *f[0].shape[2:]), f[1].reshape(k * k, *f[1].shape[2:])  # stored [i, j]
        terms = [BlockTerm((k, k), ar.repeat_interleave(k), ar.repeat(k), B, A)]
        if layer.hybrid_r > 0:
            h = pick("hybrid_B", "hybrid_A")
            if h is None:
                return None
            terms.append(_single(*h))
        return s, terms
    return None


def _grid_view(M: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(p, q, m/p, n/q) view of an m x n matrix's blocks (shares storage with M)."""
    p, q = grid
    m, n = M.shape
    return M.view(p, m // p, q, n // q).permute(0, 2, 1, 3)


def blockwise_effective_gradient(G: torch.Tensor, scale: float, terms: list[BlockTerm]) -> torch.Tensor:
    """Ĝ = s²·Σ_b E_b(B_b B_bᵀ G_b + G_b A_bᵀ A_b): J Jᵀ G for independent factor pairs on ΔW's blocks.

    Only the blocks a term covers see G (RaLoRA: the diagonal blocks); one batched product per term.
    """
    out = torch.zeros_like(G)
    for t in terms:
        B, A = t.B.to(G.dtype), t.A.to(G.dtype)
        Gb = _grid_view(G, t.grid)[t.rows, t.cols]  # (nb, m/p, n/q)
        upd = B @ (B.transpose(1, 2) @ Gb) + (Gb @ A.transpose(1, 2)) @ A
        ov = _grid_view(out, t.grid)
        ov[t.rows, t.cols] += (scale * scale) * upd
    return out


def equivalent_factors(terms: list[BlockTerm], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B_eq (m x R), A_eq (R x n)) with Σ_b E_b(B_b A_b) = B_eq A_eq, R = Σ_b r_b.

    Each block's B_b sits at its block-rows and A_b at its block-columns, on rows/columns of their own, so
    B_eq is block-diagonal for RaLoRA (spectrum = union of the blocks' spectra) and B_eq A_eq reproduces the grid
    for GraLoRA. Applied to gradients this gives ∂L/∂B_eq, ∂L/∂A_eq restricted to the structural sparsity.
    """
    m, n = shape
    Bs, As = [], []
    for t in terms:
        p, q = t.grid
        nb, mb, r = t.B.shape
        nw = t.A.shape[-1]
        idx = torch.arange(nb, device=t.B.device)
        Be = t.B.new_zeros(p, mb, nb, r)
        Be[t.rows, :, idx, :] = t.B  # advanced indices split by a slice: indexed dims come first
        Ae = t.A.new_zeros(nb, r, q, nw)
        Ae[idx, :, t.cols, :] = t.A
        Bs.append(Be.reshape(m, nb * r))
        As.append(Ae.reshape(nb * r, n))
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def _orth_masked(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of each matrix in a batch (…, d, R), as (…, d, R') with zero columns
    where the singular value is negligible (rank-revealing SVD, so a zero factor has an empty basis)."""
    U, sv, _ = torch.linalg.svd(M, full_matrices=False)
    tol = sv.amax(dim=-1, keepdim=True) * (max(M.shape[-2:]) * torch.finfo(sv.dtype).eps)
    keep = (sv > tol) & (sv > 0)
    return U * keep.unsqueeze(-2).to(U.dtype)


def subspace_overlap(G: torch.Tensor, terms: list[BlockTerm]) -> float:
    """κ = ‖Π(G)‖_F / ‖G‖_F, Π the projection onto the adapter's column x row space, block by block.

    LoRA/SDS: Π(G) = U Uᵀ G V Vᵀ with U, V orthonormal bases of span(B), span(Aᵀ) (SPEC §7). Block variants: the
    same per block of ΔW's structure (RaLoRA's diagonal blocks, GraLoRA's grid), so energy in blocks the adapter
    cannot reach counts as misaligned. Overlapping terms (Hybrid GraLoRA) are refined to a common grid and each
    fine block's bases span all terms' factors there (a superset of the reachable product space, documented).
    Bases come from a rank-revealing SVD (equal to QR's span at full rank); a zero factor (LoRA's B at step 0)
    has an empty basis and gives κ = 0.
    """
    G = G.contiguous()
    gnorm = float(torch.linalg.matrix_norm(G))
    if gnorm == 0.0:
        return float("nan")
    m, n = G.shape
    P = math.lcm(*(t.grid[0] for t in terms))
    Q = math.lcm(*(t.grid[1] for t in terms))
    mf, nf = m // P, n // Q
    R = sum(t.B.shape[-1] for t in terms)
    Bf = G.new_zeros(P, Q, mf, R)
    Af = G.new_zeros(P, Q, R, nf)
    present = torch.zeros(P, Q, dtype=torch.bool, device=G.device)
    off = 0
    for t in terms:
        p, q = t.grid
        fp, fq = P // p, Q // q
        nb, _, r = t.B.shape
        dev = t.B.device
        rows = (t.rows.view(nb, 1, 1) * fp + torch.arange(fp, device=dev).view(1, fp, 1)).expand(nb, fp, fq)
        cols = (t.cols.view(nb, 1, 1) * fq + torch.arange(fq, device=dev).view(1, 1, fq)).expand(nb, fp, fq)
        Bsub = t.B.to(G.dtype).reshape(nb, fp, mf, r).unsqueeze(2).expand(nb, fp, fq, mf, r)
        Asub = t.A.to(G.dtype).reshape(nb, r, fq, nf).permute(0, 2, 1, 3).unsqueeze(1).expand(nb, fp, fq, r, nf)
        Bf[rows, cols, :, off : off + r] = Bsub
        Af[rows, cols, off : off + r, :] = Asub
        present[rows, cols] = True
        off += r
    pr, pc = present.nonzero(as_tuple=True)
    U = _orth_masked(Bf[pr, pc])  # (nbf, mf, R)
    V = _orth_masked(Af[pr, pc].transpose(-1, -2))  # (nbf, nf, R)
    Gb = _grid_view(G, (P, Q))[pr, pc]
    proj = U.transpose(-1, -2) @ Gb @ V
    return float(torch.linalg.vector_norm(proj)) / gnorm
