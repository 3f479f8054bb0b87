"""Targets, the markdown table, and the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import Figure
from lightning_ralora.io import markdown_table, write_json_atomic

# target id -> what the README promises; a figure with this target_id is met when its median ratio <= bound
TARGETS: dict[str, dict[str, Any]] = {
    "lora_vs_peft_lora_step": {"text": "Our LoRA ≤ 1.05× peft LoRA per step", "bound": 1.05},
    "gralora_vs_peft_gralora": {"text": "Our GraLoRA ≤ 1.0× peft GraLoRA", "bound": 1.0},
    "ralora_vs_lora": {"text": "RaLoRA (4 blocks) ≤ 1.15× our LoRA at equal parameters", "bound": 1.15},
    "gralora_vs_lora": {"text": "GraLoRA (k = 2) ≤ 1.15× our LoRA at equal parameters", "bound": 1.15},
    "sds_run_vs_lora": {"text": "SDS-LoRA ≤ 1.05× LoRA averaged over a run", "bound": 1.05},
    "sds_memory": {"text": "SDS-LoRA memory ≤ 1.01× LoRA", "bound": 1.01},
    "gid_share": {"text": "GID warm-up ≤ 5% of the default job's wall time", "bound": 0.05},
    "alignment_overhead": {"text": "Alignment logging ≤ 5% at its default interval", "bound": 1.05},
    "lightning_vs_plain": {"text": "Lightning module step ≤ 1.05× the plain loop", "bound": 1.05},
    "paper_lora_vs_floor": {"text": "Papers' shapes: our LoRA ≤ 1.03× the frozen floor", "bound": 1.03},
    "paper_lora_vs_peft_lora": {"text": "Papers' shapes: our LoRA ≤ 1.0× peft LoRA", "bound": 1.0},
    "paper_variant_vs_lora": {"text": "Papers' shapes: RaLoRA, GraLoRA, Hybrid, SDS ≤ 1.05× our LoRA", "bound": 1.05},
    "paper_gralora_vs_peft_gralora": {"text": "Papers' shapes: our GraLoRA ≤ 1.0× peft GraLoRA", "bound": 1.0},
}


def fmt_ratio(fig: Figure) -> str:
    """'1.031 (0.998–1.060)': median of the paired ratios and their interquartile range."""
    r = fig.ratio
    return f"{r['median']:.3f} ({r['q1']:.3f}–{r['q3']:.3f})"


def fmt_target(fig: Figure) -> str:
    """'≤ 1.05' or '—'."""
    if fig.bound is None:
        return "—"
    return f"≤ {fig.bound:g}"


def fmt_met(fig: Figure) -> str:
    """yes / no, flagged when the bound lies inside the spread; '—' without a target."""
    if fig.met is None:
        return "—"
    word = "yes" if fig.met else "**no**"
    return f"{word} (within spread)" if fig.within_spread else word


def markdown(figures: list[Figure], env_info: dict[str, Any], notes: list[str]) -> str:
    """The figure table plus the per-target summary, as markdown."""
    quick = " — QUICK (tiny sizes, not meaningful)" if env_info["quick"] else ""
    lines = [
        f"Benchmarks on {env_info['device_name']} ({env_info['dtype']}, {env_info['threads']} threads), "
        f"{env_info['date']}, host {env_info['host']}{quick}",
        "",
        "Ratios are medians of per-round paired ratios (variants interleaved round-robin in one process); "
        "the spread in brackets is the interquartile range.",
        "",
        markdown_table(
            ["figure", "measured ratio (spread)", "target", "met?"],
            [[fig.label, fmt_ratio(fig), fmt_target(fig), fmt_met(fig)] for fig in figures],
        ),
    ]
    summary = []
    for tid, t in TARGETS.items():
        mine = [f for f in figures if f.target_id == tid]
        if not mine:
            summary.append([t["text"], "not measured in this run", "—"])
            continue
        vals = ", ".join(f"{f.value:.3f}" for f in mine)
        summary.append([t["text"], vals, "yes" if all(f.met for f in mine) else "**no**"])
    lines += ["", markdown_table(["target", "figures", "met?"], summary)]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write(path: Path, data: dict[str, Any], table: str) -> tuple[Path, Path]:
    """Write the JSON (atomically) and the markdown table next to it; returns both paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    md = path.with_suffix(".md")
    md.write_text(table)
    return path, md
