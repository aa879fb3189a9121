"""Transformer in Transformer (P39): an inner transformer over the pixels ("words") of each patch feeding an outer
transformer over the patches ("sentences").

P39 "Transformer in Transformer" (Han et al., NeurIPS 2021). Facts read from the official PyTorch code,
huawei-noah/Efficient-AI-Backbones tnt_pytorch/tnt.py (which timm's non-legacy `tnt_s_patch16_224` follows), and
its readme; no line of it is copied.

Components:
- `WordEmbed`: image -> p x p patches -> a k x k conv (stride s) on each patch alone -> visual words (B*N, W, c)
- `TNTBlock`: inner ViT block on the words of each patch, words -> patch projection added to the patch tokens,
  then the outer ViT block (`ViTBlock` of t2t_vit: registry `softmax` mixer + `mlp` ffn)
- `TNT`: the model, registered as `tnt` (every option), `tnt_s_patch16_224`, `tnt_b_patch16_224` and `tnt_tiny`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from formers.models.vision.base import VisionModel, drop_path_rates, init_vit_weights
from formers.models.vision.t2t_vit import ViTBlock, grid_positions
from formers.registry import FormersError, register


class WordEmbed(nn.Module):
    """Visual words of TNT: each p x p patch (a "sentence") is convolved on its own into s' x s' words of width c.

    P39 (PatchEmbed of tnt.py). (B, C, H, W) -> words (B*N, W, c) with N = (H/p)(W/p) patches in row-major
    order and W = s'^2 words per patch, s' = floor((p + 2 (k//2) - k) / stride) + 1 (= ceil(p / stride) for odd k);
    the conv (kernel k = 7, stride 4, padding 3 in the paper) sees only its patch, zero-padded at the patch border.
    """

    def __init__(self, in_chans: int = 3, inner_dim: int = 24, patch_size: int = 16, inner_stride: int = 4,
                 inner_kernel: int = 7):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, inner_dim, inner_kernel, stride=inner_stride, padding=inner_kernel // 2)
        side = (patch_size + 2 * (inner_kernel // 2) - inner_kernel) // inner_stride + 1
        if side < 1:
            raise FormersError(f"tnt: inner_kernel={inner_kernel} with inner_stride={inner_stride} gives no word in a "
                               f"{patch_size}x{patch_size} patch")
        self.num_words = side * side

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise FormersError(f"tnt: image sides must be multiples of patch_size={p}, got {H}x{W}")
        hw = (H // p, W // p)
        patches = F.unfold(x, p, stride=p)  # (B, C p p, N)
        patches = patches.transpose(1, 2).reshape(B * hw[0] * hw[1], C, p, p)  # (B*N, C, p, p)
        words = self.proj(patches)  # (B*N, c, s', s')
        return words.flatten(2).transpose(1, 2), hw  # (B*N, W, c)


class TNTBlock(nn.Module):
    """One TNT block: inner transformer on the words, words -> patch tokens, outer transformer on the patches.

    P39 (Block of tnt.py). words (B*N, W, c), patches (B, 1 + N, D) with the class token first:
        words = InnerViTBlock(words)                                   (attention among the W words of a patch)
        patches[1:] += LN(W_p LN(flatten(words)))                      (W_p: W c -> D, no bias; not the cls)
        patches = OuterViTBlock(patches)                               (attention among the patches)
    Both ViT blocks are pre-LN with MLP ratio `mlp_ratio` and share the block's drop-path rate, as the code.
    """

    def __init__(self, dim: int, inner_dim: int, num_words: int, heads: int, inner_heads: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        self.inner = ViTBlock(inner_dim, inner_heads, mlp_ratio, drop_path, qkv_bias)
        self.proj_norm1 = nn.LayerNorm(num_words * inner_dim)
        self.proj = nn.Linear(num_words * inner_dim, dim, bias=False)
        self.proj_norm2 = nn.LayerNorm(dim)
        self.outer = ViTBlock(dim, heads, mlp_ratio, drop_path, qkv_bias)

    def forward(self, words: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.inner(words)  # (B*N, W, c)
        B, N1, _ = patches.shape
        sent = self.proj_norm2(self.proj(self.proj_norm1(words.reshape(B, N1 - 1, -1))))  # (B, N, D)
        patches = torch.cat([patches[:, :1], patches[:, 1:] + sent], dim=1)
        return words, self.outer(patches)


class TNT(VisionModel):
    """Transformer in Transformer: visual words per patch, an inner and an outer transformer in every block.

    P39 (TNT of tnt.py). images -> WordEmbed + inner positions (W, c) -> words;
    patches = LN(Linear(LN(flatten(words)))) (D, with bias), [cls; patches] + outer positions (1 + N, D);
    depth x TNTBlock; LN; class token -> Linear. Init: trunc-normal(0.02) linears, class token and both position
    tables, zero biases, unit LN, PyTorch's default for the word conv (the code leaves it).
    Choices: the code's unused, frozen `outer_tokens` parameter (1, N, D) is left out (it is counted in the
    published sizes, see the tests); other input sizes resample the learned outer positions bicubically (timm's
    transfer habit; the code itself asserts 224); the words per patch do not change with the input size.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 dim: int = 384, inner_dim: int = 24, depth: int = 12, heads: int = 6, inner_heads: int = 4,
                 mlp_ratio: float = 4.0, inner_stride: int = 4, inner_kernel: int = 7, qkv_bias: bool = False,
                 drop_path: float = 0.1, global_pool: Literal["token", "avg", ""] = "token"):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise FormersError(f"tnt: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if img_size % patch_size:
            raise FormersError(f"tnt: img_size={img_size} must be a multiple of patch_size={patch_size}")
        self.num_classes, self.in_chans, self.img_size, self.global_pool = num_classes, in_chans, img_size, global_pool
        self.num_features = dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.other_size = img_size + patch_size  # one more patch per side
        self.words = WordEmbed(in_chans, inner_dim, patch_size, inner_stride, inner_kernel)
        nw = self.words.num_words
        self.proj_norm1 = nn.LayerNorm(nw * inner_dim)
        self.proj = nn.Linear(nw * inner_dim, dim)
        self.proj_norm2 = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.outer_pos = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, dim))
        self.inner_pos = nn.Parameter(torch.zeros(1, nw, inner_dim))
        self.blocks = nn.ModuleList(TNTBlock(dim, inner_dim, nw, heads, inner_heads, mlp_ratio, p, qkv_bias)
                                    for p in drop_path_rates(drop_path, depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        for t in (self.cls_token, self.outer_pos, self.inner_pos):
            nn.init.trunc_normal_(t, std=0.02)
        self.apply(init_vit_weights)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> words (B*N, W, c) and patch tokens (B, 1 + N, D) before the blocks."""
        words, hw = self.words(x)
        words = words + self.inner_pos
        B = x.shape[0]
        patches = self.proj_norm2(self.proj(self.proj_norm1(words.reshape(B, hw[0] * hw[1], -1))))  # (B, N, D)
        patches = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)
        return words, patches + grid_positions(self.outer_pos, self.grid, hw)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised patch tokens (B, 1 + N, D), the class token first."""
        words, patches = self.embed(x)
        for block in self.blocks:
            words, patches = self.run(block, words, patches)
        return self.norm(patches)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """'token': the class token; 'avg': the mean of the patch tokens (the class token left out, as timm)."""
        if self.global_pool == "avg":
            return x[:, 1:].mean(dim=1)
        return super().pool(x)


@register("model", "tnt_s_patch16_224", paper="P39")
def tnt_s_patch16_224(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                      drop_path: float = 0.1) -> TNT:
    """TNT-S (P39): 16x16 patches of 16 words, outer D=384 / 6 heads, inner c=24 / 4 heads, depth 12; 23.8M."""
    return TNT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dim=384, inner_dim=24, heads=6,
               inner_heads=4, drop_path=drop_path)


@register("model", "tnt_b_patch16_224", paper="P39")
def tnt_b_patch16_224(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                      drop_path: float = 0.1) -> TNT:
    """TNT-B (P39): 16x16 patches of 16 words, outer D=640 / 10 heads, inner c=40 / 4 heads, depth 12; 65.6M."""
    return TNT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dim=640, inner_dim=40, heads=10,
               inner_heads=4, drop_path=drop_path)


register("model", "tnt", paper="P39")(TNT)


@register("model", "tnt_tiny", paper="P39")
def tnt_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path: float = 0.0) -> TNT:
    """TNT for 28x28 Fashion-MNIST (P39's mechanism at our size): 49 patches of 16 words, depth 4; 0.98M params.

    4x4 patches, words from a 3x3 stride-1 conv (one per pixel), outer D=128 / 4 heads, inner c=16 / 2 heads,
    MLP ratio 4. Choice: the paper's 7x7 stride-4 word conv would give one word per 4x4 patch; a 3x3 stride-1
    conv keeps 16 words (one per pixel), so the inner transformer has something to attend over."""
    return TNT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch_size=4, dim=128, inner_dim=16,
               depth=4, heads=4, inner_heads=2, inner_stride=1, inner_kernel=3, drop_path=drop_path)


__all__ = ["WordEmbed", "TNTBlock", "TNT", "tnt_s_patch16_224", "tnt_b_patch16_224", "tnt_tiny"]
