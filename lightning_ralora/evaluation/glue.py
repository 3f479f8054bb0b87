"""GLUE validation scores of a sequence classifier (`eval=glue`, `eval.glue_task=<task>`), with the official
metrics computed by torchmetrics.

Per task (all metrics as fractions in [0, 1]; a GLUE table shows them x100):
  cola: mcc (Matthews correlation)                 score = mcc
  stsb: pearson, spearman                          score = (pearson + spearman) / 2
  mrpc, qqp: f1 (binary, positive class 1), accuracy score = (f1 + accuracy) / 2
  mnli: accuracy_matched, accuracy_mismatched      score = (accuracy_matched + accuracy_mismatched) / 2
  sst2, qnli, rte, wnli: accuracy                  score = accuracy
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_ralora.evaluation.base import EvalDataError, read_rows, register_classification_suite
from lightning_ralora.tasks.classification import GLUE_HUB, GLUE_TASKS, glue_task_name

# the eight tasks the GLUE average is taken over: GLUE without WNLI (whose dev set is adversarial and which T5/BERT
# style tables leave out)
GLUE_AVERAGE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
SPLIT_SUFFIX = {"validation_matched": "matched", "validation_mismatched": "mismatched"}


def split_metrics(task: str, predictions: Sequence[float] | torch.Tensor, labels: Sequence[float] | torch.Tensor):
    """The official metrics of one GLUE task on one split, from predicted classes (STS-B: predicted scores)."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
    from torchmetrics.functional.classification import binary_f1_score, binary_matthews_corrcoef

    task = glue_task_name(task)
    if GLUE_TASKS[task].num_labels == 1:
        p, y = torch.as_tensor(predictions, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64)
        return {"pearson": float(pearson_corrcoef(p, y)), "spearman": float(spearman_corrcoef(p, y))}
    p, y = torch.as_tensor(predictions, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
    if task == "cola":
        return {"mcc": float(binary_matthews_corrcoef(p, y))}
    out = {"accuracy": float((p == y).double().mean()) if len(y) else 0.0}
    if task in ("mrpc", "qqp"):
        out["f1"] = float(binary_f1_score(p, y))
    return out


def glue_score(task: str, metrics: Mapping[str, float]) -> float:
    """The single number a GLUE table shows for a task (see the module docstring)."""
    task = glue_task_name(task)
    if task == "cola":
        return float(metrics["mcc"])
    if task == "stsb":
        return (metrics["pearson"] + metrics["spearman"]) / 2
    if task in ("mrpc", "qqp"):
        return (metrics["f1"] + metrics["accuracy"]) / 2
    if task == "mnli":
        accs = [metrics[k] for k in ("accuracy_matched", "accuracy_mismatched") if k in metrics]
        return sum(accs) / len(accs)
    return float(metrics["accuracy"])


def glue_metrics(task: str, splits: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> dict[str, float]:
    """Metrics and `score` of a task from {split: (predictions, labels)}; MNLI's per-split accuracies are named
    accuracy_matched / accuracy_mismatched (split validation_matched / validation_mismatched)."""
    task = glue_task_name(task)
    out: dict[str, float] = {}
    for split, (preds, labels) in splits.items():
        metrics = split_metrics(task, preds, labels)
        if task == "mnli":
            suffix = SPLIT_SUFFIX.get(split, split)
            metrics = {f"{k}_{suffix}": v for k, v in metrics.items()}
        out.update(metrics)
    out["score"] = glue_score(task, out)
    return out


def glue_average(per_task_scores: Mapping[str, float]) -> float:
    """The GLUE average of a results table (RaLoRA's T5-Base table, "GLUE Avg"): the unweighted mean of the
    per-task scores (`glue_score`: CoLA MCC, STS-B mean of Pearson/Spearman, MRPC/QQP mean of F1/accuracy, MNLI mean
    of matched/mismatched accuracy, else accuracy) over the eight tasks CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI
    and RTE; WNLI is not part of the average (a score for it is ignored). Raises ValueError when one of the eight is
    missing, since an average over fewer tasks is not comparable with the table."""
    scores = {glue_task_name(k): float(v) for k, v in per_task_scores.items()}
    missing = [t for t in GLUE_AVERAGE_TASKS if t not in scores]
    if missing:
        raise ValueError(f"glue_average needs all of {list(GLUE_AVERAGE_TASKS)}; missing {missing}")
    return sum(scores[t] for t in GLUE_AVERAGE_TASKS) / len(GLUE_AVERAGE_TASKS)


def _local_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path).expanduser()
    if path.suffix in (".jsonl", ".json"):
        return read_rows(path)
    if not path.is_file():
        raise EvalDataError(f"eval.data_files={path}: file not found")
    import datasets

    fmt = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if fmt is None:
        raise EvalDataError(f"eval.data_files={path}: suffix {path.suffix!r} unknown; allowed: .jsonl .json .csv .tsv")
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    return list(datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs))


