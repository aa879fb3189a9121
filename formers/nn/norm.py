"""Normalisations (family `norm`): forward(x) -> x over the last dimension."""

import torch
import torch.nn.functional as F
from torch import nn

from formers.registry import register


@register("norm", "layernorm", paper="baseline", aliases=("ln",))
class LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al.): y = (x - mean) / sqrt(var + eps) * g + b over the last dim; (..., D) -> (..., D)."""

    row_wise = True  # each token normalised alone (Block.forward_prefix)

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)


@register("norm", "rmsnorm", paper="baseline", aliases=("rms",))
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich): y = x / sqrt(mean(x^2) + eps) * g; (..., D) -> (..., D)."""

    row_wise = True

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fused; = x * rsqrt(mean(x^2) + eps) * g


@register("norm", "crmsnorm", paper="P54", aliases=("crms",))
class CRMSNorm(nn.Module):
    """Compressed RMSNorm: RMSNorm of a zero-mean (dim + 1)-vector stored as its first `dim` coordinates.

    P54 "Pre-RMSNorm and Pre-CRMSNorm Transformers" (Jiang et al., NeurIPS 2023), §3.3 and the official
    `torch/customized_layer.py` (facts sheet P54): the implicit last coordinate is x_d = -sum(x_1..x_{d-1}), so
    y = x / sqrt((sum(x_i^2) + (sum(x_i))^2) / d + eps) * g, with d = dim + 1. On the compressed vector this is
    exactly the first `dim` outputs of `rmsnorm` on the full zero-mean d-vector. (..., dim) -> (..., dim).
    """

    row_wise = True

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] + 1  # width of the zero-mean vector that x compresses
        sq = x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)  # sum of squares incl. implicit x_d
        return x * torch.rsqrt(sq / d + self.eps) * self.weight
