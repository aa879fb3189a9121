"""Channel mixers (family `ffn`): position-wise feed-forward layers, forward(x) -> x on (B, N, D)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from formers.registry import build, register


@register("ffn", "mlp", paper="baseline")
class MLP(nn.Module):
    """Two-layer feed-forward (Vaswani et al.): y = W2 act(W1 x + b1) + b2, hidden = mult * dim.

    `dropout` acts on the output; `hidden_dropout` (default 0: none) also on the hidden activations,
    y = drop(W2 drop_h(act(W1 x + b1)) + b2), as Informer's feed-forward (P73) does. Shapes (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, mult: float = 4.0, hidden: int | None = None, act: Any = "gelu",
                 bias: bool = True, dropout: float = 0.0, hidden_dropout: float = 0.0):
        super().__init__()
        hidden = hidden or int(mult * dim)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = build("act", act, path="ffn.act")
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.hidden_drop = nn.Dropout(hidden_dropout) if hidden_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.hidden_drop(self.act(self.fc1(x))))
        return self.drop(y) if self.drop.p else y  # no module call at p = 0


@register("ffn", "glu", paper="baseline")
class GLU(nn.Module):
    """Gated FFN (Shazeer, GLU Variants): y = W2 (act(W x) * (V x)); silu = SwiGLU, gelu = GeGLU, relu = ReGLU.

    The hidden width defaults to 2/3 * mult * dim (rounded up to a multiple of 8) so that parameters match `mlp`.
    Shapes (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, mult: float = 4.0, hidden: int | None = None, act: Any = "silu",
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if hidden is None:
            hidden = int(2 * mult * dim / 3)
            hidden = 8 * ((hidden + 7) // 8)
        self.fc_in = nn.Linear(dim, 2 * hidden, bias=bias)  # gate and value in one matmul
        self.act = build("act", act, path="ffn.act")
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc_in(x).chunk(2, dim=-1)  # (B, N, hidden) each
        return self.drop(self.fc2(self.act(gate) * value))
