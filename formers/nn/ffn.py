"""Channel mixers (family `ffn`): position-wise feed-forward layers, forward(x) -> x on (B, N, D)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from formers.nn.hooks import hook_free
from formers.registry import build, register

# oneDNN's linear with a fused GELU epilogue (the op torch.compile's CPU backend emits): one pass instead of a
# matmul, a bias copy and a separate GELU; about 2x faster for a ViT-Tiny fc1 here and equal to the plain path
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear_gelu(x: torch.Tensor, fc: nn.Linear, approximate: str) -> torch.Tensor:
    """GELU(x W^T + b) in one oneDNN call; x (..., D_in) -> (..., D_out). Inference only (no autograd formula)."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), fc.weight, fc.bias, "gelu", [], approximate)
    return y.view(*x.shape[:-1], fc.out_features)


@register("ffn", "mlp", paper="baseline")
class MLP(nn.Module):
    """Two-layer feed-forward (Vaswani et al.): y = W2 act(W1 x + b1) + b2, hidden = mult * dim.

    `dropout` acts on the output; `hidden_dropout` (default 0: none) also on the hidden activations,
    y = drop(W2 drop_h(act(W1 x + b1)) + b2), as Informer's feed-forward (P73) does. Shapes (B, N, D) -> (B, N, D).
    """

    row_wise = True  # position-wise (Block.forward_prefix)

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
        if self._fused_gelu(x):  # inference fast path, tests/test_fast_paths.py
            return self.fc2(linear_gelu(x, self.fc1, self.act.approximate))
        y = self.fc2(self.hidden_drop(self.act(self.fc1(x))))
        return self.drop(y) if self.drop.p else y  # no module call at p = 0

    def _fused_gelu(self, x: torch.Tensor) -> bool:
        """fc1 + GELU as one oneDNN op: without autograd, on CPU float32, with a plain hook-free nn.Linear and GELU
        (a quantized, pruned or adapted fc1 is another module type and keeps the plain path), no active dropout."""
        return (_ONEDNN_LINEAR and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and type(self.fc1) is nn.Linear and isinstance(self.act, nn.GELU)
                and self.fc1.weight.dtype == torch.float32 and not (self.training and self.drop.p)
                and not (self.training and isinstance(self.hidden_drop, nn.Dropout))
                and hook_free(self.fc1, self.act))


@register("ffn", "glu", paper="baseline")
class GLU(nn.Module):
    """Gated FFN (Shazeer, GLU Variants): y = W2 (act(W x) * (V x)); silu = SwiGLU, gelu = GeGLU, relu = ReGLU.

    The hidden width defaults to 2/3 * mult * dim (rounded up to a multiple of 8) so that parameters match `mlp`.
    Shapes (B, N, D) -> (B, N, D).
    """

    row_wise = True

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
