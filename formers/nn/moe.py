"""Sparse mixtures of experts (family `ffn`): top-k token-choice routing, capacity and token dropping, auxiliary
routing losses through the shared hook (formers/nn/hooks.py).

    moe    top-k MoE FFN (Shazeer et al. 2017; GShard; Switch), used by WideNet (P42) and ModuleFormer (P24)

The routing pieces are functions so that other experts (ModuleFormer's attention experts, EMoE's centroid gates)
reuse them:

    route(logits, k, ...)          -> expert index (T, k), gate weight (T, k)
    capacity_keep(index, E, cap)   -> which (token, slot) assignments fit their expert's capacity
    dispatch(index, keep)          -> assignments sorted by expert and the slice length of each expert
    balance_loss / z_loss / mi_loss

Dispatch sorts the kept assignments by expert (a stable sort, so each expert sees its tokens in order) and runs
every expert once on its contiguous slice: a loop over experts, never over tokens. A dropped assignment adds
nothing; a token whose every assignment is dropped leaves the layer as zero, i.e. passes through the residual.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.hooks import report_aux
from formers.registry import FormersError, build, register


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Router arithmetic in at least float32 (half-precision softmax over experts is too coarse)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def route(logits: torch.Tensor, k: int, combine: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their combine weights.

    logits (T, E) -> index (T, k) ordered best first, gates (T, k):
        softmax   p = softmax(logits); gates = p[top-k] / sum(p[top-k])  (renormalised: k = 1 gives gate 1)
        softmax_raw  gates = p[top-k], not renormalised (Switch Transformer's k = 1 form: y = p_i E_i(x))
        unit      gates = 1 (EMoE's one-score combine: each chosen expert added with weight one)
    """
    if not 1 <= k <= logits.shape[-1]:
        raise FormersError(f"moe: k must be in 1..{logits.shape[-1]} (the number of experts), got {k}")
    top, index = logits.topk(k, dim=-1)  # (T, k)
    if combine == "softmax":
        gates = torch.softmax(_wide(top), dim=-1).to(logits.dtype)  # = p[top-k] / sum p[top-k]
    elif combine == "softmax_raw":
        gates = torch.softmax(_wide(logits), dim=-1).gather(-1, index).to(logits.dtype)
    elif combine == "unit":
        gates = torch.ones_like(top)
    else:
        raise FormersError(f"moe: combine must be 'softmax', 'softmax_raw' or 'unit', got {combine!r}")
    return index, gates


def capacity(tokens: int, experts: int, k: int, factor: float | None) -> int:
    """Slots per expert: ceil(factor * tokens * k / experts); no limit when factor is None or <= 0."""
    if factor is None or factor <= 0:
        return tokens * k
    return max(1, math.ceil(factor * tokens * k / experts))


def capacity_keep(index: torch.Tensor, experts: int, cap: int, priority: str = "token") -> torch.Tensor:
    """Which assignments fit: (T, k) bool; an expert keeps the first `cap` assignments that arrive at it.

    priority `token`: tokens in order, each token's choices best first; a token's fate depends only on earlier
    tokens, so a causal model stays causal. `rank` (GShard): every token's first choice before any second choice,
    which favours first choices but lets a later token's first choice evict an earlier token's second choice."""
    T, k = index.shape
    if priority == "token":
        flat = index.reshape(-1)  # (T * k,) token-major
    elif priority == "rank":
        flat = index.t().reshape(-1)  # (k * T,) rank-major
    else:
        raise FormersError(f"moe: priority must be 'token' or 'rank', got {priority!r}")
    onehot = F.one_hot(flat, experts)  # (T*k, E)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # 0-based arrival position within the chosen expert
    keep = position < cap
    return keep.view(T, k) if priority == "token" else keep.view(k, T).t()


