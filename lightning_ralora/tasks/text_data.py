"""Loading text datasets the real way (`datasets.load_dataset`) from local JSONL/CSV files or the hub, and encoding
them once per node into `Dataset.map` cache files that every rank reads."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CHECK_LINES = 1000  # JSONL rows parsed by the pre-compute check (the rest is left to the loader)


def local_suffix(path: str | Path) -> str:
    """A local data file's format suffix: `.jsonl` for `train.jsonl` and for `train.jsonl.gz` (gzip-compressed)."""
    path = Path(path)
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _open_text(path: Path, **kwargs: Any):
    """A text handle on a local data file, decompressing `.gz`."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", **kwargs)
    return path.open(encoding="utf-8", errors="replace", **kwargs)


def _columns(cfg: Mapping[str, Any], keys: Mapping[str, str | None]) -> dict[str, str]:
    """{column name: the task key naming it} of the columns every row needs (None defaults are optional)."""
    out = {}
    for key, default in keys.items():
        col = cfg.get(key, default)
        if col is not None:
            out[str(col)] = f"task.{key}"
    return out


def check_file_content(path: Path, name: str, columns: Mapping[str, str]) -> list[str]:
    """One line naming the file and the problem: an invalid JSONL row (first CHECK_LINES rows) or a row/CSV header
    without a required column."""
    if local_suffix(path) == ".jsonl":
        with _open_text(path) as fh:
            for i, line in enumerate(fh, 1):
                if i > CHECK_LINES:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    return [f"{name}={path}: line {i} is not valid JSON ({err.msg}, column {err.colno})"]
                if not isinstance(row, dict):
                    return [f"{name}={path}: line {i} is a {type(row).__name__}, not a JSON object"]
                missing = [f"{c!r} ({k})" for c, k in columns.items() if c not in row]
                if missing:
                    return [f"{name}={path}: line {i} has no column {', '.join(missing)}; it has {sorted(row)}"]
    elif local_suffix(path) == ".csv":
        with _open_text(path, newline="") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            return [f"{name}={path}: empty CSV file (no header row)"]
        missing = [f"{c!r} ({k})" for c, k in columns.items() if c not in header]
        if missing:
            return [f"{name}={path}: CSV header has no column {', '.join(missing)}; columns: {header}"]
    return []


def check_data_source(cfg: Mapping[str, Any], keys: Mapping[str, str | None] | None = None) -> list[str]:
    """A task needs `task.data_files` (local) or `task.dataset` (hub name); local files must exist, have a known
    suffix and (JSONL/CSV) parse with the columns `keys` names ({task key: default column}; None: optional)."""
    files, dataset = cfg.get("data_files"), cfg.get("dataset")
    if not files and not dataset:
        return ["task.data_files (a local JSONL/CSV path) or task.dataset (a hub dataset name) is required"]
    columns = _columns(cfg, keys or {})
    problems = []
    for f in [files] if isinstance(files, str) else list(files or []):
        path = Path(f).expanduser()
        if not path.is_file():
            problems.append(f"task.data_files={f}: file not found")
        elif local_suffix(path) not in LOCAL_FORMATS:
            allowed = sorted(LOCAL_FORMATS) + [f"{s}.gz" for s in sorted(LOCAL_FORMATS) if s != ".parquet"]
            problems.append(f"task.data_files={f}: suffix {''.join(path.suffixes)!r} unknown; allowed: {allowed}")
        else:
            problems += check_file_content(path, "task.data_files", columns)
    return problems


def load_split(cfg: Mapping[str, Any], seed: int):
    """(train, val) `datasets.Dataset`s; val is `task.val_split` or a seeded `task.val_fraction` hold-out."""
    import datasets

    if cfg.get("data_files"):
        files = cfg["data_files"]
        first = files if isinstance(files, str) else files[0]
        ds = datasets.load_dataset(LOCAL_FORMATS[local_suffix(first)], data_files=files, split="train")
    else:
        ds = datasets.load_dataset(cfg["dataset"], cfg.get("dataset_config"), split=cfg.get("train_split", "train"))
    if cfg.get("max_samples"):
        ds = ds.select(range(min(len(ds), int(cfg["max_samples"]))))
    if cfg.get("dataset") and cfg.get("val_split"):
        val = datasets.load_dataset(cfg["dataset"], cfg.get("dataset_config"), split=cfg["val_split"])
        return ds, val
    parts = ds.train_test_split(test_size=float(cfg.get("val_fraction", 0.1)), seed=seed)
    return parts["train"], parts["test"]


ENCODING_VERSION = 1  # bump when an encoder's output changes for the same inputs: older cache files stop matching
CACHE_PREFIX = "lightning-ralora-encoded"
OUT_PREFIX = "encoded__"  # the encoded columns' names while Dataset.map writes them


def tokenizer_key(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's encoding: its name/path, class, sizes, special ids, chat template and a hash
    of its full definition (fast tokenizers) or vocabulary, so an edited local tokenizer gets a new cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation/padding state that each call with truncation=True sets
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "vocab_size": getattr(tokenizer, "vocab_size", None),
        "special_ids": {
            k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk", "sep", "cls")
        },
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "spec_sha256": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(),
    }


class EncodedText:
    """A text task's (train, val) from `load_split`, encoded row by row (`encode`) with `Dataset.map` into cache
    files beside the dataset's own: `prepare` (one process per node) writes them, `load` (every process) reads
    them. `key` names everything that changes the encoding; with the data's fingerprint it names the files."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        seed: int,
        encode: Callable[[Mapping[str, Any]], dict[str, Any]],
        key: Mapping[str, Any],
        tensor_columns: Sequence[str],
    ) -> None:
        self.cfg, self.seed, self.encode, self.key = dict(cfg), seed, encode, dict(key)
        self.tensor_columns = list(tensor_columns)
        self.encoded_examples = 0  # rows this process encoded itself

    def _encode_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        self.encoded_examples += 1
        # new column names: datasets would cast an output column to the type of the input column of its name (a
        # regression task's float `label` to the file's int)
        return {OUT_PREFIX + k: v for k, v in self.encode(row).items()}

    def fingerprint(self, ds: Any, split: str) -> str:
        """The encoded split's fingerprint: the loaded split's `_fingerprint`, the key and the encoding version."""
        blob = {"data": ds._fingerprint, "split": split, "version": ENCODING_VERSION, "seed": self.seed, **self.key}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def cache_file(self, ds: Any, split: str) -> str | None:
        """The cache file of the encoded split, beside the dataset's cache files; None for an in-memory dataset."""
        if not ds.cache_files:
            return None
        folder = Path(ds.cache_files[0]["filename"]).parent
        return str(folder / f"{CACHE_PREFIX}-{self.fingerprint(ds, split)}.arrow")

    def _map(self, ds: Any, split: str) -> Any:
        out = ds.map(
            self._encode_row,
            remove_columns=ds.column_names,
            cache_file_name=self.cache_file(ds, split),
            load_from_cache_file=True,
            new_fingerprint=self.fingerprint(ds, split),
            desc=f"encoding {split}",
        )
        out = out.rename_columns({c: c.removeprefix(OUT_PREFIX) for c in out.column_names})
        out.set_format("torch", columns=self.tensor_columns, output_all_columns=True)
        return out

    def prepare(self) -> None:
        """Load the data (downloads land in the node's datasets cache) and write the encoded cache files; nothing
        to write for an in-memory dataset (every process then encodes it in `load`)."""
        for split, ds in zip(("train", "val"), load_split(self.cfg, self.seed), strict=True):
            if ds.cache_files:
                self._map(ds, split)

    def load(self) -> tuple[Any, Any]:
        """(train, val) encoded: read from the cache files, or encoded here when there are none."""
        train, val = load_split(self.cfg, self.seed)
        return self._map(train, "train"), self._map(val, "val")
