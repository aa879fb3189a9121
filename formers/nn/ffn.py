"""Channel mixers (family `ffn`): position-wise feed-forward layers, forward(x) -> x on (B, N, D)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.hooks import (
    autocast_on,
    forward_ad_active,
    forward_unpatched,
    functorch_active,
    hook_free,
    idle_dropout,
    torch_forward,
    vmapped,
)
from formers.registry import build, register

IN_PLACE_MIN = 1 << 16  # elements of fc1's output from which MLP applies GELU in place (inference)


class _GeluLinearFn(torch.autograd.Function):
    """res + GELU(a) W^T + b in one autograd node (res and b optional); a (..., hidden), W (out, hidden).

    The forward is the plain one (F.gelu, then addmm). The backward computes fc2's input gradient dh = dy W itself,
    a fresh tensor no one else holds, and lets the GELU backward overwrite it with da = dh * GELU'(a) instead of
    writing another (tokens, hidden) tensor: one less pass over fresh memory per feed-forward layer."""

    @staticmethod
    def forward(ctx, a, w, b, res, approximate: str):
        h = F.gelu(a, approximate=approximate)
        h2 = h.reshape(-1, w.shape[1])
        # the output is allocated in its own shape and written through a 2-D view of it: a view returned from a
        # custom Function could not be changed in place afterwards (a user's `y.mul_(2)`, a hook patching rows)
        out = torch.empty(*a.shape[:-1], w.shape[0], dtype=h.dtype, device=h.device)
        o2 = out.view(-1, w.shape[0])
        if res is None:
            if b is not None:
                torch.addmm(b, h2, w.t(), out=o2)
            else:
                torch.mm(h2, w.t(), out=o2)
        else:
            r2 = res.reshape(-1, w.shape[0])
            torch.add(r2, b, out=o2) if b is not None else o2.copy_(r2)
            o2.addmm_(h2, w.t())
        ctx.save_for_backward(a, h2, w)
        ctx.approximate, ctx.has_b, ctx.has_res = approximate, b is not None, res is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        a, h2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, w.shape[0])
        da = dw = db = None
        if ctx.needs_input_grad[0]:
            dh = dy2.mm(w)  # (tokens, hidden), ours alone
            if torch.is_grad_enabled() or vmapped(dh):  # create_graph: a differentiable backward; vmap
                # (is_grads_batched, jacobian(vectorize=True)) has no rule for the out= form: both out of place
                da = torch.ops.aten.gelu_backward(dh, a.reshape(dh.shape), approximate=ctx.approximate)
            else:
                da = torch.ops.aten.gelu_backward.grad_input(dh, a.reshape(dh.shape), approximate=ctx.approximate,
                                                              grad_input=dh)
            da = da.view(a.shape)
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: h as a function of a, so that d(dW)/da is not lost
                h2 = F.gelu(a, approximate=ctx.approximate).reshape(h2.shape)
            dw = dy2.t().mm(h2)
        if ctx.has_b and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return da, dw, db, (dy if ctx.has_res and ctx.needs_input_grad[3] else None), None


class GeluLinear:
    """a -> fc2(GELU(a)) as one autograd node (`_GeluLinearFn`): what `MLP.forward_split` returns in place of fc2
    in training, with the pre-activation; `add(res, a)` is res + fc2(GELU(a)) with the residual as the matmul's
    starting value (`linear_add`)."""

    def __init__(self, fc2: nn.Linear, approximate: str):
        self.weight, self.bias, self.approximate = fc2.weight, fc2.bias, approximate

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return _GeluLinearFn.apply(a, self.weight, self.bias, None, self.approximate)

    def add(self, res: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if res.shape[:-1] != a.shape[:-1] or res.shape[-1] != self.weight.shape[0] or res.dtype != a.dtype:
            return res + self(a)
        return _GeluLinearFn.apply(a, self.weight, self.bias, res, self.approximate)


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

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, nn.Module | GeluLinear | None]:
        """`forward` stopped before fc2: (h, fc2) with `self(x) == fc2(h)`, h the hidden activations; (result,
        None) when output dropout is active. A Pre-LN block uses it to add fc2 straight into its residual stream
        (`PreNorm`, `linear_add`; in training too). In training with a plain GELU and fc2 (`_gelu_linear`) it is
        (a, GeluLinear) instead, a = fc1(x) before the activation: GELU and fc2 are then one autograd node whose
        backward reuses fc2's input gradient for GELU's (tests/test_fast_paths.py)."""
        if self._gelu_linear():
            a = self.fc1(x)
            return a, GeluLinear(self.fc2, self.act.approximate)
        if self._gelu_in_place():  # inference fast path, tests/test_fast_paths.py
            h = F.linear(x, self.fc1.weight, self.fc1.bias)
            if h.numel() >= IN_PLACE_MIN:
                return torch.ops.aten.gelu_(h, approximate=self.act.approximate), self.fc2
            return F.gelu(h, approximate=self.act.approximate), self.fc2
        h = self.hidden_drop(self.act(self.fc1(x)))
        if not idle_dropout(self.drop):  # also at p = 0 when hooked or replaced: the module is called
            return self.drop(self.fc2(h)), None
        return h, self.fc2  # output dropout is the identity in evaluation mode (or p = 0)

    def _gelu_linear(self) -> bool:
        """Training (autograd on) with a plain nn.GELU and a plain fc2 (nn.Linear, no hooks or replaced forward on
        either: the fused node calls neither), no active dropout (hidden or output), no autocast (the node runs
        F.gelu and addmm in the input's dtype) and no torch.func transform (the node has no functorch rules)."""
        return (torch.is_grad_enabled() and type(self.fc2) is nn.Linear and self._plain_gelu_no_dropout()
                and hook_free(self.fc2) and forward_unpatched(self.fc2)
                and not autocast_on(self.fc2.weight.device.type) and not functorch_active()
                and not forward_ad_active())

    def _gelu_in_place(self) -> bool:
        """Without autograd, GELU overwrites fc1's fresh output (from IN_PLACE_MIN elements) instead of allocating
        another (B, N, hidden) tensor. Measured here, ViT-Tiny forward (2 threads): at parity with the plain path
        when neither side's new buffers page-fault, and 8-13% faster when the plain path's do (about half the
        faults); 13% faster than oneDNN's fused linear+GELU on fc1 + GELU + fc2. Below IN_PLACE_MIN (decoding one
        token) ATen's in-place GELU is slower than the out-of-place one (22 vs 13 us on 1024 values), so that
        takes the plain GELU. Only with a plain hook-free nn.Linear and GELU (a hook could keep fc1's output, which
        must not change under it; a quantized, pruned or adapted fc1 is another module type; a forward replaced on
        the instance is honoured) and no active dropout."""
        return (not torch.is_grad_enabled() and type(self.fc1) is nn.Linear and self._plain_gelu_no_dropout()
                and hook_free(self.fc1) and forward_unpatched(self.fc1))

    def _plain_gelu_no_dropout(self) -> bool:
        """What both GELU fast paths need besides their own linear layer: `_plain_gelu_kinds`, and no hooks or
        replaced forward on the GELU and the dropouts."""
        return (self._plain_gelu_kinds() and hook_free(self.act, self.hidden_drop, self.drop)
                and forward_unpatched(self.act, self.hidden_drop, self.drop))

    def _plain_gelu_kinds(self) -> bool:
        """A plain nn.GELU (no subclass forward) and hidden and output dropout that are the identity (nn.Identity, or
        a plain nn.Dropout in evaluation mode or at p = 0): the types and modes only, all that the lean inference
        plans ask (formers/blocks.py `block_plan`, which has walked the block for hooks and replaced forwards)."""
        act, hidden, out = self.act, self.hidden_drop, self.drop
        return (isinstance(act, nn.GELU) and type(act).forward is torch_forward(nn.GELU)
                and (type(hidden) is nn.Identity or _identity_dropout(hidden))
                and (not out.p or _identity_dropout(out)))


def _identity_dropout(m: nn.Module) -> bool:
    """A plain nn.Dropout that drops nothing: evaluation mode or p = 0 (`idle_dropout` without its hook checks)."""
    return type(m) is nn.Dropout and (not m.training or m.p == 0)


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
