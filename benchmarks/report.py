"""Targets, the markdown table, and the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import TARGETS, Figure
from lightning_ralora.core.io import markdown_table, write_json_atomic


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
