"""Loading text datasets the real way (`datasets.load_dataset`) from local JSONL/CSV files or the hub, and encoding
them once per node into `Dataset.map` cache files that every rank reads."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_ralora.adapters.schema import pos_int

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def local_suffix(path: str | Path) -> str:
    """A local data file's format suffix: `.jsonl` for `train.jsonl` and for `train.jsonl.gz` (gzip-compressed)."""
    path = Path(path)
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _open_text(path: Path, **kwargs: Any):
    """A text handle on a local data file, decompressing `.gz`."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", **kwargs)
    return path.open(encoding="utf-8", errors="replace", **kwargs)


RowCheck = Callable[[Mapping[str, Any]], "str | None"]  # a problem with one row (e.g. its label), or None


def _columns(cfg: Mapping[str, Any], keys: Mapping[str, str | None]) -> dict[str, str]:
    """{column name: the task key naming it} of the columns every row needs (None defaults are optional)."""
    out = {}
    for key, default in keys.items():
        col = cfg.get(key, default)
        if col is not None:
            out[str(col)] = f"task.{key}"
    return out


def _row_problem(row: Any, columns: Mapping[str, str], check: RowCheck | None) -> str | None:
    """What is wrong with one parsed row: not an object, a required column absent or null, or `check`'s problem."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not a JSON object"
    missing = [f"{c!r} ({k})" for c, k in columns.items() if c not in row]
    if missing:
        return f"has no column {', '.join(missing)}; it has {sorted(row)}"
    null = [f"{c!r} ({k})" for c, k in columns.items() if row[c] is None]
    if null:
        return f"has a null {', '.join(null)}"
    return check(row) if check is not None else None


