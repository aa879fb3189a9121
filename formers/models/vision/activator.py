"""Activator (P68): "Activator: GLU Activations as The Core Functions of a Vision Transformer" (Abdullah & Aydin,
arXiv 2405.15953). The attention layer of a ViT block is replaced by a GLU MLP (the "activator gating unit"); a
second variant drops the block's plain MLP as well.

    ActivatorGatingUnit  ffn `activator_gu`  u = LN(act(W1 x)), v = LN(W2 x) (one LN shared), y = W3 (u * v)
    ActivatorBlock       x = x + GU(LN(x)); x = x + FFN(LN(x))   (one LN module used in both places; FFN optional)
    Activator            non-overlapping patch conv -> blocks -> mean over tokens -> linear head

Every operation after the patch convolution is per token, so the blocks mix no information across tokens (the test
checks permutation equivariance); there are no position embeddings. Facts from the official code,
github.com/Abdullah-88/Activator at commit 0abd14c (`activator.py`, `activator_only_GEGLU.py`, `train.py`): the
CIFAR-10 model is patch 4 on 32x32 (64 tokens), d_model 256, d_ffn 512, 4 blocks, dropout 0.5 (FFN only), mean
pooling, no final norm, PyTorch default initialisation; it has 2,650,890 parameters (1,599,242 without the FFNs).

Registered models: `activator` (every option), `activator_patch4_32` and `activator_glu_only_patch4_32` (the two
published CIFAR models), `activator_tiny` (Fashion-MNIST 28x28).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from formers.models.vision.base import DropPath, VisionModel, drop_path_rates
from formers.registry import FormersError, build, register


@register("ffn", "activator_gu", paper="P68")
class ActivatorGatingUnit(nn.Module):
    """Activator gating unit (P68): y = W3 (LN(act(W1 x + b1)) * LN(W2 x + b2)) + b3, hidden = mult * dim.

    The official code applies one LayerNorm module (over the hidden width) to both the gate u and the value v
    (`shared_norm=True`); `shared_norm=False` gives each its own. act: gelu (GEGLU, the paper's default), silu
    (SwiGLU) or relu (ReGLU), the paper's ablation. Shapes (..., D) -> (..., D); every token on its own.
    """

    def __init__(self, dim: int, mult: float = 2.0, hidden: int | None = None, act: Any = "gelu",
                 shared_norm: bool = True, bias: bool = True):
        super().__init__()
        hidden = hidden or int(mult * dim)
        if hidden <= 0:
            raise FormersError(f"activator_gu: hidden width must be positive, got {hidden}; set mult or hidden")
        self.proj_u = nn.Linear(dim, hidden, bias=bias)
        self.proj_v = nn.Linear(dim, hidden, bias=bias)
        self.proj_out = nn.Linear(hidden, dim, bias=bias)
        self.act = build("act", act, path="ffn.act")
        self.norm_u = nn.LayerNorm(hidden)
        self.norm_v = self.norm_u if shared_norm else nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm_u(self.act(self.proj_u(x)))  # (..., hidden) the gate
        v = self.norm_v(self.proj_v(x))  # (..., hidden) the value
        return self.proj_out(u * v)


class ActivatorBlock(nn.Module):
    """Activator block (P68): x = x + GU(LN(x)); x = x + FFN(LN(x)), one LN module for both (as the official code),
    FFN = Linear -> GELU -> Dropout -> Linear -> Dropout. `with_ffn=False` is the paper's GLU-only block
    (x = x + GU(LN(x))). Shapes (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int, act: Any = "gelu", with_ffn: bool = True, dropout: float = 0.0,
                 drop_path: float = 0.0, shared_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gu = ActivatorGatingUnit(dim, hidden=hidden, act=act, shared_norm=shared_norm)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout)) if with_ffn else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gu(self.norm(x)))
        if self.ffn is not None:
            x = x + self.drop_path(self.ffn(self.norm(x)))
        return x


