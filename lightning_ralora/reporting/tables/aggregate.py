"""From runs to a table's numbers: the cells (mean and sample std over the seeds of each group, then the spec's
derived cells), its columns and its rows."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

from lightning_ralora.reporting.tables.model import Cell, Cells, Group, Run
from lightning_ralora.reporting.tables.spec import Metric, TableSpec


def aggregate(spec: TableSpec, runs: Sequence[Run]) -> Cells:
    """{group: {metric: Cell}}: mean and sample std over the seeds of each group, then the spec's derived cells."""
    values: dict[Group, dict[str, list[float]]] = {}
    for run in runs:
        row = values.setdefault(run.group, {})
        for metric, v in run.values.items():
            row.setdefault(metric, []).append(v)
    cells: Cells = {
        g: {m: Cell(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)) for m, v in row.items()}
        for g, row in values.items()
    }
    if spec.derive is not None:
        spec.derive(cells)
    return cells


def _natural(s: str) -> list:
    return [(0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t) for t in re.split(r"(\d+\.?\d*)", s)]


def columns(spec: TableSpec, cells: Cells) -> list[Metric]:
    """The spec's columns, then (dynamic tables) any other metric found, naturally sorted; Avg last."""
    cols = [m for m in spec.metrics if m.id != "average"]
    known = {m.id for m in spec.metrics}
    if spec.dynamic is not None:
        found = sorted({m for row in cells.values() for m in row if m not in known and m != "average"}, key=_natural)
        cols += [Metric(m, m, spec.dynamic.percent, spec.dynamic.decimals) for m in found]
    avg = next((m for m in spec.metrics if m.id == "average"), None)
    if avg is None and any("average" in row for row in cells.values()) and spec.dynamic is not None:
        avg = Metric("average", "Avg", spec.dynamic.percent, spec.dynamic.decimals)
    return cols + ([avg] if avg else [])


def _method_key(spec: TableSpec, method: str) -> tuple:
    return (spec.methods.index(method), "") if method in spec.methods else (len(spec.methods), method)


def rows(spec: TableSpec, cells: Cells) -> list[Group]:
    """Groups with runs plus the spec's expected methods in every (model, rank) block (full: the rankless block)."""
    groups = set(cells)
    for model in {g[0] for g in cells}:
        ranks = {g[1] for g in cells if g[0] == model and g[1] is not None}
        for method in spec.methods:
            if method == "full":
                groups.add((model, None, method))
            else:
                groups.update((model, r, method) for r in ranks)
    models = sorted({g[0] for g in groups})
    return sorted(groups, key=lambda g: (models.index(g[0]), g[1] is not None, g[1] or 0, _method_key(spec, g[2])))
