"""The tables' extractors ({metric id: value} of one run, accuracies already in percent) and derivations (cells
computed from other cells: averages, overheads, verdicts, oracle rows), by the names a table.yaml gives them
(`extract:`, `derive:`, `cell_text:`)."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lightning_ralora.reporting.tables.model import Cell, Cells, Run, finite

MEMORY_KEYS = ("peak_memory_bytes", "max_memory_allocated")  # bytes, top-level or in final_metrics


def _get(d: Any, *keys: str) -> Any:
    """d[k1][k2]... or None where a level is missing."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _slug(name: Any) -> str:
    """A dataset's short name: last path component, lower case, '-' and ' ' as '_'."""
    return re.sub(r"[-\s]+", "_", str(name).rstrip("/").rsplit("/", 1)[-1].lower())


def _glue_task(run: Run) -> str | None:
    name = run.record.at("config", "eval", "glue_task") or run.record.at("config", "task", "glue_task")
    return None if name is None else str(name).lower().replace("-", "")


def _image_dataset(run: Run) -> str | None:
    """The evaluated image dataset (eval.dataset, else the task's), as the SDS table names it where recognised."""
    cfg = run.record.config or {}
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
    name = run.record.at("config", "task", "dataset")
    if name is None:
        return None
    slug = _slug(name)
    for short, pattern in (("metamathqa", "metamath"), ("code_feedback", "codefeedback"), ("wizardlm", "wizardlm")):
        if pattern in slug.replace("_", ""):
            return short
    return slug


# ------------------------------------------------------------------------------------------------------------------
# metric extractors: {metric id: value}, accuracies already in percent
# ------------------------------------------------------------------------------------------------------------------
def _eval_metric(run: Run, suite: str, key: str, percent: bool = True) -> float | None:
    v = finite(run.record.eval_metric(suite, key))
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
    entries = run.record.at("plan", "entries") or run.record.at("layers") or {}
    values = [v for e in entries.values() if (v := finite(_get(e, "erank"))) is not None]
    gid = run.path.parent / "gid.json"
    if not values and gid.is_file():
        try:
            entries = json.loads(gid.read_text()).get("entries") or {}
        except (json.JSONDecodeError, AttributeError):
            entries = {}
        values = [v for e in entries.values() if (v := finite(_get(e, "erank"))) is not None]
    return values


def extract_gid(run: Run) -> dict[str, float]:
    """The GID of the training dataset: the mean erank over the adapted modules (plan entries / gid.json)."""
    values, name = _eranks(run), _train_dataset(run)
    return {f"gid_{name}": statistics.mean(values)} if values and name else {}


def _s_per_step(run: Run) -> float | None:
    """Training seconds per optimizer step: fit_time_s (the fit alone), else wall_time_s, over global_step."""
    fit = finite(run.record.fit_time_s)
    wall = fit if fit is not None else finite(run.record.wall_time_s)
    steps = finite(run.record.global_step)
    return wall / steps if wall is not None and steps else None


def _peak_memory_gib(run: Run) -> float | None:
    for key in MEMORY_KEYS:
        v = finite(run.record.at(key))
        v = finite(run.record.at("final_metrics", key)) if v is None else v
        if v is not None:
            return v / 2**30
    return None


def extract_overhead(run: Run) -> dict[str, float]:
    """Per training set (`<dataset>_` prefix): seconds per optimizer step (fit_time_s / global_step), the fit's hours
    (`time_h`) and peak memory (GiB, from a MEMORY_KEYS value; `memory_gb` is the same figure in the paper's column)."""
    ds = _train_dataset(run)
    if ds is None:
        return {}
    fit = finite(run.record.fit_time_s)
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
    k = run.record.adapter.get("k")
    return _collect([(f"k={k}", _eval_metric(run, "humaneval_plus", "pass@1"))]) if k is not None else {}


def extract_hybrid_ratio(run: Run) -> dict[str, float]:
    """eval.glue.score of MRPC runs under the shared share hybrid_r / (r + hybrid_r), in percent; a plain LoRA run
    is the all-shared end of the sweep (100 %), GraLoRA without a shared part 0 %."""
    adapter = run.record.adapter
    if _glue_task(run) != "mrpc" or adapter.get("r") is None:
        return {}
    r, h = int(adapter["r"]), int(adapter.get("hybrid_r") or 0)
    share = 100 if run.record.variant in ("lora", "rslora") else round(100 * h / (r + h))
    return _collect([(f"hybrid={share}%", _eval_metric(run, "glue", "score"))])


def _by_profile(run: Run) -> dict[str, dict[str, list[float]]]:
    """{profile: {gap, ceiling (percent), cos (mean cos(G, Ĝ) of the alignment callback), size (n or k)}: values
    over the profile's targets} from results.json task_summary.planted and callbacks.GradientAlignment.layers."""
    align = run.record.callback_summary("GradientAlignment").get("layers") or {}
    by: dict[str, dict[str, list[float]]] = {}
    for name, rec in (run.record.at("task_summary", "planted") or {}).items():
        if not isinstance(rec, Mapping) or "profile" not in rec:
            continue
        gap, ceil = finite(rec.get("gap_closed")), finite(rec.get("ceiling"))
        structure = str(rec.get("structure") or "")
        size = re.fullmatch(r"(?:blocks|grid)(\d+)", structure)
        values = {
            "gap": None if gap is None else 100.0 * gap,
            "ceiling": None if ceil is None else 100.0 * ceil,
            "cos": finite(_get(align, name, "cos_f")),
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
    adapter = run.record.adapter
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
# by name: what a table.yaml's `extract:`, `derive:` and `cell_text:` say
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
            v = finite(run.record.at(*path))
            if v is not None:
                values[metric] = 100.0 * v if percent[metric] else v
        return values

    return extract
