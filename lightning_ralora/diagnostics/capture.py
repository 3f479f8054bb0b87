"""Capture the full fine-tuning gradient G = ∂L/∂W0 of an adapted (frozen) linear layer with temporary hooks."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class FullGradientCapture:
    """Accumulates G = Σ_tokens g_outᵀ x (fp32, out x in) for one linear-like layer while attached.

    G is what ∂L/∂W0 would be if W0 were trainable: x is the layer's input *before* the adapter's dropout, because
    W0 sees x (y = W0 x + b + ΔW·dropout(x)); with dropout > 0 the adapter's own gradients see dropout(x) instead,
    so they differ from Jᵀ G by the dropout noise (G is the full fine-tuning reference, by choice). g_out is the
    gradient of the loss actually back-propagated, so Lightning's division by `accumulate_grad_batches` is already
    in it: summed over a window's micro-batches, G equals W0.grad. A fp16 GradScaler's scale is NOT removed here
    (the caller divides by it). Only a forward hook lives on the module (attach/detach, or use as a context
    manager); each forward that needs grad puts a one-shot tensor hook on its own output, which goes away with the
    autograd graph. Gradients that arrive after `detach()` are ignored.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.G: torch.Tensor | None = None
        self.tokens = 0
        self._handle: RemovableHandle | None = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self) -> FullGradientCapture:
        """Register the forward hook (idempotent)."""
        if self._handle is None:
            self._handle = self.layer.register_forward_hook(self._forward_hook)
        return self

    def detach(self) -> None:
        """Remove the forward hook; the module keeps no hook of ours afterwards."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def reset(self) -> None:
        """Forget the accumulated G."""
        self.G, self.tokens = None, 0

    def __enter__(self) -> FullGradientCapture:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not args or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # no_grad / eval forward, or a reentrant activation checkpoint's first pass
        x = args[0].detach()  # already saved by the base linear for its backward: no extra memory
        output.register_hook(partial(self._grad_hook, x))

    def _grad_hook(self, x: torch.Tensor, g: torch.Tensor) -> None:
        if self._handle is None:
            return
        g2 = g.detach().reshape(-1, g.shape[-1]).float()
        x2 = x.reshape(-1, x.shape[-1]).float()
        contrib = g2.T @ x2
        self.G = contrib if self.G is None else self.G.add_(contrib)
        self.tokens += x2.shape[0]
