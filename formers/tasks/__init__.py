"""Tasks: offline data + loss + metrics for a model. Importing this package registers them."""

from formers.tasks import classification, forecast, images, lm_bytes, lra  # noqa: F401
from formers.tasks.base import ClassificationTask, Task

__all__ = ["ClassificationTask", "Task"]
