"""Gradient alignment of an adapter with full fine-tuning (docs/maths.md §7).

For a layer with full gradient G = ∂L/∂W0 (see `FullGradientCapture`) and adapter parameters θ with ΔW = ΔW(θ),
J = ∂vec(ΔW)/∂θ. The adapter's own gradient is Jᵀ G (when the layer has no dropout), and one step along it changes
ΔW, to first order, by J Jᵀ G =: Ĝ, the *effective gradient*. cos_F(G, Ĝ) measures how well the parameterisation
follows full fine-tuning. Closed forms (LoRA s²(B Bᵀ G + G Aᵀ A), SDS-LoRA s²(Q_B Q_Bᵀ G + G Q_A Q_Aᵀ), the block
variants blockwise) are used when known; the generic path (torch.func vjp then jvp through `delta_weight`) serves
any AdapterLayer and is what the closed forms are tested against. A plain nn.Linear (full fine-tuning) has Ĝ = G.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from lightning_ralora.adapters import AdapterLayer
from lightning_ralora.diagnostics.structure import (
    block_terms,
    blockwise_effective_gradient,
    dense,
    equivalent_factors,
    subspace_overlap,
)
from lightning_ralora.rank.spectra import effective_rank

METHODS = ("auto", "closed", "generic")


class _DeltaWeight(nn.Module):
    """forward() = layer.delta_weight(), so torch.func.functional_call can substitute the adapter's tensors."""

    def __init__(self, layer: AdapterLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self) -> torch.Tensor:
        return self.layer.delta_weight()


