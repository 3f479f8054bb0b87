"""GID estimation (docs/maths.md §2): average each target's warm-up gradient (all-reduced across ranks) and measure it.

No Lightning import, so the estimator runs from any loop (the GIDWarmup callback and the `lightning-ralora-gid`
profiler are thin schedulers around it).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchmetrics.functional import spearman_corrcoef

from lightning_ralora.rank.spectra import effective_rank, singular_values


class NonFiniteGradientError(FloatingPointError):
    """A target's averaged warm-up gradient contains NaN/inf (raised on every rank, after the all-reduce)."""


@dataclass
class GIDStat:
    """GID statistics of one target weight, from its warm-up gradient averaged over N batches (and ranks)."""

    erank: float
    importance: float
    sigma: torch.Tensor  # singular values of Ḡ, fp32, descending, on CPU
    grad_norm: float
    shape: tuple[int, int] = (0, 0)
    warning: str | None = None
    grad: torch.Tensor | None = field(default=None, repr=False)  # Ḡ itself, only with keep_grads=True

    def to_dict(self, with_sigma: bool = True) -> dict[str, Any]:
        """A JSON-ready record (gid.json, plan meta); the singular values only with `with_sigma`."""
        d: dict[str, Any] = {
            "erank": self.erank,
            "importance": self.importance,
            "grad_norm": self.grad_norm,
            "shape": list(self.shape),
            "warning": self.warning,
        }
        if with_sigma:
            d["sigma"] = [float(s) for s in self.sigma]
        return d


def _dist_world() -> int:
    """World size if torch.distributed is initialised (else 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextlib.contextmanager
def warmup_train_mode(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Run the warm-up in train mode (dropout active, as the RaLoRA authors do); restore every submodule's mode.

    Yields the record for gid.json: train_mode (every submodule training), dropout_modules_active (nn.Dropout*
    modules with p > 0, now active) and dropout_config (the model config's *dropout* fields > 0: HF models such
    as Llama apply attention_dropout functionally, when training, without a module to count).
    """
    modes = {m: m.training for m in model.modules()}
    model.train()
    config = getattr(model, "config", None)
    cfg = config.to_dict() if hasattr(config, "to_dict") else {}
    record = {
        "train_mode": all(m.training for m in model.modules()),
        "dropout_modules_active": sum(1 for m in model.modules() if isinstance(m, _DROPOUTS) and m.p > 0),
        "dropout_config": {
            k: v
            for k, v in cfg.items()
            if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        },
    }
    try:
        yield record
    finally:
        for m, mode in modes.items():
            m.training = mode