def glue_rows(task: str, eval_cfg: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{split: rows} of a task's validation data: `eval.data_files` (a path, or {split: path}, MNLI:
    validation_matched/validation_mismatched; either may sit under the key `glue` of the runner's {suite: file}
    map) or the hub (`nyu-mll/glue`, config = task, its validation split(s))."""
    spec = GLUE_TASKS[task]
    files = eval_cfg.get("data_files")
    if isinstance(files, Mapping) and "glue" in files:  # the runner's {suite: file} form
        files = files["glue"]
    if files:
        named = dict(files) if isinstance(files, Mapping) else {spec.val_splits[0]: files}
        rows = {split: _local_rows(path) for split, path in named.items()}
    else:
        import datasets

        hub = eval_cfg.get("dataset") or GLUE_HUB
        rows = {s: list(datasets.load_dataset(hub, task, split=s)) for s in eval_cfg.get("splits") or spec.val_splits}
    need = [k for k in (spec.text_key, spec.text_pair_key, "label") if k]
    for split, split_rows in rows.items():
        for i, row in enumerate(split_rows, start=1):
            if any(k not in row for k in need):
                raise EvalDataError(f"glue {task} {split}: row {i} lacks {[k for k in need if k not in row]}")
        if eval_cfg.get("max_samples"):
            rows[split] = split_rows[: int(eval_cfg["max_samples"])]
    return rows


def _local_files(eval_cfg: Mapping[str, Any]) -> list[Any]:
    """The local files of `eval.data_files` for GLUE: one path, {split: path}, or either under the key `glue`."""
    files = eval_cfg.get("data_files")
    if isinstance(files, Mapping) and "glue" in files:
        files = files["glue"]
    if not files:
        return []
    return list(files.values()) if isinstance(files, Mapping) else [files]


def _peek_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a local GLUE file read without `datasets` (no progress bars, no cache): JSON/JSONL as the suites
    read them, CSV/TSV by the csv module; a Parquet file as one row of its footer's column names (none if empty)."""
    path = Path(path).expanduser()
    if path.suffix in (".jsonl", ".json"):
        return read_rows(path)
    if not path.is_file():
        raise EvalDataError(f"eval.data_files={path}: file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path)
        return [dict.fromkeys(meta.schema_arrow.names)] if meta.metadata.num_rows else []  # its columns, if any row
    if path.suffix not in (".csv", ".tsv"):
        raise EvalDataError(f"eval.data_files={path}: suffix {path.suffix!r} unknown; allowed: .jsonl .json .csv .tsv")
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))


def check_glue_data(eval_cfg: Mapping[str, Any]) -> None:
    """Before any model loads: every local GLUE file exists, parses and holds rows (with `eval.glue_task`'s columns
    when it is set; the run's task.glue_task is checked when the suite runs)."""
    task = glue_task_name(eval_cfg["glue_task"]) if eval_cfg.get("glue_task") else None
    need = [k for k in (GLUE_TASKS[task].text_key, GLUE_TASKS[task].text_pair_key, "label") if k] if task else []
    for path in _local_files(eval_cfg):
        rows = _peek_rows(path)
        if not rows:
            raise EvalDataError(f"eval.data_files={path}: no data rows (an empty file)")
        for i, row in enumerate(rows, start=1):
            if any(k not in row for k in need):
                raise EvalDataError(f"eval.data_files={path}: row {i} lacks {[k for k in need if k not in row]}")


@torch.no_grad()
def predict_rows(module: Any, task: str, rows: Sequence[Mapping[str, Any]], batch_size: int = 32) -> list[float]:
    """The module's predictions on GLUE rows: classes (argmax), or STS-B scores (the regression output)."""
    spec, ctask = GLUE_TASKS[task], module.task
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        items = [
            {
                "input_ids": ctask.encode(
                    str(r[spec.text_key]), str(r[spec.text_pair_key]) if spec.text_pair_key else None
                ),
                "label": 0.0 if spec.num_labels == 1 else 0,
            }
            for r in chunk
        ]
        batch = ctask.collate(items)
        batch.pop("labels")
        batch = {k: v.to(module.device) for k, v in batch.items()}
        logits = module.backbone(**batch).logits
        preds = logits[..., 0].float() if spec.num_labels == 1 else logits.argmax(-1)
        out += preds.cpu().tolist()
    return out


@register_classification_suite("glue", check=check_glue_data)
def evaluate_glue(module: Any, eval_cfg: Mapping[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score the module on `eval.glue_task`'s validation data (defaults to the module's `task.glue_task`); records
    per example: split, text, text_pair, label, prediction, correct (None for STS-B: a regression has no
    per-example correctness)."""
    name = eval_cfg.get("glue_task") or module.task.cfg.get("glue_task")
    if not name:
        raise ValueError("eval.glue_task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) is required")
    task = glue_task_name(name)
    spec = GLUE_TASKS[task]
    if module.task.cfg.get("num_labels") != spec.num_labels:
        raise ValueError(
            f"eval.glue_task={task} has {spec.num_labels} label(s) but the model was trained with "
            f"task.num_labels={module.task.cfg.get('num_labels')}"
        )
    records: list[dict[str, Any]] = []
    splits = {}
    for split, rows in glue_rows(task, eval_cfg).items():
        rows = [r for r in rows if spec.num_labels == 1 or int(r["label"]) >= 0]  # -1: an unlabelled (test) row
        preds = predict_rows(module, task, rows, int(eval_cfg.get("batch_size") or 32))
        labels = [float(r["label"]) if spec.num_labels == 1 else int(r["label"]) for r in rows]
        splits[split] = (preds, labels)
        for r, p, y in zip(rows, preds, labels, strict=True):
            records.append(
                {
                    "split": split,
                    "text": r[spec.text_key],
                    "text_pair": r[spec.text_pair_key] if spec.text_pair_key else None,
                    "label": y,
                    "prediction": p,
                    "correct": None if spec.num_labels == 1 else p == y,
                }
            )
    metrics = glue_metrics(task, splits)
    metrics["n"] = float(len(records))
    return metrics, records
