"""Residual connections beyond the plain `add` (which lives in formers/blocks.py): the GTrXL GRU-type gate."""

from __future__ import annotations

import torch
from torch import nn

from formers.registry import FormersError, register


@register("residual", "gru_gate", paper="P48", aliases=("gtrxl",))
class GRUGate(nn.Module):
    """GRU-type gated residual of GTrXL: g(x, y) replaces x + y; with the Pre-LN placement this is GTrXL's block.

    P48 "Stabilizing Transformers for Reinforcement Learning" (Parisotto et al., ICML 2020), Sec. 3.2, eq. for the
    GRU gate; x is the stream (skip) input, y the sublayer output:
        y = ReLU(y)                                   (identity-map reordering; `relu=False` drops it)
        r = sigmoid(W_r y + U_r x)
        z = sigmoid(W_z y + U_z x - b_g)
        h = tanh(W_g y + U_g (r * x))
        g = (1 - z) * x + z * h
    W_*, U_* are bias-free d -> d maps. b_g > 0 starts the block near the identity (z ~ sigmoid(-b_g)); 2.0 is the
    DI-engine default. x, y (B, N, D) -> (B, N, D).
    """

    row_wise = True

    def __init__(self, dim: int, bias: float = 2.0, relu: bool = True):
        super().__init__()
        if dim <= 0:
            raise FormersError(f"residual: gru_gate needs a positive dim, got {dim}")
        self.bias, self.relu = float(bias), relu
        self.w = nn.Linear(dim, 3 * dim, bias=False)  # W_r, W_z, W_g stacked: one matmul on y
        self.u = nn.Linear(dim, 2 * dim, bias=False)  # U_r, U_z stacked: one matmul on x
        self.u_g = nn.Linear(dim, dim, bias=False)  # U_g acts on r * x, so it cannot join the stack above

    def forward(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        y = torch.relu(update) if self.relu else update
        wr, wz, wg = self.w(y).chunk(3, dim=-1)  # each (B, N, D)
        ur, uz = self.u(x).chunk(2, dim=-1)  # each (B, N, D)
        r = torch.sigmoid(wr + ur)
        z = torch.sigmoid(wz + uz - self.bias)
        h = torch.tanh(wg + self.u_g(r * x))
        return x + z * (h - x)  # = (1 - z) x + z h, written so that z == 0 returns x bit-exactly
