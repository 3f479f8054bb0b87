"""`lightning-ralora-tables --table ID --out DIR RUN_OR_SWEEP_DIR...`: a paper table from finished runs.

Every `results.json` below the given directories is one run. Runs are grouped by (model, rank, method):
`model`, `config.adapter.r` (+ `config.adapter.hybrid_r`, the total rank of Hybrid GraLoRA; empty for full
fine-tuning) and `variant`. The table's spec (its folder's table.yaml, `TABLES`) says where its metrics come from;
each cell is the mean ± the sample standard deviation (n − 1) over distinct seeds, accuracies in percent. Writes
`DIR/<ID>.md` (rows = methods in model/rank blocks, the published value and the difference beside each cell) and
`DIR/<ID>.csv` (columns `CSV_HEADER`; one line per measured cell: missing cells are "—" in the markdown and have no
csv line). `--wandb` also logs the table to the runs' W&B project (offline without credentials).

Runs left out, with a warning on stderr: results.json unreadable or missing a required key, a `status` other than
`completed`, no metric of the table. A seed seen twice in one group (a re-run or requeue) counts once: the run whose
results.json is newest. Bad input (unknown table, a directory without runs, runs of several experiments) is one
line each on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import csv
import importlib
import io as _io
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ralora import io

PROG = "lightning-ralora-tables"
CSV_HEADER = ("model", "rank", "method", "metric", "mean", "std", "n_seeds", "published")
REQUIRED = ("variant", "model", "seed", "config")
MISSING = "—"
MINUS = "−"

MEMORY_KEYS = ("peak_memory_bytes", "max_memory_allocated")  # bytes, top-level or in final_metrics


class TableInputError(ValueError):
    """Bad command-line input: one message per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


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


@dataclass
class Run:
    """One results.json: its group (model, rank, method), seed, what it measured (the table's metric ids)."""

    path: Path
    results: dict[str, Any]
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


# ------------------------------------------------------------------------------------------------------------------
# reading results.json
# ------------------------------------------------------------------------------------------------------------------
def _get(d: Any, *keys: str) -> Any:
    """d[k1][k2]... or None where a level is missing."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _num(v: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def run_rank(results: Mapping[str, Any]) -> int | None:
    """The run's total adapter rank (r + hybrid_r); None for full fine-tuning or no rank."""
    adapter = _get(results, "config", "adapter") or {}
    if results.get("variant") == "full" or adapter.get("kind") == "full" or adapter.get("r") is None:
        return None
    return int(adapter["r"]) + int(adapter.get("hybrid_r") or 0)


def _slug(name: Any) -> str:
    """A dataset's short name: last path component, lower case, '-' and ' ' as '_'."""
    return re.sub(r"[-\s]+", "_", str(name).rstrip("/").rsplit("/", 1)[-1].lower())


def _glue_task(run: Run) -> str | None:
    name = _get(run.results, "config", "eval", "glue_task") or _get(run.results, "config", "task", "glue_task")
    return None if name is None else str(name).lower().replace("-", "")


def _image_dataset(run: Run) -> str | None:
    """The evaluated image dataset (eval.dataset, else the task's), as the SDS table names it where recognised."""
    cfg = _get(run.results, "config") or {}
    name = _get(cfg, "eval", "dataset") or _get(cfg, "task", "dataset") or _get(cfg, "task", "data_dir")
    if name is None:
        return None
    slug = _slug(name)
    for short, pattern in (("cars", "cars"), ("cub200", "cub"), ("dtd", "dtd"), ("food101", "food"), ("sun397", "sun")):
        if pattern in slug:
            return short
    return slug


def _train_dataset(run: Run) -> str | None:
    """The training dataset as the RaLoRA GID table names it (metamathqa, code_feedback, wizardlm), else its slug."""
    name = _get(run.results, "config", "task", "dataset")
    if name is None:
        return None
    slug = _slug(name)
    for short, pattern in (("metamathqa", "metamath"), ("code_feedback", "codefeedback"), ("wizardlm", "wizardlm")):
        if pattern in slug.replace("_", ""):
            return short
    return slug


def _identity(results: Mapping[str, Any]) -> str:
    cfg = results.get("config") or {}
    keys = (_get(cfg, "task", "dataset"), _get(cfg, "task", "dataset_config"), _get(cfg, "task", "glue_task"))
    structure = (_get(cfg, "adapter", "k"), _get(cfg, "adapter", "hybrid_r"), _get(cfg, "eval", "dataset"))
    return json.dumps([results.get("task"), *keys, *structure], default=str)


