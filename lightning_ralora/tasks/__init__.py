"""Tasks: data + loss + metrics, selected by `task.name`."""

from lightning_ralora.tasks.base import Task
from lightning_ralora.tasks.classification import ClassificationTask
from lightning_ralora.tasks.image_classification import ImageClassificationTask
from lightning_ralora.tasks.planted import PlantedTask
from lightning_ralora.tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (PlantedTask, SFTTask, ClassificationTask, ImageClassificationTask)}

__all__ = ["TASKS", "ClassificationTask", "ImageClassificationTask", "PlantedTask", "SFTTask", "Task"]
