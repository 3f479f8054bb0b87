"""What a table is made of: runs (a run record in its group, with the values it measured) and cells (mean and std
over the seeds of a group)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ralora.run.record import RunRecord


@dataclass
class Run:
    """One run record: its group (model, rank, method), seed, what it measured (the table's metric ids)."""

    path: Path
    record: RunRecord
    mtime: float
    model: str
    rank: int | None
    method: str
    seed: Any
    experiment: str | None
    identity: str  # what the run trained on (task, dataset, GLUE task): two runs of one seed differ here
    values: dict[str, float] = field(default_factory=dict)

    @property
    def group(self) -> tuple[str, int | None, str]:
        return (self.model, self.rank, self.method)


@dataclass
class Cell:
    """One table cell: mean and sample std (None for one seed or a derived cell) over n seeds."""

    mean: float
    std: float | None
    n: int


Group = tuple[str, "int | None", str]
Cells = dict[Group, dict[str, Cell]]


def finite(v: Any) -> float | None:
    """A finite float, or None (booleans and non-numbers too)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def rank_text(rank: int | None) -> str:
    """A rank as the csv writes it: empty for full fine-tuning."""
    return "" if rank is None else str(rank)
