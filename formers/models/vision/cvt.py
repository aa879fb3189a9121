"""CvT: convolutional token embeddings and convolutional projections in a 3-stage vision Transformer (P47).

P47 "CvT: Introducing Convolutions to Vision Transformers" (Wu et al., ICCV 2021, arXiv 2103.15808). Facts from the
fact sheet (## P47) and the official code, microsoft/CvT `lib/models/cls_cvt.py` (`ConvEmbed`, `Attention`, `Block`,
`VisionTransformer`, `ConvolutionalVisionTransformer`, `get_cls_model`); parity peer: HF transformers
`CvtForImageClassification` (modeling_cvt.py).

    QuickGELU          x * sigmoid(1.702 x), the MLP activation of the official code
    ConvEmbed          overlapping conv (7/4/2 then 3/2/1) + LayerNorm: image or map -> tokens
    ConvProjection     depthwise conv + BatchNorm ('dw_bn'), average pooling ('avg') or nothing ('linear')
    ConvAttention      multi-head attention whose q/k/v read the convolved token map; k, v at stride 2
    CvTBlock           pre-LN block: x + DropPath(attn(LN x)), x + DropPath(mlp(LN x))
    CvTStage           ConvEmbed, an optional class token (last stage only), blocks
    CvT                the 3-stage classifier; `fuse()` folds each BatchNorm into its depthwise conv

Registered models: cvt (all options), cvt_13, cvt_21 (paper Table 2, 224x224, ImageNet-1k) and cvt_tiny (28x28).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from formers.models.vision.base import DropPath, VisionModel, drop_path_rates
from formers.nn.ffn import MLP
from formers.registry import FormersError, register

METHODS = ("dw_bn", "avg", "linear")
ACTS = ("quick_gelu", "gelu")


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU, x * sigmoid(1.702 x) (Hendrycks & Gimpel), used by the official CvT code
    (`get_cls_model(act_layer=QuickGELU)`). (...) -> (...)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvEmbed(nn.Module):
    """Convolutional token embedding (P47 §3.1): an overlapping strided conv, then LayerNorm over channels.

    (B, C_in, H, W) -> tokens (B, H' W', D) and the grid (H', W'), H' = floor((H + 2p - k) / s) + 1.
    """

    def __init__(self, in_chans: int, dim: int, kernel: int = 7, stride: int = 4, padding: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, H', W')
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (h, w)  # (B, H'W', D)


class ConvProjection(nn.Module):
    """The convolutional part of one of q, k, v (P47 §3.2, official `Attention._build_projection`).

    'dw_bn': depthwise k x k conv (no bias) then BatchNorm2d; 'avg': AvgPool2d(k, stride, ceil_mode=True);
    'linear': nothing. Map (B, D, H, W) -> tokens (B, H_s W_s, D); padding k // 2, so H_s = ceil(H / stride) for
    'dw_bn' with k = 3.
    """

    def __init__(self, dim: int, kernel: int = 3, stride: int = 1, method: str = "dw_bn"):
        super().__init__()
        if method not in METHODS:
            raise FormersError(f"cvt: unknown projection method '{method}'; choose one of {', '.join(METHODS)}")
        self.method = method
        if method == "dw_bn":
            self.conv = nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim, bias=False)
            self.bn: nn.Module = nn.BatchNorm2d(dim)
        elif method == "avg":
            self.pool = nn.AvgPool2d(kernel, stride=stride, padding=kernel // 2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "dw_bn":
            x = self.bn(self.conv(x))
        elif self.method == "avg":
            x = self.pool(x)
        return x.flatten(2).transpose(1, 2)  # (B, H_s W_s, D)

    @torch.no_grad()
    def fold_bn(self) -> None:
        """Merge an eval-mode BatchNorm into the depthwise conv: w' = w g / sqrt(var + eps), b' = beta - g mean /
        sqrt(var + eps). Exact at inference; the conv gains a bias."""
        if self.method != "dw_bn" or not isinstance(self.bn, nn.BatchNorm2d):
            return
        bn, conv = self.bn, self.conv
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (D,)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, groups=conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * a[:, None, None, None])
        fused.bias.copy_(bn.bias - a * bn.running_mean)
        self.conv, self.bn = fused, nn.Identity()


class ConvAttention(nn.Module):
    """Multi-head self-attention with convolutional projections (P47 §3.2, official `Attention`).

    With the token map X (B, D, H, W) and any leading extra tokens t (the class token) kept out of the convolution:
        q = W_q [t; Conv_q(X)],  k = W_k [t; Conv_k(X)],  v = W_v [t; Conv_v(X)]
        out = W_o concat_h softmax(q_h k_h^T / sqrt(D)) v_h
    Conv_q has stride 1; Conv_k and Conv_v have stride `stride_kv` (2: a quarter of the keys and values).
    x (B, T + H W, D) with hw = (H, W) -> (B, T + H W, D).

    The scale is D ** -0.5 with D the model width, not the head width: both the official code
    (`self.scale = dim_out ** -0.5`) and HF do this; the paper writes plain MHSA with no scale of its own
    (UNCERTAIN). We follow the code, which the published weights were trained with. Stride 1 for q is fixed (the
    residual needs as many queries as tokens).
    """

    def __init__(self, dim: int, heads: int = 1, kernel: int = 3, stride_kv: int = 2, method: str = "dw_bn",
                 qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise FormersError(f"cvt: dim={dim} is not divisible by heads={heads}; change one of them")
        if stride_kv < 1:
            raise FormersError(f"cvt: stride_kv must be >= 1, got {stride_kv}")
        self.dim, self.heads = dim, heads
        self.scale = dim ** -0.5
        # official: with 'avg' the queries are not pooled (method 'linear' for q)
        self.conv_q = ConvProjection(dim, kernel, 1, "linear" if method == "avg" else method)
        self.conv_k = ConvProjection(dim, kernel, stride_kv, method)
        self.conv_v = ConvProjection(dim, kernel, stride_kv, method)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        h, w = hw
        extra = N - h * w  # leading tokens that are not on the grid (the class token)
        if extra < 0:
            raise FormersError(f"cvt: {N} tokens cannot hold a {h}x{w} grid")
        lead = x[:, :extra]  # (B, T, D)
        grid = x[:, extra:].transpose(1, 2).reshape(B, D, h, w)  # (B, D, H, W)
        H, Dh = self.heads, D // self.heads

        def heads(proj: nn.Linear, conv: ConvProjection) -> torch.Tensor:
            t = proj(torch.cat([lead, conv(grid)], dim=1))  # (B, T + H_s W_s, D)
            return t.view(B, -1, H, Dh).transpose(1, 2)  # (B, H, T + H_s W_s, Dh)

        q, k, v = heads(self.proj_q, self.conv_q), heads(self.proj_k, self.conv_k), heads(self.proj_v, self.conv_v)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class CvTBlock(nn.Module):
    """Convolutional Transformer block (P47 Fig. 2, official `Block`): pre-LN attention and MLP with drop-path.

        x = x + DropPath(ConvAttention(LN(x), hw));  x = x + DropPath(MLP(LN(x)))
    MLP: Linear(D, r D), act, Linear(r D, D) (the formers `mlp` ffn). (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int = 1, mlp_ratio: float = 4.0, kernel: int = 3, stride_kv: int = 2,
                 method: str = "dw_bn", qkv_bias: bool = True, act: str = "quick_gelu", drop_path: float = 0.0):
        super().__init__()
        if act not in ACTS:
            raise FormersError(f"cvt: unknown act '{act}'; choose one of {', '.join(ACTS)}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ConvAttention(dim, heads, kernel, stride_kv, method, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLP(dim, mult=mlp_ratio, act="gelu")
        if act == "quick_gelu":
            self.mlp.act = QuickGELU()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """One CvT stage (official `VisionTransformer`): ConvEmbed, an optional class token prepended, then blocks."""

    def __init__(self, in_chans: int, dim: int, depth: int, heads: int, embed: tuple[int, int, int],
                 cls_token: bool, drop_path: float, **block):
        super().__init__()
        self.embed = ConvEmbed(in_chans, dim, *embed)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.blocks = nn.ModuleList(CvTBlock(dim, heads, drop_path=p, **block)
                                    for p in drop_path_rates(drop_path, depth))


@register("model", "cvt", paper="P47")
class CvT(VisionModel):
    """Convolutional vision Transformer (P47): 3 stages of ConvEmbed + convolutional-projection blocks, no position
    embedding, a class token in the last stage only; head = LayerNorm, class token (or token mean), Linear.

    images (B, C, H, W) -> logits (B, num_classes); forward_features -> tokens (B, 1 + H3 W3, D3) after the final
    LayerNorm (no class token: (B, H3 W3, D3), pooled by the mean).
    Options are per stage where the official spec is (dims, depths, heads, embed_*, drop_path); `method`,
    `kernel`, `stride_kv` apply to every stage, as in all published configs.

    Init (official `_init_weights_trunc_normal`): Linear weights trunc-normal(0.02) with zero bias, LayerNorm and
    BatchNorm weights 1 and biases 0, convs PyTorch's default, class token trunc-normal(0.02); the head bias is 0
    (UNCERTAIN: the official head keeps PyTorch's default bias init; we use the timm habit).
    `act`: 'quick_gelu' is the official code's MLP activation (the published weights); HF's port uses the exact
    GELU ('gelu'), so HF parity needs act='gelu'. Drop-path rises linearly inside each stage (official).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 dims: Sequence[int] = (64, 192, 384), depths: Sequence[int] = (1, 2, 10),
                 heads: Sequence[int] = (1, 3, 6), embed_kernel: Sequence[int] = (7, 3, 3),
                 embed_stride: Sequence[int] = (4, 2, 2), embed_padding: Sequence[int] = (2, 1, 1),
                 mlp_ratio: float = 4.0, kernel: int = 3, stride_kv: int = 2, method: str = "dw_bn",
                 qkv_bias: bool = True, cls_token: bool = True, act: str = "quick_gelu",
                 drop_path: Sequence[float] = (0.0, 0.0, 0.1)):
        super().__init__()
        per_stage = {"depths": depths, "heads": heads, "embed_kernel": embed_kernel, "embed_stride": embed_stride,
                     "embed_padding": embed_padding, "drop_path": drop_path}
        for key, val in per_stage.items():
            if len(val) != len(dims):
                raise FormersError(f"cvt: {key} has {len(val)} entries but dims has {len(dims)}; give one per stage")
        if method not in METHODS:
            raise FormersError(f"cvt: unknown method '{method}'; choose one of {', '.join(METHODS)}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.other_size = max(32, img_size // 2)  # no position embedding: any side that survives the strides
        self.global_pool = "token" if cls_token else "avg"
        self.num_features = dims[-1]
        last = len(dims) - 1
        self.stages = nn.ModuleList(
            CvTStage(in_chans if i == 0 else dims[i - 1], dims[i], depths[i], heads[i],
                     (embed_kernel[i], embed_stride[i], embed_padding[i]), cls_token and i == last, drop_path[i],
                     mlp_ratio=mlp_ratio, kernel=kernel, stride_kv=stride_kv, method=method, qkv_bias=qkv_bias,
                     act=act)
            for i in range(len(dims)))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-5)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x, (h, w) = stage.embed(x)  # (B, H W, D)
            if stage.cls_token is not None:  # only the last stage has one
                x = torch.cat([stage.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + H W, D)
            for block in stage.blocks:
                x = self.run(block, x, (h, w))
            if i < last:
                x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, D, H, W) for the next ConvEmbed
        return self.norm(x)

    def fuse(self) -> CvT:
        """An eval-mode copy with every BatchNorm of the convolutional projections folded into its conv."""
        model = copy.deepcopy(self).eval()
        for m in model.modules():
            if isinstance(m, ConvProjection):
                m.fold_bn()
        return model


@register("model", "cvt_13", paper="P47")
def cvt_13(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, drop_path: float = 0.1,
           act: str = "quick_gelu") -> CvT:
    """CvT-13 (P47 Table 2): dims 64/192/384, depths 1/2/10, heads 1/3/6; 20M parameters (paper; 19,997,480 here
    and in HF). Drop-path 0.1 in the last stage (HF's default CvtConfig, which is CvT-13)."""
    return CvT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dims=(64, 192, 384),
               depths=(1, 2, 10), heads=(1, 3, 6), act=act, drop_path=(0.0, 0.0, drop_path))


@register("model", "cvt_21", paper="P47")
def cvt_21(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, drop_path: float = 0.1,
           act: str = "quick_gelu") -> CvT:
    """CvT-21 (P47 Table 2): dims 64/192/384, depths 1/4/16, heads 1/3/6; 32M parameters (paper; 31,622,696 here
    and in HF). Drop-path 0.1 in the last stage (UNCERTAIN: the official CvT-21 yaml was not found; as CvT-13)."""
    return CvT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dims=(64, 192, 384),
               depths=(1, 4, 16), heads=(1, 3, 6), act=act, drop_path=(0.0, 0.0, drop_path))


@register("model", "cvt_tiny", paper="P47")
def cvt_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path: float = 0.0,
             act: str = "quick_gelu") -> CvT:
    """CvT for 28x28 (ours): dims 32/64/128, depths 1/2/3, heads 1/2/4; a 7x7 stride-2 first embedding gives 14x14 =
    196 tokens (keys/values 7x7), then 7x7 and 4x4 (+ class token); every stage keeps the conv embedding and the
    stride-2 dw_bn key/value projections. 821,514 parameters."""
    return CvT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dims=(32, 64, 128),
               depths=(1, 2, 3), heads=(1, 2, 4), embed_kernel=(7, 3, 3), embed_stride=(2, 2, 2),
               embed_padding=(3, 1, 1), act=act, drop_path=(0.0, 0.0, drop_path))


__all__ = ["CvT", "CvTBlock", "CvTStage", "ConvAttention", "ConvEmbed", "ConvProjection", "QuickGELU",
           "cvt_13", "cvt_21", "cvt_tiny"]