def assign_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Each target's owner rank for sharded GID sums: largest first, to the least-loaded rank (ties: the lower
    rank, targets in their given order), so every rank holds about 1/world of the sums. Deterministic."""
    load = [0] * world
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # sorted is stable: equal sizes keep the target order
        rank = min(range(world), key=lambda i: (load[i], i))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


def _reduce_ints(values: list[int], op: Any, device: torch.device) -> list[int]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def _measure(name: str, g: torch.Tensor, w: torch.Tensor, svd_method: str, keep_grads: bool) -> GIDStat:
    """The GID statistics of one averaged gradient Ḡ (finite) of weight w."""
    sigma = singular_values(g, svd_method).cpu()
    warning = None
    if not bool(sigma.sum() > 0):
        warning = f"GID: module {name!r} has an all-zero warm-up gradient; its erank is reported as 1"
        warnings.warn(warning, stacklevel=3)
    return GIDStat(
        erank=effective_rank(sigma),
        importance=float((w.detach().float() * g).abs().mean()),
        sigma=sigma,
        grad_norm=float(g.norm()),
        shape=(int(g.shape[0]), int(g.shape[1])),
        warning=warning,
        grad=g.cpu() if keep_grads else None,
    )


def estimate_gid(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    targets: list[str],
    world_reduce: bool = True,
    svd_method: str = "svdvals",
    keep_grads: bool = False,
    info: dict[str, Any] | None = None,
    shard_sums: bool = True,
) -> dict[str, GIDStat]:
    """Average each target weight's full gradient over the warm-up batches and measure its spectrum (docs/maths.md §2).

    Only the target weights require grad while this runs; no optimizer step is taken. Each gradient is folded
    into an fp32 running sum by a post-accumulate hook and freed at once. Under torch.distributed (world_reduce)
    Ḡ is the mean over every rank's batches and every rank returns the same statistics:
    - `shard_sums` (default): each target's sum lives on one owner rank (`assign_owners`): its gradient is
      reduced (SUM) to the owner inside the hook, batch by batch, and the owner alone measures it; the statistics
      are then gathered everywhere. A rank holds ≈ 1/world of the fp32 sums. Ranks with fewer batches join the
      collectives with zero contributions (a rank with none falls back to the unsharded path on every rank).
    - otherwise every rank holds every sum and they are all-reduced once at the end.
    Afterwards every requires_grad flag is restored and the target gradients are None. The model runs in its
    current train/eval mode (the callers wrap this in `warmup_train_mode`). `info`, if given, receives
    batches_local, batches_total, world_size, sharded, sum_bytes_local and sum_bytes_per_rank.
    """
    if not targets:
        raise ValueError("estimate_gid: no target modules given")
    weights: dict[str, torch.Tensor] = {}
    for name in targets:
        w = getattr(model.get_submodule(name), "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"estimate_gid: target {name!r} has no 2-D .weight")
        weights[name] = w
    dist = torch.distributed
    world = _dist_world() if world_reduce else 1
    rank = dist.get_rank() if world > 1 else 0
    dev = next(iter(weights.values())).device
    passes = None  # sharded: backward passes every rank runs (the most any rank has)
    if world > 1 and shard_sums:
        batches = list(batches)
        fewest, most = _reduce_ints([len(batches), -len(batches)], dist.ReduceOp.MIN, dev)
        passes = -most if fewest > 0 else None
    owners = assign_owners({n: w.numel() for n, w in weights.items()}, world) if passes else dict.fromkeys(weights, 0)
    mine = [n for n in weights if passes is None or owners[n] == rank]
    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {n: torch.zeros(weights[n].shape, dtype=torch.float32, device=weights[n].device) for n in mine}
    real = [True]  # False while a rank short of batches replays one with a zero contribution

    def accumulate(name: str) -> Callable[[torch.Tensor], None]:
        def hook(w: torch.Tensor) -> None:  # fold each gradient into the fp32 sum as soon as it exists, then free it
            g = w.grad.float() if real[0] else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            w.grad = None
            if passes is not None:  # sharded: every rank reaches the targets' hooks in the same (autograd) order
                dist.reduce(g, dst=owners[name], op=dist.ReduceOp.SUM)
            if name in sums:
                sums[name].add_(g)

        return hook

    count = 0
    handles = []
    try:
        for p in flags:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(accumulate(name)))
        schedule = batches if passes is None else [batches[min(i, len(batches) - 1)] for i in range(passes)]
        with torch.enable_grad():
            for i, batch in enumerate(schedule):
                real[0] = passes is None or i < len(batches)
                loss_fn(model, batch).backward()  # a target outside this loss's graph adds nothing (zero gradient)
                count += int(real[0])
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for w in weights.values():
            w.grad = None

    total = count
    if world > 1:
        total = _reduce_ints([count], dist.ReduceOp.SUM, dev)[0]
        if total > 0 and passes is None:
            for s in sums.values():
                dist.all_reduce(s, op=dist.ReduceOp.SUM)
    sum_bytes = sum(s.numel() * s.element_size() for s in sums.values())
    per_rank: list[Any] = [sum_bytes]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, sum_bytes)
    if info is not None:
        info.update(
            batches_local=count,
            batches_total=total,
            world_size=world,
            sharded=passes is not None,
            sum_bytes_local=sum_bytes,
            sum_bytes_per_rank=per_rank,
        )
    if total == 0:
        raise ValueError(
            "GID estimation got zero warm-up batches: set adapter.gid_batches >= 1 and make sure the "
            "training dataloader yields at least one batch"
        )

    local: dict[str, GIDStat] = {}
    bad = []
    for name in list(sums):
        g = sums.pop(name).div_(total)  # measured and dropped one at a time
        if torch.isfinite(g).all():
            local[name] = _measure(name, g, weights[name], svd_method, keep_grads)
        else:
            bad.append(name)
        del g
    if passes is not None:  # every rank gets every owner's statistics (and learns of any bad target)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (local, bad))
        merged = {n: s for part, _ in gathered for n, s in part.items()}
        local = {n: merged[n] for n in weights if n in merged}
        bad = [n for n in weights if any(n in b for _, b in gathered)]
    if bad:
        raise NonFiniteGradientError(
            f"GID: the averaged warm-up gradient of {bad[:4]}{' and more' if len(bad) > 4 else ''} contains NaN "
            "or inf: check the loss on the warm-up batches (fp16/bf16 overflow?) before training"
        )
    return local


# torchmetrics' spearman_corrcoef divides the rank covariance by σ_rx·σ_ry + 1e-6 (an absolute guard)
_TORCHMETRICS_SPEARMAN_EPS = 1e-6


def _rank_std(v: torch.Tensor) -> float:
    """Population std of v's average ranks (ties share their mean rank): √((n²−1)/12 − Σ(t³−t)/(12n)), t = tie sizes."""
    n = v.numel()
    t = torch.unique(v, return_counts=True)[1].double()
    return math.sqrt(max((n * n - 1) / 12 - float((t**3 - t).sum()) / (12 * n), 0.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties get their average rank); None with fewer than 2 points or a constant side.

    Computed by torchmetrics' spearman_corrcoef; its 1e-6 denominator guard (a relative shrink of up to 4e-6
    towards 0, which would turn a perfect 3-layer ordering into 0.9999985) is divided back out, so a perfect
    ordering is exactly ±1.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return None
    tx, ty = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    s = _rank_std(tx) * _rank_std(ty)
    if s == 0:
        return None
    rho = float(spearman_corrcoef(tx, ty)) * (s + _TORCHMETRICS_SPEARMAN_EPS) / s
    return min(max(rho, -1.0), 1.0)
