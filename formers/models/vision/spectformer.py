"""SpectFormer, P66: "SpectFormer: Frequency and Attention is what you need in a Vision Transformer"
(Patro, Namboodiri, Agneeswaran 2023, arXiv:2304.06446). Official code: badripatro/SpectFormers (no licence file),
`vanilla_architecture/spectformer.py` and `main_spectformer.py`; facts read there, code written here.

    SpectralGatingFilter  X -> irfft2(rfft2(X) * W), W complex and learnable (GFNet's global filter)
    SpectralBlock         x = x + DropPath(MLP(LN2(SGF(LN1(x)))))      single residual, GFNet style
    AttentionBlock        pre-LN multi-head self-attention block + MLP block (ViT/DeiT)
    SpectFormer           patch embedding + learned positions -> alpha spectral blocks -> attention blocks
                          -> LN -> mean over tokens -> Linear

Registered: the vanilla (single-stage) `spectformer_t/xs/s/b` of the official training script (patch 16, 224 px,
alpha = 4, mlp ratio 4), and `spectformer_tiny` for 28x28 (ours). The hierarchical (WaveViT/PVT-style) variant
is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formers.models.vision.base import DropPath, VisionModel, drop_path_rates, init_vit_weights
from formers.nn.vision import resample_grid
from formers.registry import FormersError, build, register


class SpectralGatingFilter(nn.Module):
    """Spectral gating network (P66 §3; GFNet's global filter): a learnable elementwise product in 2-D Fourier space.

        X in R^{a x b x C} (tokens on their grid) -> irfft2(rfft2(X, norm='ortho') * W, s=(a, b), norm='ortho')

    W in C^{h x (w//2+1) x C}, stored as real (h, w//2+1, C, 2), init 0.02 N(0, 1) as the official code. With
    both transforms orthonormal the filter is the circular depthwise convolution of X with irfft2(W), so W = 1
    is the identity and the filter commutes with cyclic shifts of the token grid (both tested).
    Another grid (a, b) than (h, w): W is resampled bicubically (align_corners=True) to (a, b//2+1), the
    official recipe for fine-tuning at another resolution (`main_spectformer.py`), here done on the fly.
    The transforms run in float32 at least (the official code casts to float32; half precision FFTs need
    power-of-two sizes). Tokens (B, a*b, C) and grid (a, b) -> (B, a*b, C).
    """

    def __init__(self, dim: int, h: int = 14, w: int = 14):
        super().__init__()
        self.h, self.w = h, w
        self.weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)

    def complex_weight(self, a: int, b: int) -> torch.Tensor:
        """W as a complex tensor (a, b//2+1, C) for an (a, b) token grid."""
        wt = self.weight
        if (a, b // 2 + 1) != tuple(wt.shape[:2]):
            h, f, c, _ = wt.shape
            wt = wt.reshape(1, h, f, 2 * c).permute(0, 3, 1, 2)  # (1, 2C, h, w//2+1)
            wt = F.interpolate(wt, size=(a, b // 2 + 1), mode="bicubic", align_corners=True)
            wt = wt.permute(0, 2, 3, 1).reshape(a, b // 2 + 1, c, 2)
        if wt.dtype not in (torch.float32, torch.float64):
            wt = wt.float()
        return torch.view_as_complex(wt.contiguous())

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        a, b = grid if grid is not None else (self.h, self.w)
        if a * b != N:
            raise FormersError(f"spectral filter: {N} tokens do not fill a {a}x{b} grid; pass the token grid")
        dtype = x.dtype
        xf = x.reshape(B, a, b, C)
        if dtype not in (torch.float32, torch.float64):
            xf = xf.float()
        xf = torch.fft.rfft2(xf, dim=(1, 2), norm="ortho")  # (B, a, b//2+1, C) complex
        xf = xf * self.complex_weight(a, b).to(xf.dtype)
        xf = torch.fft.irfft2(xf, s=(a, b), dim=(1, 2), norm="ortho")  # (B, a, b, C) real
        return xf.reshape(B, N, C).to(dtype)


class SpectralBlock(nn.Module):
    """SpectFormer's spectral block (official `Block`): x + DropPath(MLP(LN2(SGF(LN1(x))))).

    One residual around filter and MLP together, as in GFNet. MLP: formers' `mlp` (GELU, hidden dim * mlp_ratio);
    the official Mlp also drops out after the activation — identical at the default drop = 0. (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, h: int, w: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.filter = SpectralGatingFilter(dim, h, w)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = build("ffn", "mlp", dim=dim, mult=mlp_ratio, act="gelu", dropout=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(self.filter(self.norm1(x), grid))))


class AttentionBlock(nn.Module):
    """SpectFormer's attention block (official `Block_attention`): pre-LN MHSA then pre-LN MLP, each residual.

        x = x + DropPath(Attn(LN1(x)));  x = x + DropPath(MLP(LN2(x)))

    Attention: formers' `softmax` mixer with biases on q, k, v and the output projection (official qkv_bias=True),
    attention dropout = drop. (B, N, D) -> (B, N, D); `grid` is accepted and unused so blocks share a signature.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = build("mixer", "softmax", dim=dim, heads=heads, causal=False, bias=True, dropout=drop)
        self.attn_drop_out = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = build("ffn", "mlp", dim=dim, mult=mlp_ratio, act="gelu", dropout=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn_drop_out(self.attn(self.norm1(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SpectFormer(VisionModel):
    """Vanilla SpectFormer (P66): the first `alpha` blocks spectral, the rest attention; no class token.

    Images (B, C, H, W) -> patch embedding Conv2d(k = stride = patch) -> + learned positions -> blocks -> LN ->
    mean over tokens (`global_pool='avg'`) -> Linear. The filter grid is img_size // patch_size on each side.
    Other input sizes (multiples of the patch): positions resampled bicubically and filters as in
    `SpectralGatingFilter` — the official fine-tuning recipe applied on the fly.
    Init as the official code: trunc-normal(0.02) linear weights and positions, zero biases, unit LayerNorms,
    PyTorch's default patch-embedding init, filters 0.02 N(0, 1). LayerNorm eps 1e-6.

    UNCERTAIN: the official attention block hard-codes 6 heads (comment: "4 for tiny, 6 for small and 12 for
    base"), which does not divide 256 (-T) or 512 (-B); their reshape would fail. We use head dim 64 throughout:
    4 heads for -T, 6 for -XS/-S, 8 for -B. Parameter counts do not depend on the head count.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 dim: int = 384, depth: int = 12, heads: int = 6, alpha: int = 4, mlp_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if img_size % patch_size:
            raise FormersError(f"spectformer: img_size={img_size} is not a multiple of patch_size={patch_size}")
        if not 0 <= alpha <= depth:
            raise FormersError(f"spectformer: alpha (spectral blocks) must be in [0, depth={depth}], got {alpha}")
        if dim % heads:
            raise FormersError(f"spectformer: dim={dim} is not divisible by heads={heads}; change heads")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features, self.global_pool, self.alpha = dim, "avg", alpha
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.other_size = img_size + patch_size
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        self.pos_drop = nn.Dropout(drop)
        rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList([
            SpectralBlock(dim, self.grid, self.grid, mlp_ratio, drop, rates[i]) if i < alpha
            else AttentionBlock(dim, heads, mlp_ratio, drop, rates[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_vit_weights)

    def positions(self, a: int, b: int) -> torch.Tensor:
        """Learned positions (1, a*b, D), resampled bicubically when the grid is not the training grid."""
        pe = self.pos_embed
        if (a, b) != (self.grid, self.grid):
            pe = resample_grid(pe[0], self.grid, (a, b), mode="bicubic", antialias=False)[None]
        return pe

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise FormersError(f"spectformer: image sides {tuple(x.shape[-2:])} must be multiples of the patch "
                               f"size {self.patch_size}")
        x = self.patch_embed(x)  # (B, D, a, b)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = self.pos_drop(x + self.positions(*grid))
        for block in self.blocks:
            x = self.run(block, x, grid)
        return self.norm(x)


def _spectformer(dim: int, depth: int, heads: int, num_classes: int, in_chans: int, img_size: int, alpha: int,
                 drop_path: float) -> SpectFormer:
    return SpectFormer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch_size=16, dim=dim,
                       depth=depth, heads=heads, alpha=alpha, mlp_ratio=4.0, drop_path=drop_path)


@register("model", "spectformer", paper="P66")
def spectformer(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                dim: int = 384, depth: int = 12, heads: int = 6, alpha: int = 4, mlp_ratio: float = 4.0,
                drop: float = 0.0, drop_path: float = 0.0) -> SpectFormer:
    """SpectFormer with every option (P66); defaults are SpectFormer-XS."""
    return SpectFormer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch_size=patch_size,
                       dim=dim, depth=depth, heads=heads, alpha=alpha, mlp_ratio=mlp_ratio, drop=drop,
                       drop_path=drop_path)


@register("model", "spectformer_t", paper="P66")
def spectformer_t(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, alpha: int = 4,
                  drop_path: float = 0.0) -> SpectFormer:
    """SpectFormer-T (P66): 256-d, 12 blocks; 9,158,376 parameters (official training log; README 9M)."""
    return _spectformer(256, 12, 4, num_classes, in_chans, img_size, alpha, drop_path)


@register("model", "spectformer_xs", paper="P66")
def spectformer_xs(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, alpha: int = 4,
                   drop_path: float = 0.0) -> SpectFormer:
    """SpectFormer-XS (P66): 384-d, 12 blocks; 20,028,520 parameters (official training log; README says 22M)."""
    return _spectformer(384, 12, 6, num_classes, in_chans, img_size, alpha, drop_path)


@register("model", "spectformer_s", paper="P66")
def spectformer_s(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, alpha: int = 4,
                  drop_path: float = 0.15) -> SpectFormer:
    """SpectFormer-S (P66): 384-d, 19 blocks; 32,449,768 parameters (official training log; README 32M)."""
    return _spectformer(384, 19, 6, num_classes, in_chans, img_size, alpha, drop_path)


@register("model", "spectformer_b", paper="P66")
def spectformer_b(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, alpha: int = 4,
                  drop_path: float = 0.25) -> SpectFormer:
    """SpectFormer-B (P66): 512-d, 19 blocks; 57,159,656 parameters (official training log; README 57M)."""
    return _spectformer(512, 19, 8, num_classes, in_chans, img_size, alpha, drop_path)


@register("model", "spectformer_tiny", paper="P66")
def spectformer_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, alpha: int = 2,
                     drop_path: float = 0.0) -> SpectFormer:
    """SpectFormer for 28x28 (ours): patch 4 -> 7x7 = 49 tokens, 128-d, 6 blocks (2 spectral, 4 attention),
    4 heads, mlp ratio 4. alpha/depth = 1/3 as the official 4 of 12."""
    return SpectFormer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch_size=4, dim=128,
                       depth=6, heads=4, alpha=alpha, mlp_ratio=4.0, drop_path=drop_path)


__all__ = ["SpectFormer", "SpectralGatingFilter", "SpectralBlock", "AttentionBlock"]
