"""A built table and its outputs: the cell text ("85.10 ± 0.21 (85.42, −0.32)"), the markdown (rank blocks, or one
column per rank), the csv (`CSV_HEADER`, one line per measured cell), the files, and the W&B upload."""

from __future__ import annotations

import csv
import io as _io
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ralora.core import io
from lightning_ralora.reporting.tables.model import Cell, Cells, Group, Run, rank_text
from lightning_ralora.reporting.tables.spec import Metric, TableSpec

CSV_HEADER = ("model", "rank", "method", "metric", "mean", "std", "n_seeds", "published")
MISSING = "—"
MINUS = "−"


def _signed(x: float, decimals: int) -> str:
    text = f"{abs(x):.{decimals}f}"
    return f"+{text}" if round(x, decimals) > 0 else (f"{MINUS}{text}" if round(x, decimals) < 0 else f"±{text}")


def format_cell(cell: Cell | None, published: float | None, decimals: int = 2) -> str:
    """E.g. "85.10 ± 0.21 (85.42, −0.32)"; no std for one seed; "—" when missing (with any published value)."""
    if cell is None:
        return MISSING if published is None else f"{MISSING} ({published:.{decimals}f})"
    text = f"{cell.mean:.{decimals}f}"
    if cell.std is not None:
        text += f" ± {cell.std:.{decimals}f}"
    if published is not None:
        text += f" ({published:.{decimals}f}, {_signed(cell.mean - published, decimals)})"
    return text


@dataclass
class Table:
    """A built table: its spec, cells, columns, rows and the published lookup."""

    spec: TableSpec
    cells: Cells
    columns: list[Metric]
    rows: list[Group]
    runs: list[Run]
    published: Callable[[str, int | None, str, str], float | None]
    warnings: list[str] = field(default_factory=list)

    def pub(self, group: Group, metric: str) -> float | None:
        return self.published(group[0], group[1], group[2], metric)

    def csv_rows(self) -> list[list[Any]]:
        """One line per measured cell (missing cells have none); full precision; std empty for one seed."""
        out = []
        for g in self.rows:
            for m in self.columns:
                cell = self.cells.get(g, {}).get(m.id)
                if cell is None:
                    continue
                pub = self.pub(g, m.id)
                std = "" if cell.std is None else repr(cell.std)
                pub_text = "" if pub is None else repr(pub)
                out.append([g[0], rank_text(g[1]), g[2], m.id, repr(cell.mean), std, cell.n, pub_text])
        return out

    def csv_text(self) -> str:
        buf = _io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(self.csv_rows())
        return buf.getvalue()

    def markdown(self) -> str:
        """Title, sources, then the table (rank blocks, or one column per rank for pivot tables)."""
        spec = self.spec
        head = [
            f"# {spec.title} (`{spec.id}`)",
            "",
            f"Mean ± sample std over seeds ({len(self.runs)} runs); in brackets the published value and the difference "
            f"(ours − published); {MISSING}: no runs. Source: {spec.description}.",
            "",
            "",
        ]
        if spec.pivot_rank:
            return "\n".join(head) + self._pivot_markdown() + "\n"
        header = ["model", "rank", "method", *(m.heading for m in self.columns)]
        body = [[g[0], rank_text(g[1]) or MISSING, g[2]] + [self._text(g, m) for m in self.columns] for g in self.rows]
        return "\n".join(head) + io.markdown_table(header, body) + "\n"

    def _text(self, group: Group, metric: Metric) -> str:
        """One markdown cell: the spec's text for it (e.g. a verdict), else `format_cell`."""
        cell = self.cells.get(group, {}).get(metric.id)
        text = self.spec.cell_text(metric.id, cell) if self.spec.cell_text and cell is not None else None
        return text if text is not None else format_cell(cell, self.pub(group, metric.id), metric.decimals)

    def _pivot_markdown(self) -> str:
        ranks = sorted({g[1] for g in self.rows if g[1] is not None})
        has_full = any(g[1] is None for g in self.rows)
        keys: list[tuple[str, str]] = []
        for g in self.rows:
            if (g[0], g[2]) not in keys:
                keys.append((g[0], g[2]))
        blocks = []
        for m in self.columns:
            rank_cols: list[int | None] = [*ranks, *([None] if has_full else [])]
            header = ["model", "method", *(f"r = {r}" if r is not None else "full" for r in rank_cols)]
            body = []
            for model, method in keys:
                cells = [
                    format_cell(self.cells.get(g, {}).get(m.id), self.pub(g, m.id), m.decimals)
                    if (g := (model, r, method)) in self.rows
                    else ""
                    for r in rank_cols
                ]
                body.append([model, method, *cells])
            blocks.append(f"{m.heading}\n\n" + io.markdown_table(header, body))
        return "\n\n".join(blocks)


def write(table: Table, out: Path) -> tuple[Path, Path]:
    """DIR/<id>.md and DIR/<id>.csv."""
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / f"{table.spec.id}.md", out / f"{table.spec.id}.csv"
    md.write_text(table.markdown())
    csv_path.write_text(table.csv_text())
    return md, csv_path


def upload_wandb(table: Table, out: Path) -> str:
    """Log the csv rows as a wandb.Table to the runs' W&B project (offline without WANDB_API_KEY); the run dir."""
    import wandb

    projects = Counter(r.record.at("config", "wandb", "project") or "lightning_ralora" for r in table.runs)
    entities = Counter(r.record.at("config", "wandb", "entity") for r in table.runs)
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project=projects.most_common(1)[0][0],
        entity=entities.most_common(1)[0][0],
        name=f"table-{table.spec.id}",
        job_type="table",
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(out),
        config={"table": table.spec.id, "runs": [str(r.path) for r in table.runs]},
    )
    try:
        run.log({table.spec.id: wandb.Table(columns=list(CSV_HEADER), data=table.csv_rows())})
        return str(run.dir)
    finally:
        run.finish()
