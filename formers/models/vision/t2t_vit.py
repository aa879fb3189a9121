"""Tokens-to-Token ViT (P59): soft split, T2T token layers, then a deep-narrow ViT backbone.

P59 "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet" (Yuan et al., ICCV 2021).
Facts read from the official code, yitu-opensource/T2T-ViT (Clear BSD): models/t2t_vit.py, token_performer.py,
token_transformer.py, transformer_block.py; no line of it is copied.

Components:
- `SoftSplit`: overlapping k x k patches of an image (nn.Unfold), (B, C, H, W) -> (B, H'W', C k k)
- `T2TPerformerLayer`: the token layer of T2T-ViT (single-head Performer attention with a value residual)
- `T2TAttentionLayer`: the token layer of T2T-ViT_t (single-head softmax attention with a value residual)
- `T2TModule`: soft split -> token layer -> re-structurize to an image -> soft split -> ... -> Linear to D
- `ViTBlock`: the pre-LN ViT block, assembled from the registry's `softmax` mixer and `mlp` ffn (TNT uses it too)
- `sinusoid_table`: the fixed 1-D sin-cos position table of the backbone
- `T2TViT`: the model, registered as `t2t_vit` (every option), the published sizes `t2t_vit_7` .. `t2t_vit_24`,
  `t2t_vit_t_14` .. `t2t_vit_t_24` (softmax token layers) and `t2t_vit_tiny` (Fashion-MNIST 28x28).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from formers.models.vision.base import DropPath, VisionModel, drop_path_rates, init_vit_weights
from formers.nn.vision import resample_grid
from formers.registry import FormersError, build, register


class ViTBlock(nn.Module):
    """Pre-LN ViT block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))); (B, N, D) -> (B, N, D).

    The block of ViT/DeiT as T2T-ViT (transformer_block.py) and TNT (tnt.py) use it: LayerNorm eps 1e-5,
    q/k/v projections without bias (`qkv_bias=False`), a biased output projection, GELU MLP of width
    int(mlp_ratio * D) with biases. Assembled from the registry: the `softmax` mixer (its single `bias` switch
    covers q, k, v and the output, so with qkv_bias=False its output projection is replaced by a biased Linear)
    and the `mlp` ffn.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = build("mixer", "softmax", dim=dim, heads=heads, causal=False, bias=qkv_bias)
        if not qkv_bias:
            self.attn.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = build("ffn", "mlp", dim=dim, mult=mlp_ratio, act="gelu")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """The fixed sin-cos table of "Attention is all you need": (n, dim) with, for position p and channel j,
    angle p / 10000^(2 floor(j/2) / dim), sin on even j and cos on odd j (get_sinusoid_encoding of the code)."""
    pos = torch.arange(n, dtype=torch.float64, device="cpu")[:, None]
    j = torch.arange(dim, device="cpu")
    angle = pos / 10000.0 ** (2 * (j // 2).double() / dim)  # (n, dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()


def on_default_device(t: torch.Tensor) -> torch.Tensor:
    """A CPU-computed constant moved to the default device. Constants are computed on the CPU because arithmetic
    on meta tensors (`with torch.device("meta")`) goes through a decomposition that first imports torch._dynamo
    (seconds); copying into an empty tensor does not."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def grid_positions(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Position table (1, 1 + h*w, D) of an (h, w) grid, the class token's row first -> that of another grid: the
    grid rows resampled bicubically (`formers.nn.vision.resample_grid`, the transfer habit of both papers' code
    and timm), the class row kept."""
    if old == new:
        return table
    return torch.cat([table[0, :1], resample_grid(table[0, 1:], old, new)])[None]


class SoftSplit(nn.Module):
    """Soft split of T2T-ViT: overlapping k x k patches taken every `stride` pixels, each flattened to a token.

    (B, C, H, W) -> tokens (B, H'W', C k k) in channel-major order (c, i, j) as nn.Unfold, and the grid (H', W'),
    H' = floor((H + 2 padding - k) / stride) + 1. No parameters.
    """

    def __init__(self, kernel: int, stride: int, padding: int):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def grid(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        hw = self.grid(x.shape[-2], x.shape[-1])
        if min(hw) < 1:
            raise FormersError(f"T2T soft split (kernel {self.kernel}, stride {self.stride}, padding "
                               f"{self.padding}) cannot split a {x.shape[-2]}x{x.shape[-1]} map; use larger images")
        tokens = F.unfold(x, self.kernel, padding=self.padding, stride=self.stride)  # (B, C k k, H'W')
        return tokens.transpose(1, 2), hw

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


class T2TPerformerLayer(nn.Module):
    """The T2T-ViT token layer: single-head Performer attention whose residual is the value, then an MLP.

    P59 (token_performer.py). x (B, N, C) -> (B, N, e), e = token_dim (64), m = int(e * kernel_ratio) features:
        k, q, v = split(W_kqv LN(x) + b)                     (the code's order: k first), each (B, N, e)
        phi(u) = exp(W u - |u|^2 / 2) / sqrt(m)              W (m, e): fixed orthonormal rows scaled by sqrt(m)
        att_i  = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + 1e-8)
        y = v + Drop(W_p att + b_p);   out = y + MLP(LN(y))  (MLP: e -> e -> e, GELU, dropout after it)
    The residual runs through v because the input width C (C_in 7 7 or e 3 3) differs from e. phi(q).phi(k)
    estimates exp(q.k) -- no 1/sqrt(e) temperature -- and W is drawn once (the global RNG, as the code's
    orthogonal_ init) and never redrawn: a buffer, not a parameter (the code holds it as a frozen parameter).
    Choice: `dropout` (0.1) is the code's fixed dp1 = dp2 = 0.1.
    UNCERTAIN: the rows' length sqrt(m) (not the chi(e) lengths of FAVOR+, so the estimate of exp(q.k) is
    biased) and the missing temperature are the code's, kept as they are. The registry's `performer` mixer is
    not used here: its output projection returns to the input width, it has no value residual, and its
    features estimate exp(q.k / sqrt(e)) with chi-distributed lengths and periodic redraws.
    """

    def __init__(self, dim: int, token_dim: int = 64, kernel_ratio: float = 0.5, dropout: float = 0.1,
                 eps: float = 1e-8):
        super().__init__()
        m = int(token_dim * kernel_ratio)
        if m < 1:
            raise FormersError(f"T2T performer layer: token_dim * kernel_ratio = {token_dim * kernel_ratio} gives no "
                               "random feature; raise kernel_ratio")
        self.token_dim, self.eps = token_dim, eps
        self.norm1 = nn.LayerNorm(dim)
        self.kqv = nn.Linear(dim, 3 * token_dim)
        self.proj = nn.Linear(token_dim, token_dim)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = build("ffn", "mlp", dim=token_dim, mult=1.0, act="gelu", dropout=dropout)
        w = nn.init.orthogonal_(torch.empty(m, token_dim, device="cpu"))  # (m, e), rows orthonormal when m <= e
        self.register_buffer("features", on_default_device(w * math.sqrt(m)))

    def feature_map(self, u: torch.Tensor) -> torch.Tensor:
        """phi: (B, N, e) -> (B, N, m), computed in at least float32 like the code. w.u - |u|^2/2 <= |w|^2/2 =
        m/2, so it cannot overflow; far-away vectors underflow to 0 (then the 1e-8 keeps the ratio finite)."""
        u = u.to(torch.promote_types(u.dtype, torch.float32))
        w = self.features.to(u.dtype)
        return torch.exp(u @ w.T - (u * u).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Linear attention (B, N, e) x3 -> (B, N, e): phi(q) (phi(k)^T v) / (phi(q) . sum phi(k) + eps)."""
        qf, kf = self.feature_map(q), self.feature_map(k)  # (B, N, m) each
        v = v.to(qf.dtype)
        den = qf @ kf.sum(1).unsqueeze(-1)  # (B, N, 1)
        num = qf @ (kf.transpose(1, 2) @ v)  # (B, N, e): the (m, e) sum first, O(N m e)
        return num / (den + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(self.norm1(x)).chunk(3, dim=-1)  # (B, N, e) each
        y = v + self.drop(self.proj(self.attend(q, k, v).to(v.dtype)))
        return y + self.mlp(self.norm2(y))


class T2TAttentionLayer(nn.Module):
    """The T2T-ViT_t token layer: single-head softmax attention whose residual is the value, then an MLP.

    P59 (token_transformer.py). x (B, N, C) -> (B, N, e), e = token_dim:
        q, k, v = split(W_qkv LN(x))   (no bias);   y = v + W_p softmax(q k^T * C^-1/2) v + b_p
        out = y + MLP(LN(y))   (e -> e*mlp_ratio -> e, GELU)
    The code's scale uses the INPUT width C (147 or 576), not e: kept (`scale` overrides it). One head, as the
    code (its reshape only works with one).
    """

    def __init__(self, dim: int, token_dim: int = 64, mlp_ratio: float = 1.0, scale: float | None = None):
        super().__init__()
        self.scale = scale if scale is not None else dim ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * token_dim, bias=False)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = build("ffn", "mlp", dim=token_dim, mult=mlp_ratio, act="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # (B, N, e) each
        att = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, N, e)
        y = v + self.proj(att)
        return y + self.mlp(self.norm2(y))


class T2TModule(nn.Module):
    """Tokens-to-Token module: alternate soft splits and token layers, re-structurizing tokens into an image.

    P59. Image (B, C, H, W) -> tokens (B, N, D) and their grid:
        T_0 = SoftSplit_0(I);  for i >= 1: T_i' = layer_i(T_{i-1}); I_i = reshape(T_i') to (B, e, h_i, w_i);
        T_i = SoftSplit_i(I_i);  out = Linear(T_last)
    The paper's module: kernels (7, 3, 3), strides (4, 2, 2), paddings (2, 1, 1): 224 -> 56 -> 28 -> 14 grids,
    196 tokens; one token layer fewer than splits.
    """

    def __init__(self, in_chans: int = 3, dim: int = 768, token_dim: int = 64,
                 tokens_type: Literal["performer", "transformer"] = "performer", kernel_ratio: float = 0.5,
                 kernels: tuple[int, ...] = (7, 3, 3), strides: tuple[int, ...] = (4, 2, 2),
                 paddings: tuple[int, ...] = (2, 1, 1), token_drop: float = 0.1):
        super().__init__()
        if not len(kernels) == len(strides) == len(paddings) or len(kernels) < 1:
            raise FormersError(f"T2T: kernels, strides and paddings need one entry per soft split (the paper: 3), "
                               f"got {len(kernels)}, {len(strides)}, {len(paddings)}")
        if tokens_type not in ("performer", "transformer"):
            raise FormersError(f"T2T: tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        self.splits = nn.ModuleList(SoftSplit(k, s, p) for k, s, p in zip(kernels, strides, paddings, strict=True))
        widths = [in_chans * kernels[0] ** 2] + [token_dim * k ** 2 for k in kernels[1:]]

        def layer(width: int) -> nn.Module:
            if tokens_type == "performer":
                return T2TPerformerLayer(width, token_dim, kernel_ratio, token_drop)
            return T2TAttentionLayer(width, token_dim)

        self.layers = nn.ModuleList(layer(w) for w in widths[:-1])
        self.project = nn.Linear(widths[-1], dim)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """The token grid for an h x w image."""
        for split in self.splits:
            h, w = split.grid(h, w)
        return h, w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        B = x.shape[0]
        x, hw = self.splits[0](x)  # (B, h w, C k k)
        for layer, split in zip(self.layers, self.splits[1:], strict=True):
            x = layer(x)  # (B, h w, e)
            x = x.transpose(1, 2).reshape(B, x.shape[-1], *hw)  # re-structurize: (B, e, h, w)
            x, hw = split(x)  # (B, h' w', e k k)
        return self.project(x), hw  # (B, N, D)


class T2TViT(VisionModel):
    """Tokens-to-Token ViT: a T2T module, a class token, fixed sin-cos positions and a deep-narrow ViT.

    P59 (t2t_vit.py). images (B, C, H, W) -> T2TModule -> [cls; tokens] + sinusoid -> depth x ViTBlock -> LN
    -> class token -> Linear. Weights: trunc-normal(0.02) linears and class token, zero biases, unit LN.
    Other input sizes: the fixed table is resampled bicubically over the grid, as the code does when it
    transfers to 384 px. `tokens_type='transformer'` is T2T-ViT_t. Choice: the code's `qk_scale = D^-0.5` for
    its pretrained checkpoints is left out (no weights are loaded here); the scale is head_dim^-0.5.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, dim: int = 384,
                 depth: int = 14, heads: int = 6, mlp_ratio: float = 3.0, token_dim: int = 64,
                 tokens_type: Literal["performer", "transformer"] = "performer", kernel_ratio: float = 0.5,
                 kernels: tuple[int, ...] = (7, 3, 3), strides: tuple[int, ...] = (4, 2, 2),
                 paddings: tuple[int, ...] = (2, 1, 1), token_drop: float = 0.1, drop_path: float = 0.1,
                 qkv_bias: bool = False, global_pool: Literal["token", "avg", ""] = "token"):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise FormersError(f"t2t_vit: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        self.num_classes, self.in_chans, self.img_size, self.global_pool = num_classes, in_chans, img_size, global_pool
        self.num_features = dim
        self.t2t = T2TModule(in_chans, dim, token_dim, tokens_type, kernel_ratio, tuple(kernels), tuple(strides),
                             tuple(paddings), token_drop)
        self.grid = self.t2t.grid(img_size, img_size)
        if min(self.grid) < 1:
            raise FormersError(f"t2t_vit: img_size={img_size} leaves no token after the soft splits; use larger "
                               "images or smaller strides")
        stride = math.prod(strides)
        self.other_size = (self.grid[0] + 1) * stride  # one more token per side
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", on_default_device(sinusoid_table(self.grid[0] * self.grid[1] + 1, dim)[None]))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio, p, qkv_bias)
                                    for p in drop_path_rates(drop_path, depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + N, D), the class token first."""
        x, hw = self.t2t(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + grid_positions(self.pos_embed, self.grid, hw).to(x.dtype)
        for block in self.blocks:
            x = self.run(block, x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """'token': the class token; 'avg': the mean of the image tokens (timm's habit: the class token left out)."""
        if self.global_pool == "avg":
            return x[:, 1:].mean(dim=1)
        return super().pool(x)


# ------------------------------------------------------------------------------------------------- named sizes

# (dim, depth, heads, mlp_ratio, tokens_type); published params (README, with the frozen tables) in the comment
T2T_SIZES: dict[str, tuple[int, int, int, float, str]] = {
    "t2t_vit_7": (256, 7, 4, 2.0, "performer"),  # 4.3M
    "t2t_vit_10": (256, 10, 4, 2.0, "performer"),  # 5.9M
    "t2t_vit_12": (256, 12, 4, 2.0, "performer"),  # 6.9M
    "t2t_vit_14": (384, 14, 6, 3.0, "performer"),  # 21.5M (trainable 21,465,806)
    "t2t_vit_19": (448, 19, 7, 3.0, "performer"),  # 39.2M
    "t2t_vit_24": (512, 24, 8, 3.0, "performer"),  # 64.1M
    "t2t_vit_t_14": (384, 14, 6, 3.0, "transformer"),  # 21.5M
    "t2t_vit_t_19": (448, 19, 7, 3.0, "transformer"),  # 39.2M
    "t2t_vit_t_24": (512, 24, 8, 3.0, "transformer"),  # 64.1M
}


def _named(name: str, dim: int, depth: int, heads: int, mlp_ratio: float, tokens_type: str) -> Callable[..., T2TViT]:
    def factory(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, drop_path: float = 0.1) -> T2TViT:
        return T2TViT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dim=dim, depth=depth,
                      heads=heads, mlp_ratio=mlp_ratio, tokens_type=tokens_type, drop_path=drop_path)

    kind = "Performer" if tokens_type == "performer" else "softmax"
    title = "T2T-ViT" + ("_t" if tokens_type == "transformer" else "") + "-" + name.rsplit("_", 1)[1]
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"{title} (P59): {kind} token layers, ViT D={dim}, depth {depth}, {heads} heads, MLP ratio "
                       f"{mlp_ratio:g}.")
    return factory


for _name, _cfg in T2T_SIZES.items():
    globals()[_name] = register("model", _name, paper="P59")(_named(_name, *_cfg))

register("model", "t2t_vit", paper="P59")(T2TViT)


@register("model", "t2t_vit_tiny", paper="P59")
def t2t_vit_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path: float = 0.0) -> T2TViT:
    """T2T-ViT for 28x28 Fashion-MNIST (P59's mechanism at our size): 49 tokens, ViT D=128, depth 6; 0.87M params.

    Soft splits (kernel/stride/padding) 7/2/3, 3/2/1, 3/1/1 -> 14x14, 7x7, 7x7 grids; Performer token layers of
    width 32 (16 features); backbone 4 heads, MLP ratio 2. Choice: the paper's strides (4, 2, 2) would leave 2x2
    tokens of a 28x28 image; strides (2, 2, 1) keep an overlapping soft split at every step and give 49 backbone
    tokens. Token dropout 0 (the code's 0.1 is for ImageNet)."""
    return T2TViT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dim=128, depth=6, heads=4,
                  mlp_ratio=2.0, token_dim=32, kernels=(7, 3, 3), strides=(2, 2, 1), paddings=(3, 1, 1),
                  token_drop=0.0, drop_path=drop_path)


__all__ = ["SoftSplit", "T2TPerformerLayer", "T2TAttentionLayer", "T2TModule", "ViTBlock", "T2TViT",
           "sinusoid_table", "grid_positions", "t2t_vit_tiny", *T2T_SIZES]