def dispatch(index: torch.Tensor, keep: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                             list[int]]:
    """Kept assignments sorted by expert: (token ids, slot ids, per-expert counts). Stable: token order within
    an expert is preserved."""
    T, k = index.shape
    flat_e = index.reshape(-1)  # token-major: assignment a = t * k + slot
    kept = keep.reshape(-1).nonzero().squeeze(-1)  # (A,)
    order = kept[torch.sort(flat_e[kept], stable=True).indices]  # (A,) assignments grouped by expert
    counts = torch.bincount(flat_e[kept], minlength=experts).tolist()
    return order // k, order % k, counts


def balance_loss(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balance loss E * sum_e f_e * P_e: f_e the fraction of (token, slot) assignments routed to
    e (before capacity dropping), P_e the mean router probability of e. Equals 1 at perfect balance."""
    E = probs.shape[-1]
    f = torch.bincount(index.reshape(-1), minlength=E).to(probs.dtype) / index.numel()
    return E * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(_wide(logits), dim=-1).pow(2).mean()


def mi_loss(probs: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """ModuleFormer's (P24) mutual-information loss -H(e) + H(e|x): H(e) the entropy of the batch-mean routing
    distribution (load balance, maximised), H(e|x) the mean per-token entropy (concentration, minimised)."""
    mean = probs.mean(0)
    h_e = -(mean * (mean + eps).log()).sum()
    h_e_x = -(probs * (probs + eps).log()).sum(-1).mean()
    return -h_e + h_e_x


class Router(nn.Module):
    """Token -> expert logits. `linear`: one bias-free Linear (Switch/GShard); `mlp`: Linear, GELU, Linear as in
    ModuleFormer's gate (d -> hidden -> E). Optional Gaussian noise on the logits while training."""

    def __init__(self, dim: int, experts: int, kind: str = "linear", hidden: int = 256, noise: float = 0.0):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(dim, experts, bias=False)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, experts, bias=False))
        else:
            raise FormersError(f"moe: router must be 'linear' or 'mlp', got {kind!r}")
        if noise < 0:
            raise FormersError(f"moe: router noise must be >= 0, got {noise}")
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise
        return logits


