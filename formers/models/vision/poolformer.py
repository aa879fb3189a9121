"""MetaFormer / PoolFormer: a Transformer block whose token mixer is plain average pooling (P53).

P53 "MetaFormer Is Actually What You Need for Vision" (Yu et al., CVPR 2022, arXiv 2111.11418). Facts from the
fact sheet (## P53) and the official code, sail-sg/poolformer `models/poolformer.py` (`PatchEmbed`, `GroupNorm`,
`Pooling`, `Mlp`, `PoolFormerBlock`, `basic_blocks`, `PoolFormer`, `poolformer_s12` .. `poolformer_m48`); model sizes
and drop-path rates from its README; parity peer: HF transformers `PoolFormerForImageClassification`.

    PatchEmbed       strided conv (stem 7/4/2, downsampling 3/2/1) on channels-first maps, no norm
    GroupNorm1       GroupNorm with one group: normalises each sample over (C, H, W), per-channel affine
    Pooling          the token mixer: AvgPool2d(3, stride 1, pad 1, count_include_pad=False)(x) - x, no parameters
    ConvMlp          1x1 conv, GELU, 1x1 conv (a per-pixel MLP)
    MetaFormerBlock  x = x + DropPath(g1 * Mixer(Norm(x)));  x = x + DropPath(g2 * Mlp(Norm(x)))
    PoolFormer       4 stages of PatchEmbed + blocks; head = GroupNorm1, global average pool, Linear

Registered models: poolformer (all options), poolformer_s12/s24/s36/m36/m48 (timm's names) and poolformer_tiny.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from formers.models.vision.base import DropPath, LayerScale, VisionModel, drop_path_rates
from formers.registry import FormersError, register

MIXERS = ("pooling", "identity")


class PatchEmbed(nn.Module):
    """Patch embedding / downsampling by one strided conv (official `PatchEmbed`, norm_layer=None).
    (B, C_in, H, W) -> (B, D, H', W'), H' = floor((H + 2p - k) / s) + 1."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with 1 group (official `GroupNorm`): y = (x - mean) / sqrt(var + eps) * g_c + b_c, mean and var of
    each sample over all of (C, H, W). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(1, dim, eps=eps)


class Pooling(nn.Module):
    """PoolFormer's token mixer (P53 Eq. 4): Pool(x) - x, the average over the k x k neighbourhood (stride 1,
    padding k // 2, padded positions not counted) minus the input itself, so the residual branch adds only the
    neighbours' difference. No parameters. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise FormersError(f"poolformer: pool_size must be odd and >= 1 to keep the map size, got {pool_size}")
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlp(nn.Module):
    """Channel MLP as 1x1 convs (official `Mlp`): fc2(GELU(fc1 x)), hidden = mlp_ratio * dim.
    (B, D, H, W) -> (B, D, H, W)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        for fc in (self.fc1, self.fc2):  # official Mlp._init_weights
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MetaFormerBlock(nn.Module):
    """The MetaFormer block (P53 Eq. 1-3, official `PoolFormerBlock`), channels-first:

        x = x + DropPath(g1 * TokenMixer(GroupNorm1(x)))
        x = x + DropPath(g2 * ConvMlp(GroupNorm1(x)))
    g1, g2 per-channel layer scales (init `layer_scale`; None or 0: no scale). mixer 'pooling' (PoolFormer) or
    'identity' (the paper's ablation: the MetaFormer with no token mixing). (B, D, H, W) -> (B, D, H, W).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, pool_size: int = 3, mixer: str = "pooling",
                 layer_scale: float | None = 1e-5, drop_path: float = 0.0):
        super().__init__()
        if mixer not in MIXERS:
            raise FormersError(f"poolformer: unknown mixer '{mixer}'; choose one of {', '.join(MIXERS)}")
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = Pooling(pool_size) if mixer == "pooling" else nn.Identity()
        self.norm2 = GroupNorm1(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layer_scale, channels_first=True) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale, channels_first=True) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PoolFormerStage(nn.Module):
    """A patch embedding (the stem for stage 0, a downsampling conv after) followed by MetaFormer blocks."""

    def __init__(self, embed: PatchEmbed, blocks: list[MetaFormerBlock]):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)


@register("model", "poolformer", paper="P53")
class PoolFormer(VisionModel):
    """PoolFormer (P53): a 4-stage hierarchical MetaFormer with the pooling token mixer.

    Stem conv 7/4/2 (H/4), then a 3/2/1 conv before each later stage (H/8, H/16, H/32); head: GroupNorm1, mean
    over H, W, Linear. images (B, C, H, W) -> logits (B, num_classes); forward_features -> map (B, D4, H/32, W/32)
    after the final norm.

    Init (official `cls_init_weights` and `Mlp._init_weights`): Linear and the MLP's 1x1 convs trunc-normal(0.02)
    with zero bias; the patch-embedding convs keep PyTorch's default init; GroupNorm 1 / 0; layer scales
    `layer_scale` (1e-5, or 1e-6 for S36/M36/M48). Drop-path rises linearly from 0 over all blocks of the network.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 depths: Sequence[int] = (2, 2, 6, 2), dims: Sequence[int] = (64, 128, 320, 512),
                 mlp_ratio: float = 4.0, pool_size: int = 3, mixer: str = "pooling", layer_scale: float | None = 1e-5,
                 drop_path: float = 0.0, stem_kernel: int = 7, stem_stride: int = 4, stem_padding: int = 2,
                 down_kernel: int = 3, down_stride: int = 2, down_padding: int = 1):
        super().__init__()
        if len(depths) != len(dims):
            raise FormersError(f"poolformer: depths has {len(depths)} entries but dims has {len(dims)}; give one per "
                               "stage")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.other_size = max(32, img_size // 2)  # no position embedding: any side that survives the strides
        self.global_pool = "avg"
        self.num_features = dims[-1]
        rates = drop_path_rates(drop_path, sum(depths))
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            embed = (PatchEmbed(in_chans, dim, stem_kernel, stem_stride, stem_padding) if i == 0
                     else PatchEmbed(dims[i - 1], dim, down_kernel, down_stride, down_padding))
            blocks = [MetaFormerBlock(dim, mlp_ratio, pool_size, mixer, layer_scale, rates[start + j])
                      for j in range(depth)]
            stages.append(PoolFormerStage(embed, blocks))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.norm = GroupNorm1(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage.embed(x)  # (B, D, H', W')
            for block in stage.blocks:
                x = self.run(block, x)
        return self.norm(x)


_S_DIMS, _M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)


def _poolformer(depths, dims, layer_scale, num_classes, in_chans, img_size, drop_path) -> PoolFormer:
    return PoolFormer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, depths=depths, dims=dims,
                      layer_scale=layer_scale, drop_path=drop_path)


