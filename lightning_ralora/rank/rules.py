"""RaLoRA / RaLoRA-Pro / LS-LoRA plan rules (docs/maths.md §3, §4): block counts, the rank budget, config checks,
the plan.

Pure functions on numbers and plain dicts; the GID statistics they consume come from rank.estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_ralora.adapters.gralora import GraLoRAConfig
from lightning_ralora.adapters.plan import AdapterPlan, PlanEntry
from lightning_ralora.adapters.ralora import SMOOTHINGS, RaLoRAConfig
from lightning_ralora.adapters.registry import check_adapter
from lightning_ralora.adapters.schema import LayerSpec, is_pos_int, is_power_of_two

if TYPE_CHECKING:
    from lightning_ralora.rank.estimate import GIDStat

# floor() of a ratio that is an exact integer in real arithmetic must not drop by one through rounding
_FLOOR_EPS = 1e-9


def blocks_for(erank: float, r: int, n_max: int) -> int:
    """n_l = 2^clip(floor(log2(erank/r)), 0, log2 n_max): enough blocks for n_l·r to reach the layer's GID."""
    if not is_power_of_two(n_max):
        raise ValueError(f"adapter.n_max must be a power of two (1, 2, 4, 8, ...), got {n_max!r}")
    if not is_pos_int(r):
        raise ValueError(f"RaLoRA rank r must be a positive integer, got {r!r}")
    if not erank > 0:
        return 1
    p = math.floor(math.log2(erank / r) + _FLOOR_EPS)
    return 2 ** min(max(p, 0), int(math.log2(n_max)))


def fit_blocks(n: int, out_features: int, in_features: int) -> tuple[int, str | None]:
    """Halve n until it divides both dimensions (docs/maths.md §3); the note records the halving (None if none)."""
    n0 = n
    while n > 1 and (out_features % n or in_features % n):
        n //= 2
    if n == n0:
        return n, None
    return n, f"n_blocks {n0} does not divide (out={out_features}, in={in_features}); halved to {n}"


def _f(d: int, smoothing: str) -> float:
    return math.sqrt(d) if smoothing == "sqrt" else float(d)


def allocate_ranks(
    importance: Mapping[str, float],
    shapes: Mapping[str, tuple[int, int]],
    r_ref: int,
    r_min: int,
    r_max: int,
    smoothing: str = "sqrt",
) -> tuple[dict[str, int], dict[str, Any]]:
    """RaLoRA-Pro's inter-layer budget (docs/maths.md §4): r_l = clamp(⌊P·α_l / f(m_l+n_l)⌋, r_min, r_max) ≥ 1,
    then at most min(m_l, n_l) (our choice, where the paper is silent: a rank above it only adds parameters).

    α_l = I_l/ΣI, P = Σ f(m_l+n_l)·r_ref, f = √ ("sqrt", dimension smoothing) or identity ("none", exact budget).
    Returns the ranks and a budget record: P, α, the unclamped ranks, why each clipped module was clipped,
    and the parameter counts of the plan and of uniform LoRA at r_ref (they differ under f = √).
    """
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"adapter.smoothing must be one of {list(SMOOTHINGS)}, got {smoothing!r}")
    if r_min > r_max:
        raise ValueError(f"adapter.r_min ({r_min}) must be <= adapter.r_max ({r_max})")
    missing = [n for n in shapes if n not in importance]
    if missing:
        raise ValueError(f"allocate_ranks: no importance for module(s) {missing[:4]}")
    names = list(shapes)
    f = {n: _f(shapes[n][0] + shapes[n][1], smoothing) for n in names}
    budget = sum(f[n] * r_ref for n in names)
    imp = {n: float(importance[n]) for n in names}
    total = sum(imp.values())
    notes: dict[str, str] = {}
    if not (math.isfinite(total) and total > 0):
        # no loss sensitivity at all: α_l is undefined, fall back to the uniform reference rank
        alpha = {n: 1.0 / len(names) for n in names} if names else {}
        raw = {n: float(r_ref) for n in names}
        fallback = f"total importance is {total}; every layer gets r_ref={r_ref}"
    else:
        alpha = {n: imp[n] / total for n in names}
        raw = {n: budget * alpha[n] / f[n] for n in names}
        fallback = None
    ranks: dict[str, int] = {}
    for n in names:
        r = math.floor(raw[n] + _FLOOR_EPS)
        lo = max(r_min, 1)
        if r < lo:
            notes[n] = f"rank {raw[n]:.3g} floored to {r}, raised to the minimum {lo} (adapter.r_min={r_min})"
            r = lo
        elif r > r_max:
            notes[n] = f"rank {raw[n]:.3g} floored to {r}, clipped to adapter.r_max={r_max}"
            r = r_max
        if r > min(shapes[n]):  # the update of an m x n layer has rank <= min(m, n): more only adds parameters
            notes[n] = f"rank {raw[n]:.3g} floored to {r}, clipped to min(out, in)={min(shapes[n])} of the layer"
            r = min(shapes[n])
        ranks[n] = r
    params_plan = sum(ranks[n] * (shapes[n][0] + shapes[n][1]) for n in names)
    params_uniform = sum(r_ref * (shapes[n][0] + shapes[n][1]) for n in names)
    info = {
        "budget_P": budget,
        "smoothing": smoothing,
        "r_ref": r_ref,
        "r_min": r_min,
        "r_max": r_max,
        "alpha": alpha,
        "raw_rank": raw,
        "clipped": notes,
        "fallback": fallback,
        "params_plan": params_plan,
        "params_uniform_lora_r_ref": params_uniform,
    }
    return ranks, info


