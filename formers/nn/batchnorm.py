"""Batch-statistics norms of P06 (SLAB): RepBN, the progressive LN -> RepBN switch PRepBN, and `fold_repbn`, which
merges an eval-mode RepBN into the linear layers that read it.

Unlike LayerNorm, these normalise each channel with statistics over the batch and all tokens. In training mode the
statistics therefore mix positions and sequences (padding and, in a causal LM, future tokens too), exactly as in the
paper; in eval mode they use the running statistics and act on every token independently.
"""

from __future__ import annotations

import torch
from torch import nn

from formers.registry import FormersError, register


@register("norm", "repbn", paper="P06")
class RepBN(nn.Module):
    """Re-parameterisable BatchNorm (P06): y = BN(x) + alpha * x, BN over channels; (..., D) -> (..., D).

    P06 "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
    Normalization". BN statistics are taken over every leading dim (batch and tokens), as BatchNorm1d over (B, D, N)
    in the official code (xinghaochen/SLAB classification/models/prepbn.py); alpha is one learnable scalar, init 1.
    In eval mode y = a * x + c with a = gamma / sqrt(var + eps) + alpha and c = beta - gamma * mean / sqrt(var + eps)
    (`affine()`), which `fold_repbn` merges into the following linear layer.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, alpha: float = 1.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum)
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[-1]:
            raise FormersError("norm: repbn needs more than one token per batch in training mode (batch statistics); "
                               "use a longer sequence or a larger batch, or call model.eval()")
        y = self.bn(x.reshape(-1, x.shape[-1]))  # (B*N, D): one sample per token, statistics over batch and tokens
        return y.view(x.shape) + self.alpha * x

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode map as a per-channel affine y = a * x + c; returns (a, c), each (D,)."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        return gamma * inv + self.alpha, beta - gamma * bn.running_mean * inv


@register("norm", "prepbn", paper="P06")
class PRepBN(nn.Module):
    """Progressive RepBN (P06): y = lam * LN(x) + (1 - lam) * RepBN(x) in training, RepBN(x) in eval; (..., D).

    P06 (SLAB), "LinearNorm" in the official code (xinghaochen/SLAB classification/models/prepbn.py): during the
    first `warm` steps y = LN(x) only; afterwards lam = r0 * (1 - (t - warm) / step) decays linearly from r0 to 0 over
    `step` steps (t = optimizer step) and stays at 0. The official code counts forward calls; here t comes from the
    trainer's `set_step` hook, so evaluation passes and resumption do not shift the schedule. Eval mode uses RepBN
    only, as in the paper, so an eval-mode PRepBN can be folded like a RepBN. Paper defaults: step 60000 for
    DeiT/Swin; warm 10000 and step 18000 for LLaMA-350M.
    """

    def __init__(self, dim: int, step: int = 60000, warm: int = 0, r0: float = 1.0, eps: float = 1e-5):
        super().__init__()
        if step <= 0 or warm < 0:
            raise FormersError(f"norm: prepbn needs step > 0 and warm >= 0 (got step={step}, warm={warm})")
        self.step, self.warm, self.r0 = step, warm, r0
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.repbn = RepBN(dim, eps=eps)
        self.t = 0

    def set_step(self, step: int) -> None:
        self.t = int(step)

    @property
    def lam(self) -> float:
        """Weight of the LayerNorm branch at the current step (1 while warming up, then linear decay to 0)."""
        if self.t < self.warm:
            return 1.0
        return self.r0 * max(0.0, 1.0 - (self.t - self.warm) / self.step)

    @property
    def warming(self) -> bool:
        return self.t < self.warm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.repbn(x)
        if self.warming:  # LN only: the BN statistics start accumulating when the mix begins, as in the paper
            return self.ln(x)
        lam = self.lam
        return lam * self.ln(x) + (1.0 - lam) * self.repbn(x)

    def extra_repr(self) -> str:
        return f"step={self.step}, warm={self.warm}, r0={self.r0}"


def _reader_linears(sub: nn.Module) -> list[nn.Linear] | None:
    """The linear layers that read a sublayer's input directly and only through themselves, or None if unknown."""
    from formers.nn.attention import SoftmaxAttention
    from formers.nn.ffn import GLU, MLP

    cls = type(sub)
    if isinstance(sub, SoftmaxAttention):
        # subclasses that change only the scores/probabilities still read x through q and kv alone
        if cls.project is SoftmaxAttention.project and cls.forward is SoftmaxAttention.forward:
            return [sub.q, sub.kv]
        return None
    if cls is MLP:
        return [sub.fc1]
    if cls is GLU:
        return [sub.fc_in]
    return None


@torch.no_grad()
def _fold_into(lin: nn.Linear, a: torch.Tensor, c: torch.Tensor) -> None:
    """lin(a * x + c) = (W diag(a)) x + (W c + b): rewrite lin's weight and bias in place."""
    shift = lin.weight @ c  # (out,)
    lin.weight.mul_(a)  # (out, in) * (in,): scales column j by a_j
    if lin.bias is None:  # a bias-free reader (e.g. q, kv) gains one
        lin.bias = nn.Parameter(shift)
    else:
        lin.bias.add_(shift)


@torch.no_grad()
def fold_repbn(model: nn.Module) -> nn.Module:
    """Fold every eval-mode RepBN/PRepBN of `pre` (and `lns`) placements into the sublayer's reading linears.

    P06 re-parameterisation: RepBN(x) = a * x + c per channel in eval mode, so the norm becomes the identity and
    W' = W diag(a), b' = W c + b for each first linear of the sublayer (q and kv of softmax attention, fc1 / fc_in of
    the FFNs); LNS's constant 1/sqrt(l) multiplies c. Other placements (post, peri) and unknown sublayers keep their
    norm. The model must be in eval mode; it is changed in place and returned. Outputs are unchanged (to rounding).
    """
    from formers.blocks import Block, PreNorm

    if model.training:
        raise FormersError("fold_repbn: call model.eval() first; folding uses the running BN statistics")
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        for place in (block.attn, getattr(block, "ffn", None)):
            if not isinstance(place, PreNorm):
                continue
            norm = place.norm
            rep = norm.repbn if isinstance(norm, PRepBN) else norm
            readers = _reader_linears(place.fn)
            if not isinstance(rep, RepBN) or readers is None:
                continue
            a, c = rep.affine()
            c = c * getattr(place, "scale", 1.0)  # LNS computes F(scale * norm(x)); the identity keeps scale * x
            for lin in readers:
                _fold_into(lin, a, c)
            place.norm = nn.Identity()
    return model


__all__ = ["RepBN", "PRepBN", "fold_repbn"]