def _adapter_tensors(layer: AdapterLayer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({param name: fp32 detached}, {buffer name: fp32 detached}) of the update, names prefixed for _DeltaWeight."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = dense(t)
        return t.float() if t.is_floating_point() else t

    params = {f"layer.{n}": cast(p) for n, p in layer.named_parameters() if not n.startswith("base.")}
    buffers = {f"layer.{n}": cast(b) for n, b in layer.named_buffers() if not n.startswith("base.")}
    return params, buffers


def _delta_fn(layer: AdapterLayer, buffers: dict[str, torch.Tensor]):
    wrapper = _DeltaWeight(layer)
    return lambda params: functional_call(wrapper, {**buffers, **params}, ())


def adapter_grads_from_full(layer: AdapterLayer, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Jᵀ G: the gradient each adapter parameter gets from a full gradient G (torch.func vjp through delta_weight).

    Keys are the parameter names inside the layer (e.g. ``lora_A``). Equals autograd's gradient of ⟨G, ΔW(θ)⟩.
    """
    params, buffers = _adapter_tensors(layer)
    _, pull = vjp(_delta_fn(layer, buffers), params)
    (grads,) = pull(G.detach().float())
    return {k.removeprefix("layer."): v for k, v in grads.items()}


def generic_effective_gradient(layer: AdapterLayer, G: torch.Tensor) -> torch.Tensor:
    """Ĝ = J (Jᵀ G) for any AdapterLayer: vjp of θ ↦ delta_weight(θ) at G, then jvp along that tangent (fp32)."""
    params, buffers = _adapter_tensors(layer)
    f = _delta_fn(layer, buffers)
    _, pull = vjp(f, params)
    (tangent,) = pull(G.detach().float())
    _, ghat = jvp(f, (params,), (tangent,))
    return ghat


def closed_form_effective_gradient(layer: nn.Module, G: torch.Tensor) -> torch.Tensor | None:
    """Ĝ from the variant's closed form (blockwise s²(B Bᵀ G + G Aᵀ A) on its Jacobian factors); None if unknown.

    A plain nn.Linear (full fine-tuning) returns G itself.
    """
    if isinstance(layer, nn.Linear) and not isinstance(layer, AdapterLayer):
        return G
    got = block_terms(layer, "jacobian")
    if got is None:
        return None
    scale, terms = got
    return blockwise_effective_gradient(G.detach().float().contiguous(), scale, terms)


def effective_gradient(layer: nn.Module, G: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Ĝ = J Jᵀ G of a layer (fp32): ``closed`` form, ``generic`` torch.func path, or ``auto`` (closed if known)."""
    if method not in METHODS:
        raise ValueError(f"effective_gradient method must be one of {METHODS}, got {method!r}")
    if method != "generic":
        ghat = closed_form_effective_gradient(layer, G)
        if ghat is not None:
            return ghat
        if method == "closed":
            raise ValueError(f"no closed-form effective gradient for {type(layer).__name__}; use method='generic'")
    if not isinstance(layer, AdapterLayer):
        if isinstance(layer, nn.Linear):
            return G.detach().float()
        raise TypeError(f"effective_gradient needs an AdapterLayer or nn.Linear, got {type(layer).__name__}")
    return generic_effective_gradient(layer, G)


def cos_f(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius cosine ⟨a, b⟩_F / (‖a‖_F ‖b‖_F), in fp64; NaN if either is zero."""
    a, b = a.detach().double(), b.detach().double()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float((a * b).sum() / (na * nb))


def stable_rank(M: torch.Tensor) -> float:
    """‖M‖_F² / ‖M‖_2² (between 1 and rank M; 0.0 for a zero matrix)."""
    M = dense(M).float()
    top = float(torch.linalg.matrix_norm(M, ord=2))
    if top == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(M)) ** 2 / top**2


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A parameter-shaped tensor as a matrix for unknown variants: all leading dims stacked as rows."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def layer_metrics(
    layer: nn.Module,
    G: torch.Tensor,
    adapter_grads: Mapping[str, torch.Tensor] | None = None,
    method: str = "auto",
    full_erank: bool = False,
) -> dict[str, float]:
    """Alignment diagnostics of one layer given its full gradient G (and the adapter's gradients; default p.grad).

    Keys: ``cos_f`` = cos_F(G, Ĝ); ``erank_grad_A``, ``erank_grad_B`` = erank of ∂L/∂A, ∂L/∂B; ``srank_A``,
    ``srank_B`` = stable ranks of A, B; ``kappa`` = subspace overlap (`structure.subspace_overlap`); with
    `full_erank` also ``erank_G`` (one SVD of the m x n G: costly on big layers). Block variants use the
    equivalent dense factors B_eq (m x Σr_b), A_eq (Σr_b x n) with ΔW = s·B_eq A_eq (block-diagonal for RaLoRA,
    so their spectra are the union of the blocks'), and their gradients restricted to that sparsity. For SDS-LoRA,
    A and B are the trained factors (their gradients are s·Q_Bᵀ G, s·G Q_A). Unknown variants report
    ``erank_grad_<param>`` / ``srank_<param>`` per parameter (leading dims stacked as rows) and κ from the top-R
    singular vectors of ΔW (R = equivalent_rank). A plain nn.Linear (full fine-tuning) reports cos_f = 1.
    """
    G = dense(G).float().contiguous()
    out: dict[str, float] = {}
    if full_erank:
        out["erank_G"] = effective_rank(G)
    if isinstance(layer, nn.Linear) and not isinstance(layer, AdapterLayer):
        out["cos_f"] = 1.0 if float(G.abs().sum()) > 0 else float("nan")
        return out
    out["cos_f"] = cos_f(G, effective_gradient(layer, G, method))
    if adapter_grads is not None:
        grads = {n: dense(g) for n, g in adapter_grads.items()}
    else:
        grads = {
            n: dense(p.grad) for n, p in layer.named_parameters() if not n.startswith("base.") and p.grad is not None
        }
    shape = (layer.out_features, layer.in_features)
    factors = block_terms(layer, "factors")
    if factors is None:  # unknown variant: per-parameter statistics, κ from ΔW's leading singular vectors
        for n, p in layer.named_parameters():
            if n.startswith("base."):
                continue
            out[f"srank_{n}"] = stable_rank(_as_matrix(dense(p)))
            if n in grads:
                out[f"erank_grad_{n}"] = effective_rank(_as_matrix(grads[n].float()))
        with torch.no_grad():
            dw = dense(layer.delta_weight()).float()
        U, sv, Vh = torch.linalg.svd(dw, full_matrices=False)
        tol = float(sv.max()) * max(dw.shape) * torch.finfo(sv.dtype).eps if sv.numel() else 0.0
        R = min(int(layer.equivalent_rank), int((sv > tol).sum()))
        gn = float(torch.linalg.matrix_norm(G))
        out["kappa"] = float(torch.linalg.matrix_norm(U[:, :R].T @ G @ Vh[:R].T)) / gn if gn > 0 else float("nan")
        return out
    _, fterms = factors
    B_eq, A_eq = equivalent_factors(fterms, shape)
    out["srank_A"] = stable_rank(A_eq)
    out["srank_B"] = stable_rank(B_eq)
    out["kappa"] = subspace_overlap(G, fterms)
    gterms = block_terms(layer, "grads", grads)
    if gterms is not None:
        gB, gA = equivalent_factors(gterms[1], shape)
        out["erank_grad_A"] = effective_rank(gA.float())
        out["erank_grad_B"] = effective_rank(gB.float())
    return out