# ------------------------------------------------------------------------------------------------------------------
# metric extractors: {metric id: value}, accuracies already in percent
# ------------------------------------------------------------------------------------------------------------------
def _eval_metric(run: Run, suite: str, key: str, percent: bool = True) -> float | None:
    v = _num(_get(run.results, "eval", suite, key))
    return None if v is None else (100.0 * v if percent else v)


def _collect(pairs: Iterable[tuple[str, float | None]]) -> dict[str, float]:
    return {k: v for k, v in pairs if v is not None}


def extract_glue(run: Run) -> dict[str, float]:
    """eval.glue.score under the run's GLUE task (eval.glue_task, else task.glue_task)."""
    task = _glue_task(run)
    return _collect([(task, _eval_metric(run, "glue", "score"))]) if task else {}


def extract_image(run: Run) -> dict[str, float]:
    """eval.image.accuracy under the evaluated dataset (eval.dataset, else task.dataset)."""
    name = _image_dataset(run)
    return _collect([(name, _eval_metric(run, "image", "accuracy"))]) if name else {}


def _eranks(run: Run) -> list[float]:
    """Per-module erank of the run's plan (results.json `plan`, else RUN/gid.json), or of a gid_profile.json's
    `layers` (`lightning-ralora-gid`)."""
    entries = _get(run.results, "plan", "entries") or _get(run.results, "layers") or {}
    values = [v for e in entries.values() if (v := _num(_get(e, "erank"))) is not None]
    gid = run.path.parent / "gid.json"
    if not values and gid.is_file():
        try:
            entries = json.loads(gid.read_text()).get("entries") or {}
        except (json.JSONDecodeError, AttributeError):
            entries = {}
        values = [v for e in entries.values() if (v := _num(_get(e, "erank"))) is not None]
    return values


def extract_gid(run: Run) -> dict[str, float]:
    """The GID of the training dataset: the mean erank over the adapted modules (plan entries / gid.json)."""
    values, name = _eranks(run), _train_dataset(run)
    return {f"gid_{name}": statistics.mean(values)} if values and name else {}


def _s_per_step(run: Run) -> float | None:
    """Training seconds per optimizer step: fit_time_s (the fit alone), else wall_time_s, over global_step."""
    fit = _num(run.results.get("fit_time_s"))
    wall = fit if fit is not None else _num(run.results.get("wall_time_s"))
    steps = _num(run.results.get("global_step"))
    return wall / steps if wall is not None and steps else None


def _peak_memory_gib(run: Run) -> float | None:
    for key in MEMORY_KEYS:
        v = _num(run.results.get(key))
        v = _num(_get(run.results, "final_metrics", key)) if v is None else v
        if v is not None:
            return v / 2**30
    return None


def extract_overhead(run: Run) -> dict[str, float]:
    """Per training set (`<dataset>_` prefix): seconds per optimizer step (fit_time_s / global_step), the fit's hours
    (`time_h`) and peak memory (GiB, from a MEMORY_KEYS value; `memory_gb` is the same figure in the paper's column)."""
    ds = _train_dataset(run)
    if ds is None:
        return {}
    fit = _num(run.results.get("fit_time_s"))
    memory = _peak_memory_gib(run)
    return _collect(
        [
            (f"{ds}_s_per_step", _s_per_step(run)),
            (f"{ds}_peak_memory_gib", memory),
            (f"{ds}_time_h", None if fit is None else fit / 3600.0),  # the paper's Table 6 units: hours and GB
            (f"{ds}_memory_gb", memory),
        ]
    )


def extract_k_sweep(run: Run) -> dict[str, float]:
    """eval.humaneval_plus.pass@1 under k=<config.adapter.k>."""
    k = _get(run.results, "config", "adapter", "k")
    return _collect([(f"k={k}", _eval_metric(run, "humaneval_plus", "pass@1"))]) if k is not None else {}


def extract_hybrid_ratio(run: Run) -> dict[str, float]:
    """eval.glue.score of MRPC runs under the shared share hybrid_r / (r + hybrid_r), in percent; a plain LoRA run
    is the all-shared end of the sweep (100 %), GraLoRA without a shared part 0 %."""
    adapter = _get(run.results, "config", "adapter") or {}
    if _glue_task(run) != "mrpc" or adapter.get("r") is None:
        return {}
    r, h = int(adapter["r"]), int(adapter.get("hybrid_r") or 0)
    share = 100 if run.results.get("variant") in ("lora", "rslora") else round(100 * h / (r + h))
    return _collect([(f"hybrid={share}%", _eval_metric(run, "glue", "score"))])


