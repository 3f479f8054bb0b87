"""Measurements that never change training (docs/maths.md §7): full-gradient capture, effective gradient,
alignment metrics."""

from lightning_ralora.diagnostics.alignment import (
    METHODS,
    adapter_grads_from_full,
    closed_form_effective_gradient,
    cos_f,
    effective_gradient,
    generic_effective_gradient,
    layer_metrics,
    stable_rank,
)
from lightning_ralora.diagnostics.capture import FullGradientCapture
from lightning_ralora.diagnostics.structure import BlockTerm, block_terms, equivalent_factors, subspace_overlap

__all__ = [
    "METHODS",
    "BlockTerm",
    "FullGradientCapture",
    "adapter_grads_from_full",
    "block_terms",
    "closed_form_effective_gradient",
    "cos_f",
    "effective_gradient",
    "equivalent_factors",
    "generic_effective_gradient",
    "layer_metrics",
    "stable_rank",
    "subspace_overlap",
]
