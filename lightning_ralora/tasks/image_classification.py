"""Image classification from a hub image dataset or a local image folder, with torchmetrics top-1 accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_ralora.adapters.schema import is_int, pos_int
from lightning_ralora.data.datamodule import ListDataModule
from lightning_ralora.modules.backbone import load_config
from lightning_ralora.tasks.base import Task


def model_image_size(model_cfg: Mapping[str, Any]) -> int:
    """The input resolution the backbone was built for (`image_size` of its config or its vision config)."""
    config = load_config(model_cfg)
    size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", None)
    return int(size or 224)


def image_processor(model_cfg: Mapping[str, Any], image_size: int | None = None):
    """The backbone's image processor: `AutoImageProcessor.from_pretrained(model.pretrained)`, or for a model built
    from `model.config` a ViTImageProcessor at the config's resolution. `image_size` resizes (and center-crops,
    for processors that crop, e.g. CLIP's) to image_size x image_size."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    if model_cfg.get("pretrained"):
        processor = AutoImageProcessor.from_pretrained(model_cfg["pretrained"])
        if image_size:
            if getattr(processor, "do_center_crop", False):
                processor.size = {"shortest_edge": int(image_size)}
                processor.crop_size = {"height": int(image_size), "width": int(image_size)}
            else:
                processor.size = {"height": int(image_size), "width": int(image_size)}
        return processor
    size = int(image_size or model_image_size(model_cfg))
    return ViTImageProcessor(size={"height": size, "width": size})


def load_image_splits(cfg: Mapping[str, Any], seed: int):
    """(train, val) `datasets.Dataset`s from `task.data_dir` (imagefolder: one sub-folder per class, optionally
    under train/ and validation/ or test/) or `task.dataset`; val is `task.val_split` when the data has it, else a
    seeded `task.val_fraction` hold-out of the train split."""
    import datasets

    if cfg.get("data_dir"):
        dd = datasets.load_dataset("imagefolder", data_dir=str(Path(cfg["data_dir"]).expanduser()))
    else:
        dd = datasets.load_dataset(cfg["dataset"], cfg.get("dataset_config"))
    train = dd[cfg.get("train_split") or "train"]
    if cfg.get("max_samples"):
        train = train.shuffle(seed=seed).select(range(min(len(train), int(cfg["max_samples"]))))
    if cfg.get("val_split") and cfg["val_split"] in dd:
        return train, dd[cfg["val_split"]]
    parts = train.train_test_split(test_size=float(cfg.get("val_fraction") or 0.1), seed=seed)
    return parts["train"], parts["test"]


SPLIT_FOLDERS = ("train", "validation", "valid", "val", "test", "dev", "eval")  # imagefolder's split names


def folder_classes(root: Path) -> list[str]:
    """The class folders of an imagefolder (under train/ when the folder is split), sorted as `datasets` labels
    them 0, 1, ..."""
    splits = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLIT_FOLDERS]
    base = root / "train" if (root / "train").is_dir() else (splits[0] if splits else root)
    return sorted(d.name for d in base.iterdir() if d.is_dir())


def folder_problems(root: Path, num_labels: int) -> list[str]:
    """An imagefolder needs class folders, at most `task.num_labels` of them (a label >= num_labels has no logit)."""
    classes = folder_classes(root)
    if not classes:
        return [f"task.data_dir={root}: no class folders (<data_dir>/<class>/*.png, optionally under train/)"]
    if len(classes) > num_labels:
        shown = classes[:5] + (["..."] if len(classes) > 5 else [])
        return [
            f"task.data_dir={root}: {len(classes)} class folders {shown} give labels 0..{len(classes) - 1}, but "
            f"task.num_labels={num_labels}; allowed: task.num_labels >= {len(classes)}"
        ]
    return []