def _by_profile(run: Run) -> dict[str, dict[str, list[float]]]:
    """{profile: {gap, ceiling (percent), cos (mean cos(G, Ĝ) of the alignment callback), size (n or k)}: values
    over the profile's targets} from results.json task_summary.planted and callbacks.GradientAlignment.layers."""
    align = _get(run.results, "callbacks", "GradientAlignment", "layers") or {}
    by: dict[str, dict[str, list[float]]] = {}
    for name, rec in (_get(run.results, "task_summary", "planted") or {}).items():
        if not isinstance(rec, Mapping) or "profile" not in rec:
            continue
        gap, ceil = _num(rec.get("gap_closed")), _num(rec.get("ceiling"))
        structure = str(rec.get("structure") or "")
        size = re.fullmatch(r"(?:blocks|grid)(\d+)", structure)
        values = {
            "gap": None if gap is None else 100.0 * gap,
            "ceiling": None if ceil is None else 100.0 * ceil,
            "cos": _num(_get(align, name, "cos_f")),
            "size": float(size.group(1)) if size else (1.0 if structure == "lora" else None),
        }
        for key, v in values.items():
            if v is not None:
                by.setdefault(str(rec["profile"]), {}).setdefault(key, []).append(v)
    return by


def extract_claims(run: Run) -> dict[str, float]:
    """Per planted profile, the mean over its targets of the layer-local gap closed (`gap:<profile>`), of the
    ceiling of the run's structure (`ceiling:<profile>`), both in percent, and of cos(G, Ĝ) (`cos:<profile>`)."""
    return {
        f"{key}:{profile}": statistics.mean(values)
        for profile, vals in _by_profile(run).items()
        for key, values in vals.items()
        if key != "size" and values
    }


def derive_claims(cells: Cells) -> None:
    """`verdict:<profile>` per method ≠ lora of a (model, rank) block: +1 when its gap closed beats LoRA's by more
    than 3 std of the difference (√(std²+std_lora²)), −1 when it trails by as much, 0 within that noise."""
    for (model, rank, method), row in list(cells.items()):
        base = cells.get((model, rank, "lora"))
        if method == "lora" or base is None:
            continue
        for metric, cell in list(row.items()):
            if not metric.startswith("gap:") or metric not in base:
                continue
            ref = base[metric]
            noise = 3.0 * math.sqrt((cell.std or 0.0) ** 2 + (ref.std or 0.0) ** 2)
            margin = cell.mean - ref.mean
            verdict = 1.0 if margin > noise else (-1.0 if margin < -noise else 0.0)
            row[f"verdict:{metric[4:]}"] = Cell(verdict, None, min(cell.n, ref.n))


VERDICTS = {1.0: "holds", -1.0: "does not hold", 0.0: "within noise"}


def claims_text(metric: str, cell: Cell) -> str | None:
    """`verdict:<profile>` cells as words (holds / does not hold / within noise); other cells as numbers."""
    return VERDICTS.get(cell.mean) if metric.startswith("verdict:") else None


# the oracle sweep (experiment claims_oracle): fixed structures, one method name each, and the GID-planned ones
ORACLE_FAMILIES = {"ralora_n": "oracle_ralora", "gralora_k": "oracle_gralora"}


def extract_oracle(run: Run) -> dict[str, float]:
    """Per planted profile: the layer-local gap closed (`gap:<profile>`, percent) and the structure's block count or
    grid size (`n:<profile>`, the mean over the profile's targets: a GID plan may differ between them). Names the
    run's row by its fixed structure (ralora_n<n> without the GID plan, gralora_k<k> for an integer k)."""
    adapter = _get(run.results, "config", "adapter") or {}
    if adapter.get("kind") == "ralora" and not adapter.get("needs_gid"):
        run.method = f"ralora_n{adapter.get('n_blocks', 1)}"
    elif adapter.get("kind") == "gralora" and str(adapter.get("k")) != "auto" and not adapter.get("hybrid_r"):
        run.method = f"gralora_k{adapter.get('k')}"
    out = {}
    for profile, vals in _by_profile(run).items():
        for key, name in (("gap", "gap"), ("size", "n")):
            if vals.get(key):
                out[f"{name}:{profile}"] = statistics.mean(vals[key])
    return out


