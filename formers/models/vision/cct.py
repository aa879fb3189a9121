"""Compact Convolutional Transformers (CCT), P55: "Escaping the Big Data Paradigm with Compact Transformers"
(Hassani et al. 2021, arXiv:2104.05704). Official code: SHI-Labs/Compact-Transformers (Apache-2.0), files
`src/cct.py`, `src/utils/tokenizer.py`, `src/utils/transformers.py`; facts read there, code written here.

    ConvTokenizer   C x [Conv2d(k, stride s, pad p, no bias) -> ReLU -> MaxPool(3, 2, 1)]; images -> tokens
    CCTLayer        x = x + DropPath(MHSA(LN0(x)));  x = LN1(x);  x = x + DropPath(MLP(x))   (hybrid norm)
    SeqPool         z = softmax_N(x W^T + b)^T x: attention pooling over tokens, no class token
    CCT             tokenizer -> (+ learnable or sine positions) -> layers -> LN -> SeqPool -> Linear

Names follow the official `L/PxC` scheme: `cct_7_3x1_32` = 7 layers, 3x3 convolutions, 1 convolution layer, 32 px.
CCT-2/4: 128-d, 2 heads, mlp ratio 1; CCT-6/7: 256-d, 4 heads, ratio 2; CCT-14: 384-d, 6 heads, ratio 3.
`cct_tiny` is our 28x28 Fashion-MNIST variant (two 3x3 conv layers: 49 tokens, 4 layers of 128-d).
"""

from __future__ import annotations

import torch
from torch import nn

from formers.models.vision.base import DropPath, VisionModel, drop_path_rates, init_vit_weights
from formers.nn.vision import resample_grid
from formers.registry import FormersError, build, register

POS_EMBEDS = ("learnable", "sine", "none")


class ConvTokenizer(nn.Module):
    """CCT's convolutional tokenizer (P55 §3, `src/utils/tokenizer.py`): `n_conv` repeats of
    Conv2d(k x k, stride, padding, no bias) -> ReLU -> MaxPool2d(3, 2, 1); 64 filters on the inner layers
    (`in_planes`) and `dim` on the last. (B, C, H, W) -> tokens (B, H'W', dim) and the grid (H', W').

    Init as the official code: Kaiming-normal convolution weights (PyTorch's defaults: fan_in, gain sqrt(2)).
    """

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int, n_conv: int = 1,
                 in_planes: int = 64):
        super().__init__()
        if n_conv < 1:
            raise FormersError(f"cct: n_conv must be >= 1, got {n_conv}")
        widths = [in_chans] + [in_planes] * (n_conv - 1) + [dim]
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.layers = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], kernel_size, stride, padding, bias=False), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1))
            for i in range(n_conv)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def grid(self, size: int) -> int:
        """Tokens along one side for an input side `size` (convolution then pooling arithmetic, no forward)."""
        for _ in self.layers:
            size = (size + 2 * self.padding - self.kernel_size) // self.stride + 1
            size = (size + 2 - 3) // 2 + 1
        return size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.layers(x)  # (B, D, H', W')
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])  # (B, N, D)


class SeqPool(nn.Module):
    """Sequence pooling (P55 §3.2): attention weights over tokens from one linear score, no class token.

    z = softmax(x_L w + b over the N tokens)^T x_L, w in R^{D x 1}.  (B, N, D) -> (B, D).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling weights (B, N), summing to 1 over tokens."""
        return self.score(x).squeeze(-1).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weights(x).unsqueeze(1) @ x).squeeze(1)  # (B, 1, N) @ (B, N, D) -> (B, D)


