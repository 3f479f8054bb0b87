"""The runs of a table: every run record below the given directories, read as `RunRecord`s, the ones that did not
complete or measured nothing of the table left out with a warning, and one run per seed of a group."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_ralora.reporting.tables.model import Run, rank_text
from lightning_ralora.reporting.tables.spec import TableSpec
from lightning_ralora.run.record import RunRecord

PROG = "lightning-ralora-tables"
REQUIRED = ("variant", "model", "seed", "config")


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


def training_identity(record: RunRecord) -> str:
    """What a run trained on and how its adapter was shaped (task, dataset, GLUE task, k, hybrid_r, eval dataset):
    two runs of one seed in one group that differ here are two runs, not a re-run."""
    keys = [("task", "dataset"), ("task", "dataset_config"), ("task", "glue_task")]
    keys += [("adapter", "k"), ("adapter", "hybrid_r"), ("eval", "dataset")]
    return json.dumps([record.task, *(record.at("config", *k) for k in keys)], default=str)


def load_run(path: Path, warn: Callable[[str], None] = warn) -> Run | None:
    """The run of one results.json, or None (with a warning) when it is unreadable or did not complete."""
    try:
        record = RunRecord.load(path)
    except (OSError, json.JSONDecodeError) as e:
        warn(f"{path}: left out (unreadable: {e})")
        return None
    except ValueError as e:  # JSON, but not an object
        warn(f"{path}: left out ({e})")
        return None
    missing = record.missing(REQUIRED)
    if missing:
        warn(f"{path}: left out (incomplete run: missing {missing})")
        return None
    if not record.completed:
        warn(f"{path}: left out (status {record.status!r})")
        return None
    return Run(
        path=path,
        record=record,
        mtime=path.stat().st_mtime,
        model=str(record.model),
        rank=record.rank,
        method=str(record.variant),
        seed=record.seed,
        experiment=record.experiment,
        identity=training_identity(record),
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
                f"seed {run.seed} of {run.method} ({run.model}, rank {rank_text(run.rank) or '-'}) appears twice: "
                f"counting {keep.path}, not {drop.path}"
            )
            run = keep
        latest[key] = run
    configs: dict[tuple, set[str]] = {}
    for key, run in latest.items():
        digest = run.record.at("identity", "hash")
        if digest is not None:
            configs.setdefault(key[:-1], set()).add(str(digest))
    for key, digests in configs.items():
        if len(digests) > 1:  # e.g. two learning rates of one method in the directories given
            warn(
                f"{key[2]} ({key[0]}, rank {rank_text(key[1]) or '-'}) mixes runs of {len(digests)} configs "
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
