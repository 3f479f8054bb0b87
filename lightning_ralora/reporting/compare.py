"""`lightning-ralora-compare RUN_DIR... [--out DIR]`: loss and alignment curves side by side, and a final-metrics table.

Each run directory holds the `results.json` written by `lightning-ralora-train` (keys used: variant, seed,
final_metrics, trainable_params, total_params, wall_time_s; the GradientAlignment summary when present) and the
CSVLogger's `**/metrics.csv` (columns `step`, `train/loss`, `align/mean/cos_f`, ... with gaps). Writes
`comparison.png` and `comparison.md` to --out and prints the table.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ralora.core import io
from lightning_ralora.rank.plots import plot_comparison
from lightning_ralora.run.record import RunRecord

REQUIRED = ("variant", "seed", "final_metrics", "trainable_params", "total_params", "wall_time_s")
PER_LAYER = re.compile(r"^align/(?!mean/)")  # per-layer alignment keys stay out of the table


@dataclass
class Run:
    """One run directory: its record (results.json) and its logged curves {column: [(step, value), ...]}."""

    path: Path
    record: RunRecord
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    label: str = ""


def _version_key(path: Path) -> tuple:
    """Sort metrics.csv files by path, with version_N compared numerically (version_10 after version_9)."""
    return tuple((0, int(p[8:])) if re.fullmatch(r"version_\d+", p) else (1, p) for p in path.parts)


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of every `metrics.csv` under run_dir, as sorted (step, value); later versions win."""
    merged: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("**/metrics.csv"), key=_version_key):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for key, raw in row.items():
                    if key in ("step", "epoch") or key is None or raw in (None, ""):
                        continue
                    try:
                        value = float(raw)
                    except ValueError:
                        continue
                    if math.isfinite(value):
                        merged.setdefault(key, {})[int(float(step))] = value
    return {k: sorted(v.items()) for k, v in merged.items()}


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Read every run; all problems (missing dirs/files, missing keys, bad JSON) are raised together."""
    problems, runs = [], []
    for d in run_dirs:
        path = Path(d)
        res_path = path / "results.json"
        if not path.is_dir():
            problems.append(f"{path}: not a directory")
            continue
        if not res_path.is_file():
            problems.append(f"{res_path} not found (is {path} a finished run directory?)")
            continue
        try:
            record = RunRecord.load(res_path)
        except json.JSONDecodeError as e:
            problems.append(f"{res_path}: invalid JSON ({e})")
            continue
        except ValueError as e:  # JSON, but not an object
            problems.append(f"{res_path}: {e}")
            continue
        missing = record.missing(REQUIRED)
        if missing:
            problems.append(f"{res_path}: missing key(s) {missing}")
            continue
        runs.append(Run(path, record, read_curves(path)))
    if problems:
        raise FileNotFoundError("; ".join(problems))
    labels = [f"{r.record.variant} s{r.record.seed}" for r in runs]
    for run, label in zip(runs, labels, strict=True):
        run.label = label if labels.count(label) == 1 else f"{label} ({run.path.name})"
    return runs


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _align_mean(run: Run, key: str) -> float | None:
    """The run's mean of an alignment metric: the callback's summary in results.json, else the CSV curve's mean."""
    summary = run.record.callback_summary("GradientAlignment").get("metrics") or {}
    if key in summary:
        return float(summary[key]["mean"])
    values = [v for _, v in run.curves.get(key, [])]
    return sum(values) / len(values) if values else None


def markdown_table(runs: list[Run], align_key: str = "align/mean/cos_f") -> str:
    """One row per run (final metrics, parameters, wall time, mean alignment); per-variant mean ± std over seeds."""
    metric_keys = sorted({k for r in runs for k in r.record.final_metrics if not PER_LAYER.match(k)})
    header = [
        "run",
        "variant",
        "seed",
        "trainable",
        "total",
        "trainable %",
        "wall s",
        *metric_keys,
        f"mean {align_key}",
    ]
    rows = []
    for r in runs:
        rec = r.record
        pct = 100.0 * rec.trainable_params / rec.total_params if rec.total_params else None
        rows.append(
            [
                r.label,
                str(rec.variant),
                str(rec.seed),
                _fmt(rec.trainable_params),
                _fmt(rec.total_params),
                _fmt(pct),
                _fmt(float(rec.wall_time_s)),
                *(_fmt(rec.final_metrics.get(k)) for k in metric_keys),
                _fmt(_align_mean(r, align_key)),
            ]
        )
    text = "## Runs\n\n" + io.markdown_table(header, rows) + "\n"
    by_variant: dict[str, list[Run]] = {}
    for r in runs:
        by_variant.setdefault(str(r.record.variant), []).append(r)
    if any(len(v) > 1 for v in by_variant.values()):
        agg_rows = []
        for variant, group in by_variant.items():
            cells = [variant, str(len(group))]
            for k in metric_keys:
                vals = [float(g.record.final_metrics[k]) for g in group if g.record.final_metrics.get(k) is not None]
                if not vals:
                    cells.append("–")
                elif len(vals) == 1:
                    cells.append(_fmt(vals[0]))
                else:
                    cells.append(f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}")
            agg_rows.append(cells)
        text += "\n## Mean ± std over seeds\n\n" + io.markdown_table(["variant", "runs", *metric_keys], agg_rows) + "\n"
    return text


def _loss_curve(run: Run, loss_key: str) -> list[tuple[int, float]]:
    for key in (loss_key, f"{loss_key}_step"):
        if run.curves.get(key):
            return run.curves[key]
    return []


def plot(runs: list[Run], path: Path, loss_key: str = "train/loss", align_key: str = "align/mean/cos_f") -> Path:
    """Loss (left) and alignment (right) against the optimizer step, one line per run, same colour in both panels."""
    curves = [(run.label, _loss_curve(run, loss_key), run.curves.get(align_key, [])) for run in runs]
    return plot_comparison(curves, path, loss_key, align_key)