class Activator(VisionModel):
    """Activator classifier (P68): (B, C, H, W) -> patch conv (kernel = stride = patch) -> (B, N, D) tokens ->
    `depth` ActivatorBlocks -> mean over tokens -> linear head. No class token, no positions, no final norm, so any
    input side divisible by `patch` works."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, patch: int = 4,
                 dim: int = 256, hidden: int = 512, depth: int = 4, act: Any = "gelu", with_ffn: bool = True,
                 dropout: float = 0.5, drop_path: float = 0.0, shared_norm: bool = True):
        super().__init__()
        if img_size % patch:
            raise FormersError(f"activator: img_size {img_size} is not divisible by patch {patch}; pick a patch "
                               f"size that divides it")
        if dim <= 0 or hidden <= 0 or depth <= 0:
            raise FormersError(f"activator: dim, hidden and depth must be positive (got {dim}, {hidden}, {depth})")
        self.num_classes, self.in_chans, self.img_size, self.patch = num_classes, in_chans, img_size, patch
        self.num_features, self.global_pool = dim, "avg"
        self.other_size = next(s for s in range(img_size + 1, 2 * img_size + patch) if s % patch == 0)
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.blocks = nn.ModuleList(
            ActivatorBlock(dim, hidden, act=act, with_ffn=with_ffn, dropout=dropout, drop_path=p,
                           shared_norm=shared_norm) for p in drop_path_rates(drop_path, depth))
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, H/p * W/p, D), row-major over the patch grid."""
        if x.shape[-2] % self.patch or x.shape[-1] % self.patch:
            raise FormersError(f"activator: image side {tuple(x.shape[-2:])} is not divisible by the patch size "
                               f"{self.patch}; resize or crop the images")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        for block in self.blocks:
            x = self.run(block, x)
        return x


@register("model", "activator", paper="P68")
def activator(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, patch: int = 4, dim: int = 256,
              hidden: int = 512, depth: int = 4, act: str = "gelu", with_ffn: bool = True, dropout: float = 0.5,
              drop_path: float = 0.0, shared_norm: bool = True) -> Activator:
    """Activator (P68) with every option; the defaults are the official CIFAR-10 model."""
    return Activator(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch=patch, dim=dim,
                     hidden=hidden, depth=depth, act=act, with_ffn=with_ffn, dropout=dropout, drop_path=drop_path,
                     shared_norm=shared_norm)


@register("model", "activator_patch4_32", paper="P68")
def activator_patch4_32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, act: str = "gelu",
                        dropout: float = 0.5, drop_path: float = 0.0) -> Activator:
    """Activator CIFAR model (P68, official `train.py`): patch 4, d_model 256, d_ffn 512, 4 blocks with FFN."""
    return Activator(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch=4, dim=256, hidden=512,
                     depth=4, act=act, with_ffn=True, dropout=dropout, drop_path=drop_path)


@register("model", "activator_glu_only_patch4_32", paper="P68")
def activator_glu_only_patch4_32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, act: str = "gelu",
                                 drop_path: float = 0.0) -> Activator:
    """Activator without the plain MLP (P68, official `train_only_GEGLU.py`): gating units only, 4 blocks."""
    return Activator(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch=4, dim=256, hidden=512,
                     depth=4, act=act, with_ffn=False, dropout=0.0, drop_path=drop_path)


@register("model", "activator_tiny", paper="P68")
def activator_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, act: str = "gelu",
                   dropout: float = 0.1, drop_path: float = 0.0) -> Activator:
    """Activator for 28x28 Fashion-MNIST: patch 4 (49 tokens), dim 128, hidden 256, 4 blocks (~0.67M params)."""
    return Activator(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch=4, dim=128, hidden=256,
                     depth=4, act=act, with_ffn=True, dropout=dropout, drop_path=drop_path)


__all__ = ["ActivatorGatingUnit", "ActivatorBlock", "Activator"]
