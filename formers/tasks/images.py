"""Image classification on offline grey-scale images: Fashion-MNIST (the vision benchmark of issue 6) and
scikit-learn's 8x8 digits (for fast tests).

Components: the task `image_classification` (baseline) and its batch augmentations `random_crop`, `random_flip`
(vectorised over the batch, drawn from the trainer's generator, so a run is reproducible and resumable).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.data.sources import get_source, load_images
from formers.registry import FormersError, _hint, register
from formers.tasks.base import Task

# Per data set: image side, pixel scale (max value), default held-out validation size, the standard augmentation
# (crop padding in pixels, horizontal flips) and, where there is no official test split, the test images held out.
DATASETS: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"side": 28, "scale": 255.0, "val_size": 5000, "crop_pad": 2, "flip": True, "test_size": None,
                      "num_classes": 10},
    "digits": {"side": 8, "scale": 16.0, "val_size": 297, "crop_pad": 1, "flip": False, "test_size": 297,
               "num_classes": 10},
}
AUGMENTS = ("none", "standard")
SPLITS = ("train", "val", "test")


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad every image by `pad` pixels on each side, then crop it back to (H, W) at a random offset in
    [0, 2 pad] per axis, independently per image. (B, C, H, W) -> (B, C, H, W); pad 0 is the identity."""
    if pad < 0:
        raise FormersError(f"task.crop_pad: must be >= 0, got {pad}")
    if pad == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H + 2p, W + 2p, C)
    off = torch.randint(2 * pad + 1, (2, B), generator=generator)
    rows = off[0][:, None] + torch.arange(H)  # (B, H)
    cols = off[1][:, None] + torch.arange(W)  # (B, W)
    out = padded[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability p. (B, C, H, W) -> (B, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=generator) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@register("task", "image_classification", paper="baseline")
class ImageClassification(Task):
    """Grey-image classification: Fashion-MNIST or sklearn's 8x8 digits, with crop/flip augmentation.

    Splits: `fashion_mnist` = 60k train minus `val_size` (5,000) held out as val (seeded by `seed`), test = the
    official 10k test set; `digits` = 1,797 images, a fixed 297 held out as test (independent of `seed`), `val_size`
    (297) as val, the rest (1,203) train.

    Batches {"x": (B, 1, H, W) float, "y": (B,) long}. Pixels are scaled to [0, 1] and normalised with the mean and
    standard deviation of the training split (one scalar each). `augment: standard` = random crop with `crop_pad`
    pixels of zero padding (2 for fashion_mnist, 1 for digits by default) + horizontal flip (fashion_mnist only);
    the padding is black (0 before normalisation), as in torchvision's RandomCrop before Normalize. Loss:
    cross-entropy (optionally label-smoothed in training); metric: val_acc (higher is better).
    """

    metric = "val_acc"
    mode = "max"

    def __init__(self, dataset: str = "fashion_mnist", val_size: int | None = None, augment: str = "none",
                 crop_pad: int | None = None, flip: bool | None = None, label_smoothing: float = 0.0, seed: int = 0,
                 eval_batch_size: int = 500, eval_limit: int | None = None):
        if dataset not in DATASETS:
            raise FormersError(f"task.dataset: unknown image data set '{dataset}'{_hint(dataset, DATASETS)}; "
                               f"choices: {', '.join(DATASETS)}")
        get_source(dataset)
        if augment not in AUGMENTS:
            raise FormersError(f"task.augment: unknown '{augment}'{_hint(augment, AUGMENTS)}; choices: "
                               f"{', '.join(AUGMENTS)}")
        spec = DATASETS[dataset]
        self.dataset, self.augment, self.seed = dataset, augment, seed
        self.val_size = spec["val_size"] if val_size is None else val_size
        self.crop_pad = spec["crop_pad"] if crop_pad is None else crop_pad
        self.flip = spec["flip"] if flip is None else flip
        if self.val_size < 1:
            raise FormersError(f"task.val_size: must be >= 1, got {self.val_size}")
        if self.crop_pad < 0:
            raise FormersError(f"task.crop_pad: must be >= 0, got {self.crop_pad}")
        if not 0.0 <= label_smoothing < 1.0:
            raise FormersError(f"task.label_smoothing: must be in [0, 1), got {label_smoothing}")
        if eval_batch_size < 1:
            raise FormersError(f"task.eval_batch_size: must be >= 1, got {eval_batch_size}")
        self.label_smoothing = label_smoothing
        self.eval_batch_size, self.eval_limit = eval_batch_size, eval_limit
        self.side, self.scale, self.num_classes = spec["side"], spec["scale"], spec["num_classes"]
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mean = self.std = 0.0

    # -- data ----------------------------------------------------------------------------------------------------
    def model_defaults(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "in_chans": 1, "img_size": self.side}

    def prepare(self) -> None:
        """Load the arrays, hold out val (and test where there is no official one), compute the train statistics."""
        if self._splits is not None:
            return
        arrays = load_images(self.dataset)
        images, labels = arrays["train_images"], arrays["train_labels"]
        splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        test_size = DATASETS[self.dataset]["test_size"]
        if "test_images" in arrays:
            splits["test"] = (arrays["test_images"], arrays["test_labels"])
        else:  # a fixed test split, independent of `seed`, so every run scores the same images
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
            test, rest = perm[:test_size].sort().values, perm[test_size:].sort().values
            splits["test"] = (images[test], labels[test])
            images, labels = images[rest], labels[rest]
        if self.val_size >= len(images):
            raise FormersError(f"task.val_size: {self.val_size} leaves no training images of {self.dataset} "
                               f"({len(images)} available); use a smaller val_size")
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val, train = perm[: self.val_size].sort().values, perm[self.val_size:].sort().values
        splits["val"] = (images[val], labels[val])
        splits["train"] = (images[train], labels[train])
        self._splits = {k: (x[:, None].contiguous(), y) for k, (x, y) in splits.items()}  # (n, 1, H, W) uint8
        pixels = self._splits["train"][0].double() / self.scale
        self.mean, self.std = float(pixels.mean()), float(pixels.std())

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (n, 1, H, W), int64 labels (n,)) of 'train', 'val' or 'test'."""
        if name not in SPLITS:
            raise FormersError(f"split must be one of {', '.join(SPLITS)}, got '{name}'")
        self.prepare()
        return self._splits[name]

    def images(self, split: str, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Float images (B, 1, H, W) of `split` at `idx`, augmented when a generator is given and augment is on."""
        x = self.split(split)[0][idx].float() / self.scale
        if generator is not None and self.augment == "standard":
            x = random_crop(x, self.crop_pad, generator)
            if self.flip:
                x = random_flip(x, generator)
        return (x - self.mean) / self.std

    def train_size(self) -> int:
        return len(self.split("train")[1])

    def train_batch(self, batch_size, generator):
        idx = torch.randint(self.train_size(), (batch_size,), generator=generator)
        return {"x": self.images("train", idx, generator), "y": self.split("train")[1][idx]}

    def count(self, batch):
        """Images in a batch (the trainer's `tokens_per_s` is images/s for this task)."""
        return batch["x"].shape[0]

    # -- loss and metrics ----------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"], label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model, limit=None, split: str = "val"):
        """Accuracy and mean cross-entropy (no smoothing, no augmentation) on the first `limit` images of `split`."""
        was = model.training
        model.eval()
        y_all = self.split(split)[1]
        n = len(y_all) if limit is None else min(len(y_all), limit)
        correct, loss_sum = 0, 0.0
        for i in range(0, n, self.eval_batch_size):
            idx = torch.arange(i, min(i + self.eval_batch_size, n))
            logits, y = model(self.images(split, idx)), y_all[idx]
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        model.train(was)
        return {f"{split}_acc": correct / max(n, 1), f"{split}_loss": loss_sum / max(n, 1)}


__all__ = ["ImageClassification", "random_crop", "random_flip", "DATASETS"]