def _jsonl_rows(path: Path, name: str, columns: Mapping[str, str], check: RowCheck | None) -> tuple[int, str | None]:
    """(rows, first problem) of a JSONL file, every line parsed in one streaming pass."""
    n = 0
    with _open_text(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return n, f"{name}={path}: line {i} is not valid JSON ({err.msg}, column {err.colno})"
            problem = _row_problem(row, columns, check)
            if problem:
                return n, f"{name}={path}: line {i} {problem}"
            n += 1
    return n, None


def _json_rows(path: Path, name: str, columns: Mapping[str, str], check: RowCheck | None) -> tuple[int, str | None]:
    """(rows, first problem) of a .json file: a JSON list of row objects, or JSON lines (as `datasets` reads both)."""
    with _open_text(path) as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith("["):
        return _jsonl_rows(path, name, columns, check)
    try:
        with _open_text(path) as fh:
            rows = json.load(fh)
    except json.JSONDecodeError as err:
        return 0, f"{name}={path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})"
    for i, row in enumerate(rows, 1):
        problem = _row_problem(row, columns, check)
        if problem:
            return i - 1, f"{name}={path}: row {i} {problem}"
    return len(rows), None


def _csv_rows(path: Path, name: str, columns: Mapping[str, str], check: RowCheck | None) -> tuple[int, str | None]:
    """(rows, first problem) of a CSV file: its header has the columns, every row a value for each of them."""
    with _open_text(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            return 0, f"{name}={path}: empty CSV file (no header row)"
        missing = [f"{c!r} ({k})" for c, k in columns.items() if c not in header]
        if missing:
            return 0, f"{name}={path}: CSV header has no column {', '.join(missing)}; columns: {header}"
        n = 0
        for values in reader:
            if not values:
                continue
            if len(values) != len(header):
                return n, (f"{name}={path}: line {reader.line_num} has {len(values)} fields, the header {len(header)}")
            problem = check(dict(zip(header, values, strict=True))) if check is not None else None
            if problem:
                return n, f"{name}={path}: line {reader.line_num} {problem}"
            n += 1
    return n, None


def _parquet_rows(path: Path, name: str, columns: Mapping[str, str], check: RowCheck | None) -> tuple[int, str | None]:
    """(rows, first problem) of a Parquet file: the schema has the columns (read from its footer); `check` runs on
    the checked columns only."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - not a Parquet file: one line naming it
        return 0, f"{name}={path}: cannot be read as Parquet ({type(err).__name__}: {str(err)[:200]})"
    names = meta.schema_arrow.names
    missing = [f"{c!r} ({k})" for c, k in columns.items() if c not in names]
    if missing:
        return 0, f"{name}={path}: Parquet file has no column {', '.join(missing)}; columns: {names}"
    if check is not None and meta.metadata.num_rows:
        for i, row in enumerate(meta.read(columns=list(columns)).to_pylist(), 1):
            problem = check(row)
            if problem:
                return i - 1, f"{name}={path}: row {i} {problem}"
    return meta.metadata.num_rows, None


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def check_file_content(
    path: Path, name: str, columns: Mapping[str, str], check: RowCheck | None = None
) -> tuple[int, list[str]]:
    """(rows, problems) of one local data file, read in full in one streaming pass: one line naming the file and
    its first problem (invalid JSON, a row without a required column, `check`'s problem with a row), or that it
    holds no rows."""
    rows, problem = _READERS[local_suffix(path)](path, name, columns, check)
    if problem:
        return rows, [problem]
    if rows == 0:
        return 0, [f"{name}={path}: no data rows (an empty file); a row needs the columns {list(columns)}"]
    return rows, []


def holdout_problems(cfg: Mapping[str, Any], rows: int) -> list[str]:
    """`task.val_fraction` in (0, 1), and (local rows known) a hold-out that leaves both splits non-empty, as
    `datasets.train_test_split` requires: ceil(f·n) validation rows, the rest training rows."""
    if cfg.get("dataset") and cfg.get("val_split"):
        return []
    frac = cfg.get("val_fraction", 0.1)
    if not (isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0 < frac < 1):
        return [f"task.val_fraction must be a number in (0, 1) (the held-out share of the rows), got {frac!r}"]
    if cfg.get("max_samples"):
        rows = min(rows, int(cfg["max_samples"]))
    n_val = math.ceil(frac * rows)
    if rows and (n_val < 1 or rows - n_val < 1):
        return [
            f"task.val_fraction={frac} of {rows} data rows leaves {rows - n_val} for training and {n_val} for "
            "validation; give at least 2 rows (both splits need one)"
        ]
    return []


def check_data_source(
    cfg: Mapping[str, Any], keys: Mapping[str, str | None] | None = None, check: RowCheck | None = None
) -> list[str]:
    """A task needs `task.data_files` (local) or `task.dataset` (hub name); local files must exist, have a known
    suffix and parse in full with the columns `keys` names ({task key: default column}; None: optional), every row
    passing `check`. A hub dataset cannot be read offline: it is checked when it loads."""
    files, dataset = cfg.get("data_files"), cfg.get("dataset")
    if not files and not dataset:
        return ["task.data_files (a local JSONL/CSV path) or task.dataset (a hub dataset name) is required"]
    problems = []
    if cfg.get("max_samples") is not None:
        problems += pos_int(cfg["max_samples"], "task.max_samples")
    columns = _columns(cfg, keys or {})
    rows = 0
    for f in [files] if isinstance(files, str) else list(files or []):
        path = Path(f).expanduser()
        if not path.is_file():
            problems.append(f"task.data_files={f}: file not found")
        elif local_suffix(path) not in LOCAL_FORMATS:
            allowed = sorted(LOCAL_FORMATS) + [f"{s}.gz" for s in sorted(LOCAL_FORMATS) if s != ".parquet"]
            problems.append(f"task.data_files={f}: suffix {''.join(path.suffixes)!r} unknown; allowed: {allowed}")
        else:
            n, found = check_file_content(path, "task.data_files", columns, check)
            rows, problems = rows + n, problems + found
    if not problems:
        problems += holdout_problems(cfg, rows if files else 0)
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
