"""The task interface the trainer drives, and a generic sequence-classification task that later tasks
(Long Range Arena, vision) subclass by implementing `load(split)`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Task:
    """A task supplies batches, a loss and metrics; the trainer knows nothing else about it.

    `metric` names the validation metric used for early stopping and `mode` says whether lower or higher is better.
    """

    metric = "val_loss"
    mode = "min"

    def model_defaults(self) -> dict[str, Any]:
        """Model options implied by the data (vocab, max_len, num_classes); the recipe may override them."""
        return {}

    def prepare(self) -> None:
        """Load or generate the data; raises FormersError naming `formers data fetch ...` when it is missing."""

    def train_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens in a batch, for throughput."""
        return batch["x"].numel()

    def train_size(self) -> int:
        """Number of training examples (for `train.epochs`)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, limit: int | None = None) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, model: nn.Module, **kw) -> str | None:
        """A short qualitative sample of the model's output, or None."""
        return None


class ClassificationTask(Task):
    """Sequence (or token) classification from integer inputs. Subclasses implement `load(split)` returning
    `(x (n, N) long, y (n,) or (n, N) long, mask (n, N) bool or None)` for split in {'train', 'val', 'test'};
    token-level labels use -100 for ignored positions. Loss: cross-entropy; metric: accuracy."""

    metric = "val_acc"
    mode = "max"
    num_classes = 2
    vocab = 256

    def __init__(self, eval_batch_size: int = 64):
        self.eval_batch_size = eval_batch_size
        self._splits: dict[str, tuple] = {}

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def split(self, name: str):
        if name not in self._splits:
            self._splits[name] = self.load(name)
        return self._splits[name]

    def model_defaults(self) -> dict[str, Any]:
        x = self.split("train")[0]
        return {"vocab": self.vocab, "num_classes": self.num_classes, "max_len": x.shape[1]}

    def train_size(self) -> int:
        return len(self.split("train")[0])

    def _batch(self, split: str, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y, mask = self.split(split)
        batch = {"x": x[idx], "y": y[idx]}
        if mask is not None:
            batch["mask"] = mask[idx]
        return batch

    def train_batch(self, batch_size, generator):
        idx = torch.randint(self.train_size(), (batch_size,), generator=generator)
        return self._batch("train", idx)

    def loss(self, model, batch):
        logits = model(batch["x"], mask=batch.get("mask"))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["y"].reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def evaluate(self, model, limit=None, split: str = "val"):
        was = model.training
        model.eval()
        x = self.split(split)[0]
        n = len(x) if limit is None else min(len(x), limit)
        correct = total = 0
        loss_sum = 0.0
        for i in range(0, n, self.eval_batch_size):
            b = self._batch(split, torch.arange(i, min(i + self.eval_batch_size, n)))
            logits = model(b["x"], mask=b.get("mask"))
            y = b["y"].reshape(-1)
            flat = logits.reshape(-1, logits.shape[-1])
            keep = y != -100
            loss_sum += F.cross_entropy(flat[keep], y[keep], reduction="sum").item()
            correct += (flat[keep].argmax(-1) == y[keep]).sum().item()
            total += int(keep.sum())
        model.train(was)
        return {f"{split}_acc": correct / max(total, 1), f"{split}_loss": loss_sum / max(total, 1)}
