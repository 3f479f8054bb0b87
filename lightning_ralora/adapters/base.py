"""The adapter contract shared by every variant (docs/maths.md §0): a frozen linear plus a low-rank update.

Pure PyTorch: no Lightning, Hydra or transformers imports, so this folder can be lifted into any loop.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ralora.adapters.schema import LayerSpec


@dataclass
class BlockTerm:
    """Blocks (rows[b], cols[b]) of a p x q grid of ΔW, each B[b] @ A[b] (before the scale s)."""

    grid: tuple[int, int]
    rows: torch.Tensor  # (nb,) long: block-row index of each block
    cols: torch.Tensor  # (nb,) long: block-column index of each block
    B: torch.Tensor  # (nb, m/p, r_b)
    A: torch.Tensor  # (nb, r_b, n/q)


BLOCK_VIEWS = ("jacobian", "factors", "grads")


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached plain tensor (a DTensor shard, as under FSDP2, is gathered first: a collective on every rank)."""
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def single_term(B: torch.Tensor, A: torch.Tensor) -> BlockTerm:
    """One dense B (m x r) @ A (r x n) as a 1 x 1 grid term."""
    z = torch.zeros(1, dtype=torch.long, device=B.device)
    return BlockTerm((1, 1), z, z, B.unsqueeze(0), A.unsqueeze(0))


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on t's device (bf16-mixed, 16-mixed), None outside autocast. In-place
    products (addmm_, baddbmm_) are not autocast, so the fast paths check it."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def add_product(out: torch.Tensor | None, h: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s·h Bᵀ, accumulated into `out` when given: by one addmm_ with the scale as alpha when `out`, h and B share
    a dtype and `out` is 2-D (no tokens x out temporary, no extra pass), else scaled on the small h and added
    (casting into a bf16 `out`; under autocast the product runs in autocast's dtype, as peft's)."""
    if out is None:
        return F.linear(h * s, B)
    if out.dim() != 2 or h.dim() != 2 or not out.dtype == h.dtype == B.dtype:
        return out.add_(F.linear(h * s, B))
    return out.addmm_(h, B.t(), alpha=s)


class _AddBlocks(torch.autograd.Function):
    """out (M x nb·mb) += s·[h_b B_bᵀ]_b for h (nb, M, r), B (nb, mb, r): one baddbmm_ into a strided view of `out`,
    so neither pass makes a tokens x out temporary or a permute copy (autograd's in-place-on-view would clone)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        nb, M, _ = h.shape
        out.view(M, nb, -1).transpose(0, 1).baddbmm_(h, B.transpose(1, 2), alpha=s)
        ctx.mark_dirty(out)
        ctx.save_for_backward(h, B)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, B = ctx.saved_tensors
        nb, M, _ = h.shape
        gv = g.reshape(M, nb, -1).transpose(0, 1)  # (nb, M, mb), a view of g
        gh = torch.bmm(gv, B).mul_(ctx.s) if ctx.needs_input_grad[1] else None
        gB = torch.bmm(gv.transpose(1, 2), h).mul_(ctx.s) if ctx.needs_input_grad[2] else None
        return g, gh, gB, None


def eager_apply(function: type[torch.autograd.Function]) -> Callable[..., torch.Tensor]:
    """`function.apply`, left eager by torch.compile (adapter.compile): dynamo does not trace the in-place update
    of a strided view of `out` that the fused adapter Functions make."""
    return torch.compiler.disable(function.apply)


_add_blocks_in_place = eager_apply(_AddBlocks)


def add_blocks(out: torch.Tensor | None, h: torch.Tensor, B: torch.Tensor, s: float, m: int) -> torch.Tensor:
    """The block-diagonal product s·blockdiag(B_b)·h as (M x m), output chunk b = s·h_b B_bᵀ (h (nb, M, r),
    B (nb, m/nb, r)); accumulated into a contiguous 2-D `out` of h's and B's dtype in place (`_AddBlocks`), else
    added (under autocast: autocast's bmm, then added)."""
    if out is not None and out.dim() == 2 and out.dtype == h.dtype == B.dtype and out.is_contiguous():
        return _add_blocks_in_place(out, h, B, s)
    y = torch.bmm(h * s, B.transpose(1, 2)).transpose(0, 1).reshape(h.shape[1], m)
    return y if out is None else out.add_(y)


@functools.cache
def compiled_update(cls: type) -> Callable[..., torch.Tensor]:
    """`torch.compile` of a layer class's `update` (adapter.compile), shared by every layer of the class: the
    layer is an argument, so one compiled graph serves every layer of a shape."""
    return torch.compile(cls.update)


@functools.cache
def _accumulates(cls: type) -> bool:
    """True when `cls.update` takes `out=`, i.e. writes the update into the base output itself."""
    return "out" in inspect.signature(cls.update).parameters


def kaiming_uniform_(weight: torch.Tensor, fan_in: int | None = None) -> torch.Tensor:
    """nn.Linear's default init (Kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    `fan_in` may be given for batched block factors whose last dim is not the true fan-in.
    """
    fan_in = weight.shape[-1] if fan_in is None else fan_in
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class AdapterLayer(nn.Module):
    """Base for "a frozen nn.Linear plus a low-rank update".

    Subclasses implement `update(x)` (the scaled ΔW·x through the factors, never materialising ΔW),
    `delta_weight()` (dense ΔW), `equivalent_rank`, `expected_num_trainable` and `spec()`.
    """

    kind: ClassVar[str] = ""
    # names of the B-side (output-side) factors: LoRA+ gives them lr_ratio_B x the learning rate
    b_side: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} wraps torch.nn.Linear, got {type(base).__name__}"
                " (transformers' GPT-2 Conv1D is not supported: its weight is stored transposed)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.compiled = False  # adapter.compile: forward runs `compiled_update` instead of `update`

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def dropout_p(self) -> float:
        return float(self.dropout.p) if isinstance(self.dropout, nn.Dropout) else 0.0

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, so code that reads `layer.weight` (e.g. HF tying checks) still works."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _factory(self) -> dict[str, Any]:
        """dtype/device for new adapter tensors: at least fp32 whatever the base dtype (fp32 on a bf16/fp16 base,
        fp64 on an fp64 one; as peft's `autocast_adapter_dtype`), so AdamW's small updates are not rounded away
        in bf16; `set_adapter_dtype` changes it."""
        w = self.base.weight
        dtype = torch.promote_types(w.dtype, torch.float32) if w.is_floating_point() else torch.float32
        return {"dtype": dtype, "device": w.device}

    @torch.no_grad()
    def set_adapter_dtype(self, dtype: torch.dtype) -> AdapterLayer:
        """Cast every adapter parameter and floating buffer (not the frozen base) to `dtype`, in place."""
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                p.data = p.data.to(dtype)
        for name, b in self.named_buffers():
            if not name.startswith("base.") and b.is_floating_point():
                owner, _, leaf = name.rpartition(".")
                (self.get_submodule(owner) if owner else self)._buffers[leaf] = b.to(dtype)
        return self

    def b_side_parameters(self) -> list[nn.Parameter]:
        """The B-side factors this variant declares (`b_side`); LoRA+ scales their learning rate."""
        return [getattr(self, n) for n in self.b_side if isinstance(getattr(self, n, None), nn.Parameter)]

    # --- to implement -------------------------------------------------------------------------
    def update(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled low-rank update ΔW·x, computed through the factors; with `out` (the 2-D base output, called so
        by `forward` when the variant's `update` takes `out`) accumulated into it in place and returned."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW (out x in) for merge, tests and diagnostics."""
        raise NotImplementedError

    @property
    def equivalent_rank(self) -> int:
        """Upper bound on rank(ΔW)."""
        raise NotImplementedError

    @property
    def expected_num_trainable(self) -> int:
        """The paper's parameter-count formula for this layer."""
        raise NotImplementedError

    def spec(self) -> LayerSpec:
        raise NotImplementedError

    def _spec(self, **variant_fields: Any) -> LayerSpec:
        """This layer's LayerSpec: the shared fields (kind, r, alpha, dropout) plus the variant's own."""
        return LayerSpec(kind=self.kind, r=self.r, alpha=self.alpha, dropout=self.dropout_p, **variant_fields)

    @classmethod
    def from_spec(cls, base: nn.Linear, spec: LayerSpec) -> AdapterLayer:
        raise NotImplementedError

    # --- diagnostics ------------------------------------------------------------------------------
    def block_terms(
        self, view: str, grads: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, list[BlockTerm]] | None:
        """(s, terms): ΔW = s·Σ_terms Σ_blocks E(B_b A_b) in the given view (``jacobian``: the factors a parameter
        step is multiplied with; ``factors``: the trained factors; ``grads``: their gradients, from `grads` or
        p.grad). None (the default) means no closed form: diagnostics then take the generic torch.func path; also
        None for ``grads`` when a factor has no gradient."""
        return None

    def _view_tensors(
        self, view: str, names: tuple[str, ...], grads: Mapping[str, torch.Tensor] | None
    ) -> list[torch.Tensor] | None:
        """The named factors (or, for view ``grads``, their gradients) as detached dense tensors."""
        if view != "grads":
            return [dense(getattr(self, n)) for n in names]
        got = [dense(grads.get(n) if grads is not None else getattr(self, n).grad) for n in names]
        if any(g is None for g in got):
            return None
        for n, g in zip(names, got, strict=True):
            if g.shape != getattr(self, n).shape:
                raise ValueError(
                    f"gradient for {n!r} has shape {tuple(g.shape)}, the parameter {tuple(getattr(self, n).shape)}"
                )
        return got

    # --- shared behaviour ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the update, on 2-D (tokens x features) views; `update` casts the input to the adapter
        dtype and accumulates into the base output in place (its `out=`), or the update is added in place."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        y = self.base(x)
        if not self.merged:
            # in place: the base output is not saved for backward, and a fresh (tokens x out) tensor costs a full
            # pass; add_ also casts a float32 update into a bf16 output without a temporary
            x = self.dropout(x)
            update = compiled_update(type(self)) if self.compiled else type(self).update
            y = update(self, x, out=y) if _accumulates(type(self)) else y.add_(update(self, x))
        return y.view(*lead, self.out_features)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the update (everything but the frozen base)."""
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight; forward then costs exactly the base linear."""
        if self.merged:
            return
        w = self.base.weight
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()` (exact up to floating-point rounding)."""
        if not self.merged:
            return
        w = self.base.weight
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def summary(self) -> dict[str, Any]:
        """Structure for results.json: the spec plus the shape and counts."""
        return {
            **self.spec().to_dict(),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_trainable": self.num_trainable,
            "equivalent_rank": self.equivalent_rank,
        }

    def extra_repr(self) -> str:
        s = self.spec()
        return f"kind={s.kind}, r={s.r}, in={self.in_features}, out={self.out_features}, merged={self.merged}"
