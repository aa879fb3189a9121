"""What every vision backbone shares: the model method set (DESIGN §3), drop-path and layer-scale.

A backbone subclasses `VisionModel`, builds its layers, sets `num_features` and `self.head`, and implements
`forward_features(x)`: images (B, C, H, W) -> tokens (B, N, D) or a feature map (B, D, H', W'). The base class gives
`forward`, `forward_head` (pooling by `global_pool`: 'token' = first token, 'avg' = mean over tokens or pixels,
'' = none), `reset_classifier`, `set_grad_checkpointing` (blocks run through `self.run`), `num_params` and `fuse()`
(a no-op unless the paper re-parameterises; it must return an equivalent module).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from formers.registry import FormersError


class VisionModel(nn.Module):
    """Base of image classifiers: (B, C, H, W) float images -> (B, num_classes) logits."""

    num_features: int = 0
    global_pool: str = "avg"
    in_chans: int = 3
    img_size: int = 224  # the training side
    other_size: int | None = None  # another input side the model takes (None: the paper's model cannot)

    def __init__(self):
        super().__init__()
        self.grad_checkpointing = False
        self.head_drop = nn.Dropout(0.0)

    # -- the method set ------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) or maps (B, D, H, W) -> (B, D) according to `global_pool`."""
        if not self.global_pool:
            return x
        if x.dim() == 4:
            return x.mean(dim=(2, 3))
        if self.global_pool == "token":
            return x[:, 0]
        return x.mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_head(self.forward_features(x))

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or not x.is_floating_point():
            raise FormersError(f"{type(self).__name__}: expected float images of shape (batch, channels, height, "
                               f"width), got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] != self.in_chans:
            raise FormersError(f"{type(self).__name__}: built for {self.in_chans} input channels, got images with "
                               f"{x.shape[1]}; set in_chans={x.shape[1]}")

    def reset_classifier(self, num_classes: int) -> None:
        w = next(self.parameters())
        self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype) if num_classes > 0 \
            else nn.Identity()
        self.num_classes = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run(self, block: nn.Module, x: torch.Tensor, *args, **kw) -> torch.Tensor:
        """Run one block, through activation checkpointing when enabled and training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False, **kw)
        return block(x, *args, **kw)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fuse(self) -> VisionModel:
        """An equivalent model for inference with re-parameterisations merged (BN folding, ...); default: self."""
        return self


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): zero a sample's residual branch with probability p while training,
    scale survivors by 1/(1-p). (B, ...) -> (B, ...)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise FormersError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT, Touvron et al. 2021): x * gamma, gamma = init.
    Works on (..., D) or, with `channels_first`, on (B, D, H, W)."""

    def __init__(self, dim: int, init: float = 1e-5, channels_first: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gamma[:, None, None] if self.channels_first else self.gamma)


def init_vit_weights(m: nn.Module) -> None:
    """timm's ViT init, used by most official codes here: trunc-normal(0.02) Linear weights, zero biases, LN 1/0.
    Apply with `model.apply(init_vit_weights)`."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def drop_path_rates(total: float, depth: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over `depth` blocks, 0 to `total` (the timm/DeiT schedule)."""
    return [total * i / max(depth - 1, 1) for i in range(depth)]


__all__ = ["VisionModel", "DropPath", "LayerScale", "drop_path_rates", "init_vit_weights"]
