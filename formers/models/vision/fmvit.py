"""FMViT (P33): "FMViT: A multiple-frequency mixing Vision Transformer" (Tan, Geng, Xie, arXiv 2311.05707).

A hybrid CNN-Transformer that mixes high-frequency (local, convolutional) and low-frequency (global, attention)
features "with varying frequencies", with deploy-friendly parts that re-parameterise for inference: convolutional
multi-group re-parameterisation (gMLP), a lightweight MHSA (RLMHSA) and a Convolutional Fusion Block (CFB).

    ConvBN            conv (no bias) + BatchNorm; fuse -> one conv with bias
    RepConv           k x k + 1 x 1 grouped ConvBN branches + BN identity, summed; fuse -> one k x k conv
    MultiGroupConv1x1 1 x 1 ConvBN branches with group counts (1, 2, 4, ...), summed; fuse -> one dense 1 x 1 conv
    GroupRepMLP       gMLP: MultiGroupConv1x1 -> act -> MultiGroupConv1x1; fuse -> conv -> act -> conv
    RLMHSA            heads attend from every pixel to keys/values of an r x r average-pooled map (a low-pass view)
    CFB               x + proj(relu(RepConv3x3(x))); x + gMLP(BN(x))             (high frequency)
    FMB               x + W_fuse [relu(RepConv3x3(n)); RLMHSA_r1(n); RLMHSA_r2(n); ...], n = BN(x); x + gMLP(BN(x))
    FMViT             conv stem -> stages of CFBs with FMBs placed in them -> BN -> global average -> linear

WHAT THE PAPER GIVES AND WHAT WE CHOSE. The official repository (github.com/tany0699/FMViT) holds only a README
("Code coming soon"), and the paper's method section, equations and size table could not be read here: only the
abstract (and its anchors: ImageNet top-1 83.3% on TensorRT at ResNet-101 latency, 78.5% on CoreML at MobileOne
latency) was available. No named FMViT size is therefore registered (no `fmvit_t/s/b`): their widths, depths and
parameter counts are unknown. Every internal detail below is our reading, and is a gap against the paper:
- Skeleton: the paper frames itself (TensorRT/CoreML latency, hybrid blocks) exactly as Next-ViT (Li et al. 2022,
  github.com/bytedance/Next-ViT, `classification/nextvit.py`), so we take Next-ViT's layout: a 4-conv stem
  (strides 2,1,1,2), 4 stages (strides 1,2,2,2) whose downsampling is 2x2 average pooling + 1x1 ConvBN, BatchNorm
  everywhere (foldable), ReLU, conv blocks with one mixing block closing each group ("hybrid strategy"), final BN,
  global average pooling, a linear head, trunc-normal(0.02) init for convs and linears.
- Multi-frequency mixing (FMB): one high-frequency branch (a grouped 3x3 conv, groups = width / head_dim, as
  Next-ViT's MHCA) and several low-frequency branches, RLMHSA with different pooling rates r (the keys/values see
  the map averaged over r x r windows: larger r = lower cut-off frequency), all reading the same BN-normalised input;
  their outputs are concatenated and mixed by one 1x1 conv (that conv is the attention's output projection and the
  fusion at once). Default rates (s, 2s) with s = Next-ViT's per-stage reduction ratio (8, 4, 2, 1).
- RLMHSA: "lightweight" = keys/values from the pooled map and no per-branch output projection; "re-parameterised" =
  the BatchNorm after pooling folds into the key/value projections at inference. Q/K/V have biases (Next-ViT).
- gMLP: each 1x1 projection of the MLP is trained as a sum of grouped 1x1 ConvBN branches with group counts
  `mlp_groups` (default 1, 2, 4), which add up to one dense 1x1 conv (block-diagonal weights summed, BN folded).
- CFB: Next-ViT's NCB with its grouped 3x3 conv trained as a RepVGG-style multi-branch conv (3x3 + 1x1 + BN
  identity) that fuses into one 3x3 conv, and gMLP as its MLP.
- `fuse()` folds every branch and BN that folds exactly (not the FMB's pre-norm: it feeds a zero-padded 3x3 conv,
  where folding an affine map is not exact at the borders).
Registered models: `fmvit` (every option; defaults at Next-ViT-S scale, our layout) and `fmvit_tiny` (28x28).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.models.vision.base import DropPath, VisionModel, drop_path_rates
from formers.registry import FormersError, build, register

NORM_EPS = 1e-5


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift, per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _conv(weight: torch.Tensor, bias: torch.Tensor, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A Conv2d holding the given weight (out, in/groups, k, k) and bias, padding k // 2."""
    out, cin, k, _ = weight.shape
    conv = nn.Conv2d(cin * groups, out, k, stride=stride, padding=k // 2, groups=groups, bias=True,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def _fold_pre_bn(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """conv(bn(x)) as one conv, for a dense 1x1 conv (exact: no padding)."""
    scale, shift = _bn_affine(bn)
    w = conv.weight[:, :, 0, 0]  # (out, in)
    b = conv.bias if conv.bias is not None else torch.zeros_like(w[:, 0])
    return _conv((w * scale)[:, :, None, None], b + w @ shift)


class ConvBN(nn.Module):
    """k x k conv without bias followed by BatchNorm (padding k // 2). fuse() -> one Conv2d with bias."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = _bn_affine(self.bn)
        return self.conv.weight * scale[:, None, None, None], shift

    def fuse(self) -> nn.Conv2d:
        return _conv(*self.fused_weight(), stride=self.conv.stride[0], groups=self.conv.groups)


class RepConv(nn.Module):
    """Multi-branch grouped conv trained as ConvBN(k x k) + ConvBN(1 x 1) + BN(x) (the identity branch only when
    cin == cout and stride 1), RepVGG style; fuse() -> one k x k grouped conv with the same output in eval mode.
    (B, cin, H, W) -> (B, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        if cin % groups or cout % groups:
            raise FormersError(f"fmvit: channels {cin}->{cout} are not divisible by groups={groups}; pick widths "
                               f"that are multiples of head_dim")
        self.kernel, self.stride, self.groups = kernel, stride, groups
        self.main = ConvBN(cin, cout, kernel, stride, groups)
        self.scale = ConvBN(cin, cout, 1, stride, groups) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(cout, eps=NORM_EPS) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return y

    def fuse(self) -> nn.Conv2d:
        w, b = self.main.fused_weight()
        k = self.kernel
        if self.scale is not None:
            w1, b1 = self.scale.fused_weight()
            w, b = w + F.pad(w1, [k // 2] * 4), b + b1
        if self.identity is not None:
            scale, shift = _bn_affine(self.identity)
            per_group = w.shape[1]  # input channels per group
            eye = torch.zeros_like(w)
            out = torch.arange(w.shape[0], device=w.device)
            eye[out, out % per_group, k // 2, k // 2] = 1.0  # output o reads input o within its group
            w, b = w + eye * scale[:, None, None, None], b + shift
        return _conv(w, b, stride=self.stride, groups=self.groups)


class MultiGroupConv1x1(nn.Module):
    """Convolutional multi-group re-parameterisation (our reading of P33's gMLP projection): the sum of grouped
    1x1 ConvBN branches, one per group count in `groups`. fuse() -> one dense 1x1 conv whose weight is the sum of
    each branch's block-diagonal (out, in) matrix. (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int, groups: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        if not groups or any(cin % g or cout % g for g in groups):
            raise FormersError(f"fmvit: gMLP widths {cin}->{cout} must be divisible by every group count in "
                               f"mlp_groups={tuple(groups)}")
        self.groups = tuple(groups)
        self.branches = nn.ModuleList(ConvBN(cin, cout, 1, 1, g) for g in self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)

    def fuse(self) -> nn.Conv2d:
        dense, bias = 0.0, 0.0
        for g, branch in zip(self.groups, self.branches):
            w, b = branch.fused_weight()  # (out, in/g, 1, 1)
            out, per_group = w.shape[:2]
            blocks = w[:, :, 0, 0].reshape(g, out // g, per_group)  # group j maps inputs j*in/g.. to outputs j*out/g..
            dense, bias = dense + torch.block_diag(*blocks), bias + b
        return _conv(dense[:, :, None, None], bias)


class GroupRepMLP(nn.Module):
    """gMLP (P33, our reading): MultiGroupConv1x1(dim -> hidden) -> act -> dropout -> MultiGroupConv1x1(hidden ->
    dim) -> dropout, on (B, dim, H, W). fuse() -> dense 1x1 conv -> act -> dense 1x1 conv."""

    def __init__(self, dim: int, hidden: int, groups: tuple[int, ...] = (1, 2, 4), act: Any = "relu",
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = MultiGroupConv1x1(dim, hidden, groups)
        self.act = build("act", act, path="fmvit.act")
        self.fc2 = MultiGroupConv1x1(hidden, dim, groups)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def fuse(self, pre_norm: nn.BatchNorm2d | None = None) -> nn.Sequential:
        fc1 = self.fc1.fuse()
        if pre_norm is not None:
            fc1 = _fold_pre_bn(pre_norm, fc1)
        return nn.Sequential(fc1, self.act, self.fc2.fuse())


class RLMHSA(nn.Module):
    """Lightweight multi-head self-attention (our reading of P33's RLMHSA) on a feature map.

    q = W_q x + b_q at every pixel; s = BN(AvgPool_{r x r}(x)) (s = x when r = 1; ceil mode, partial windows average
    what they cover); k = W_k s + b_k, v = W_v s + b_v; per head h: y_h = softmax(q_h k_h^T / sqrt(Dh)) v_h.
    No output projection (the FMB's fusion conv is shared by all branches). fuse() folds the BN into W_k, W_v.
    (B, C, H, W) -> (B, heads * head_dim, H, W).
    """

    def __init__(self, dim: int, heads: int, head_dim: int = 32, pool: int = 1, attn_drop: float = 0.0):
        super().__init__()
        if pool < 1 or heads < 1:
            raise FormersError(f"fmvit: RLMHSA needs pool >= 1 and heads >= 1, got pool={pool}, heads={heads}")
        self.heads, self.head_dim, self.pool, self.attn_drop = heads, head_dim, pool, attn_drop
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.sr = nn.AvgPool2d(pool, pool, ceil_mode=True, count_include_pad=False) if pool > 1 else nn.Identity()
        self.sr_norm = nn.BatchNorm2d(dim, eps=NORM_EPS) if pool > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h, dh = self.heads, self.head_dim
        s = self.sr_norm(self.sr(x)).flatten(2).transpose(1, 2)  # (B, M, C), M = ceil(H/r) * ceil(W/r)
        q = self.q(x.flatten(2).transpose(1, 2)).view(B, H * W, h, dh).transpose(1, 2)  # (B, h, N, Dh)
        k = self.k(s).view(B, -1, h, dh).transpose(1, 2)  # (B, h, M, Dh)
        v = self.v(s).view(B, -1, h, dh).transpose(1, 2)  # (B, h, M, Dh)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return y.transpose(2, 3).reshape(B, h * dh, H, W)  # (B, h*Dh, H, W), channel = head * Dh + d

    def fuse(self) -> RLMHSA:
        """Fold the post-pooling BN into the key and value projections (in place; eval statistics)."""
        if isinstance(self.sr_norm, nn.BatchNorm2d):
            scale, shift = _bn_affine(self.sr_norm)
            with torch.no_grad():
                for lin in (self.k, self.v):
                    lin.bias.add_(lin.weight @ shift)
                    lin.weight.mul_(scale)
            self.sr_norm = nn.Identity()
        return self


class Downsample(nn.Module):
    """Next-ViT's patch embedding: stride 2 -> 2x2 average pool (ceil mode) + 1x1 ConvBN; a width change alone ->
    1x1 ConvBN; otherwise identity. (B, cin, H, W) -> (B, cout, ceil(H/s), ceil(W/s))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride == 2 else nn.Identity()
        self.proj = ConvBN(cin, cout) if stride == 2 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))

    def fuse(self) -> Downsample:
        if isinstance(self.proj, ConvBN):
            self.proj = self.proj.fuse()
        return self


def _mlp_hidden(dim: int, ratio: float, groups: tuple[int, ...]) -> int:
    """MLP width: dim * ratio rounded to a multiple of 32 (Next-ViT) and of every group count."""
    step = math.lcm(32, *groups)
    return max(step, int(dim * ratio + step / 2) // step * step)


class CFB(nn.Module):
    """Convolutional Fusion Block (our reading of P33), the high-frequency block:
    x = down(x); x = x + DP(W_p relu(RepConv3x3_g(x))); x = x + DP(gMLP(BN(x))), g = width / head_dim.
    (B, cin, H, W) -> (B, dim, H/stride, W/stride)."""

    def __init__(self, cin: int, dim: int, stride: int = 1, head_dim: int = 32, mlp_ratio: float = 3.0,
                 mlp_groups: tuple[int, ...] = (1, 2, 4), act: Any = "relu", drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        if dim % head_dim:
            raise FormersError(f"fmvit: width {dim} is not a multiple of head_dim={head_dim}")
        self.down = Downsample(cin, dim, stride)
        self.local = nn.Sequential(RepConv(dim, dim, 3, groups=dim // head_dim), nn.ReLU(),
                                   nn.Conv2d(dim, dim, 1, bias=False))
        self.norm = nn.BatchNorm2d(dim, eps=NORM_EPS)
        self.mlp = GroupRepMLP(dim, _mlp_hidden(dim, mlp_ratio, mlp_groups), mlp_groups, act, drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        x = x + self.drop_path(self.local(x))
        return x + self.drop_path(self.mlp(self.norm(x)))

    def fuse(self) -> CFB:
        self.down.fuse()
        self.local[0] = self.local[0].fuse()
        self.mlp = self.mlp.fuse(self.norm)
        self.norm = nn.Identity()
        return self


class FMB(nn.Module):
    """Multi-frequency mixing block (our reading of P33): with n = BN(down(x)),
    x = down(x) + DP(W_fuse [relu(RepConv3x3_g(n)); RLMHSA_r1(n); ...; RLMHSA_rk(n)]); x = x + DP(gMLP(BN(x))).
    The conv branch keeps the high frequencies; RLMHSA_r attends to keys/values pooled over r x r, one band per
    rate in `pools`; W_fuse (1x1 conv, no bias) mixes them. The attention bands together are about
    `attn_ratio` * dim wide: each RLMHSA has max(1, round(attn_ratio * dim / (head_dim * len(pools)))) heads.
    (B, cin, H, W) -> (B, dim, H/stride, W/stride)."""

    def __init__(self, cin: int, dim: int, stride: int = 1, head_dim: int = 32, attn_ratio: float = 0.5,
                 pools: tuple[int, ...] = (1, 2), mlp_ratio: float = 2.0, mlp_groups: tuple[int, ...] = (1, 2, 4),
                 act: Any = "relu", drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if dim % head_dim:
            raise FormersError(f"fmvit: width {dim} is not a multiple of head_dim={head_dim}")
        if not pools:
            raise FormersError("fmvit: an FMB needs at least one pooling rate in `pools`")
        heads = max(1, round(attn_ratio * dim / (head_dim * len(pools))))
        self.down = Downsample(cin, dim, stride)
        self.norm1 = nn.BatchNorm2d(dim, eps=NORM_EPS)
        self.high = nn.Sequential(RepConv(dim, dim, 3, groups=dim // head_dim), nn.ReLU())
        self.low = nn.ModuleList(RLMHSA(dim, heads, head_dim, r, attn_drop) for r in pools)
        self.fuse_proj = nn.Conv2d(dim + len(pools) * heads * head_dim, dim, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim, eps=NORM_EPS)
        self.mlp = GroupRepMLP(dim, _mlp_hidden(dim, mlp_ratio, mlp_groups), mlp_groups, act, drop)
        self.drop_path = DropPath(drop_path)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The token mixer: (B, dim, H, W) -> (B, dim, H, W), all frequency bands fused by one 1x1 conv."""
        n = self.norm1(x)
        bands = [self.high(n)] + [attn(n) for attn in self.low]  # (B, dim, H, W), then (B, heads*Dh, H, W) each
        return self.fuse_proj(torch.cat(bands, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        x = x + self.drop_path(self.mix(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def fuse(self) -> FMB:
        self.down.fuse()
        self.high[0] = self.high[0].fuse()
        for attn in self.low:
            attn.fuse()
        self.mlp = self.mlp.fuse(self.norm2)
        self.norm2 = nn.Identity()
        return self


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ConvBN(cin, cout, 3, stride), nn.ReLU())


class FMViT(VisionModel):
    """FMViT classifier (P33; layout after Next-ViT, see the module docstring for every gap).

    stem: 3x3 ConvBN-ReLU per entry of `stem_chs` with `stem_strides`; stage i: `depths[i]` blocks of width
    `dims[i]`, the first with stride `strides[i]`; block j of stage i is an FMB when `fmb_every[i]` > 0 and
    (j + 1) % fmb_every[i] == 0, else a CFB; FMBs of stage i use pooling rates `pools[i]`. Then BN -> global
    average -> linear. (B, C, H, W) -> (B, num_classes); any input side works (ceil-mode pooling).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 stem_chs: tuple[int, ...] = (64, 32, 64, 64), stem_strides: tuple[int, ...] = (2, 1, 1, 2),
                 dims: tuple[int, ...] = (96, 192, 384, 768), depths: tuple[int, ...] = (3, 4, 10, 3),
                 strides: tuple[int, ...] = (1, 2, 2, 2), fmb_every: tuple[int, ...] = (0, 4, 5, 3),
                 pools: tuple[tuple[int, ...], ...] = ((8, 16), (4, 8), (2, 4), (1, 2)), head_dim: int = 32,
                 attn_ratio: float = 0.5, cfb_mlp_ratio: float = 3.0, fmb_mlp_ratio: float = 2.0,
                 mlp_groups: tuple[int, ...] = (1, 2, 4), act: str = "relu", drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.1):
        super().__init__()
        n = len(dims)
        if not (len(depths) == len(strides) == len(fmb_every) == len(pools) == n) or n == 0:
            raise FormersError(f"fmvit: dims, depths, strides, fmb_every and pools need one entry per stage, got "
                               f"{len(dims)}, {len(depths)}, {len(strides)}, {len(fmb_every)}, {len(pools)}")
        if len(stem_chs) != len(stem_strides) or not stem_chs:
            raise FormersError("fmvit: stem_chs and stem_strides need the same (non-zero) length")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.other_size = img_size + 4  # any side works; this one exercises the ceil-mode pooling
        self.num_features, self.global_pool = dims[-1], "avg"
        chans = (in_chans,) + tuple(stem_chs)
        self.stem = nn.Sequential(*(_conv_bn_relu(chans[i], chans[i + 1], s) for i, s in enumerate(stem_strides)))
        rates = iter(drop_path_rates(drop_path, sum(depths)))
        blocks, cin = [], chans[-1]
        for i in range(n):
            for j in range(depths[i]):
                stride = strides[i] if j == 0 else 1
                common = dict(stride=stride, head_dim=head_dim, mlp_groups=tuple(mlp_groups), act=act, drop=drop,
                              drop_path=next(rates))
                if fmb_every[i] > 0 and (j + 1) % fmb_every[i] == 0:
                    blocks.append(FMB(cin, dims[i], attn_ratio=attn_ratio, pools=tuple(pools[i]),
                                      mlp_ratio=fmb_mlp_ratio, attn_drop=attn_drop, **common))
                else:
                    blocks.append(CFB(cin, dims[i], mlp_ratio=cfb_mlp_ratio, **common))
                cin = dims[i]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.BatchNorm2d(dims[-1], eps=NORM_EPS)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        """Next-ViT's init (no FMViT code exists): trunc-normal(0.02) convs and linears, zero biases."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised last-stage map (B, dims[-1], H/32, W/32) (H/stride in general)."""
        x = self.stem(x)
        for block in self.blocks:
            x = self.run(block, x)
        return self.norm(x)

    def fuse(self) -> FMViT:
        """An equivalent inference copy (eval mode): every multi-branch conv, multi-group 1x1 conv and foldable BN
        merged into single convs."""
        m = copy.deepcopy(self).eval()
        for stage in m.stem:
            stage[0] = stage[0].fuse()
        for block in m.blocks:
            block.fuse()
        return m


@register("model", "fmvit", paper="P33")
def fmvit(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
          stem_chs: tuple[int, ...] = (64, 32, 64, 64), stem_strides: tuple[int, ...] = (2, 1, 1, 2),
          dims: tuple[int, ...] = (96, 192, 384, 768), depths: tuple[int, ...] = (3, 4, 10, 3),
          strides: tuple[int, ...] = (1, 2, 2, 2), fmb_every: tuple[int, ...] = (0, 4, 5, 3),
          pools: tuple[tuple[int, ...], ...] = ((8, 16), (4, 8), (2, 4), (1, 2)), head_dim: int = 32,
          attn_ratio: float = 0.5, cfb_mlp_ratio: float = 3.0, fmb_mlp_ratio: float = 2.0,
          mlp_groups: tuple[int, ...] = (1, 2, 4), act: str = "relu", drop: float = 0.0, attn_drop: float = 0.0,
          drop_path: float = 0.1) -> FMViT:
    """FMViT (P33) with every option. The defaults are OUR layout at Next-ViT-S scale (Next-ViT-S stem, depths and
    hybrid pattern), not a published FMViT size: the paper's size table was not available."""
    return FMViT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, stem_chs=stem_chs,
                 stem_strides=stem_strides, dims=dims, depths=depths, strides=strides, fmb_every=fmb_every,
                 pools=pools, head_dim=head_dim, attn_ratio=attn_ratio, cfb_mlp_ratio=cfb_mlp_ratio,
                 fmb_mlp_ratio=fmb_mlp_ratio, mlp_groups=mlp_groups, act=act, drop=drop, attn_drop=attn_drop,
                 drop_path=drop_path)


@register("model", "fmvit_tiny", paper="P33")
def fmvit_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path: float = 0.05) -> FMViT:
    """FMViT for 28x28 Fashion-MNIST: stem stride 2 (14x14 = 196 tokens in stage 1), 3 stages of widths 32/64/128,
    each [CFB, FMB]; FMB pooling rates (2, 4), (1, 2), (1, 2) on 14x14, 7x7, 4x4 maps; head_dim 16."""
    return FMViT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, stem_chs=(16, 32),
                 stem_strides=(2, 1), dims=(32, 64, 128), depths=(2, 2, 2), strides=(1, 2, 2), fmb_every=(2, 2, 2),
                 pools=((2, 4), (1, 2), (1, 2)), head_dim=16, drop_path=drop_path)


__all__ = ["ConvBN", "RepConv", "MultiGroupConv1x1", "GroupRepMLP", "RLMHSA", "CFB", "FMB", "FMViT"]