class CCTLayer(nn.Module):
    """CCT encoder layer with the official code's hybrid norm placement (`TransformerEncoderLayer`):

        x = x + DropPath(Attn(LN0(x)));  x = LN1(x);  x = x + DropPath(MLP(x))

    The MLP reads the normalised stream and the residual carries it, so this is neither pre- nor post-LN.
    Attention: formers' `softmax` mixer without bias on q/k/v (official `qkv` has none) and with a biased output
    projection (official `proj`), attention-probability dropout `attn_drop`. MLP: formers' `mlp` (GELU, hidden
    int(dim * mlp_ratio)); the official code also drops out between GELU and the second linear — with the default
    `drop=0` the two are identical. (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float = 0.0, attn_drop: float = 0.1,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim)
        self.attn = build("mixer", "softmax", dim=dim, heads=heads, causal=False, bias=False, dropout=attn_drop)
        self.attn.out = nn.Linear(dim, dim)  # the official projection has a bias although qkv has none
        self.attn_drop_out = nn.Dropout(drop)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = build("ffn", "mlp", dim=dim, mult=mlp_ratio, act="gelu", dropout=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn_drop_out(self.attn(self.norm0(x))))
        x = self.norm1(x)
        return x + self.drop_path(self.mlp(x))


def sine_positions(n: int, dim: int) -> torch.Tensor:
    """The official fixed 1-D sinusoid over token index p (`sinusoidal_embedding`): angle p / 10000^(2 floor(i/2)
    / dim), sine on even channels, cosine on odd ones. -> (1, n, dim)."""
    p = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(dim)
    angle = p / 10000 ** (2 * (i // 2) / dim).double()
    pe = torch.where(i % 2 == 0, angle.sin(), angle.cos())
    return pe[None].float()


class CCT(VisionModel):
    """Compact Convolutional Transformer (P55): convolutional tokenizer, CCT layers, sequence pooling.

    Images (B, C, H, W) -> logits (B, num_classes). `forward_features` returns the final-normed tokens
    (B, N, D); `pool` is SeqPool (`global_pool='seq'`; 'avg' and 'token' fall back to the base pooling).
    Stride and padding default to the official `_cct` rule: s = max(1, k//2 - 1), p = max(1, k//2).
    Positions: 'learnable' (trunc-normal std 0.2, as the official code), 'sine' (fixed) or 'none'.
    Other input sizes: learnable positions are resampled bilinearly to the new token grid (the official
    `resize_pos_embed` used when loading at another `img_size`), sine positions are recomputed.
    Defaults as the official CCT class: dropout 0, attention dropout 0.1, stochastic depth 0.1.
    Init: trunc-normal(0.02) linear weights, zero biases, unit LayerNorms (the official `init_weight`).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, dim: int = 256, depth: int = 7,
                 heads: int = 4, mlp_ratio: float = 2.0, kernel_size: int = 3, n_conv: int = 1,
                 stride: int | None = None, padding: int | None = None, in_planes: int = 64,
                 pos_embed: str = "learnable", drop: float = 0.0, attn_drop: float = 0.1, drop_path: float = 0.1):
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise FormersError(f"cct: pos_embed must be one of {', '.join(POS_EMBEDS)}, got {pos_embed!r}")
        if dim % heads:
            raise FormersError(f"cct: dim={dim} is not divisible by heads={heads}; change heads")
        stride = stride if stride is not None else max(1, kernel_size // 2 - 1)
        padding = padding if padding is not None else max(1, kernel_size // 2)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = dim
        self.global_pool = "seq"
        self.pos_kind = pos_embed
        self.tokenizer = ConvTokenizer(in_chans, dim, kernel_size, stride, padding, n_conv, in_planes)
        self.grid = self.tokenizer.grid(img_size)
        if self.grid < 1:
            raise FormersError(f"cct: img_size={img_size} leaves no tokens after {n_conv} conv+pool layers; "
                               f"use a larger image or fewer conv layers")
        self.other_size = img_size + 4
        n = self.grid * self.grid
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim)) if pos_embed == "learnable" else None
        if pos_embed == "sine":
            self.register_buffer("sine", sine_positions(n, dim), persistent=False)
        self.pos_drop = nn.Dropout(drop)
        rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList([CCTLayer(dim, heads, mlp_ratio, drop, attn_drop, rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.seq_pool = SeqPool(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        self.apply(init_vit_weights)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.2)

    def positions(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
        """Positional embedding (1, N, D) for a token grid (h, w), resampled or recomputed off the training grid."""
        h, w = grid
        if self.pos_kind == "none":
            return None
        if self.pos_kind == "sine":
            pe = self.sine if h * w == self.sine.shape[1] else sine_positions(h * w, self.num_features)
            return pe.to(like)
        pe = self.pos_embed
        if (h, w) != (self.grid, self.grid):
            pe = resample_grid(pe[0], self.grid, (h, w), mode="bilinear", antialias=False)[None]
        return pe

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.tokenizer(x)  # (B, N, D)
        pe = self.positions(grid, x)
        if pe is not None:
            x = x + pe
        x = self.pos_drop(x)
        for block in self.blocks:
            x = self.run(block, x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq_pool(x) if self.global_pool == "seq" else super().pool(x)


# (layers, dim, heads, mlp ratio) of the official `cct_2` ... `cct_14`; the name adds kernel x conv layers and size
_SIZES = {2: (2, 128, 2, 1.0), 4: (4, 128, 2, 1.0), 6: (6, 256, 4, 2.0), 7: (7, 256, 4, 2.0), 14: (14, 384, 6, 3.0)}


def _cct(layers: int, kernel_size: int, n_conv: int, **kw) -> CCT:
    depth, dim, heads, mlp_ratio = _SIZES[layers]
    return CCT(depth=depth, dim=dim, heads=heads, mlp_ratio=mlp_ratio, kernel_size=kernel_size, n_conv=n_conv, **kw)


@register("model", "cct", paper="P55")
def cct(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, dim: int = 256, depth: int = 7, heads: int = 4,
        mlp_ratio: float = 2.0, kernel_size: int = 3, n_conv: int = 1, stride: int | None = None,
        padding: int | None = None, in_planes: int = 64, pos_embed: str = "learnable", drop: float = 0.0,
        attn_drop: float = 0.1, drop_path: float = 0.1) -> CCT:
    """CCT with every option (P55); defaults are CCT-7/3x1 on 32x32."""
    return CCT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dim=dim, depth=depth, heads=heads,
               mlp_ratio=mlp_ratio, kernel_size=kernel_size, n_conv=n_conv, stride=stride, padding=padding,
               in_planes=in_planes, pos_embed=pos_embed, drop=drop, attn_drop=attn_drop, drop_path=drop_path)


@register("model", "cct_2_3x2_32", paper="P55")
def cct_2_3x2_32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, pos_embed: str = "learnable",
                 drop_path: float = 0.1) -> CCT:
    """CCT-2/3x2 for 32x32 (P55; 283,723 parameters with 10 classes, paper 0.28M)."""
    return _cct(2, 3, 2, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_4_3x2_32", paper="P55")
def cct_4_3x2_32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, pos_embed: str = "learnable",
                 drop_path: float = 0.1) -> CCT:
    """CCT-4/3x2 for 32x32 (P55)."""
    return _cct(4, 3, 2, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_6_3x1_32", paper="P55")
def cct_6_3x1_32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, pos_embed: str = "learnable",
                 drop_path: float = 0.1) -> CCT:
    """CCT-6/3x1 for 32x32 (P55)."""
    return _cct(6, 3, 1, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_7_3x1_32", paper="P55")
def cct_7_3x1_32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, pos_embed: str = "learnable",
                 drop_path: float = 0.1) -> CCT:
    """CCT-7/3x1 for 32x32, the paper's CIFAR model (P55; 3,760,139 parameters with 10 classes, paper 3.76M)."""
    return _cct(7, 3, 1, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_7_3x2_32", paper="P55")
def cct_7_3x2_32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, pos_embed: str = "learnable",
                 drop_path: float = 0.1) -> CCT:
    """CCT-7/3x2 for 32x32 (P55)."""
    return _cct(7, 3, 2, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_7_7x2_224", paper="P55")
def cct_7_7x2_224(num_classes: int = 102, in_chans: int = 3, img_size: int = 224, pos_embed: str = "learnable",
                  drop_path: float = 0.1) -> CCT:
    """CCT-7/7x2 for 224x224, the Flowers-102 model (P55)."""
    return _cct(7, 7, 2, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_14_7x2_224", paper="P55")
def cct_14_7x2_224(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, pos_embed: str = "learnable",
                   drop_path: float = 0.1) -> CCT:
    """CCT-14/7x2 for 224x224, the ImageNet model (P55; 22,367,273 parameters, README 22.36M)."""
    return _cct(14, 7, 2, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_14_7x2_384", paper="P55")
def cct_14_7x2_384(num_classes: int = 1000, in_chans: int = 3, img_size: int = 384, pos_embed: str = "learnable",
                   drop_path: float = 0.1) -> CCT:
    """CCT-14/7x2 for 384x384, fine-tuned on ImageNet (P55; 22,513,193 parameters, README 22.51M)."""
    return _cct(14, 7, 2, num_classes=num_classes, in_chans=in_chans, img_size=img_size, pos_embed=pos_embed,
                drop_path=drop_path)


@register("model", "cct_tiny", paper="P55")
def cct_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, pos_embed: str = "learnable",
             drop_path: float = 0.0, attn_drop: float = 0.0) -> CCT:
    """CCT-4/3x2 at 128-d with mlp ratio 2 for 28x28 (ours): 28 -> 14 -> 7, 49 tokens, SeqPool head.

    Our choice, not the paper's: CCT-4's layers and width with CCT-7's mlp ratio 2, and no attention dropout or
    stochastic depth by default (a 5-minute CPU budget underfits rather than overfits).
    """
    return CCT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dim=128, depth=4, heads=2,
               mlp_ratio=2.0, kernel_size=3, n_conv=2, pos_embed=pos_embed, attn_drop=attn_drop, drop_path=drop_path)


__all__ = ["CCT", "CCTLayer", "ConvTokenizer", "SeqPool", "sine_positions"]
