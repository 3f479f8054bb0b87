"""What an evaluation writes: RUN/eval.json (merged with earlier suites), RUN/eval/<suite>.jsonl (one record per
example) and a W&B table of the first rows."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_ralora.core.io import write_json_atomic

TABLE_ROWS = 200  # examples in the W&B table


TABLE_COLUMNS = ("prompt", "completion", "extracted", "reference", "correct")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write_outputs(
    run_dir: Path, metrics: Mapping[str, Mapping[str, float]], records: Mapping[str, list[dict[str, Any]]]
) -> None:
    """RUN/eval.json (merged with earlier suites) and RUN/eval/<suite>.jsonl (results.json's `eval` is the run
    layer's: run/evaluate.py adds it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    for name, recs in records.items():
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in recs))
        tmp.replace(path)
    eval_path = run_dir / "eval.json"
    previous = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    write_json_atomic(eval_path, {**previous, **_json_safe(dict(metrics))})


def log_wandb(
    metrics: Mapping[str, Mapping[str, float]], records: Mapping[str, list[dict[str, Any]]], rows: int = TABLE_ROWS
) -> None:
    """Summary values `eval/<suite>/<metric>` and a table of the first `rows` examples, when a W&B run is active."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is None:
        return
    for name, m in metrics.items():
        for key, value in m.items():
            wandb.run.summary[f"eval/{name}/{key}"] = value
        table = wandb.Table(columns=list(TABLE_COLUMNS))
        for r in records.get(name, [])[:rows]:
            table.add_data(*(r.get(c) if c == "correct" else str(r.get(c, "")) for c in TABLE_COLUMNS))
        wandb.log({f"eval/{name}/examples": table})
