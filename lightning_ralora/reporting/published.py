"""The numbers the source papers publish, cell by cell: each reproduced table's cells are in its folder's table.yaml
(`published:`), the papers' other tables in `experiments/<paper>/paper.yaml` (lightning_ralora/run/catalog.py)."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from lightning_ralora.run.catalog import paper_docs, table_docs

PAPERS = ("ralora", "sds_lora", "gralora")


@cache
def _load(paper: str) -> dict[str, Any]:
    """One paper's record with every published table of it: paper.yaml's, and those in its table folders."""
    docs = paper_docs()
    if paper not in docs:
        raise FileNotFoundError(f"published numbers for {paper!r} not found (experiments/{paper}/paper.yaml missing?)")
    doc = copy.deepcopy(docs[paper])
    tables = dict(doc.get("tables") or {})
    for table_id, (folder, spec) in table_docs().items():
        if folder.parent.name == paper and spec.get("published"):
            tables[table_id] = copy.deepcopy(spec["published"])
    doc["tables"] = tables
    return doc


def load_published(paper: str | None = None) -> dict[str, Any]:
    """One paper's published tables, or {paper: tables-document} for all papers when paper is None."""
    if paper is None:
        return {p: copy.deepcopy(_load(p)) for p in PAPERS}
    if paper not in PAPERS:
        raise KeyError(f"unknown paper {paper!r}; expected one of {PAPERS}")
    return copy.deepcopy(_load(paper))


@cache
def _index() -> dict[tuple[str, str, int | None, str, str], tuple[float, float | None]]:
    """(table, model, rank, method, metric) -> (mean, std) over every paper."""
    index: dict[tuple[str, str, int | None, str, str], tuple[float, float | None]] = {}
    for paper in PAPERS:
        for table, spec in (_load(paper).get("tables") or {}).items():
            for cell in spec["cells"]:
                key = (table, cell["model"], cell["rank"], cell["method"], cell["metric"])
                if key in index:
                    raise ValueError(f"duplicate published cell {key} in {paper}'s tables")
                index[key] = (float(cell["mean"]), None if cell.get("std") is None else float(cell["std"]))
    return index


def published_tables() -> list[str]:
    """Every table id across the papers."""
    return sorted({key[0] for key in _index()})


def published_cell(
    table: str, model: str, rank: int | None, method: str, metric: str
) -> tuple[float, float | None] | None:
    """(mean, std) of one published cell (std None where none is printed), or None if the paper has no such cell."""
    return _index().get((table, model, rank, method, metric))
