"""What a paper table is: its spec (`TableSpec`: columns, rows, where its numbers come from), read from its folder's
table.yaml by `load_spec` (docs/protocols.md, "Adding a table", lists the fields), and the registry `TABLES` of every
table in experiments/ (run/catalog.py finds them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_ralora.reporting.tables.extract import (
    CELL_TEXTS,
    DERIVES,
    EXTRACTORS,
    average_over,
    extract_columns,
)
from lightning_ralora.reporting.tables.model import Cell, Cells, Run
from lightning_ralora.run.catalog import table_docs


@dataclass(frozen=True)
class Metric:
    """One column: its id (csv `metric`, the published-value key), heading, scale and decimals."""

    id: str
    label: str = ""
    percent: bool = True
    decimals: int = 2

    @property
    def heading(self) -> str:
        return self.label or self.id


@dataclass(frozen=True)
class TableSpec:
    """How one paper table is built from results.json files: its folder's table.yaml, read by `load_spec`."""

    id: str
    title: str
    description: str  # where the numbers come from, in words (the markdown repeats it)
    extract: Callable[[Run], dict[str, float]]  # {metric id: value in the table's scale}
    metrics: tuple[Metric, ...] = ()  # the expected columns, in the paper's order
    methods: tuple[str, ...] = ()  # the expected rows (per model/rank block); missing ones are shown as "—"
    experiments: tuple[str, ...] = ()  # the sweep configs whose runs fill this table (may be combined)
    sources: tuple[tuple[str, ...], ...] = ()  # every results.json key path the table reads
    dynamic: Metric | None = None  # template for columns found in the runs (ids not in `metrics`)
    derive: Callable[[Cells], None] | None = None  # adds derived cells (averages, overheads)
    pivot_rank: bool = False  # markdown: one column per rank (rows model/method) instead of rank blocks
    files: tuple[str, ...] = ("results.json",)  # the run records read (ralora_gid: also lightning-ralora-gid's)
    cell_text: Callable[[str, Cell], str | None] | None = None  # markdown text of a cell (verdicts); None: the number
    published_ids: Mapping[str, str] = field(default_factory=dict)  # our metric id -> the paper's, where they differ
    published_row: Mapping[str, Any] = field(default_factory=dict)  # model/rank/method of the paper's row, if fixed


def load_spec(doc: Mapping[str, Any]) -> TableSpec:
    """A TableSpec from one table.yaml (experiments/<paper>/<table>/table.yaml)."""
    cols = doc.get("columns") or []
    metrics = tuple(Metric(c["id"], c.get("label", ""), c.get("percent", True), c.get("decimals", 2)) for c in cols)
    by_source = {c["id"]: tuple(c["source"]) for c in cols if c.get("source")}
    name = doc.get("extract")
    if name is not None and name not in EXTRACTORS:
        raise ValueError(f"table {doc['id']}: extract={name!r} is unknown; allowed: {sorted(EXTRACTORS)}")
    extract = EXTRACTORS[name] if name else extract_columns(by_source, {m.id: m.percent for m in metrics})
    derive = doc.get("derive")
    if isinstance(derive, Mapping):
        derive = average_over(tuple(derive["average_over"]))
    elif derive is not None:
        derive = DERIVES[derive]
    dyn = doc.get("dynamic_columns")
    return TableSpec(
        id=doc["id"],
        title=doc["title"],
        description=doc["description"],
        extract=extract,
        metrics=metrics,
        methods=tuple(doc.get("methods") or ()),
        experiments=tuple(doc.get("experiments") or ()),
        sources=tuple(dict.fromkeys([*by_source.values(), *(tuple(p) for p in doc.get("sources") or ())])),
        dynamic=None if dyn is None else Metric("", "", dyn.get("percent", True), dyn.get("decimals", 2)),
        derive=derive,
        pivot_rank=bool(doc.get("pivot_rank", False)),
        files=tuple(doc.get("files") or ("results.json",)),
        cell_text=CELL_TEXTS[doc["cell_text"]] if doc.get("cell_text") else None,
        published_ids={c["id"]: c["published_id"] for c in cols if c.get("published_id")},
        published_row=dict(doc.get("published_row") or {}),
    )


TABLES: dict[str, TableSpec] = {table_id: load_spec(doc) for table_id, (_, doc) in table_docs().items()}
