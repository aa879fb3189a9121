"""Activations (family `act`), each a module so that learnable ones fit the same slot as fixed ones.

    gelu, relu, silu   baseline
    squared_relu  P79  relu(x)^2 (Primer)
    polyrelu      P22  sum_i a_i relu(x)^i + a_0, learnable a (PolyCom)
    polynorm      P22  sum_i a_i N(x^i) + a_0, N a weightless RMS norm over the last dim (PolyCom)
"""

from __future__ import annotations

import torch
from torch import nn

from formers.registry import FormersError, register


@register("act", "gelu", paper="baseline")
class GELU(nn.GELU):
    """GELU, x * Phi(x) (Hendrycks & Gimpel); `approximate='tanh'` for the GPT-2 form."""

    def __init__(self, approximate: str = "none"):
        super().__init__(approximate=approximate)


@register("act", "relu", paper="baseline")
class ReLU(nn.ReLU):
    """ReLU, max(0, x)."""

    def __init__(self):
        super().__init__()


@register("act", "silu", paper="baseline", aliases=("swish",))
class SiLU(nn.SiLU):
    """SiLU / Swish, x * sigmoid(x)."""

    def __init__(self):
        super().__init__()


@register("act", "squared_relu", paper="P79", aliases=("relu_squared",))
class SquaredReLU(nn.Module):
    """Squared ReLU, f(x) = max(0, x)^2, derivative 2 max(0, x).

    P79 "Primer: Searching for Efficient Transformers for Language Modeling" (So et al., 2021): one of the two
    Primer-EZ changes, used in the plain two-layer FFN as W2 relu(W1 x)^2 (google-research `primer/t5_models.py`,
    `DenseReluDense.activation = ["squared_relu"]`). Use it as `ffn={"name": "mlp", "act": "squared_relu"}`.
    Any shape -> same shape.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class _PolyCom(nn.Module):
    """Shared parameters of PolyReLU and PolyNorm: r learnable scalar coefficients and one scalar bias.

    Layout as in the official code (BryceZhuo/PolyCom, README and `dense_model/megatron_patch/model/llama2/
    transformer.py`): `weight` (r,) holds the coefficients from the highest power down, weight[k] = a_{r-k}, so that
    the released order-3 checkpoints load unchanged; `bias` (1,) is a_0. Init a_1..a_r = 1/r (1/3 for r = 3, the
    official `torch.ones(3) / 3`), a_0 = 0. UNCERTAIN: the code only has r = 3; 1/r for other orders is our choice.
    """

    def __init__(self, order: int = 3):
        super().__init__()
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise FormersError(f"act: the PolyCom order must be an integer >= 1 (the paper uses 3), got {order!r}")
        self.order = order
        self.weight = nn.Parameter(torch.full((order,), 1.0 / order))  # (r,): a_r, ..., a_1
        self.bias = nn.Parameter(torch.zeros(1))  # (1,): a_0

    def coefficient(self, i: int) -> torch.Tensor:
        """a_i, the coefficient of the i-th power (1 <= i <= r)."""
        return self.weight[self.order - i]

    def extra_repr(self) -> str:
        return f"order={self.order}"


@register("act", "polyrelu", paper="P22")
class PolyReLU(_PolyCom):
    """PolyReLU: a learnable polynomial of ReLU, PolyReLU(x) = sum_{i=1..r} a_i relu(x)^i + a_0.

    P22 "Polynomial Composition Activations: Unleashing the Dynamics of Large Language Models" (Zhuo et al.,
    ICLR 2025). Order r = 3 in the paper; a = (a_0, 1, 0, 0) gives ReLU + a_0 and (0, 0, 1, 0) squared ReLU.
    Parameters (one set per FFN layer): `weight` (r,) = (a_r, ..., a_1), highest power first as in the official code,
    init 1/r each (1/3 for r = 3); `bias` (1,) = a_0, init 0. Any shape -> same shape.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        power, out = r, self.bias + self.coefficient(1) * r
        for i in range(2, self.order + 1):
            power = power * r  # relu(x)^i
            out = out + self.coefficient(i) * power
        return out


@register("act", "polynorm", paper="P22")
class PolyNorm(_PolyCom):
    """PolyNorm: a learnable sum of RMS-normalised powers, PolyNorm(x) = sum_{i=1..r} a_i N(x^i) + a_0.

    P22 "Polynomial Composition Activations: Unleashing the Dynamics of Large Language Models" (Zhuo et al.,
    ICLR 2025), the README class: N(z) = z / sqrt(mean_last_dim(z^2) + eps), an RMS norm without a weight, eps 1e-6.
    Each power is normalised separately, so PolyNorm(c x) = PolyNorm(x) for c > 0 up to eps (N(c^i z) = N(z) when
    eps = 0). The normalised axis is the last one: the FFN hidden width inside `mlp`/`glu`.
    Parameters: `weight` (r,) = (a_r, ..., a_1), init 1/r each; `bias` (1,) = a_0, init 0 (as for polyrelu).
    UNCERTAIN: the official MoE model (`moe_model/olmo/model.py`) reshapes the fused expert activations into blocks
    before normalising; we use the dense form (README, `dense_model`): each FFN normalises its own hidden vector.
    (..., D) -> (..., D).
    """

    def __init__(self, order: int = 3, eps: float = 1e-6):
        super().__init__(order)
        if eps < 0:
            raise FormersError(f"act: polynorm eps must be >= 0 (the paper uses 1e-6), got {eps}")
        self.eps = eps

    def norm(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.square().mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        power, out = x, self.bias + self.coefficient(1) * self.norm(x)
        for i in range(2, self.order + 1):
            power = power * x  # x^i
            out = out + self.coefficient(i) * self.norm(power)
        return out

    def extra_repr(self) -> str:
        return f"order={self.order}, eps={self.eps}"
