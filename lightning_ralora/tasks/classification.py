"""Sequence classification (and STS-B-style regression) from CSV/JSONL or the hub, with torchmetrics metrics.

`num_labels >= 2`: cross-entropy on integer labels; validation reports acc, f1 (macro), mcc and, for two labels,
f1_binary (positive class 1, GLUE's MRPC/QQP F1). `num_labels == 1`: regression (MSE on float labels, HF's
`problem_type="regression"`); validation reports pearson and spearman. `glue_task` (cola, sst2, mrpc, qqp, stsb,
mnli, qnli, rte, wnli) sets the text columns, num_labels and, on the hub GLUE dataset, the config and validation
split. Models that pool at the last EOS token (T5/BART `*ForSequenceClassification`) get an EOS on every example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_ralora.adapters.schema import is_int, pos_int
from lightning_ralora.data.datamodule import ListDataModule
from lightning_ralora.data.tokenizer import load_tokenizer
from lightning_ralora.modules.backbone import load_config
from lightning_ralora.tasks.base import Task
from lightning_ralora.tasks.text_data import EncodedText, check_data_source, tokenizer_key


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text columns, label count (1: regression) and validation split(s) on the hub."""

    text_key: str
    text_pair_key: str | None
    num_labels: int
    val_splits: tuple[str, ...] = ("validation",)


GLUE_HUB = "nyu-mll/glue"
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, 2),
    "sst2": GlueTask("sentence", None, 2),
    "mrpc": GlueTask("sentence1", "sentence2", 2),
    "qqp": GlueTask("question1", "question2", 2),
    "stsb": GlueTask("sentence1", "sentence2", 1),
    "mnli": GlueTask("premise", "hypothesis", 3, ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("question", "sentence", 2),
    "rte": GlueTask("sentence1", "sentence2", 2),
    "wnli": GlueTask("sentence1", "sentence2", 2),
}
# *ForSequenceClassification of these model types pools the hidden state at the last EOS token and raises when an
# example has none (or when examples hold different numbers of them)
EOS_POOLED_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "plbart")


def glue_task_name(name: str) -> str:
    """The canonical GLUE task name (`SST-2` -> `sst2`); ValueError for an unknown one."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"GLUE task {name!r} is unknown; allowed: {sorted(GLUE_TASKS)}")
    return key


def resolve_glue(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The task config with `glue_task` applied: its text columns, `label` and num_labels win over the yaml's;
    on the hub GLUE dataset (`nyu-mll/glue` or `glue`) it also sets dataset_config and val_split (MNLI: matched)."""
    out = dict(cfg)
    if not out.get("glue_task"):
        return out
    name = glue_task_name(out["glue_task"])
    spec = GLUE_TASKS[name]
    out.update(glue_task=name, text_key=spec.text_key, text_pair_key=spec.text_pair_key, num_labels=spec.num_labels)
    out["label_key"] = "label"
    if out.get("dataset") in (GLUE_HUB, "glue"):
        out["dataset_config"], out["val_split"] = name, spec.val_splits[0]
    return out


def eos_pooled(model_cfg: Mapping[str, Any]) -> bool:
    """Whether the backbone's sequence classifier pools at the EOS token (T5/BART families)."""
    if model_cfg.get("config"):
        model_type = dict(model_cfg["config"]).get("model_type")
    elif model_cfg.get("pretrained"):
        model_type = load_config(model_cfg).model_type
    else:
        return False
    return model_type in EOS_POOLED_TYPES


def _as_int(value: Any) -> int | None:
    """A label as the integer it denotes (1, 1.0, "1", " 1.0 "), or None (a bool, a word, a fraction)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() else None


def _as_number(value: Any) -> float | None:
    """A regression label as a finite float, or None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def label_check(num_labels: int, label_key: str) -> Callable[[Mapping[str, Any]], str | None]:
    """The data check of one row's label: an integer in [0, num_labels), or (num_labels 1, regression) a number;
    the problem names the value and the allowed labels."""
    if num_labels == 1:
        allowed = "a finite number (task.num_labels=1: regression)"
    else:
        allowed = f"the integers 0..{num_labels - 1} (task.num_labels={num_labels})"

    def check(row: Mapping[str, Any]) -> str | None:
        value = row.get(label_key)
        if num_labels == 1:
            ok = _as_number(value) is not None
        else:
            label = _as_int(value)
            ok = label is not None and 0 <= label < num_labels
        return None if ok else f"has label {value!r} (column {label_key!r}, task.label_key); allowed: {allowed}"

    return check


def _scalar(value: Any) -> Any:
    """A label as a Python number (a 0-d tensor from a torch-formatted dataset, or the number itself)."""
    return value.item() if isinstance(value, torch.Tensor) else value


