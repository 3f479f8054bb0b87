"""GID profiling without training: per-layer effective rank, importance and cumulative energy of the warm-up
gradient (the RaLoRA estimator and the cumulative-energy diagnostic), written as JSON, a markdown table and a plot.

A pure function; the Hydra CLI `lightning-ralora-gid` builds the model and batches and calls `profile`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_ralora.core.io import markdown_table, write_json_atomic
from lightning_ralora.core.secrets import redact
from lightning_ralora.rank.estimate import estimate_gid, spearman, warmup_train_mode
from lightning_ralora.rank.plots import plot_cumulative_energy
from lightning_ralora.rank.spectra import cumulative_energy, effective_rank, rank_for_energy, singular_values
from lightning_ralora.run.build import build_module
from lightning_ralora.run.methods import apply_method_settings
from lightning_ralora.run.validate import validate_config

ENERGY_RANKS = (1, 2, 4, 8, 16, 32)
ENERGY_THRESHOLD = 0.9
SV_METHODS = ("svdvals", "gram")  # the singular-value paths whose GID accuracy is reported (rank.spectra)


def gid_accuracy(measured: Mapping[str, float], planted: Mapping[str, float]) -> dict[str, float | None]:
    """How the estimated erank follows the planted one over the common layers: Spearman ρ, the bias
    mean(measured − planted) and the relative bias mean(measured/planted − 1)."""
    common = [n for n in measured if n in planted]
    if not common:
        return {"spearman": None, "bias": None, "rel_bias": None, "layers": 0}
    diff = [measured[n] - float(planted[n]) for n in common]
    rel = [measured[n] / float(planted[n]) - 1.0 for n in common if float(planted[n]) > 0]
    return {
        "spearman": spearman([measured[n] for n in common], [float(planted[n]) for n in common]),
        "bias": sum(diff) / len(diff),
        "rel_bias": sum(rel) / len(rel) if rel else None,
        "layers": len(common),
    }


def _energy_at(c: torch.Tensor, r: int) -> float:
    return float(c[min(r, len(c)) - 1]) if len(c) else 1.0


def profile(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    targets: list[str],
    out_dir: str | Path,
    planted_erank: Mapping[str, float] | None = None,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Estimate GID on `targets` (no training) and write gid_profile.json, gid_profile.md and gid_profile.png.
    `run` (variant, model, task, seed, config, status) goes into the json, so `lightning-ralora-tables --table
    ralora_gid` reads a profile as a run.

    The warm-up runs in train mode (dropout active, like GIDWarmup); the result records train_mode and the
    active dropout (see rank.estimate.warmup_train_mode), and every submodule's mode is restored afterwards.

    With `planted_erank` ({module: known effective rank}, e.g. from a synthetic task) the table also shows it and
    the result holds the Spearman correlation between measured and planted erank.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warmup_train_mode(model) as mode:  # dropout active, as in the GIDWarmup callback; modes restored after
        stats = estimate_gid(model, batches, loss_fn, targets, info=info, keep_grads=planted_erank is not None)
    seconds = time.perf_counter() - t0

    layers: dict[str, dict[str, Any]] = {}
    for name, st in stats.items():
        c = cumulative_energy(st.sigma)
        layers[name] = {
            "shape": list(st.shape),
            "erank": st.erank,
            "importance": st.importance,
            "grad_norm": st.grad_norm,
            "energy": {str(r): _energy_at(c, r) for r in ENERGY_RANKS},
            "rank_for_0.9": rank_for_energy(st.sigma, ENERGY_THRESHOLD),
            "warning": st.warning,
            "planted_erank": None if planted_erank is None else planted_erank.get(name),
        }
    rho, accuracy = None, None
    if planted_erank:
        common = [n for n in layers if n in planted_erank]
        rho = spearman([layers[n]["erank"] for n in common], [float(planted_erank[n]) for n in common])
        accuracy = {}  # the same averaged gradients, singular values by each path
        for method in SV_METHODS:
            eranks = {
                n: effective_rank(singular_values(st.grad, method)) for n, st in stats.items() if st.grad is not None
            }
            accuracy[method] = gid_accuracy(eranks, planted_erank)
            for n, e in eranks.items():
                layers[n].setdefault("erank_by_method", {})[method] = e
    result: dict[str, Any] = {
        "batches": info.get("batches_total"),
        "world_size": info.get("world_size"),
        "seconds": seconds,
        **mode,
        "spearman_erank_vs_planted": rho,
        "accuracy": accuracy,
        "layers": layers,
        **dict(run or {}),
    }
    write_json_atomic(out_dir / "gid_profile.json", result)
    (out_dir / "gid_profile.md").write_text(_markdown(result, planted_erank is not None))
    plot_cumulative_energy(stats, out_dir / "gid_profile.png")
    result["files"] = [str(out_dir / f) for f in ("gid_profile.json", "gid_profile.md", "gid_profile.png")]
    return result


def _markdown(result: dict[str, Any], planted: bool) -> str:
    """One row per layer: shape, erank, importance, C(r) at r=1..32, the rank for 90% energy (and planted erank)."""
    head = ["module", "shape", "erank", "importance"] + [f"C({r})" for r in ENERGY_RANKS] + ["r@0.9"]
    if planted:
        head.append("planted erank")
    lines = [
        f"# GID profile ({result['batches']} batches, {result['seconds']:.2f} s, "
        f"{'train' if result.get('train_mode') else 'eval'} mode)",
        "",
        "C(r) = Σ_{i≤r} σ_i² / Σ σ_i² of the averaged warm-up gradient; r@0.9 = smallest r with C(r) ≥ 0.9.",
        "",
    ]
    rows = []
    for name, d in result["layers"].items():
        row = [name, "x".join(map(str, d["shape"])), f"{d['erank']:.2f}", f"{d['importance']:.3e}"]
        row += [f"{d['energy'][str(r)]:.3f}" for r in ENERGY_RANKS]
        row.append(str(d["rank_for_0.9"]))
        if planted:
            p = d["planted_erank"]
            row.append("" if p is None else f"{p:g}")
        rows.append(row)
    lines.append(markdown_table(head, rows))
    if planted:
        rho = result["spearman_erank_vs_planted"]
        shown = "n/a" if rho is None else f"{rho:.3f}"
        lines += ["", f"Spearman rank correlation (measured vs planted erank): {shown}"]
        for method, acc in (result.get("accuracy") or {}).items():
            if acc["spearman"] is not None:
                lines.append(
                    f"- {method}: Spearman {acc['spearman']:.3f}, bias {acc['bias']:+.2f} "
                    f"(relative {acc['rel_bias']:+.1%}) over {acc['layers']} layers"
                )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# the CLI: `lightning-ralora-gid [overrides]`, composed from the same Hydra configs as training
# --------------------------------------------------------------------------------------------------------------
def profile_gid(cfg: Any) -> dict[str, Any]:
    """Estimate GID on the un-adapted backbone without training; write gid_profile.{json,md,png} to run_dir."""
    from itertools import islice

    import lightning as L

    cfg = apply_method_settings(cfg)
    validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg)
    n = int(cfg.adapter.get("gid_batches") or 8)
    batches = list(islice(module.task.datamodule().train_dataloader(), n))
    planted = {k: v["erank"] for k, v in getattr(module.task, "planted", {}).items()} or None
    run = {"status": "completed", "variant": cfg.adapter.name, "model": cfg.model.name, "task": cfg.task.name}
    run |= {"seed": cfg.seed, "config": redact(OmegaConf.to_container(cfg, resolve=True))}
    loss = lambda model, batch: module.training_loss(batch)  # noqa: E731
    result = profile(module.backbone, batches, loss, module.targets, run_dir, planted, run)
    print((run_dir / "gid_profile.md").read_text())
    return result
