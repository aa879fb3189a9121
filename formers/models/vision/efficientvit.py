"""EfficientViT (P12): "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention"
(Liu et al., CVPR 2023, arXiv:2305.07027). Not MIT-Han-Lab's EfficientViT (timm `efficientvit_b*`).

Facts from the official code, microsoft/Cream `EfficientViT/classification/model/efficientvit.py` and `build.py`,
and timm `timm/models/efficientvit_msra.py` (names, config table); the code below is ours.

    ConvBN                  Conv2d (no bias) + BatchNorm2d, folds into one Conv2d (`fused()`)
    SqueezeExcite           SE gate of the patch merging (ratio 0.25, timm's rounding to multiples of 8)
    FFN                     1x1 Conv-BN (d -> 2d), ReLU, 1x1 Conv-BN (2d -> d)
    CascadedGroupAttention  per-head channel split, head i sees its split plus head i-1's output (the cascade)
    LocalWindowAttention    CGA inside 7x7 windows (zero-padded), or over the whole map when it fits one window
    EfficientViTBlock       the sandwich: DW, FFN, attention, DW, FFN, each residual
    PatchMerging            inverted residual: 1x1 (4x), ReLU, DW 3x3 stride 2, ReLU, SE, 1x1
    EfficientViT            the backbone; `fuse()` folds every BN (Conv+BN -> Conv, BN+Linear head -> Linear)

Registered models (family `model`, paper P12): `efficientvit_m0` .. `efficientvit_m5` (timm's names, the paper's
configs at 224), `efficientvit_tiny` (28x28 Fashion-MNIST) and the generic `efficientvit_msra` with every option.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from formers.models.vision.base import DropPath, VisionModel, drop_path_rates
from formers.registry import FormersError, register


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor` (at least `divisor`): timm's SE width rounding (round_limit 0)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class ConvBN(nn.Module):
    """Conv2d without bias followed by BatchNorm2d; padding k // 2. (B, Cin, H, W) -> (B, Cout, H', W').

    `bn_init` is the BN weight at init: the official code starts the last BN of every residual branch at 0 (the
    block's depthwise convs, the FFN's second conv, the attention projection), so each branch starts as zero.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def fused(self) -> nn.Conv2d:
        """One Conv2d equal to this module in eval mode: W' = W * s, b' = beta - mu * s, s = gamma / sqrt(var + eps)."""
        c, bn = self.conv, self.bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (Cout,)
        out = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                        bias=True, device=c.weight.device, dtype=c.weight.dtype)
        out.weight.copy_(c.weight * s[:, None, None, None])
        out.bias.copy_(bn.bias - bn.running_mean * s)
        return out


