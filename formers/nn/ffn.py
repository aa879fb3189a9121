"""Channel mixers (family `ffn`): position-wise feed-forward layers, forward(x) -> x on (B, N, D)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.hooks import forward_unpatched, hook_free, idle_dropout
from formers.registry import build, register

IN_PLACE_MIN = 1 << 16  # elements of fc1's output from which MLP applies GELU in place (inference)


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
        h, out = self.forward_split(x)
        return h if out is None else out(h)

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, nn.Module | None]:
        """`forward` stopped before fc2: (h, fc2) with `self(x) == fc2(h)`, h the hidden activations; (result,
        None) when output dropout is active. A Pre-LN block uses it to add fc2 straight into its residual stream
        (`PreNorm`, `linear_add`; in training too)."""
        if self._gelu_in_place():  # inference fast path, tests/test_fast_paths.py
            h = F.linear(x, self.fc1.weight, self.fc1.bias)
            if h.numel() >= IN_PLACE_MIN:
                return torch.ops.aten.gelu_(h, approximate=self.act.approximate), self.fc2
            return F.gelu(h, approximate=self.act.approximate), self.fc2
        h = self.hidden_drop(self.act(self.fc1(x)))
        if self.drop.p and not idle_dropout(self.drop):
            return self.drop(self.fc2(h)), None
        return h, self.fc2  # output dropout is the identity in evaluation mode (or p = 0)

    def _gelu_in_place(self) -> bool:
        """Without autograd, GELU overwrites fc1's fresh output (from IN_PLACE_MIN elements) instead of allocating
        another (B, N, hidden) tensor. Measured here, ViT-Tiny forward (2 threads): at parity with the plain path
        when neither side's new buffers page-fault, and 8-13% faster when the plain path's do (about half the
        faults); 13% faster than oneDNN's fused linear+GELU on fc1 + GELU + fc2. Below IN_PLACE_MIN (decoding one
        token) ATen's in-place GELU is slower than the out-of-place one (22 vs 13 us on 1024 values), so that
        takes the plain GELU. Only with a plain hook-free nn.Linear and GELU (a hook could keep fc1's output, which
        must not change under it; a quantized, pruned or adapted fc1 is another module type; a forward replaced on
        the instance is honoured) and no active dropout."""
        return (not torch.is_grad_enabled() and type(self.fc1) is nn.Linear and isinstance(self.act, nn.GELU)
                and type(self.act).forward is nn.GELU.forward
                and (not self.drop.p or idle_dropout(self.drop))
                and (type(self.hidden_drop) is nn.Identity or idle_dropout(self.hidden_drop))
                and hook_free(self.fc1, self.act, self.drop, self.hidden_drop)
                and forward_unpatched(self.fc1, self.act))


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
