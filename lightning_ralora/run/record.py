"""The run record (results.json) as one type, `RunRecord`: training writes it (run/outcome.py builds it, run/job.py
saves it), an evaluation adds its suites to `eval`, and the tables, the comparison and the sweep summary read it.
Also where records go (`write_record`: a completed results.json is never replaced by a failed attempt; every attempt is
kept in attempts/), the end-of-run summary and a sweep's summary. Reading a record needs no torch or Lightning."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ralora.core.io import write_json_atomic

RESULTS = "results.json"


ATTEMPTS = "attempts"


SWEEP_ID_ENV = "LIGHTNING_RALORA_SWEEP_ID"  # set by the sweep summary callback; records carry it (run.SweepSummary)


def timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:].replace(".", "-")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_record(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Record one attempt of a run. A completed record becomes results.json (an earlier results.json is kept in
    attempts/ first); any other (failed, interrupted, skipped) goes to attempts/<time>-<status>.json and also to
    results.json while that holds no completed run (so every attempt is in attempts/ or is the completed
    results.json). Returns where the record is authoritative."""
    run_dir = Path(run_dir)
    record = {"sweep_id": os.environ.get(SWEEP_ID_ENV), **record, "recorded_at": time.time()}
    status = record.get("status", "completed")
    results = run_dir / RESULTS
    earlier = read_json(results)
    if status == "completed":
        if earlier is not None and earlier.get("status", "completed") == "completed":  # others are in attempts/
            write_json_atomic(run_dir / ATTEMPTS / f"{timestamp()}-completed.json", earlier)
        return write_json_atomic(results, record)
    attempt = write_json_atomic(run_dir / ATTEMPTS / f"{timestamp()}-{status}.json", record)
    if status != "skipped" and (earlier is None or earlier.get("status", "completed") != "completed"):
        write_json_atomic(results, record)
    return attempt


def records_of_sweep(sweep_dir: str | Path, sweep_id: str | None) -> dict[Path, dict[str, Any]]:
    """{job dir: its latest record written by this sweep} (results.json and attempts/ whose `sweep_id` matches; with
    no id, every job's results.json)."""
    latest: dict[Path, dict[str, Any]] = {}
    for path in sorted(Path(sweep_dir).rglob("*.json")):
        job = path.parent.parent if path.parent.name == ATTEMPTS else path.parent
        if path.name != RESULTS and path.parent.name != ATTEMPTS:
            continue
        record = read_json(path) or ({"status": "unreadable"} if path.name == RESULTS else None)
        if record is None or (sweep_id is not None and record.get("sweep_id") != sweep_id):
            continue
        if job not in latest or record.get("recorded_at", 0) >= latest[job].get("recorded_at", 0):
            latest[job] = record
    return latest


