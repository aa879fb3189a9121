"""Normalisations (family `norm`): forward(x) -> x over the last dimension."""

import torch
from torch import nn

from formers.registry import register


@register("norm", "layernorm", paper="baseline", aliases=("ln",))
class LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al.): y = (x - mean) / sqrt(var + eps) * g + b over the last dim; (..., D) -> (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)


@register("norm", "rmsnorm", paper="baseline", aliases=("rms",))
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich): y = x / sqrt(mean(x^2) + eps) * g; (..., D) -> (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
