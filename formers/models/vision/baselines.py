"""Context baselines for the vision benchmark (issue 6): not Transformers, the yardsticks the tiny backbones are read
against on Fashion-MNIST.

Components (family `model`, paper "baseline"): `mlp_image` (a multi-layer perceptron on the flattened pixels) and
`cnn_small` (two 3x3 conv layers of 32 and 64 channels, each with BatchNorm, ReLU and 2x2 max-pooling, then one
hidden fully-connected layer). Both have the VisionModel method set; both are tied to their training size
(`other_size = None`) because their first fully-connected layer sees every pixel position.
"""

from __future__ import annotations

import torch
from torch import nn

from formers.models.vision.base import VisionModel
from formers.registry import FormersError, register


def _check(num_classes: int, in_chans: int, img_size: int) -> None:
    if num_classes < 0 or in_chans < 1 or img_size < 1:
        raise FormersError(f"need num_classes >= 0, in_chans >= 1, img_size >= 1; got {num_classes}, {in_chans}, "
                           f"{img_size}")


class MLPImage(VisionModel):
    """Flatten -> [Linear -> ReLU -> Dropout] x depth -> Linear head: 784-256-256-10 for Fashion-MNIST by default.

    forward_features: (B, C, H, W) -> (B, 1, hidden), one token (the last hidden layer); the head maps it to logits.
    Init: PyTorch's default for nn.Linear (Kaiming-uniform with a = sqrt(5)), the usual choice for ReLU MLPs.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, hidden: int = 256,
                 depth: int = 2, drop: float = 0.0):
        super().__init__()
        _check(num_classes, in_chans, img_size)
        if depth < 1 or hidden < 1:
            raise FormersError(f"mlp_image: need depth >= 1 and hidden >= 1, got depth={depth}, hidden={hidden}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.global_pool, self.other_size, self.num_features = "avg", None, hidden
        widths = [in_chans * img_size * img_size] + [hidden] * depth
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(drop)) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise FormersError(f"mlp_image: built for {self.img_size}x{self.img_size} images, got "
                               f"{x.shape[-2]}x{x.shape[-1]}; set img_size")
        x = x.flatten(1)  # (B, C*H*W)
        for layer in self.layers:
            x = self.run(layer, x)
        return x[:, None]  # (B, 1, hidden)


class CNNSmall(VisionModel):
    """Two conv stages, then a hidden fully-connected layer and the head:
    [Conv3x3(pad 1) -> BN -> ReLU -> MaxPool2] with `widths` (32, 64) channels, flatten (64 x H/4 x W/4),
    Linear(hidden 128) -> ReLU -> Dropout, Linear head.

    forward_features: (B, C, H, W) -> (B, 1, hidden). Init: PyTorch's defaults (Kaiming-uniform convs/linears,
    BN weight 1, bias 0).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, widths: tuple = (32, 64),
                 hidden: int = 128, drop: float = 0.0):
        super().__init__()
        _check(num_classes, in_chans, img_size)
        widths = tuple(widths)
        side = img_size // 2 ** len(widths)
        if not widths or side < 1:
            raise FormersError(f"cnn_small: img_size {img_size} is too small for {len(widths)} 2x poolings; use "
                               f"fewer widths or a larger img_size")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.global_pool, self.other_size, self.num_features = "avg", None, hidden
        chans = (in_chans, *widths)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2))
            for a, b in zip(chans, chans[1:]))
        self.fc = nn.Sequential(nn.Linear(widths[-1] * side * side, hidden), nn.ReLU(), nn.Dropout(drop))
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise FormersError(f"cnn_small: built for {self.img_size}x{self.img_size} images, got "
                               f"{x.shape[-2]}x{x.shape[-1]}; set img_size")
        for stage in self.stages:
            x = self.run(stage, x)  # (B, C_i, H / 2^i, W / 2^i)
        return self.fc(x.flatten(1))[:, None]  # (B, 1, hidden)


@register("model", "mlp_image", paper="baseline")
def mlp_image(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, hidden: int = 256, depth: int = 2,
              drop: float = 0.0) -> MLPImage:
    """MLP on flattened pixels (context row of the vision benchmark): 784-256-256-10 by default."""
    return MLPImage(num_classes=num_classes, in_chans=in_chans, img_size=img_size, hidden=hidden, depth=depth,
                    drop=drop)


@register("model", "cnn_small", paper="baseline")
def cnn_small(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, widths: list | tuple = (32, 64),
              hidden: int = 128, drop: float = 0.0) -> CNNSmall:
    """Small CNN (context row of the vision benchmark): conv 32 -> conv 64 (BN, ReLU, max-pool) -> FC 128 -> head."""
    return CNNSmall(num_classes=num_classes, in_chans=in_chans, img_size=img_size, widths=tuple(widths),
                    hidden=hidden, drop=drop)


__all__ = ["MLPImage", "CNNSmall", "mlp_image", "cnn_small"]