@dataclass
class RunRecord:
    """What results.json holds (and each attempt in attempts/). A completed run: what it trained and measured, from
    `variant` to `config` (`outcome.results_record`), then `eval` and `export_dir` when asked for; a failed,
    diverged, interrupted or requeued one: `status`, `error` and what stopped it (`outcome.failure_record`).

    A field is None where the record lacks the key; `extra` keeps the keys no field names (e.g. gid_profile.json's
    `layers`), and `key_order` the order of the keys read, so a record loaded and saved again is the same JSON (with
    a new `recorded_at`)."""

    sweep_id: str | None = None  # the sweep whose job wrote it (record.write_record)
    variant: str | None = None
    model: str | None = None
    task: str | None = None
    seed: Any = None
    final_metrics: dict[str, float] | None = None  # the last validation's metrics and the trainer's callback metrics
    trainable_params: int | None = None
    total_params: int | None = None
    structure: dict[str, Any] | None = None  # the adapters built (AdapterModule.structure)
    plan: dict[str, Any] | None = None  # the GID plan (its entries and meta); null without one
    task_summary: dict[str, Any] | None = None
    callbacks: dict[str, Any] | None = None  # {callback class: its results_summary()}
    global_step: int | None = None
    world_size: int | None = None
    structure_digest_per_rank: list[str] | None = None
    adapter_state_digest_per_rank: list[str] | None = None
    data_encoded_per_rank: list[Any] | None = None
    wall_time_s: float | None = None
    fit_time_s: float | None = None  # the fit alone (no validation, eval or export)
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None  # cuda_max_allocated or cpu_max_rss
    host: str | None = None
    status: str | None = None  # completed, failed, diverged, interrupted, requeued or skipped; absent: completed
    error: str | None = None
    traceback: str | None = None  # its last 4000 characters
    signal: str | None = None  # a stop: the signal, the phase it stopped in, the checkpoint, how to resume
    phase: str | None = None
    checkpoint: str | None = None
    resume: str | None = None
    diverged_at_step: int | None = None
    identity: dict[str, Any] | None = None  # run/identity.py: hash, label, keys
    wandb: dict[str, Any] | None = None  # the W&B group, name, job type and tags
    config: dict[str, Any] | None = None  # the resolved config, secrets redacted
    eval: dict[str, dict[str, Any]] | None = None  # {suite: {metric: value}}
    export_dir: str | None = None
    recorded_at: float | None = field(default=None, compare=False)  # set by write_record
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    # --- the JSON -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The record of a results.json object (any keys: those no field names go to `extra`)."""
        known = {k: v for k, v in data.items() if k in FIELDS}
        extra = {k: v for k, v in data.items() if k not in FIELDS}
        return cls(**known, extra=extra, key_order=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys read (in their order), then the fields set since (not None), then new extras."""
        values = {name: getattr(self, name) for name in FIELDS}
        set_since = (name for name in FIELDS if values[name] is not None)
        out: dict[str, Any] = {}
        for key in dict.fromkeys([*self.key_order, *set_since, *self.extra]):
            if key in values:
                out[key] = values[key]
            elif key in self.extra:
                out[key] = self.extra[key]
        return out

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        """The record in a run dir's results.json, or in the file `path` (an attempt, a gid_profile.json). Raises
        OSError, json.JSONDecodeError, or ValueError for JSON that is not an object."""
        path = Path(path)
        data = json.loads((path / RESULTS if path.is_dir() else path).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return cls.from_dict(data)

    @classmethod
    def add_eval(cls, run_dir: str | Path, metrics: Mapping[str, Mapping[str, Any]]) -> bool:
        """Merge an evaluation's metrics into the `eval` of the run's results.json, rewritten in place (atomically):
        the same attempt, amended, so no new attempt and the same `recorded_at`. False when the dir holds no record."""
        path = Path(run_dir) / RESULTS
        if not path.is_file():
            return False
        record = cls.load(path)
        record.eval = {**(record.eval or {}), **json.loads(json.dumps(dict(metrics), default=str))}
        write_json_atomic(path, record.to_dict())
        return True

    def save(self, run_dir: str | Path) -> Path:
        """Record this attempt of the run in `run_dir` (record.write_record: a completed record becomes results.json,
        any other goes to attempts/ and to results.json unless that holds a completed run). Returns where it went."""
        return write_record(run_dir, self.to_dict())

    # --- what readers ask -----------------------------------------------------------------------------------------
    @property
    def completed(self) -> bool:
        """A completed run (a record without `status` is an older completed one)."""
        return self.status == "completed" or not self.has("status")

    def has(self, key: str) -> bool:
        """Whether the record holds the top-level `key` (null counts)."""
        return key in self.to_dict()

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The `keys` the record lacks, in their order."""
        held = self.to_dict()
        return [k for k in keys if k not in held]

    def at(self, *keys: str) -> Any:
        """The value at a key path (`at("config", "adapter", "r")`), or None where a level is missing."""
        value: Any = self.to_dict()
        for key in keys:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return value

    @property
    def adapter(self) -> dict[str, Any]:
        """The run's adapter config (`config.adapter`; {} without one)."""
        adapter = self.at("config", "adapter")
        return adapter if isinstance(adapter, dict) else {}

    @property
    def rank(self) -> int | None:
        """The run's total adapter rank (r + hybrid_r); None for full fine-tuning or no rank."""
        adapter = self.adapter
        if self.variant == "full" or adapter.get("kind") == "full" or adapter.get("r") is None:
            return None
        return int(adapter["r"]) + int(adapter.get("hybrid_r") or 0)

    @property
    def experiment(self) -> str | None:
        """The experiment (sweep config) the run belongs to (`config.experiment_name`)."""
        return self.at("config", "experiment_name")

    def eval_metric(self, suite: str, metric: str) -> float | None:
        """`eval.<suite>.<metric>` as a float, or None where absent or not a number."""
        value = self.at("eval", suite, metric)
        return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)

    def callback_summary(self, name: str) -> dict[str, Any]:
        """What the callback class `name` kept in `callbacks` ({} without it)."""
        summary = (self.callbacks or {}).get(name)
        return summary if isinstance(summary, dict) else {}


FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord) if f.name not in ("extra", "key_order"))


def summary(record: RunRecord, run_dir: Path) -> str:
    """A few lines for the end of a run: final val metrics (gap closed first), parameters, where the files are."""
    m = record.final_metrics or {}
    keys = sorted((k for k in m if k.startswith("val/")), key=lambda k: (k != "val/gap_closed", k))
    trainable, total = record.trainable_params or 0, record.total_params or 0
    share = f" ({100 * trainable / total:.3f}%)" if total else ""
    lines = [
        f"{record.variant} on {record.model} / {record.task}, seed {record.seed}: "
        f"{record.global_step} steps in {record.wall_time_s:.1f} s",
        "  " + ("  ".join(f"{k} {m[k]:.4g}" for k in keys) or "no validation metrics"),
        f"  params: {trainable:,} trainable / {total:,} total{share}",
        f"  run dir: {run_dir.resolve()}",
        f"  results: {(run_dir / RESULTS).resolve()}",
    ]
    if record.export_dir:
        lines.append(f"  export:  {record.export_dir}")
    return "\n".join(lines)


def print_sweep_summary(sweep_dir: Path, stopped_by: str | None = None) -> int:
    """Print this sweep's jobs (records_of_sweep) to stderr; returns how many did not complete."""
    lines, failed = [], 0
    for job, data in sorted(records_of_sweep(sweep_dir, os.environ.get(SWEEP_ID_ENV)).items()):
        record = RunRecord.from_dict(data)
        status = record.status or "completed"
        failed += status not in ("completed", "skipped")
        error = f"  {record.error}".splitlines()[0][:160] if record.error else ""
        lines.append(f"  {status:<11} {job}{error}")
    stop = f"; stopped by {stopped_by}, later jobs not started" if stopped_by else ""
    done = sum(1 for line in lines if line.split()[0] in ("completed", "skipped"))
    print(f"sweep {sweep_dir}: {done} completed, {failed} not{stop}", file=sys.stderr, flush=True)
    print("\n".join(lines), file=sys.stderr, flush=True)
    return failed