def validate_ralora_cfg(cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of a RaLoRA-family adapter config as a GID plan: the registry's schema (`RaLoRAConfig.validate`,
    what config validation runs before any compute), with `needs_gid` set, since a plan is what is asked for."""
    return check_adapter({**cfg, "kind": cfg.get("kind", "ralora"), "needs_gid": True})


def build_ralora_plan(
    stats: Mapping[str, GIDStat], shapes: Mapping[str, tuple[int, int]], cfg: Mapping[str, Any]
) -> AdapterPlan:
    """Turn GID statistics into a plan: ranks (uniform or RaLoRA-Pro budget) and block counts per target.

    ralora: r_l = r, n_l from erank; ralora_pro: r_l from allocate_ranks, then n_l from erank; ls_lora: the
    same r_l as ralora_pro with n_l = 1. Every spec is kind "ralora" with its scale written out.
    """
    problems = validate_ralora_cfg(cfg)
    if problems:
        raise ValueError("invalid RaLoRA adapter config: " + "; ".join(problems))
    missing = [n for n in shapes if n not in stats]
    if missing:
        raise ValueError(f"build_ralora_plan: no GID statistics for target module(s) {missing[:4]}")
    c = RaLoRAConfig.from_cfg(cfg)  # the schema's defaults for absent keys
    variant = c.name
    r_ref, alpha = int(c.r if c.r_ref is None else c.r_ref), float(c.alpha)
    dims = {n: int(shapes[n][0]) + int(shapes[n][1]) for n in shapes}
    budget_info: dict[str, Any] | None = None
    if variant == "ralora":
        ranks = {n: int(c.r) for n in shapes}
    else:
        ranks, budget_info = allocate_ranks(
            {n: stats[n].importance for n in shapes}, shapes, r_ref, int(c.r_min), int(c.r_max), c.smoothing
        )
    entries: dict[str, PlanEntry] = {}
    for name, (m, n) in shapes.items():
        st = stats[name]
        r_l = ranks[name]
        notes: list[str] = []
        if budget_info is not None and name in budget_info["clipped"]:
            notes.append(budget_info["clipped"][name])
        if st.warning:
            notes.append(st.warning)
        if variant == "ls_lora":
            n_l = 1
        else:
            n_l, note = fit_blocks(blocks_for(st.erank, r_l, int(c.n_max)), int(m), int(n))
            if note:
                notes.append(note)
        spec = LayerSpec(
            kind="ralora", r=r_l, alpha=alpha, dropout=float(c.dropout), n_blocks=n_l, scale=c.layer_scale(r_l)
        )
        entries[name] = PlanEntry(
            shape=(int(m), int(n)), spec=spec, erank=st.erank, importance=st.importance, notes=notes
        )
    params_uniform = sum(r_ref * d for d in dims.values())
    params_plan = sum(ranks[n] * dims[n] for n in shapes)
    meta: dict[str, Any] = {
        "budget_P": None if budget_info is None else budget_info["budget_P"],
        "smoothing": c.smoothing,
        "scale_rule": c.scale,
        "r_ref": r_ref,
        "n_max": int(c.n_max),
        "gid_batches_cfg": int(c.gid_batches),
        "params_uniform_lora_r_ref": params_uniform,
        "params_plan": params_plan,
        "params_drift": params_plan - params_uniform,
        "budget_fallback": None if budget_info is None else budget_info["fallback"],
        "warnings": [stats[n].warning for n in shapes if stats[n].warning],
    }
    return AdapterPlan(variant=variant, entries=entries, meta=meta)


# --------------------------------------------------------------------------------------------------------------
# GID-aligned GraLoRA (adapter=gralora adapter.k=auto): RaLoRA's block-count rule applied to the grid size
# --------------------------------------------------------------------------------------------------------------
def grid_for(
    erank: float, r: int, out_features: int, in_features: int, k_max: int, block_r_min: int = 1
) -> tuple[int, str | None]:
    """k_l = blocks_for(erank, r, k_max) (a k x k grid of rank-r/k blocks reaches rank k·r), halved until k divides
    r, out and in and r/k >= block_r_min; the note records the halving (None if none)."""
    k0 = k = blocks_for(erank, r, k_max)
    while k > 1 and (r % k or out_features % k or in_features % k or r // k < block_r_min):
        k //= 2
    if k == k0:
        return k, None
    return k, (
        f"k {k0} does not divide (r={r}, out={out_features}, in={in_features}) with r/k >= {block_r_min}; halved to {k}"
    )


def build_gralora_plan(
    stats: Mapping[str, GIDStat], shapes: Mapping[str, tuple[int, int]], cfg: Mapping[str, Any]
) -> AdapterPlan:
    """The k=auto plan: every target a GraLoRA spec of rank r with k_l from its GID (`grid_for`); r(m+n) per layer,
    as LoRA of rank r, whatever k_l."""
    c = GraLoRAConfig.from_cfg(cfg)  # the registry's schema: its rules, and its defaults for absent keys
    problems = c.validate()
    if problems:
        raise ValueError("invalid GraLoRA k=auto adapter config:\n  - " + "\n  - ".join(problems))
    missing = [n for n in shapes if n not in stats]
    if missing:
        raise ValueError(f"build_gralora_plan: no GID statistics for target module(s) {missing[:4]}")
    r, k_max, r_min = int(c.r), int(c.k_max), int(c.block_r_min)
    hybrid_r, alpha = int(c.hybrid_r), float(c.alpha)
    entries: dict[str, PlanEntry] = {}
    for name, (m, n) in shapes.items():
        st = stats[name]
        k, note = grid_for(st.erank, r, int(m), int(n), k_max, r_min)
        spec = LayerSpec(kind="gralora", r=r, alpha=alpha, dropout=float(c.dropout), k=k, hybrid_r=hybrid_r)
        notes = [x for x in (note, st.warning) if x]
        entries[name] = PlanEntry(
            shape=(int(m), int(n)), spec=spec, erank=st.erank, importance=st.importance, notes=notes
        )
    meta: dict[str, Any] = {
        "rule": "gralora_auto",
        "r_ref": r,
        "k_max": k_max,
        "block_r_min": r_min,
        "gid_batches_cfg": int(c.gid_batches),
        "params_plan": sum((r + hybrid_r) * (int(m) + int(n)) for m, n in shapes.values()),
        "warnings": [stats[n].warning for n in shapes if stats[n].warning],
    }
    return AdapterPlan(variant=str(cfg.get("name") or "gralora"), entries=entries, meta=meta)
