"""Training: optimizers and schedules (registered), checkpoints, the trainer."""

from formers.train import optim  # noqa: F401  (registration)
from formers.train.trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
