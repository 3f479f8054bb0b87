"""Top-1 accuracy of an image classifier on a data set's test split (`eval=image`): the SDS-LoRA / RaLoRA vision
data sets by name (`eval.dataset=cars`), any hub image dataset, or a local image folder (`eval.data_dir`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_ralora.evaluation.base import EvalDataError, register_classification_suite
from lightning_ralora.tasks.image_classification import folder_classes


@dataclass(frozen=True)
class ImageDataset:
    """A hub image classification data set: its path, evaluation split and column names."""

    path: str
    split: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    num_labels: int | None = None


# hub copies of the papers' vision data sets (names and columns not verified offline: check before a real run;
# eval.dataset may also be any hub path, with eval.split / eval.image_key / eval.label_key)
IMAGE_DATASETS: dict[str, ImageDataset] = {
    "cars": ImageDataset("tanganke/stanford_cars", num_labels=196),
    "cub200": ImageDataset("bentrevett/caltech-ucsd-birds-200-2011", num_labels=200),
    "dtd": ImageDataset("tanganke/dtd", num_labels=47),
    "food101": ImageDataset("ethz/food101", split="validation", num_labels=101),  # food101 has no test split
    "sun397": ImageDataset("tanganke/sun397", num_labels=397),
}


def image_eval_data(eval_cfg: Mapping[str, Any]):
    """(dataset, image column, label column) of the evaluation split: `eval.data_dir` (imagefolder; its `test`
    split, or `eval.split`, or the whole folder when it has one split) or `eval.dataset` (a key of
    IMAGE_DATASETS or a hub path)."""
    import datasets

    split = eval_cfg.get("split")
    image_key, label_key = eval_cfg.get("image_key"), eval_cfg.get("label_key")
    if eval_cfg.get("data_dir"):
        path = Path(eval_cfg["data_dir"]).expanduser()
        if not path.is_dir():
            raise EvalDataError(f"eval.data_dir={path}: directory not found")
        dd = datasets.load_dataset("imagefolder", data_dir=str(path))
        name = split or ("test" if "test" in dd else next(iter(dd)))
        if name not in dd:
            raise EvalDataError(f"eval.data_dir={path}: no split {name!r}; it has {list(dd)}")
        return dd[name], image_key or "image", label_key or "label"
    if not eval_cfg.get("dataset"):
        raise ValueError(f"eval.dataset ({sorted(IMAGE_DATASETS)} or a hub path) or eval.data_dir is required")
    spec = IMAGE_DATASETS.get(str(eval_cfg["dataset"]).lower(), ImageDataset(str(eval_cfg["dataset"])))
    ds = datasets.load_dataset(spec.path, eval_cfg.get("dataset_config"), split=split or spec.split)
    return ds, image_key or spec.image_key, label_key or spec.label_key


def check_image_data(eval_cfg: Mapping[str, Any]) -> None:
    """Before any model loads: a local `eval.data_dir` exists and holds class folders."""
    if not eval_cfg.get("data_dir"):
        return
    path = Path(eval_cfg["data_dir"]).expanduser()
    if not path.is_dir():
        raise EvalDataError(f"eval.data_dir={path}: directory not found")
    if not folder_classes(path):
        raise EvalDataError(f"eval.data_dir={path}: no class folders (<data_dir>/<class>/*.png, or under test/)")


@register_classification_suite("image", check=check_image_data)
@torch.no_grad()
def evaluate_image(module: Any, eval_cfg: Mapping[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Top-1 accuracy (`accuracy`, a fraction) and n; records per example: index, label, prediction, correct."""
    from torchmetrics.functional.classification import multiclass_accuracy

    ds, image_key, label_key = image_eval_data(eval_cfg)
    if eval_cfg.get("max_samples"):
        ds = ds.select(range(min(len(ds), int(eval_cfg["max_samples"]))))
    missing = [c for c in (image_key, label_key) if c not in ds.column_names]
    if missing:
        raise EvalDataError(f"image eval data has no column {missing}; its columns: {ds.column_names}")
    batch_size = int(eval_cfg.get("batch_size") or 32)
    preds: list[int] = []
    labels: list[int] = []
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        pixels = module.task.pixel_values(rows[image_key]).to(module.device)
        preds += module.backbone(pixel_values=pixels).logits.argmax(-1).cpu().tolist()
        labels += [int(y) for y in rows[label_key]]
    k = int(module.task.cfg["num_labels"])
    acc = float(multiclass_accuracy(torch.tensor(preds), torch.tensor(labels), k, average="micro")) if labels else 0.0
    records = [
        {"index": i, "label": y, "prediction": p, "correct": p == y}
        for i, (p, y) in enumerate(zip(preds, labels, strict=True))
    ]
    return {"accuracy": acc, "n": float(len(records))}, records