class ClassificationTask(Task):
    """`task=classification`: cross-entropy on `label` (acc, macro-F1, MCC [, binary F1]) or, with num_labels 1,
    MSE regression on a float `label` (Pearson, Spearman)."""

    name = "classification"
    loads_tokenizer = True
    objective = ("val/acc", "maximize")  # regression (num_labels 1) logs no acc: see conf/task/classification.yaml
    families = ("seq_classification",)
    # the freshly initialised head of transformers' *ForSequenceClassification: BERT/RoBERTa/DeBERTa/ViT
    # `classifier`, LLaMA/Gemma/GPT `score`, T5/BART `classification_head`
    head_modules = ("classifier", "score", "classification_head")

    @classmethod
    def validate(cls, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
        problems = []
        if cfg.get("glue_task"):
            try:
                glue_task_name(cfg["glue_task"])
            except ValueError:
                return [f"task.glue_task={cfg['glue_task']!r} is unknown; allowed: {sorted(GLUE_TASKS)}"]
        cfg = resolve_glue(cfg)
        keys = {"text_key": "text", "label_key": "label", "text_pair_key": None}
        problems += super().validate(cfg, model_cfg) + pos_int(cfg.get("max_length"), "task.max_length")
        if not (is_int(cfg.get("num_labels")) and cfg["num_labels"] >= 1):
            problems.append(f"task.num_labels must be an integer >= 1 (1: regression), got {cfg.get('num_labels')!r}")
            return problems + check_data_source(cfg, keys)
        return problems + check_data_source(cfg, keys, label_check(cfg["num_labels"], cfg.get("label_key", "label")))

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int = 0) -> None:
        super().__init__(resolve_glue(cfg), model_cfg, seed)
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer"))
        self.regression = self.cfg["num_labels"] == 1
        self.needs_eos = eos_pooled(model_cfg)
        if self.needs_eos and self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"model.tokenizer={model_cfg.get('tokenizer')!r} has no eos token, but this model's sequence "
                "classifier pools at the EOS token"
            )

    def extra_model_config(self) -> dict[str, Any]:
        extra = {
            "num_labels": self.cfg["num_labels"],
            "pad_token_id": self.tokenizer.pad_token_id,
            "problem_type": "regression" if self.regression else "single_label_classification",
        }
        if self.needs_eos:  # the pooling token must be the one the tokenizer appends
            extra["eos_token_id"] = self.tokenizer.eos_token_id
        return extra

    def encode(self, text: str, pair: str | None = None) -> list[int]:
        """Token ids of one example (pair: a second text), truncated to max_length; an EOS ends it when needed."""
        n = self.cfg["max_length"]
        ids = list(self.tokenizer(text, pair, truncation=True, max_length=n)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if self.needs_eos and (not ids or ids[-1] != eos):
            ids = ids[: n - 1] + [eos]
        return ids or [self.tokenizer.pad_token_id]

    def label(self, value: Any) -> float | int:
        """A data row's label as the loss needs it: float (regression) or an int in [0, num_labels)."""
        if self.regression:
            return float(value)
        label, k = _as_int(value), self.cfg["num_labels"]  # the rule `label_check` applied before any compute
        if label is None or not 0 <= label < k:
            raise ValueError(f"task.label_key={self.cfg.get('label_key', 'label')!r}: label {value!r} outside [0, {k})")
        return label

    def encode_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One data row as {input_ids, label}: `encode` of its text (and pair, GLUE), `label` of its label."""
        tk, lk, pk = self.cfg.get("text_key", "text"), self.cfg.get("label_key", "label"), self.cfg.get("text_pair_key")
        return {"input_ids": self.encode(str(row[tk]), str(row[pk]) if pk else None), "label": self.label(row[lk])}

    def encoding_key(self) -> dict[str, Any]:
        """Everything besides the data that changes `encode_row`'s output (names the encoding cache)."""
        keys = ("max_length", "text_key", "text_pair_key", "label_key", "num_labels")
        return {
            "task": self.name,
            "tokenizer": tokenizer_key(self.tokenizer),
            "needs_eos": self.needs_eos,
            **{k: self.cfg.get(k) for k in keys},
        }

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of {input_ids, label} into a batch with attention_mask and `labels` (float for regression)."""
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")  # renames `label` to `labels`
        batch = pad([{"input_ids": list(map(int, it["input_ids"])), "label": _scalar(it["label"])} for it in items])
        if self.regression:
            batch["labels"] = batch["labels"].float()
        return batch

    def datamodule(self) -> L.LightningDataModule:
        """Rows encoded by `encode_row`, once per node (Dataset.map cache; see EncodedText)."""
        source = EncodedText(self.cfg, self.seed, self.encode_row, self.encoding_key(), ("input_ids",))
        return ListDataModule(
            None, None, self.cfg["batch_size"], collate_fn=self.collate, seed=self.seed, source=source
        )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def metrics(self) -> nn.Module:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            BinaryF1Score,
            MulticlassAccuracy,
            MulticlassF1Score,
            MulticlassMatthewsCorrCoef,
        )
        from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

        k = self.cfg["num_labels"]
        if self.regression:
            return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
        metrics = {
            "acc": MulticlassAccuracy(k, average="micro"),
            "f1": MulticlassF1Score(k, average="macro"),
            "mcc": MulticlassMatthewsCorrCoef(k),
        }
        if k == 2:
            metrics["f1_binary"] = BinaryF1Score()
        return MetricCollection(metrics)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Predictions from logits: the score (regression, float) or the argmax class."""
        return logits[..., 0].float() if self.regression else logits.argmax(-1)

    def update_metrics(self, metrics: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        metrics.update(self.predict(model(**batch).logits), batch["labels"])