class ImageSplits:
    """The datamodule source of an image task: `prepare` (one process per node) loads the data so downloads and
    the datasets cache are written once; `load` (every process) reads them back with the image and label columns."""

    encoded_examples = 0  # nothing is encoded ahead: images are processed per batch

    def __init__(self, cfg: Mapping[str, Any], seed: int) -> None:
        self.cfg, self.seed = dict(cfg), seed

    def prepare(self) -> None:
        load_image_splits(self.cfg, self.seed)

    def load(self) -> tuple[Any, Any]:
        train, val = load_image_splits(self.cfg, self.seed)
        keep = [self.cfg.get("image_key", "image"), self.cfg.get("label_key", "label")]
        missing = [c for c in keep if c not in train.column_names]
        if missing:
            raise ValueError(
                f"task.image_key/label_key: the data has no column {missing}; its columns: {train.column_names}"
            )
        return train.select_columns(keep), val.select_columns(keep)


class ImageClassificationTask(Task):
    """`task=image_classification`: cross-entropy on the label column, the new head trained in full; validation
    reports top-1 accuracy (`acc`)."""

    name = "image_classification"
    objective = ("val/acc", "maximize")
    families = ("image_classification", "clip_vision")
    head_modules = ("classifier",)  # ViTForImageClassification and CLIPForImageClassification

    @classmethod
    def validate(cls, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
        problems = super().validate(cfg, model_cfg)
        data_dir, dataset = cfg.get("data_dir"), cfg.get("dataset")
        if not data_dir and not dataset:
            problems.append("task.data_dir (a local image folder) or task.dataset (a hub image dataset) is required")
        elif data_dir and not Path(data_dir).expanduser().is_dir():
            problems.append(f"task.data_dir={data_dir}: directory not found")
        if not (is_int(cfg.get("num_labels")) and cfg["num_labels"] >= 2):
            problems.append(f"task.num_labels must be an integer >= 2, got {cfg.get('num_labels')!r}")
        elif data_dir and Path(data_dir).expanduser().is_dir():
            problems += folder_problems(Path(data_dir).expanduser(), cfg["num_labels"])
        if cfg.get("image_size") is not None:
            problems += pos_int(cfg["image_size"], "task.image_size")
        return problems

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int = 0) -> None:
        super().__init__(cfg, model_cfg, seed)
        self.processor = image_processor(model_cfg, self.cfg.get("image_size"))

    def extra_model_config(self) -> dict[str, Any]:
        return {"num_labels": self.cfg["num_labels"]}

    def pixel_values(self, images: list[Any]) -> torch.Tensor:
        """The processor's (N, 3, H, W) float tensor of a list of PIL images (converted to RGB)."""
        return self.processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def collate(self, items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Rows {image, label} -> {pixel_values, labels}; the images are processed here, batch by batch."""
        ik, lk, k = self.cfg.get("image_key", "image"), self.cfg.get("label_key", "label"), self.cfg["num_labels"]
        labels = torch.tensor([int(it[lk]) for it in items], dtype=torch.long)
        if ((labels < 0) | (labels >= k)).any():
            raise ValueError(f"task.label_key={lk!r}: labels {labels.tolist()} outside [0, task.num_labels={k})")
        return {"pixel_values": self.pixel_values([it[ik] for it in items]), "labels": labels}

    def datamodule(self) -> L.LightningDataModule:
        """Rows {image, label} of `load_image_splits`, loaded once per node first (hub downloads, datasets cache);
        the images are processed per batch in `collate`."""
        source = ImageSplits(self.cfg, self.seed)
        return ListDataModule(
            None, None, self.cfg["batch_size"], collate_fn=self.collate, seed=self.seed, source=source
        )

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def metrics(self) -> nn.Module:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy

        return MetricCollection({"acc": MulticlassAccuracy(self.cfg["num_labels"], average="micro")})

    def update_metrics(self, metrics: nn.Module, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
        metrics.update(model(**batch).logits.argmax(-1), batch["labels"])