@register("model", "poolformer_s12", paper="P53")
def poolformer_s12(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                   drop_path: float = 0.1) -> PoolFormer:
    """PoolFormer-S12: layers 2/2/6/2, dims 64/128/320/512, layer scale 1e-5; 12M params, 77.2% (README)."""
    return _poolformer((2, 2, 6, 2), _S_DIMS, 1e-5, num_classes, in_chans, img_size, drop_path)


@register("model", "poolformer_s24", paper="P53")
def poolformer_s24(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                   drop_path: float = 0.1) -> PoolFormer:
    """PoolFormer-S24: layers 4/4/12/4, dims 64/128/320/512, layer scale 1e-5; 21M params, 80.3% (README)."""
    return _poolformer((4, 4, 12, 4), _S_DIMS, 1e-5, num_classes, in_chans, img_size, drop_path)


@register("model", "poolformer_s36", paper="P53")
def poolformer_s36(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                   drop_path: float = 0.2) -> PoolFormer:
    """PoolFormer-S36: layers 6/6/18/6, dims 64/128/320/512, layer scale 1e-6; 31M params, 81.4% (README)."""
    return _poolformer((6, 6, 18, 6), _S_DIMS, 1e-6, num_classes, in_chans, img_size, drop_path)


@register("model", "poolformer_m36", paper="P53")
def poolformer_m36(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                   drop_path: float = 0.3) -> PoolFormer:
    """PoolFormer-M36: layers 6/6/18/6, dims 96/192/384/768, layer scale 1e-6; 56M params, 82.1% (README)."""
    return _poolformer((6, 6, 18, 6), _M_DIMS, 1e-6, num_classes, in_chans, img_size, drop_path)


@register("model", "poolformer_m48", paper="P53")
def poolformer_m48(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                   drop_path: float = 0.4) -> PoolFormer:
    """PoolFormer-M48: layers 8/8/24/8, dims 96/192/384/768, layer scale 1e-6; 73M params, 82.5% (README)."""
    return _poolformer((8, 8, 24, 8), _M_DIMS, 1e-6, num_classes, in_chans, img_size, drop_path)


@register("model", "poolformer_tiny", paper="P53")
def poolformer_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                    drop_path: float = 0.0) -> PoolFormer:
    """PoolFormer for 28x28 (ours): layers 1/1/3/1, dims 32/64/128/256, a 7x7 stride-2 stem so the four stages see
    14x14 (196 tokens), 7x7, 4x4 and 2x2 maps: pooling mixes tokens in every stage (on a 1x1 map Pool(x) - x would
    be 0). 1,358,762 parameters."""
    return PoolFormer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, depths=(1, 1, 3, 1),
                      dims=(32, 64, 128, 256), layer_scale=1e-5, drop_path=drop_path, stem_stride=2, stem_padding=3)


__all__ = ["PoolFormer", "MetaFormerBlock", "Pooling", "GroupNorm1", "ConvMlp", "PatchEmbed",
           "poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48",
           "poolformer_tiny"]