class Experts(nn.Module):
    """E independent two-layer FFNs stored as stacked tensors: w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D).
    `glu=True` makes each a gated FFN with w1 (E, D, 2H) holding gate and value."""

    def __init__(self, experts: int, dim: int, hidden: int, act: Any = "gelu", bias: bool = True,
                 glu: bool = False):
        super().__init__()
        self.glu = glu
        width = 2 * hidden if glu else hidden
        bound1, bound2 = dim ** -0.5, hidden ** -0.5  # nn.Linear's default uniform bounds
        self.w1 = nn.Parameter(torch.empty(experts, dim, width).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim).uniform_(-bound2, bound2))
        self.b1 = nn.Parameter(torch.empty(experts, width).uniform_(-bound1, bound1)) if bias else None
        self.b2 = nn.Parameter(torch.empty(experts, dim).uniform_(-bound2, bound2)) if bias else None
        self.act = build("act", act, path="ffn.act")

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """The models' GPT-2 init, as nn.Linear gets it: N(0, std) weights, zero biases."""
        for w in (self.w1, self.w2):
            w.normal_(0.0, std)
        for b in (self.b1, self.b2):
            if b is not None:
                b.zero_()

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on a (n, D) slice."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        if self.glu:
            gate, value = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        y = h @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (A, D) sorted by expert, counts[e] rows each -> (A, D)."""
        outs = [self.expert(e, chunk) for e, chunk in enumerate(x.split(counts)) if chunk.shape[0] > 0]
        return torch.cat(outs) if outs else x.new_zeros(0, self.w2.shape[-1])


@register("ffn", "moe", paper="P42")
class MoE(nn.Module):
    """Sparse mixture-of-experts FFN: top-k token-choice routing, capacity factor with token dropping.

    Shazeer et al. 2017 / GShard / Switch, as WideNet (P42, top-2, capacity 1.25 train / 2.0 eval, noisy gating,
    load-balance loss) and ModuleFormer (P24, MLP gate, MI loss) use it:
        p = softmax(router(x)),  y = sum_{e in top-k(p)} g_e * Expert_e(x)
    with g the renormalised top-k probabilities (`combine`; `auto` = renormalised for k > 1, Switch's raw p for
    k = 1). Each expert is a two-layer FFN of width `hidden`
    (default mult * dim / k, so that the active parameters equal a dense `mlp` of the same `mult`); `glu` makes
    them gated. Capacity per expert = ceil(capacity_factor * tokens * k / experts) (None or 0: no dropping);
    dropped assignments add nothing, so a fully dropped token passes through the residual unchanged. Tokens claim
    slots in order (`priority="token"`) or GShard's all-first-choices-first order (`priority="rank"`, not causal).
    The order of a (B, N, D) batch is position-major: position 0 of every sequence, then position 1, ..., so with
    token priority a token's fate depends only on tokens at its own or earlier positions and a causal LM stays
    causal across the whole batch (batch-major order would let sequence 0's last tokens take the slots of sequence
    1's first ones). Capacity scales with the tokens in the call, so in an LM, cached decoding (one token per call:
    nothing drops) can differ from a full forward over the same text where capacity binds; `eval_capacity_factor:
    null` makes inference drop nothing, and then the two agree. Padding (Block passes the key-padding `mask`) is not
    routed, takes no slots and stays out of the auxiliary losses; a packed batch (`seqlens`) claims slots in the same
    position-major order, so packed and padded forwards agree even where capacity binds.
    Auxiliary losses, reported through `report_aux` and added by the trainer:
        moe_balance  balance_weight * E * sum_e f_e P_e    (`aux="switch"`)
        moe_mi       balance_weight * (-H(e) + H(e|x))    (`aux="mi"`, P24)
        moe_z        z_weight * mean logsumexp(logits)^2
    `train_router=False` freezes the gate. `last_load` keeps the last forward's per-expert kept-assignment counts
    and `last_dropped` the number of dropped assignments. (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, experts: int = 8, k: int = 2, mult: float = 4.0, hidden: int | None = None,
                 act: Any = "gelu", glu: bool = False, bias: bool = True, capacity_factor: float | None = 1.25,
                 eval_capacity_factor: float | None = 2.0, router: str = "linear", router_hidden: int = 256,
                 noise: float = 0.0, combine: str = "auto", priority: str = "token", aux: str = "switch",
                 balance_weight: float = 0.01, z_weight: float = 0.001, train_router: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if experts < 1:
            raise FormersError(f"ffn: moe needs experts >= 1, got {experts}")
        if not 1 <= k <= experts:
            raise FormersError(f"ffn: moe needs 1 <= k <= experts ({experts}), got k={k}")
        if aux not in ("switch", "mi", "none"):
            raise FormersError(f"ffn: moe aux must be 'switch', 'mi' or 'none', got {aux!r}")
        if priority not in ("token", "rank"):
            raise FormersError(f"ffn: moe priority must be 'token' or 'rank', got {priority!r}")
        if combine not in ("auto", "softmax", "softmax_raw", "unit"):
            raise FormersError(f"ffn: moe combine must be 'auto', 'softmax', 'softmax_raw' or 'unit', got {combine!r}")
        if combine == "auto":  # Switch's raw probability for k = 1 (else the gate is 1 and the router learns nothing)
            combine = "softmax_raw" if k == 1 else "softmax"
        hidden = hidden or max(1, int(mult * dim / k))
        self.dim, self.num_experts, self.k = dim, experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.combine, self.aux, self.priority = combine, aux, priority
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.router = Router(dim, experts, router, router_hidden, noise)
        self.router.requires_grad_(train_router)  # False: a fixed gate (EMoE's centroid gate, P46)
        self.experts = Experts(experts, dim, hidden, act, bias, glu)
        self.drop = nn.Dropout(dropout)
        self.last_load: list[int] = []
        self.last_dropped = 0

    def active_parameters(self) -> int:
        """Parameters one token uses: the router and k of the E experts."""
        per_expert = sum(p.numel() for p in self.experts.parameters()) // self.num_experts
        return sum(p.numel() for p in self.router.parameters()) + self.k * per_expert

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, E) router logits."""
        return self.router(x)

    takes_mask = True  # Block hands it the key-padding `mask` (B, N) and packed `seqlens`: padding takes no slots

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) (or any (..., D)); `mask` (B, N) True at real tokens (padding is not routed, takes no
        capacity and stays out of the auxiliary losses; its output is 0); `seqlens` (S + 1,) cumulative offsets of
        a packed x (1, T, D) or (T, D), so that its tokens claim slots in the same order as the padded batch."""
        shape = x.shape
        xt = x.reshape(-1, shape[-1])  # (T, D)
        T = xt.shape[0]
        logits = self.gate_logits(xt)  # (T, E)
        index, gates = route(logits, self.k, self.combine)  # (T, k) each
        valid = self._valid(x, mask)
        if (self.training or torch.is_grad_enabled()) and (valid is None or bool(valid.any())):
            lg, ix = (logits, index) if valid is None else (logits[valid], index[valid])
            probs = torch.softmax(_wide(lg), dim=-1)
            if self.aux == "switch" and self.balance_weight:
                report_aux(self, "moe_balance", self.balance_weight * balance_loss(probs, ix))
            elif self.aux == "mi" and self.balance_weight:
                report_aux(self, "moe_mi", self.balance_weight * mi_loss(probs))
            if self.z_weight:
                report_aux(self, "moe_z", self.z_weight * z_loss(lg))
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        real = T if valid is None else int(valid.sum())
        cap = capacity(real, self.num_experts, self.k, factor)
        order = self._arrival(x, valid, seqlens) if (valid is not None or cap < T * self.k) else None
        if order is None:
            keep = capacity_keep(index, self.num_experts, cap, self.priority)
        else:
            keep = torch.zeros_like(index, dtype=torch.bool)  # padding: never kept
            keep[order] = capacity_keep(index[order], self.num_experts, cap, self.priority)
        tok, slot, counts = dispatch(index, keep, self.num_experts)
        self.last_load, self.last_dropped = counts, int(real * self.k - keep.sum())
        y = self.experts(xt[tok], counts)  # (A, D), grouped by expert
        y = y * gates[tok, slot].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(xt).index_add_(0, tok, y)
        return self.drop(out.view(shape))

    @staticmethod
    def _valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(T,) bool: which rows of x are real tokens. A key mask longer than x (B, past + N: decoding with a cache)
        describes x by its last N columns."""
        if mask is None:
            return None
        if x.dim() != 3 or mask.dim() != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            raise FormersError(f"moe: the padding mask must be (batch, tokens) = {tuple(x.shape[:2])} (or longer, "
                               f"with cached tokens first), got {tuple(mask.shape)} for input {tuple(x.shape)}")
        return mask[:, mask.shape[1] - x.shape[1]:].reshape(-1).bool()

    @staticmethod
    def _arrival(x: torch.Tensor, valid: torch.Tensor | None, seqlens: torch.Tensor | None) -> torch.Tensor | None:
        """The order in which tokens claim expert slots (real tokens only): position-major, i.e. every sequence's
        token 0, then every sequence's token 1, ..., for a (B, N, D) batch and for a packed one alike; None for the
        plain order (one sequence, nothing masked)."""
        T = x.numel() // x.shape[-1]
        if seqlens is not None:
            from formers.nn.packed import positions_in_sequence, sequence_ids

            key = positions_in_sequence(seqlens) * (len(seqlens) - 1) + sequence_ids(seqlens)  # (T,)
            order = torch.sort(key, stable=True).indices
        elif x.dim() == 3 and x.shape[0] > 1:
            order = torch.arange(T, device=x.device).view(x.shape[0], x.shape[1]).t().reshape(-1)
        else:
            order = torch.arange(T, device=x.device) if valid is not None else None
        return order if valid is None or order is None else order[valid[order]]

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, k={self.k}, capacity_factor={self.capacity_factor}, "
                f"combine={self.combine!r}, aux={self.aux!r}")


__all__ = ["MoE", "Experts", "Router", "route", "capacity", "capacity_keep", "dispatch", "balance_loss", "z_loss",
           "mi_loss"]