def derive_oracle(cells: Cells) -> None:
    """An `oracle_ralora` / `oracle_gralora` row per (model, rank) block: per profile, the gap closed and n (k) of
    the fixed structure (methods ralora_n<n>, gralora_k<k>) that closes the most; the GID rows show their pick."""
    for model, rank in {(g[0], g[1]) for g in cells}:
        for prefix, name in ORACLE_FAMILIES.items():
            fixed = [
                row for (m, r, method), row in cells.items() if (m, r) == (model, rank) and method.startswith(prefix)
            ]
            best: dict[str, Cell] = {}
            for row in fixed:
                for metric, cell in row.items():
                    profile = metric[4:]
                    if metric.startswith("gap:") and (metric not in best or cell.mean > best[metric].mean):
                        best[metric] = cell
                        best[f"n:{profile}"] = row.get(f"n:{profile}", Cell(float("nan"), None, cell.n))
            if best:
                cells[(model, rank, name)] = best


# ------------------------------------------------------------------------------------------------------------------
# derived cells
# ------------------------------------------------------------------------------------------------------------------
def average_over(ids: Sequence[str], name: str = "average") -> Callable[[Cells], None]:
    """A derived `name` cell per row: the mean of the row's cell means over `ids`, only when all of them exist."""

    def derive(cells: Cells) -> None:
        for row in cells.values():
            if name not in row and all(i in row for i in ids):
                row[name] = Cell(statistics.mean(row[i].mean for i in ids), None, min(row[i].n for i in ids))

    return derive


def derive_overhead(cells: Cells) -> None:
    """sds_lora's overhead over lora in the same (model, rank) block, per training set:
    `<ds>_time_overhead_pct` / `<ds>_memory_overhead_pct` = 100 · (mean_sds / mean_lora − 1)."""
    for (model, rank, method), row in cells.items():
        base = cells.get((model, rank, "lora"))
        if method != "sds_lora" or base is None:
            continue
        for src, name in (("s_per_step", "time_overhead_pct"), ("peak_memory_gib", "memory_overhead_pct")):
            for ds in {m.rsplit(f"_{src}", 1)[0] for m in row if m.endswith(f"_{src}")}:
                a, b = row.get(f"{ds}_{src}"), base.get(f"{ds}_{src}")
                if a is not None and b is not None and b.mean:
                    row[f"{ds}_{name}"] = Cell(100.0 * (a.mean / b.mean - 1.0), None, min(a.n, b.n))


def dynamic_average(cells: Cells) -> None:
    """Avg over every dataset column present in the table (for tables whose datasets are not fixed)."""
    ids = sorted({m for row in cells.values() for m in row if m != "average"})
    if len(ids) > 1:
        average_over(ids)(cells)


# ------------------------------------------------------------------------------------------------------------------
# the tables
# ------------------------------------------------------------------------------------------------------------------
EXTRACTORS: dict[str, Callable[[Run], dict[str, float]]] = {  # table.yaml `extract:` for derived column ids
    "glue_by_task": extract_glue,
    "image_by_dataset": extract_image,
    "gid_by_dataset": extract_gid,
    "overhead": extract_overhead,
    "pass1_by_k": extract_k_sweep,
    "glue_by_hybrid_share": extract_hybrid_ratio,
    "claims": extract_claims,
    "oracle": extract_oracle,
}
DERIVES: dict[str, Callable[[Cells], None]] = {  # table.yaml `derive:` (or {average_over: [ids]})
    "dynamic_average": dynamic_average,
    "overhead": derive_overhead,
    "claims_verdicts": derive_claims,
    "oracle_rows": derive_oracle,
}
CELL_TEXTS: dict[str, Callable[[str, Cell], str | None]] = {"verdict_words": claims_text}


def extract_columns(columns: Mapping[str, tuple[str, ...]], percent: Mapping[str, bool]) -> Callable[[Run], dict]:
    """The default extractor: each column's value at its results.json key path (`source`), fractions in percent."""

    def extract(run: Run) -> dict[str, float]:
        values = {}
        for metric, path in columns.items():
            v = _num(_get(run.results, *path))
            if v is not None:
                values[metric] = 100.0 * v if percent[metric] else v
        return values

    return extract


def load_spec(doc: Mapping[str, Any]) -> TableSpec:
    """A TableSpec from one table.yaml (experiments/<paper>/<table>/table.yaml; docs/tables.md explains the fields)."""
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


def _tables() -> dict[str, TableSpec]:
    from lightning_ralora.run.catalog import table_docs

    return {table_id: load_spec(doc) for table_id, (_, doc) in table_docs().items()}


TABLES: dict[str, TableSpec] = _tables()


# ------------------------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------------------------
def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class Notes(list):
    """Warnings collected while building, printed once the table is known to be written (bad input prints none)."""

    def __call__(self, message: str) -> None:
        self.append(message)


