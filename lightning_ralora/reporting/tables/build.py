"""Building one table: its runs below the given directories, their cells, rows and columns, and the published value
beside each cell (reporting/published.py); bad input raises `TableInputError` with one message per problem."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_ralora.reporting.tables.aggregate import aggregate, columns, rows
from lightning_ralora.reporting.tables.model import finite
from lightning_ralora.reporting.tables.render import Table
from lightning_ralora.reporting.tables.runs import Notes, check_experiments, find_results, select_runs, warn
from lightning_ralora.reporting.tables.spec import TableSpec

PUBLISHED = "lightning_ralora.reporting.published"


class TableInputError(ValueError):
    """Bad command-line input: one message per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def published_lookup(spec: TableSpec) -> Callable[[str, int | None, str, str], float | None]:
    """`reporting.published.published_cell` as a mean-or-None function; no published values without it (the module
    is looked up when the table is built, so a stand-in or its absence counts)."""
    try:
        fn = importlib.import_module(PUBLISHED).published_cell
    except (ImportError, AttributeError):
        return lambda *args: None
    broken: list[str] = []

    def lookup(model: str, rank: int | None, method: str, metric: str) -> float | None:
        metric = spec.published_ids.get(metric, metric)
        row = {"model": model, "rank": rank, "method": method, **spec.published_row}
        try:
            cell = fn(spec.id, row["model"], row["rank"], row["method"], metric)
        except Exception as e:  # a lookup bug costs the published column, not the table
            if not broken:
                warn(f"published values unavailable ({type(e).__name__}: {e})")
            broken.append(metric)
            return None
        return None if cell is None else finite(cell[0] if isinstance(cell, Sequence) else cell)

    return lookup


def build(spec: TableSpec, dirs: Sequence[str | Path]) -> Table:
    """Read, filter and aggregate the runs below `dirs`; raises TableInputError listing every problem."""
    paths, problems = find_results(dirs, spec.files)
    if problems:
        raise TableInputError(problems)
    notes = Notes()
    runs = select_runs(spec, paths, notes)
    if not runs:
        raise TableInputError([f"no completed runs with {spec.id} metrics below {', '.join(map(str, dirs))}"])
    problem = check_experiments(spec, runs)
    if problem:
        raise TableInputError([problem])
    cells = aggregate(spec, runs)
    return Table(spec, cells, columns(spec, cells), rows(spec, cells), runs, published_lookup(spec), list(notes))
