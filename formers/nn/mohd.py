"""Mixture of Hidden Dimensions (family `ffn`): a feed-forward layer that reads and writes only some sub-dimension
groups of each token's hidden state, chosen per token.

    mohd   P70  shared groups always on + top-k routed specialised groups, activation scaling, group fusion

Source and how much of it we could see. P70 is "Mixture of Hidden-Dimensions Transformer" (Chen, Shang, Zhang,
Sheng, Liu, Wang, Sun, Wu, Wang; arXiv 2412.05644; ICML 2025 as "Mixture of Hidden-Dimensions: Not All
Hidden-States' Dimensions are Needed in Transformer"). No official code exists. Only the abstract, the OpenReview
abstract and a reproducibility summary of the paper were reachable (the method section, its Eqs. 1-18 and its
proofs were not), so everything below the abstract level is our choice, marked UNCERTAIN. What the sources say:
  - abstract: trained Transformers "utilize only a small fraction of token dimensions"; "shared sub-dimensions with
    sustained activation across multiple consecutive tokens and specialized sub-dimensions uniquely activated for
    each token"; MoHD "employs shared sub-dimensions for common token features and a routing mechanism to
    dynamically activate specialized sub-dimensions"; "activation scaling and group fusion mechanisms to preserve
    activation flow"; 50% fewer activated parameters (compression) or 2x-4x hidden dimension at constant activated
    parameters (expansion).
  - the ICML title says *hidden states'* dimensions, and the reproducibility summary (acmrep2026.k117.org) says the
    paper gives equations for "sparsified FFN and Attention", pretrained on LLaMA-style 355M/495M/1.13B models with
    the Sheared-LLaMA code base. So the sparsified "hidden dimension" is the model width D of the token hidden
    states that attention and FFN read and write, not the FFN's inner width.
This module is the FFN half of that (a channel mixer; MoHD attention is not implemented): the input groups a
token does not activate are not read by W1, and the output groups it does not activate are not written by W2, so
the residual stream carries them through the layer unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from formers.nn.hooks import report_aux
from formers.nn.moe import Router, balance_loss, dispatch, route
from formers.registry import FormersError, build, register


@register("ffn", "mohd", paper="P70")
class MixtureOfHiddenDimensions(nn.Module):
    """FFN over a per-token subset of the model-width sub-dimension groups (P70, MoHD).

    The width D is cut into G = `groups` contiguous groups of s = D / G coordinates. Groups 0..S-1 (S = `shared`)
    are active for every token; among the E = G - S specialised groups a bias-free linear router activates the
    top-k per token. With A(t) the active groups of token t, a = S + k, c the activation scale and F the group
    fusion (G x G, mixing coordinate i of every group into coordinate i of each group):
        p_t   = softmax(W_r x_t)                                     (E,)  router over specialised groups
        A(t)  = {0..S-1} u {S + e : e in top-k(p_t)}
        x'_t  = F x_t                   x'_{t,g} = sum_h F[g, h] x_{t,h}     (identity at init)
        u_t   = sum_{g in A(t)} c w_{t,g} W1[:, g] x'_{t,g} + b1             (H,)  W1[:, g]: the D-columns of g
        y_t,g = W2[g, :] act(u_t) + b2[g]   for g in A(t),   0 otherwise     (`sparse_out`; else y = W2 act(u)+b2)
    w_{t,g} = 1 for shared groups and 1 + (p - stopgrad p) for routed ones: exactly 1 in the forward pass, but the
    router gets the gradient it would get from a multiplicative gate p (a straight-through gate).
    Load balance (`balance_weight`, reported as `mohd_balance`): the Switch loss E * sum_e f_e P_e over the
    specialised groups (formers.nn.moe.balance_loss). `last_load` holds the last forward's token count per group
    (shared groups: every token).

    Compute: the forward loops over groups on contiguous weight slices (shared groups in one matmul, each routed
    group on the tokens that chose it, via formers.nn.moe.dispatch), never over tokens; W1/W2 FLOPs are a / G of
    the dense layer. The router and the fusion read the whole token (D * E and G * D multiply-adds).
    `active_parameters()` counts what one token touches: a of the G column blocks of W1 with all of b1, a of the G
    row blocks of W2 and of b2 (all of W2 when sparse_out=False), the router, and the a fusion rows it needs.

    UNCERTAIN (method text unavailable) and what we chose:
      - router: bias-free linear -> softmax over the specialised groups -> top-k, straight-through gate (above).
        The paper's router form, gate and balance loss are unknown.
      - activation scaling (`scale`): the kept groups are multiplied by c = G / a (True, default), which keeps the
        pre-activation W1 x unbiased when groups are kept at random (the inverted-dropout argument); "sqrt" gives
        sqrt(G / a) (keeps the squared norm instead); a float sets c; False gives c = 1.
      - group fusion (`fusion="group"`): the learned G x G cross-group mixing above, identity at init, applied to
        the input before selection so an active group can carry what the switched-off groups hold. An unverified
        third-party re-implementation (ypsilon_torch, blocks/mixture) says the paper's fusion is a Monarch matrix;
        our cross-group mixing is one of a Monarch matrix's two factors. "none" disables it.
      - defaults G = 8, S = 3, k = 1 (half the groups active, three quarters of them shared) follow that same
        unverified re-implementation's reading of the paper (16 groups, 50% active, 3/4 of active shared), scaled
        to small widths.
      - the output is written to the active groups only (`sparse_out=True`); whether the paper also sparsifies the
        output side of the FFN is not stated in what we could read.
    Exactness: `force_all=True` (every group active, no router), or k = G - S, with scale giving c = 1 and fusion
    at identity or "none", is the dense `mlp` with the same fc1/fc2 weights. (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, mult: float = 4.0, hidden: int | None = None, groups: int = 8, shared: int = 3,
                 k: int = 1, act: Any = "gelu", bias: bool = True, scale: bool | float | str = True,
                 fusion: str = "group", sparse_out: bool = True, force_all: bool = False,
                 balance_weight: float = 0.01, dropout: float = 0.0):
        super().__init__()
        if groups < 1 or dim % groups:
            raise FormersError(f"ffn: mohd needs groups >= 1 dividing dim ({dim}), got groups={groups}; "
                               f"pick a divisor of dim")
        if not 0 <= shared <= groups:
            raise FormersError(f"ffn: mohd needs 0 <= shared <= groups ({groups}), got shared={shared}")
        routed = groups - shared
        if routed == 0 and k != 0:
            raise FormersError(f"ffn: mohd with shared == groups ({groups}) has no routed groups; set k=0")
        if routed > 0 and not 1 <= k <= routed:
            raise FormersError(f"ffn: mohd needs 1 <= k <= groups - shared ({routed}), got k={k}")
        if fusion not in ("group", "none"):
            raise FormersError(f"ffn: mohd fusion must be 'group' or 'none', got {fusion!r}")
        hidden = hidden or int(mult * dim)
        self.dim, self.hidden, self.groups, self.group_dim = dim, hidden, groups, dim // groups
        self.shared, self.routed, self.k = shared, routed, k
        self.force_all, self.sparse_out, self.balance_weight = force_all, sparse_out, balance_weight
        self.active_groups = groups if force_all else shared + k
        self.scale = self._scale_factor(scale, groups / self.active_groups)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = build("act", act, path="ffn.act")
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.router = Router(dim, routed) if routed > 0 and not force_all else None
        # a bare parameter: the models' init leaves it alone, so it starts as the identity (no fusion)
        self.fusion = nn.Parameter(torch.eye(groups)) if fusion == "group" else None
        self.drop = nn.Dropout(dropout)
        self.last_load: list[int] = []

    @staticmethod
    def _scale_factor(scale: bool | float | str, ratio: float) -> float:
        if scale is True:
            return ratio
        if scale is False:
            return 1.0
        if scale == "sqrt":
            return math.sqrt(ratio)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            return float(scale)
        raise FormersError(f"ffn: mohd scale must be True (groups / active), False (1), 'sqrt' or a float > 0, "
                           f"got {scale!r}")

    def active_parameters(self) -> int:
        """Parameters one token touches (see the class docstring); `total_parameters()` counts them all."""
        a, s, H, D = self.active_groups, self.group_dim, self.hidden, self.dim
        bias = self.fc1.bias is not None
        n = a * s * H + (H if bias else 0)
        n += a * s * H + (a * s if bias else 0) if self.sparse_out else H * D + (D if bias else 0)
        if self.router is not None:
            n += sum(p.numel() for p in self.router.parameters())
        if self.fusion is not None:
            n += a * self.groups
        return n

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _route(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) -> specialised group ids (T, k) in 0..E-1 and their forward-unit gates (T, k)."""
        logits = self.router(xt)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        index, _ = route(logits, self.k, "unit")
        p = probs.gather(-1, index)
        gate = (1.0 + (p - p.detach())).to(xt.dtype)  # == 1 exactly; d gate / d p = 1
        if self.balance_weight and (self.training or torch.is_grad_enabled()):
            report_aux(self, "mohd_balance", self.balance_weight * balance_loss(probs, index))
        return index, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        G, s = self.groups, self.group_dim
        xt = x.reshape(-1, shape[-1])  # (T, D)
        T = xt.shape[0]
        always = G if self.force_all else self.shared  # groups every token reads: one contiguous slice
        routed = self.router is not None
        index, gate = self._route(xt) if routed else (None, None)
        if self.fusion is not None:
            xf = torch.einsum("gh,ths->tgs", self.fusion.to(xt.dtype), xt.view(T, G, s)).reshape(T, -1)
        else:
            xf = xt
        w1, w2 = self.fc1.weight, self.fc2.weight  # (H, D), (D, H)
        c = self.scale
        pre = (xf[:, :always * s] * c) @ w1[:, :always * s].t()  # (T, H)
        pieces: list[tuple[int, torch.Tensor]] = []  # (group, its token ids), for the output side
        if routed:
            keep = torch.ones_like(index, dtype=torch.bool)
            tok, slot, counts = dispatch(index, keep, self.routed)  # assignments sorted by group
            for e, (t, sl) in enumerate(zip(tok.split(counts), slot.split(counts))):
                if t.numel() == 0:
                    continue
                g = self.shared + e
                cols = slice(g * s, (g + 1) * s)
                xe = xf[t, cols] * (c * gate[t, sl]).unsqueeze(-1)  # (n, s)
                pre = pre.index_add(0, t, xe @ w1[:, cols].t())
                pieces.append((g, t))
        if self.fc1.bias is not None:
            pre = pre + self.fc1.bias
        h = self.act(pre)  # (T, H)
        b2 = self.fc2.bias
        if not self.sparse_out:
            y = self.fc2(h)
        else:
            y3 = xt.new_zeros(T, G, s)
            rows = slice(0, always * s)
            y_always = h @ w2[rows].t() + (b2[rows] if b2 is not None else 0.0)  # (T, always * s)
            y3[:, :always] = y_always.view(T, always, s)
            for g, t in pieces:
                rows = slice(g * s, (g + 1) * s)
                y3[t, g] = h[t] @ w2[rows].t() + (b2[rows] if b2 is not None else 0.0)  # (n, s)
            y = y3.view(T, -1)
        load = [T] * always + [0] * (G - always)
        if routed:
            for g, t in pieces:
                load[g] = int(t.numel())
        self.last_load = load
        return self.drop(y.view(shape))

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, shared={self.shared}, k={self.k}, scale={self.scale:g}, "
                f"fusion={self.fusion is not None}, sparse_out={self.sparse_out}, force_all={self.force_all}")


__all__ = ["MixtureOfHiddenDimensions"]
