"""Loading text datasets the real way (`datasets.load_dataset`) from local JSONL/CSV files or the hub."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_data_source(cfg: Mapping[str, Any]) -> list[str]:
    """A task needs `task.data_files` (local) or `task.dataset` (hub name); local files must exist."""
    files, dataset = cfg.get("data_files"), cfg.get("dataset")
    if not files and not dataset:
        return ["task.data_files (a local JSONL/CSV path) or task.dataset (a hub dataset name) is required"]
    problems = []
    for f in [files] if isinstance(files, str) else list(files or []):
        path = Path(f)
        if not path.is_file():
            problems.append(f"task.data_files: file not found: {f}")
        elif path.suffix not in LOCAL_FORMATS:
            problems.append(f"task.data_files: {f} has suffix {path.suffix!r}; allowed: {sorted(LOCAL_FORMATS)}")
    return problems


def load_split(cfg: Mapping[str, Any], seed: int):
    """(train, val) `datasets.Dataset`s; val is `task.val_split` or a seeded `task.val_fraction` hold-out."""
    import datasets

    if cfg.get("data_files"):
        files = cfg["data_files"]
        first = files if isinstance(files, str) else files[0]
        ds = datasets.load_dataset(LOCAL_FORMATS[Path(first).suffix], data_files=files, split="train")
    else:
        ds = datasets.load_dataset(cfg["dataset"], cfg.get("dataset_config"), split=cfg.get("train_split", "train"))
    if cfg.get("max_samples"):
        ds = ds.select(range(min(len(ds), int(cfg["max_samples"]))))
    if cfg.get("dataset") and cfg.get("val_split"):
        val = datasets.load_dataset(cfg["dataset"], cfg.get("dataset_config"), split=cfg["val_split"])
        return ds, val
    parts = ds.train_test_split(test_size=float(cfg.get("val_fraction", 0.1)), seed=seed)
    return parts["train"], parts["test"]