def find_results(dirs: Sequence[str | Path], names: Sequence[str] = ("results.json",)) -> tuple[list[Path], list[str]]:
    """Every run record (`names`: results.json, ...) below each directory (sorted), and one problem per directory
    without any."""
    found: list[Path] = []
    problems: list[str] = []
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            problems.append(f"{path}: not a directory")
            continue
        files = sorted(f for name in names for f in path.rglob(name))
        if not files:
            problems.append(f"{path}: no runs (no {' or '.join(names)} below it)")
        found += [f for f in files if f not in found]
    return found, problems


def load_run(path: Path, warn: Callable[[str], None] = warn) -> Run | None:
    """The run of one results.json, or None (with a warning) when it is unreadable or did not complete."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        warn(f"{path}: left out (unreadable: {e})")
        return None
    if not isinstance(results, dict):
        warn(f"{path}: left out (not a JSON object)")
        return None
    missing = [k for k in REQUIRED if k not in results]
    if missing:
        warn(f"{path}: left out (incomplete run: missing {missing})")
        return None
    if results.get("status", "completed") != "completed":
        warn(f"{path}: left out (status {results['status']!r})")
        return None
    return Run(
        path=path,
        results=results,
        mtime=path.stat().st_mtime,
        model=str(results["model"]),
        rank=run_rank(results),
        method=str(results["variant"]),
        seed=results["seed"],
        experiment=_get(results, "config", "experiment_name"),
        identity=_identity(results),
    )


def select_runs(spec: TableSpec, paths: Sequence[Path], warn: Callable[[str], None] = warn) -> list[Run]:
    """Completed runs with metrics of the table, one per (group, training identity, seed): the newest results.json."""
    latest: dict[tuple, Run] = {}
    for path in paths:
        run = load_run(path, warn)
        if run is None:
            continue
        run.values = spec.extract(run)
        if not run.values:
            warn(f"{path}: left out (no {spec.id} metrics)")
            continue
        key = (*run.group, run.identity, json.dumps(run.seed, default=str))
        old = latest.get(key)
        if old is not None:
            keep, drop = (run, old) if run.mtime >= old.mtime else (old, run)
            warn(
                f"seed {run.seed} of {run.method} ({run.model}, rank {_rank_str(run.rank) or '-'}) appears twice: "
                f"counting {keep.path}, not {drop.path}"
            )
            run = keep
        latest[key] = run
    configs: dict[tuple, set[str]] = {}
    for key, run in latest.items():
        digest = _get(run.results, "identity", "hash")
        if digest is not None:
            configs.setdefault(key[:-1], set()).add(str(digest))
    for key, digests in configs.items():
        if len(digests) > 1:  # e.g. two learning rates of one method in the directories given
            warn(
                f"{key[2]} ({key[0]}, rank {_rank_str(key[1]) or '-'}) mixes runs of {len(digests)} configs "
                f"(identity {', '.join(sorted(digests))}): its cells average over them"
            )
    return list(latest.values())


def check_experiments(spec: TableSpec, runs: Sequence[Run]) -> str | None:
    """A problem when the runs come from several experiments not all listed by the table's spec."""
    names = Counter(str(r.experiment) for r in runs)
    if len(names) <= 1 or all(n in spec.experiments for n in names):
        return None
    shown = ", ".join(f"{n} ({c} runs)" for n, c in sorted(names.items()))
    return f"runs of several experiments for table {spec.id}: {shown}; pass the runs of one experiment"


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


# ------------------------------------------------------------------------------------------------------------------
# published values
# ------------------------------------------------------------------------------------------------------------------
def published_lookup(spec: TableSpec) -> Callable[[str, int | None, str, str], float | None]:
    """`reporting.published.published_cell` as a mean-or-None function; no published values without it."""
    try:
        module = importlib.import_module(f"{__package__}.published")
        fn = module.published_cell
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
        return None if cell is None else _num(cell[0] if isinstance(cell, Sequence) else cell)

    return lookup


# ------------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------------
def _rank_str(rank: int | None) -> str:
    return "" if rank is None else str(rank)


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
                out.append([g[0], _rank_str(g[1]), g[2], m.id, repr(cell.mean), std, cell.n, pub_text])
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
        body = [[g[0], _rank_str(g[1]) or MISSING, g[2]] + [self._text(g, m) for m in self.columns] for g in self.rows]
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

    projects = Counter(_get(r.results, "config", "wandb", "project") or "lightning_ralora" for r in table.runs)
    entities = Counter(_get(r.results, "config", "wandb", "entity") for r in table.runs)
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