@torch.no_grad()
def fold_bn_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """Linear(BN(x)) in eval mode as one Linear: W' = W diag(s), b' = W (beta - mu s) + b, s = gamma / sqrt(var+eps)."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (D,)
    shift = bn.bias - bn.running_mean * s  # (D,)
    out = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight * s[None, :])
    out.bias.copy_(linear.weight @ shift + (linear.bias if linear.bias is not None else 0))
    return out


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2), hidden = round8(ratio * C).

    timm's `SqueezeExcite` (SEModule) as the official code imports it. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, ratio: float = 0.25):
        super().__init__()
        hidden = _make_divisible(channels * ratio)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * torch.sigmoid(s)


class Residual(nn.Module):
    """x + drop_path(m(x)) (the official `Residual`: per-sample stochastic depth on the branch)."""

    def __init__(self, m: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.m = m
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.m(x))


class FFN(nn.Module):
    """Pointwise FFN on maps: ConvBN 1x1 (d -> h), ReLU, ConvBN 1x1 (h -> d, BN weight 0 at init); h = 2d."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvBN(dim, hidden)
        self.pw2 = ConvBN(hidden, dim, bn_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(F.relu(self.pw1(x)))


def bias_index(h: int, w: int, side: int, device: torch.device | None = None) -> torch.Tensor:
    """LeViT-style relative-position index for an h x w region: idx[p, p'] = |dy| * side + |dx|, (h*w, h*w).

    The official code numbers the offsets of a side x side window in first-seen order, which for points in row-major
    order is exactly |dy| * side + |dx|; using that formula lets a smaller region (h, w <= side) reuse the table.
    """
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (h*w,)
    return (ys[:, None] - ys[None, :]).abs() * side + (xs[:, None] - xs[None, :]).abs()


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention (P12, Sec. 3.3, Eq. 1-2) on one region of at most `resolution` x `resolution`.

    The input X (B, C, H, W) is split into h channel groups X_1..X_h (C/h channels each). Head j computes

        X'_j = X_j + Xt_{j-1}  (j > 1),  X'_1 = X_1                       (the cascade)
        q, k, v = split(ConvBN_1x1(X'_j)),  q, k: key_dim channels, v: C/h channels
        q = DWConvBN_{k_j}(q)                                               (token interaction on q)
        Xt_j = v softmax(q^T k / sqrt(key_dim) + B_j)^T                      (B_j: learnable bias by |dy|, |dx|)

    and the output is ConvBN_1x1(ReLU(concat(Xt_1..Xt_h))) (BN weight 0 at init). Because head j's input adds head
    j-1's output, the value width must equal C/h (the official attn_ratio = C / (key_dim * h)).

    The bias table holds one value per offset of a `resolution` x `resolution` window, (h, resolution^2); any region
    of at most that size takes its entries by |dy| * resolution + |dx| (the official index at the built size).
    Shapes (B, C, H, W) -> (B, C, H, W), H, W <= resolution.
    """

    def __init__(self, dim: int, key_dim: int = 16, heads: int = 4, resolution: int = 7,
                 kernels: Sequence[int] = (5, 5, 5, 5)):
        super().__init__()
        if dim % heads:
            raise FormersError(f"efficientvit: embed dim {dim} must be divisible by its heads ({heads})")
        if len(kernels) < heads:
            raise FormersError(f"efficientvit: kernels needs one size per head ({heads}), got {list(kernels)}")
        self.heads, self.key_dim, self.val_dim, self.resolution = heads, key_dim, dim // heads, resolution
        self.scale = key_dim ** -0.5
        self.qkvs = nn.ModuleList(ConvBN(dim // heads, 2 * key_dim + self.val_dim) for _ in range(heads))
        self.dws = nn.ModuleList(ConvBN(key_dim, key_dim, k, groups=key_dim) for k in kernels[:heads])
        self.proj = ConvBN(self.val_dim * heads, dim, bn_init=0.0)
        self.attention_biases = nn.Parameter(torch.zeros(heads, resolution * resolution))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H > self.resolution or W > self.resolution:
            raise FormersError(f"efficientvit: attention region {H}x{W} is larger than the bias table "
                               f"({self.resolution}x{self.resolution}); partition into windows first")
        bias = self.attention_biases[:, bias_index(H, W, self.resolution, x.device)]  # (h, N, N)
        groups = x.chunk(self.heads, dim=1)  # h x (B, C/h, H, W)
        outs = []
        feat = groups[0]
        for i in range(self.heads):
            if i > 0:
                feat = feat + groups[i]  # the cascade: previous head's output + this head's split
            q, k, v = self.qkvs[i](feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, kd, N), (B, kd, N), (B, vd, N)
            attn = (q.transpose(1, 2) @ k * self.scale + bias[i]).softmax(dim=-1)  # (B, N, N)
            feat = (v @ attn.transpose(1, 2)).view(B, self.val_dim, H, W)  # (B, vd, H, W)
            outs.append(feat)
        return self.proj(F.relu(torch.cat(outs, dim=1)))


class LocalWindowAttention(nn.Module):
    """CGA in non-overlapping windows (P12; official `LocalWindowAttention`). (B, C, H, W) -> (B, C, H, W).

    The window side is R = min(window, resolution) where `resolution` is the map side at the training size. A map
    that fits in one R x R window is attended whole; otherwise it is zero-padded at the bottom/right to multiples of
    R, split into R x R windows, attended per window and cropped back (padded positions act as keys, as in the
    official code). At the training size this is the official behaviour; CHOICE: the official code asserts the
    training size and partitions by `window` even when the table is smaller — partitioning by R lets any input side
    run with the same parameters.
    """

    def __init__(self, dim: int, key_dim: int = 16, heads: int = 4, resolution: int = 14, window: int = 7,
                 kernels: Sequence[int] = (5, 5, 5, 5)):
        super().__init__()
        if window < 1:
            raise FormersError(f"efficientvit: window size must be >= 1, got {window}")
        self.window = min(window, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, heads, self.window, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        r = self.window
        if H <= r and W <= r:
            return self.attn(x)
        pad_b, pad_r = (-H) % r, (-W) % r
        x = F.pad(x, (0, pad_r, 0, pad_b))  # (B, C, pH, pW)
        nh, nw = (H + pad_b) // r, (W + pad_r) // r
        x = x.view(B, C, nh, r, nw, r).permute(0, 2, 4, 1, 3, 5).reshape(B * nh * nw, C, r, r)  # (B nh nw, C, r, r)
        x = self.attn(x)
        x = x.view(B, nh, nw, C, r, r).permute(0, 3, 1, 4, 2, 5).reshape(B, C, nh * r, nw * r)  # (B, C, pH, pW)
        return x[:, :, :H, :W]


class EfficientViTBlock(nn.Module):
    """The sandwich layout (P12, Sec. 3.1, Eq. 1): N x (DW + FFN), one attention, N x (DW + FFN), N = 1.

    x -> +DWConvBN3x3 -> +FFN -> +LocalWindowAttention(CGA) -> +DWConvBN3x3 -> +FFN, every step residual (DW BNs
    start at 0). Shapes (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, key_dim: int = 16, heads: int = 4, resolution: int = 14, window: int = 7,
                 kernels: Sequence[int] = (5, 5, 5, 5), drop_path: float = 0.0):
        super().__init__()
        self.dw0 = Residual(ConvBN(dim, dim, 3, groups=dim, bn_init=0.0), drop_path)
        self.ffn0 = Residual(FFN(dim, 2 * dim), drop_path)
        self.mixer = Residual(LocalWindowAttention(dim, key_dim, heads, resolution, window, kernels), drop_path)
        self.dw1 = Residual(ConvBN(dim, dim, 3, groups=dim, bn_init=0.0), drop_path)
        self.ffn1 = Residual(FFN(dim, 2 * dim), drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class PatchMerging(nn.Module):
    """Downsampling (P12, Sec. 3.4): ConvBN 1x1 (C -> 4C), ReLU, DWConvBN 3x3 stride 2, ReLU, SE(0.25), ConvBN 1x1
    (4C -> C'). (B, C, H, W) -> (B, C', ceil(H/2), ceil(W/2))."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden = 4 * dim
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, stride=2, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = ConvBN(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(F.relu(self.conv2(F.relu(self.conv1(x))))))


class Downsample(nn.Sequential):
    """Between stages: +DW3x3 +FFN at C, PatchMerging C -> C', +DW3x3 +FFN at C' (official `down_ops` subsample;
    these DW BNs start at 1, unlike the blocks'). No stochastic depth here, as in the official code."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.res1 = nn.Sequential(Residual(ConvBN(dim, dim, 3, groups=dim)), Residual(FFN(dim, 2 * dim)))
        self.patchmerge = PatchMerging(dim, out_dim)
        self.res2 = nn.Sequential(Residual(ConvBN(out_dim, out_dim, 3, groups=out_dim)),
                                  Residual(FFN(out_dim, 2 * out_dim)))


class EfficientViTStage(nn.Module):
    """Optional downsampling (every stage but the first), then `depth` sandwich blocks."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


def _conv_out(side: int, stride: int) -> int:
    return (side - 1) // stride + 1  # 3x3 conv, padding 1


class EfficientViT(VisionModel):
    """EfficientViT (P12): memory-efficient ViT with cascaded group attention, sandwich blocks and BN throughout.

    Stem: four 3x3 ConvBN (C/8, C/4, C/2, C; ReLU between) with strides `stem_strides` (official: 2,2,2,2 = 16x,
    224 -> 14x14). Three stages of `depth[i]` sandwich blocks at width `embed_dim[i]`, with `num_heads[i]` CGA heads
    of key width `key_dim[i]` in `window_size[i]` windows and query DW kernels `kernels[:heads]`; stages 2 and 3
    start with `Downsample` (stride 2). Head: global average pool, BatchNorm1d, Linear (the official BN_Linear;
    here `head_norm` then `head` so that `self.head` is a plain Linear). `forward_features` returns the map
    (B, C3, H/64, W/64).

    Init (official): convs PyTorch default, BN weight 1 except 0 for the last BN of each branch in the blocks (and of
    every FFN and attention projection; see ConvBN, Downsample), head weight
    trunc-normal 0.02, attention biases 0. `fuse()` returns a copy in eval mode whose every ConvBN is one Conv2d and
    whose head BN is folded into the Linear (no BatchNorm left).

    Other input sides work: windows pad (see LocalWindowAttention); `other_size` = img_size + 4 (28 -> 32).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 embed_dim: Sequence[int] = (64, 128, 192), depth: Sequence[int] = (1, 2, 3),
                 num_heads: Sequence[int] = (4, 4, 4), key_dim: Sequence[int] = (16, 16, 16),
                 window_size: Sequence[int] = (7, 7, 7), kernels: Sequence[int] = (5, 5, 5, 5),
                 stem_strides: Sequence[int] = (2, 2, 2, 2), drop_path: float = 0.0):
        super().__init__()
        n = len(embed_dim)
        lengths = [len(s) for s in (embed_dim, depth, num_heads, key_dim, window_size)]
        if len(set(lengths)) != 1:
            raise FormersError("efficientvit: embed_dim, depth, num_heads, key_dim and window_size need one entry per "
                               f"stage; got lengths {lengths}")
        if len(stem_strides) != 4:
            raise FormersError(f"efficientvit: stem_strides needs 4 strides (one per stem conv), got {stem_strides}")
        if embed_dim[0] % 8:
            raise FormersError(f"efficientvit: embed_dim[0] must be a multiple of 8 (the stem starts at C/8), "
                               f"got {embed_dim[0]}")
        if max(num_heads) > len(kernels):
            raise FormersError(f"efficientvit: kernels needs one size per head (up to {max(num_heads)}), "
                               f"got {list(kernels)}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.other_size = img_size + 4
        self.global_pool = "avg"
        self.num_features = embed_dim[-1]

        c = embed_dim[0]
        chans = [in_chans, c // 8, c // 4, c // 2, c]
        stem: list[nn.Module] = []
        side = img_size
        for i, s in enumerate(stem_strides):
            stem.append(ConvBN(chans[i], chans[i + 1], 3, stride=s))
            if i < 3:
                stem.append(nn.ReLU())
            side = _conv_out(side, s)
        self.patch_embed = nn.Sequential(*stem)

        rates = iter(drop_path_rates(drop_path, sum(depth)))
        stages = []
        for i in range(n):
            if i > 0:
                down: nn.Module = Downsample(embed_dim[i - 1], embed_dim[i])
                side = _conv_out(side, 2)
            else:
                down = nn.Identity()
            blocks = [EfficientViTBlock(embed_dim[i], key_dim[i], num_heads[i], side, window_size[i], kernels,
                                        next(rates)) for _ in range(depth[i])]
            stages.append(EfficientViTStage(down, blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_side = side  # the last map's side at img_size

        self.head_norm: nn.Module = nn.Identity()
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A new BN + Linear head (trunc-normal 0.02 weight, zero bias), or none for num_classes = 0."""
        w = next(self.parameters())
        if num_classes > 0:
            self.head_norm = nn.BatchNorm1d(self.num_features, device=w.device, dtype=w.dtype)
            self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head_norm, self.head = nn.Identity(), nn.Identity()
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, C1, H/16, W/16) with the official stem
        for stage in self.stages:
            if not isinstance(stage.downsample, nn.Identity):
                x = self.run(stage.downsample, x)
            for block in stage.blocks:
                x = self.run(block, x)
        return x  # (B, C3, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)  # (B, C3)
        if pre_logits:
            return x
        return self.head(self.head_drop(self.head_norm(x)))

    def fuse(self) -> EfficientViT:
        """A copy for inference (eval mode) with every ConvBN folded into a Conv2d and the head BN into the Linear."""
        fused = copy.deepcopy(self).eval()
        _fold_conv_bn(fused)
        if isinstance(fused.head_norm, nn.BatchNorm1d) and isinstance(fused.head, nn.Linear):
            fused.head = fold_bn_linear(fused.head_norm, fused.head)
            fused.head_norm = nn.Identity()
        return fused


def _fold_conv_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, ConvBN):
            setattr(module, name, child.fused())
        else:
            _fold_conv_bn(child)


# -- registered configs ------------------------------------------------------------------------------------------
# The paper's M0-M5 (official build.py = timm efficientvit_msra.py); key_dim 16 and windows 7 everywhere.
# Published params (README, 1000 classes): 2.3 / 3.0 / 4.2 / 6.9 / 8.8 / 12.4M.
CONFIGS: dict[str, dict] = {
    "efficientvit_m0": dict(embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    "efficientvit_m1": dict(embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    "efficientvit_m2": dict(embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    "efficientvit_m3": dict(embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    "efficientvit_m4": dict(embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    "efficientvit_m5": dict(embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}


def _published(name: str, cfg: dict) -> None:
    def factory(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                drop_path: float = 0.0) -> EfficientViT:
        return EfficientViT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_path=drop_path, **cfg)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"EfficientViT-{name[-2:].upper()} (P12): embed {cfg['embed_dim']}, depth {cfg['depth']}, "
                       f"heads {cfg['num_heads']}, q kernels {cfg['kernels']}, 224x224, stem 16x.")
    register("model", name, paper="P12")(factory)


for _name, _cfg in CONFIGS.items():
    _published(_name, _cfg)


@register("model", "efficientvit_tiny", paper="P12")
def efficientvit_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                      drop_path: float = 0.0) -> EfficientViT:
    """EfficientViT for 28x28 (P12 mechanisms, our size): stem strides (2,2,1,1), stages 7x7 / 4x4 / 2x2.

    CHANGED from the paper: the stem downsamples 4x instead of 16x (strides 2,2,1,1 instead of 2,2,2,2; still four
    ConvBN layers), so a 28x28 image gives 7x7 = 49 tokens in stage 1 (one 7x7 window), 4x4 in stage 2, 2x2 in
    stage 3, each stage with its cascaded group attention. A 32x32 input (`other_size`) gives 8x8 in stage 1,
    attended as four zero-padded 7x7 windows. Widths (48, 96, 144), depth (1, 2, 3) (as M0-M4), 3 heads (key 16,
    values C/3) and q kernels (7, 5, 3) are ours, chosen for ~1.3M parameters and CPU speed (a 2x stem, 14x14 in
    stage 1, was ~4x slower per image).
    """
    return EfficientViT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, embed_dim=(48, 96, 144),
                        depth=(1, 2, 3), num_heads=(3, 3, 3), key_dim=(16, 16, 16), window_size=(7, 7, 7),
                        kernels=(7, 5, 3), stem_strides=(2, 2, 1, 1), drop_path=drop_path)


register("model", "efficientvit_msra", paper="P12")(EfficientViT)

__all__ = ["ConvBN", "SqueezeExcite", "FFN", "CascadedGroupAttention", "LocalWindowAttention", "EfficientViTBlock",
           "PatchMerging", "EfficientViT", "fold_bn_linear", "bias_index", "CONFIGS"]
