"""Positional encodings (family `position`).

Absolute encodings (`learned`, `sinusoidal`) are added to the token embeddings by the model: forward(x, offset).
Relative encodings (`rope`, `alibi`) are handed to every token mixer as its `positions` argument; the mixer calls
`rotate(q, k, q_pos, k_pos)` on its heads and adds `bias(q_pos, k_pos, heads)` to its scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from formers.registry import FormersError, register


class RelativePosition(nn.Module):
    """Base of relative encodings: identity rotation, no score bias. `has_bias` says whether `bias` adds to the
    scores (mixers that never form a score matrix reject such encodings)."""

    kind = "relative"
    has_bias = False

    def rotate(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        return q, k

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: int) -> torch.Tensor | None:
        return None


@register("position", "none", paper="baseline")
class NoPosition(RelativePosition):
    """No positional information (NoPE); causal masking alone still breaks permutation symmetry."""

    kind = "none"

    def __init__(self, dim: int, max_len: int = 1024):
        super().__init__()


@register("position", "learned", paper="baseline")
class LearnedPosition(nn.Module):
    """Learned absolute positions (GPT-2): x + P[offset : offset + N]; (B, N, D) -> (B, N, D); at most max_len."""

    kind = "absolute"

    def __init__(self, dim: int, max_len: int = 1024):
        super().__init__()
        self.max_len = max_len
        self.emb = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        n = x.shape[1]
        if offset + n > self.max_len:
            raise FormersError(f"sequence of {offset + n} tokens exceeds the learned positions' "
                               f"max_len={self.max_len}; "
                               f"set model.max_len higher or use model.position=rope")
        return x + self.emb[offset:offset + n]


@register("position", "sinusoidal", paper="baseline", aliases=("sincos",))
class SinusoidalPosition(nn.Module):
    """Fixed sinusoids (Vaswani et al.): PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(...); added to x."""

    kind = "absolute"

    def __init__(self, dim: int, max_len: int = 1024, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        i = torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device)
        angle = positions.double()[:, None] / self.base ** (i / self.dim)  # (N, D/2)
        pe = torch.zeros(len(positions), self.dim, dtype=torch.float64, device=positions.device)
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle[:, : self.dim // 2])
        return pe

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + x.shape[1], device=x.device)
        return x + self.table(pos).to(x.dtype)


@register("position", "rope", paper="baseline")
class RotaryPosition(RelativePosition):
    """Rotary embedding, RoFormer (Su et al.): rotate each pair (x_i, x_{i+d/2}) of q and k by angle p * base^(-2i/d).

    `fraction` < 1 rotates only the first fraction of each head's dims (partial rotary, GPT-NeoX). The score
    q_m . k_n then depends on positions only through m - n. Heads (B, H, N, Dh) in, same shapes out.
    """

    def __init__(self, dim: int, max_len: int = 1024, base: float = 10000.0, fraction: float = 1.0):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise FormersError(f"position.fraction must be in (0, 1], got {fraction}")
        self.base, self.fraction = base, fraction

    def _angles(self, pos: torch.Tensor, rd: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (N, rd/2) of the angles p * base^(-2i/rd), in `dtype` (the angles at least in fp32). Nothing
        is cached: a tensor kept from one call could be an inference or fake tensor, or outlive a change of `base`."""
        ft = torch.float64 if dtype == torch.float64 else torch.float32
        inv = self.base ** (-torch.arange(0, rd, 2, device=pos.device, dtype=ft) / rd)  # (rd/2,)
        ang = pos.to(ft)[:, None] * inv  # (N, rd/2)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def _rotary_dims(self, x: torch.Tensor) -> int:
        return int(x.shape[-1] * self.fraction) // 2 * 2

    def _rot(self, x: torch.Tensor, pos: torch.Tensor, angles: tuple | None = None) -> torch.Tensor:
        rd = self._rotary_dims(x)
        if rd == 0:
            return x
        cos, sin = angles if angles is not None else self._angles(pos, rd, x.dtype)
        xr, xp = x[..., :rd], x[..., rd:]
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated, xp], dim=-1) if xp.shape[-1] else rotated

    def rotate(self, q, k, q_pos, k_pos):
        rd = self._rotary_dims(q)
        if rd == 0 or k_pos is not q_pos or rd != self._rotary_dims(k) or q.dtype != k.dtype:
            return self._rot(q, q_pos), self._rot(k, k_pos)
        angles = self._angles(q_pos, rd, q.dtype)  # the same positions (self-attention): one set of angles
        return self._rot(q, q_pos, angles), self._rot(k, k_pos, angles)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): 2^(-8i/n), i = 1..n for n a power of two; otherwise those of the closest
    smaller power of two m followed by every other slope of 2m (the paper's official recipe)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(m)
    if m < heads:
        slopes += power_of_two(2 * m)[0::2][: heads - m]
    return torch.tensor(slopes)


@register("position", "alibi", paper="baseline")
class ALiBi(RelativePosition):
    """Attention with linear biases (Press et al., ALiBi): score_ij += -m_h * |i - j|, slopes m_h from `alibi_slopes`.

    For causal attention only j <= i is seen, so this is the paper's -m_h (i - j); bidirectional use is symmetric.
    Returns a (H, Nq, Nk) bias.
    """

    has_bias = True

    def __init__(self, dim: int, max_len: int = 1024):
        super().__init__()

    def bias(self, q_pos, k_pos, heads):
        slopes = alibi_slopes(heads).to(q_pos.device)
        dist = (q_pos[:, None] - k_pos[None, :]).abs().float()  # (Nq, Nk)
        return -slopes[:, None, None] * dist
