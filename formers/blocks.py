"""Block = placement x norm x token mixer x channel mixer x residual, and the stacks that hold blocks.

    pre  (Pre-LN):  x = x + F(N(x))                      final norm after the stack
    post (Post-LN): x = N(x + F(x))                      no final norm
    peri (Peri-LN, P77; alias sandwich): x = x + N_out(F(N_in(x)))   final norm after the stack
    lns  (LayerNorm Scaling, P61):       x = x + F(N(x) / sqrt(l))      l = 1-based layer index; final norm

A block spec is a mapping (see DESIGN §3): placement, norm, residual, mixer, ffn, dropout. Per-layer
overrides (`model.layers`) are merged into the default spec before each block is built.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from formers.nn import attention
from formers.nn.attention import FOLD_MIN_ROWS, Affine, KVCache, SoftmaxAttention
from formers.nn.ffn import IN_PLACE_MIN, MLP, GeluLinear
from formers.nn.hooks import (
    _global_hooks,
    autocast_on,
    forward_unpatched,
    functorch_active,
    hook_free,
    idle_dropout,
    plain_tree,
    torch_forward,
)
from formers.nn.norm import RMSNorm
from formers.registry import FormersError, _hint, build, get, register, split_spec

# ---------------------------------------------------------------------------------------------------- residual


@register("residual", "add", paper="baseline")
class AddResidual(nn.Module):
    """Plain residual connection: x + update."""

    row_wise = True  # output row i depends on input row i only (Block.forward_prefix)

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return x + update


def linear_add(res: torch.Tensor, y: torch.Tensor, out: Callable | None, inplace: bool = False) -> torch.Tensor:
    """`res + out(y)` (`res + y` when out is None) with a plain nn.Linear `out` accumulating into the result: the
    residual (plus the bias) is the matmul's starting value (`addmm_`, beta = 1), so there is no separate (B, N, D)
    output of the layer and no second pass to add it. `inplace=True` writes into `res` itself (only for a tensor that
    nobody else holds). Any other `out` (a quantized or adapted layer, hooks, another dtype) is called as usual.
    `out` may also be an `Affine` (a weight and a folded bias from `SoftmaxAttention.forward_split`). In training
    only out of place; tests/test_fast_paths.py checks values and gradients equal to the plain sum."""
    if out is None:
        return res.add_(y) if inplace else res + y
    if type(out) is GeluLinear and not inplace:  # MLP in training: GELU + fc2 in one node (formers/nn/ffn.py)
        return out.add(res, y)
    if not (type(out) is Affine or (type(out) is nn.Linear and hook_free(out) and forward_unpatched(out))):
        u = out(y)
        return res.add_(u) if inplace else res + u
    return add_matmul(res, y, out.weight, out.bias, inplace)


def add_matmul(res: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
               inplace: bool = False) -> torch.Tensor:
    """`res + F.linear(y, w, b)` as `(res + b) += y w^T` in one matmul (`linear_add`; `LM.generate`'s decoding step
    uses it too, so that both give the same bits). res (..., out), y (..., in), w (out, in); `inplace` writes into
    res (contiguous; inference only). Out of place it also trains: the add and the matmul are ops autograd knows
    (the matmul in place on the fresh sum, which no backward formula needs). Where that cannot hold the bits of
    `F.linear` (other dtypes, autocast, shapes that need broadcasting, a non-contiguous res to write into) it is
    `res + F.linear(y, w, b)`."""
    if (not (res.dtype == y.dtype == w.dtype) or autocast_on(res.device.type)
            or res.shape[:-1] != y.shape[:-1] or res.shape[-1] != w.shape[0] or (inplace and not res.is_contiguous())):
        u = F.linear(y, w, b)
        return res.add_(u) if inplace else res + u
    y2 = y.reshape(-1, w.shape[1])
    if inplace:
        acc = res.view(-1, w.shape[0])
        if b is not None:
            acc.add_(b)
        acc.addmm_(y2, w.t())
        return res
    # out of place, also under autograd: the accumulator is a fresh 2-D tensor (an in-place op on a view would make
    # autograd copy the gradient back through the base in the backward pass)
    r2 = res.reshape(-1, w.shape[0])
    acc = torch.addmm(r2, y2, w.t()) if b is None else (r2 + b).addmm_(y2, w.t())
    return acc.view(res.shape)


# --------------------------------------------------------------------------------------------------- placement


class Placement(nn.Module):
    """Where the norm sits around one sublayer. `final_norm` says whether the stack needs a norm after it."""

    final_norm = True

    def __init__(self, dim: int, sublayer: nn.Module, norm: Callable[[], nn.Module], residual: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.fn = sublayer
        self.residual = residual
        self.drop = nn.Dropout(dropout)

    def _drop(self, u: torch.Tensor) -> torch.Tensor:
        # no module call for an idle dropout (per-token cost when decoding); a hooked or replaced one is called
        return u if idle_dropout(self.drop) else self.drop(u)


@register("placement", "pre", paper="baseline", aliases=("pre_ln", "prenorm"))
class PreNorm(Placement):
    """Pre-LN (Xiong et al. 2020): x + F(Norm(x))."""

    def __init__(self, dim, sublayer, norm, residual, dropout=0.0):
        super().__init__(dim, sublayer, norm, residual, dropout)
        self.norm = norm()

    def forward(self, x, **kw):
        if self._fuses_residual():  # the sublayer's last linear layer adds into the stream (also when training)
            y, out = self.fn.forward_split(self.norm(x), **kw)
            return linear_add(x, y, out)
        return self.residual(x, self._drop(self.fn(self.norm(x), **kw)))

    def add_into(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """`self(x, **kw)` written into x's own storage where the fused inference path applies, else `self(x)`.
        Only for an x that nobody else holds: Block passes the fresh output of its token-mixer sublayer; no module
        of this sublayer may have a hook or a replaced forward (it could keep x, which is then overwritten)."""
        # every module, not only those the fused path skips: the norm sees x itself, and so does the sublayer where
        # the norm is an identity
        if (not torch.is_grad_enabled() and x.is_contiguous() and not functorch_active()  # vmap: x may be
                and self._fuses_residual(whole=True)):  # unbatched where the sublayer's output is batched
            y, out = self.fn.forward_split(self.norm(x), **kw)
            return linear_add(x, y, out, inplace=True)
        return self(x, **kw)

    def _fuses_residual(self, whole: bool = False) -> bool:
        """Whether the fused path may run: this class's own forward; a plain add residual; no active dropout; a
        sublayer whose `forward_split` (`forward` stopped before its last linear layer, same defining class as its
        `forward`) says what that layer is; no hooks or replaced forwards on the modules the fused path does not
        call, or with `whole` on this module and every module under it (`plain_tree`). With autograd it computes
        out of place (`add_matmul`), so a module's saved tensors stay intact."""
        if not (type(self).forward is PreNorm.forward and type(self.residual) is AddResidual
                and (not self.drop.p or idle_dropout(self.drop)) and _splits(type(self.fn))):
            return False
        if whole:
            return plain_tree(self)
        mods = (self.fn, self.residual, self.drop)
        return hook_free(*mods) and forward_unpatched(*mods)


def _splits(cls: type) -> bool:
    """The class's `forward_split` and `forward` come from the same class (a subclass that replaces `forward`
    alone would not be described by the inherited `forward_split`). Cached per class: it runs on every sublayer
    call in inference. Under torch.compile the answer is worked out at trace time, once per graph, without the
    cache (dynamo warns about every functools cache it traces through)."""
    return _splits_of(cls) if torch.compiler.is_compiling() else _splits_cached(cls)


def _splits_of(cls: type) -> bool:
    owner = _defined_in(cls, "forward_split")
    return owner is not None and owner is _defined_in(cls, "forward")


_splits_cached = functools.cache(_splits_of)


def _defined_in(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


@register("placement", "post", paper="baseline", aliases=("post_ln", "postnorm"))
class PostNorm(Placement):
    """Post-LN (Vaswani et al. 2017): Norm(x + F(x))."""

    final_norm = False

    def __init__(self, dim, sublayer, norm, residual, dropout=0.0):
        super().__init__(dim, sublayer, norm, residual, dropout)
        self.norm = norm()

    def forward(self, x, **kw):
        return self.norm(self.residual(x, self._drop(self.fn(x, **kw))))


@register("placement", "peri", paper="P77", aliases=("sandwich",))
class PeriNorm(Placement):
    """Peri-LN (P77): x + Norm_out(F(Norm_in(x))), the sublayer's input and output both normalised.

    P77 "Peri-LN: Revisiting Layer Normalization in the Transformer Architecture"; CogView's sandwich LN and
    Gemma-2's pre+post norms are the same pattern. Final norm after the stack, as in Pre-LN.
    """

    def __init__(self, dim, sublayer, norm, residual, dropout=0.0):
        super().__init__(dim, sublayer, norm, residual, dropout)
        self.norm_in, self.norm_out = norm(), norm()

    def forward(self, x, **kw):
        return self.residual(x, self._drop(self.norm_out(self.fn(self.norm_in(x), **kw))))


@register("placement", "lns", paper="P61", aliases=("layernorm_scaling",))
class LNSNorm(PreNorm):
    """LayerNorm Scaling (P61): Pre-LN whose norm output is scaled by 1/sqrt(l), l the 1-based layer index.

    P61 "The Curse of Depth in Large Language Models": x = x + F(Norm(x) / sqrt(l)) for both sublayers of layer l,
    no new parameters; the final norm after the stack is unscaled. Facts from the official code
    (lmsdss/LayerNorm-Scaling, peft_pretraining/modeling_llama.py, norm_type 'LNS': scale = 1/sqrt(layer_index + 1)).
    Initialisation: the README asks for plain normal init, NOT depth-scaled init (OLMo/GPT-2 style 1/sqrt(2L)
    output scaling), which would cancel the benefit; the formers models' N(0, 0.02) init is the intended one.
    `layer` is the 0-based index that Block passes (reserved: set by the model, not by the config).
    """

    def __init__(self, dim, sublayer, norm, residual, dropout=0.0, layer: int = 0):
        super().__init__(dim, sublayer, norm, residual, dropout)
        if layer < 0:
            raise FormersError(f"placement: layer index must be >= 0, got {layer}")
        self.layer = layer
        self.scale = (layer + 1) ** -0.5

    def forward(self, x, **kw):
        return self.residual(x, self._drop(self.fn(self.norm(x) * self.scale, **kw)))


# ------------------------------------------------------------------------------------------------------- block

BLOCK_DEFAULTS: dict[str, Any] = {
    "placement": "pre", "norm": "layernorm", "residual": "add",
    "mixer": {"name": "softmax", "heads": 4}, "ffn": {"name": "mlp", "act": "gelu"}, "dropout": 0.0,
}


class Block(nn.Module):
    """One Transformer layer: token mixer then channel mixer, each wrapped by the placement; (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, causal: bool, spec: dict[str, Any], path: str = "model.block",
                 max_len: int | None = None, layer: int = 0):
        """`layer` is the block's 0-based depth index, passed to placements that take it (e.g. `lns`)."""
        super().__init__()
        spec = {**BLOCK_DEFAULTS, **spec}
        unknown = [k for k in spec if k not in BLOCK_DEFAULTS]
        if unknown:
            raise FormersError(f"{path}: unknown key '{unknown[0]}'{_hint(unknown[0], BLOCK_DEFAULTS)}; "
                               f"keys: {', '.join(BLOCK_DEFAULTS)}")
        name, _ = split_spec(spec["mixer"], f"{path}.mixer")
        entry = get("mixer", name, f"{path}.mixer")
        if causal and entry.causal_ok is False:
            raise FormersError(f"{path}.mixer: '{name}' cannot be causal; use it in a bidirectional model (encoder)")
        if not causal and entry.extra.get("bidirectional_ok", True) is False:
            raise FormersError(f"{path}.mixer: '{name}' is causal only; use it in a causal model (lm)")
        extra = {"max_len": max_len} if max_len is not None else {}
        mixer = build("mixer", spec["mixer"], path=f"{path}.mixer", reserved=("dim", "causal", "max_len"),
                      dim=dim, causal=causal, **extra)

        def norm() -> nn.Module:
            return build("norm", spec["norm"], path=f"{path}.norm", reserved=("dim",), dim=dim)

        def wrap(sub: nn.Module) -> nn.Module:
            residual = build("residual", spec["residual"], path=f"{path}.residual", reserved=("dim",), dim=dim)
            return build("placement", spec["placement"], path=f"{path}.placement",
                         reserved=("dim", "sublayer", "norm", "residual", "dropout", "layer"),
                         dim=dim, sublayer=sub, norm=norm, residual=residual, dropout=spec["dropout"], layer=layer)

        self.attn = wrap(mixer)
        self.has_ffn = spec["ffn"] not in (None, "none")
        if self.has_ffn:
            ffn = build("ffn", spec["ffn"], path=f"{path}.ffn", reserved=("dim",), dim=dim)
            self.ffn = wrap(ffn)
        self.final_norm = type(self.attn).final_norm

    def forward(self, x: torch.Tensor, **kw) -> torch.Tensor:
        x = self.attn(x, **kw)
        if not self.has_ffn:
            return x
        # an FFN that couples tokens (MoE capacity) declares `takes_mask` and gets the padding mask / packed seqlens;
        # looked up per call, since expert surgery (moefy) may swap the sublayer after the block was built
        takes = getattr(type(getattr(self.ffn, "fn", None)), "takes_mask", False)
        fkw = {k: kw[k] for k in ("mask", "seqlens") if kw.get(k) is not None} if takes else {}
        if self._fresh_after_attn():  # inference: the feed-forward adds into the token mixer's fresh output
            return self.ffn.add_into(x, **fkw)
        return self.ffn(x, **fkw)

    def _fresh_after_attn(self) -> bool:
        """The token-mixer sublayer returns a tensor nobody else holds (a plain Pre-LN add: `x + u` or the fused
        `linear_add`, no hooks that could keep or replace it) and the feed-forward sublayer is a Pre-LN one that
        can write into it (`PreNorm.add_into`)."""
        a = self.attn
        return (not torch.is_grad_enabled() and type(a) is PreNorm and type(self.ffn) is PreNorm
                and type(a.residual) is AddResidual and hook_free(a, a.residual) and forward_unpatched(a, a.residual))

    def forward_prefix(self, x: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`self(x)[:, :n]` computed for those n rows only: (B, N, D) -> (B, n, D). The token mixer still reads
        keys and values from all N rows, but queries, the output projection, the residuals and the feed-forward
        run on n rows; `mask` (B, N) marks the valid keys. A ViT or an encoder that classifies from its class token
        needs no more of its last block (about 1/12 of a ViT-Tiny forward, up to 1/depth of an encoder's). Only
        where `prefix_ok()`; tests/test_fast_paths.py checks it equal to the full block."""
        a = self.attn
        h = a.norm(x)
        x = a.residual(x[:, :n], a._drop(a.fn(h[:, :n], context=h, mask=mask)))  # mask: (B, N) valid keys
        return self.ffn(x) if self.has_ffn else x

    def prefix_ok(self) -> bool:
        """Whether `forward_prefix` equals the full block on its rows: every submodule in evaluation mode (no
        dropout or drop-path draws, no batch statistics); a Pre-LN token mixer that is plain bidirectional softmax
        attention (the cross-attention path: queries from n rows, keys and values from all); norms, feed-forward
        and residuals whose class declares `row_wise` (row i of the output depends on row i of the input only); no
        module hooks and no `forward` replaced on an instance anywhere in the block, since the prefix path does not
        call every submodule."""
        mods = list(self.modules())
        if (any(m.training for m in mods) or type(self.attn) is not PreNorm or not forward_unpatched(*mods)
                or not _prefix_skips_unpatched()):  # a patched Block.forward (say) would not run for this block
            return False
        mixer = self.attn.fn
        if type(mixer) is not SoftmaxAttention or mixer.causal:
            return False
        parts = [self.attn.norm, self.attn.residual]
        if self.has_ffn:
            f = self.ffn
            parts += [f.fn, f.residual] + [getattr(f, k) for k in ("norm", "norm_in", "norm_out") if hasattr(f, k)]
        return all(is_row_wise(m) for m in parts) and hook_free(*mods)


# ------------------------------------------------------------------------------------------------ lean inference
#
# In inference a standard block can spend more time deciding than computing: each sublayer checks on every call that
# its fused path may run (hooks, replaced forwards, dropout, subclasses), about 190 us a ViT-Tiny block at batch 1 on
# top of about 270 us of ATen ops (this machine, 1 thread). On a GPU, where those ops take microseconds, the checks
# are the forward. `block_plan` makes them once for the whole block, per forward, and reads its weights; `lean_block`
# then runs the ops that the module path would run, in the same order (the same bits), without the module machinery.
# Parts it does not know (another norm or feed-forward) are still called as modules. `PlainStack` runs its blocks
# this way in inference, and `LM.generate` decodes with the same plans (models/lm.py, `decode_step`).
# tests/test_fast_paths.py checks both against the module path, bit for bit, and where they must not run.


@functools.cache
def _own_methods(cls: type) -> frozenset:
    """The methods a class and its bases below nn.Module define (what its module path may call on an instance)."""
    return frozenset(k for c in cls.__mro__ if c not in (nn.Module, object) for k, v in vars(c).items()
                     if callable(v) or isinstance(v, (staticmethod, classmethod)))


def _unpatched(*mods: nn.Module) -> bool:
    """No method of these modules' classes replaced on the instance (`forward_split`, `add_into`, `run`, ...): the
    module path would call the replacement, which a plan does not see."""
    return all(_own_methods(type(m)).isdisjoint(m.__dict__) for m in mods)


def norm_fn(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> norm(x) for one norm module: LayerNorm / formers RMSNorm inlined, anything else called."""
    if isinstance(m, nn.LayerNorm) and type(m).forward is torch_forward(nn.LayerNorm):  # a class-level patch runs
        shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    if type(m) is RMSNorm:
        w, eps = m.weight, m.eps
        return lambda x: F.rms_norm(x, w.shape, w, eps)
    return m


def ffn_add_fn(m: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(h, x) -> x + ffn(h), written into x where x is contiguous and out of place where not, as `Block.forward`
    computes it (`PreNorm.add_into`, else `PreNorm.forward`: the same ops, so the same bits): the MLP with a plain GELU
    inlined (GELU in place on fc1's output from IN_PLACE_MIN elements, as `MLP.forward_split`), a feed-forward with
    `forward_split` through it, anything else called. For a module tree already checked for hooks, replaced
    forwards and evaluation mode."""
    if (type(m) is MLP and _unpatched(m) and type(m.fc1) is nn.Linear and type(m.fc2) is nn.Linear
            and m._plain_gelu_kinds()):  # `MLP._gelu_in_place`, the hooks and forwards checked by the caller
        w1, b1, w2, b2, approximate = m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.act.approximate

        def mlp_add(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            u = F.linear(h, w1, b1)
            del h  # freed before fc2, as on the module path (memory reuse: no fresh pages)
            u = (torch.ops.aten.gelu_(u, approximate=approximate) if u.numel() >= IN_PLACE_MIN
                 else F.gelu(u, approximate=approximate))
            return add_matmul(x, u, w2, b2, inplace=x.is_contiguous())
        return mlp_add
    if _splits(type(m)):
        def split_add(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            y, out = m.forward_split(h)
            del h
            return linear_add(x, y, out, inplace=x.is_contiguous())
        return split_add
    return lambda h, x: x + m(h)


def block_plan(block: nn.Module, fold: bool = True, masked: bool = False) -> tuple | None:
    """(norm1, attention weights, (norm2, ffn_add) or None) for `lean_block`, or None where the block is not the
    standard kind: a formers Block of Pre-LN sublayers with add residuals around plain softmax attention (plain
    linear layers; no explicit scores, projection, output or split replaced), every module under it in evaluation
    mode with no hooks and no `forward` replaced on the instance (global hooks: the caller checks). `fold`: the value
    bias joins the output bias and the key/value projection runs without it (`SoftmaxAttention._folds_kv_bias`;
    not for a KV cache, whose keys and values must stay whole). `masked`: the stack has a key mask, which a
    feed-forward that declares `takes_mask` (MoE capacity) would get from `Block.forward`. Submodules are read from
    `_modules` (this runs for every block on every inference forward, and `nn.Module.__getattr__` costs about a
    microsecond a read); one held outside it (a sublayer shared across layers, formers/stacks.py) is not walked for
    hooks, so its block is not planned."""
    if type(block) is not Block or not plain_tree(block, evaluating=True, global_checked=True):
        return None
    a = block._modules.get("attn")
    if type(a) is not PreNorm:
        return None
    m, norm, residual, drop = (a._modules.get(k) for k in ("fn", "norm", "residual", "drop"))
    if (type(m) is not SoftmaxAttention or norm is None or type(residual) is not AddResidual
            or type(drop) is not nn.Dropout):  # in evaluation mode (the walk): the identity
        return None
    q, kv, o = m._modules.get("q"), m._modules.get("kv"), m._modules.get("out")
    if (m.explicit or type(q) is not nn.Linear or type(kv) is not nn.Linear or type(o) is not nn.Linear
            or not _unpatched(block, a, m)):
        return None
    bkv, bo = kv.bias, o.bias
    if fold and bkv is not None:
        bkv, bo = None, m._folded_out_bias()
    attn = (q.weight, q.bias, kv.weight, bkv, o.weight, bo, m.heads, m.kv_heads, m.head_dim, m.scale, m.causal)
    ffn = None
    if block.has_ffn:
        f = block._modules.get("ffn")
        if type(f) is not PreNorm:
            return None
        fn, norm2, residual, drop = (f._modules.get(k) for k in ("fn", "norm", "residual", "drop"))
        if (fn is None or norm2 is None or type(residual) is not AddResidual or type(drop) is not nn.Dropout
                or not _unpatched(f) or (masked and getattr(type(fn), "takes_mask", False))):
            return None
        ffn = (norm_fn(norm2), ffn_add_fn(fn))
    return norm_fn(norm), attn, ffn


def lean_block(plan: tuple, x: torch.Tensor, masks: dict | None = None, cache: KVCache | None = None,
               positions: Any = None) -> torch.Tensor:
    """The block of `plan` (block_plan) on x (B, N, D) -> (B, N, D): `Block.forward`'s inference ops (the
    attention's fused q/kv projections, relative `positions` (rotation, score bias) and SDPA, the output projection
    accumulating into the residual, the feed-forward adding into that fresh sum). `masks` (`lean_masks`) where the
    stack has a key mask: {causal: (allowed, rows to zero or None)}, made once for every block. `cache`: one decoded
    token per row (N = 1, `LM.generate`'s `decode_step`), its keys and values appended, every cached key seen. The
    attention's temporaries (and the normed rows, `ffn_add_fn`) are freed when the module path frees them, so that
    the feed-forward's buffers can reuse their memory: a first version that held them read 0.94-0.95x the module
    path in two A/Bs of an encoder at 32 x 128 tokens here, this one 0.98-1.01x."""
    norm1, attn, ffn = plan
    x = add_matmul(x, _lean_attention(attn, norm1(x), masks, cache, positions), attn[4], attn[5])
    if ffn is not None:  # x is fresh: the feed-forward adds into it
        norm2, ffn_add = ffn
        x = ffn_add(norm2(x), x)
    return x


def _lean_attention(attn: tuple, h: torch.Tensor, masks: dict | None, cache: KVCache | None,
                    positions: Any = None) -> torch.Tensor:
    """Self-attention of the normed rows h (B, N, D) -> merged heads (B, N, H * Dh), before the output projection,
    with SoftmaxAttention.forward_split's inference ops: relative `positions` rotate q and k (rotary) and may give a
    score bias (ALiBi), both called as that method calls them."""
    wq, bq, wkv, bkv, _, _, H, Hkv, Dh, scale, causal = attn
    B, N, _ = h.shape
    q = F.linear(h, wq, bq).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
    k, v = F.linear(h, wkv, bkv).view(B, N, 2, Hkv, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, Hkv, N, Dh) each
    past, bias = cache.length if cache is not None else 0, None
    if positions is not None:
        q, k, bias = attention.relative_positions(positions, q, k, past)
    if cache is not None:  # (B, Hkv, L, Dh): the one query sees every cached key, no mask (N = 1: not causal below)
        k, v = cache.update(k, v)
    causal = causal and N > 1  # a decoded token (N = 1, after the cached keys) sees every key
    if masks is None and bias is None:  # through the module, so that a patch of attention._sdpa applies here too
        y = attention._sdpa(q, k, v, dropout_p=0.0, is_causal=causal, scale=scale)
    else:  # as forward_split with a key mask (made once for the stack, `lean_masks`) or a score bias
        allowed, empty = (masks[causal] if masks is not None else
                          SoftmaxAttention._allowed(N, k.shape[2], causal, past, None, h.device))
        y = attention.zero_empty_rows(attention.masked_sdpa(q, k, v, allowed, bias, 0.0, scale), empty)
    return y.transpose(1, 2).reshape(B, N, H * Dh)


def lean_masks(mask: torch.Tensor, x: torch.Tensor, plans: list) -> dict:
    """For a key mask (B, N) over x (B, N, D): {causal: (allowed, rows to zero or None)} as every block's
    `SoftmaxAttention.forward_split` would make them (`_allowed`; the rows left with no key are zeroed after the
    attention, on a CPU only where there are any), once for the whole stack, for the kinds its `plans` need."""
    N = x.shape[1]
    out = {}
    for causal in {p[1][-1] and N > 1 for p in plans if p is not None}:
        allowed, empty = SoftmaxAttention._allowed(N, N, causal, 0, mask, x.device)
        out[causal] = (allowed, empty if x.device.type != "cpu" or bool(empty.any()) else None)
    return out


def is_row_wise(m: nn.Module) -> bool:
    """The module's own class says it is row-wise (`row_wise` in the class body, not inherited: a subclass may mix
    tokens, e.g. an FFN with a depth-wise convolution)."""
    flag = type(m).__dict__.get("row_wise", False)
    return bool(flag.fget(m) if isinstance(flag, property) else flag)


def merge_spec(base: Any, override: Any) -> Any:
    """Deep-merge a per-layer override into the default block spec. A component override with a different
    name replaces the default (its options do not carry over); one without a name only changes options."""
    if isinstance(override, dict) and isinstance(base, (dict, str)):
        base_d = {"name": base} if isinstance(base, str) else dict(base)
        if "name" in override and "name" in base_d and override["name"] != base_d["name"]:
            return copy.deepcopy(override)
        out = copy.deepcopy(base_d)
        for k, v in override.items():
            out[k] = merge_spec(out.get(k), v) if isinstance(v, dict) else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def parse_layers(layers: dict[Any, Any] | None, depth: int, path: str = "model.layers") -> dict[int, dict]:
    """`{"0-1": {...}, "5": {...}, "2,4": {...}}` -> {layer index: override}; later keys win."""
    out: dict[int, dict] = {}
    for key, override in (layers or {}).items():
        if not isinstance(override, dict):
            raise FormersError(f"{path}.{key}: expected a block mapping, got {override!r}")
        idx: list[int] = []
        try:
            for part in str(key).split(","):
                if "-" in part:
                    a, b = (int(s) for s in part.split("-"))
                    idx += list(range(a, b + 1))
                else:
                    idx.append(int(part))
        except ValueError:
            raise FormersError(f"{path}: bad layer key '{key}'; use '3', '0-1' or '0,2,4'") from None
        for i in idx:
            if not 0 <= i < depth:
                raise FormersError(f"{path}: layer {i} in key '{key}' is outside 0..{depth - 1}")
            out[i] = merge_spec(out.get(i, {}), override)
    return out


def layer_specs(block: dict | None, layers: dict | None, depth: int) -> list[dict]:
    base = merge_spec(BLOCK_DEFAULTS, block or {})
    overrides = parse_layers(layers, depth)
    return [merge_spec(base, overrides[i]) if i in overrides else base for i in range(depth)]


# ------------------------------------------------------------------------------------------------------- stack


class Stack(nn.Module):
    """Base of stacks: `applications` lists which block runs at each step (for caches and looped stacks)."""

    grad_checkpointing = False

    def run(self, block: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kw)
        return block(x, **kw)


@register("stack", "plain", paper="baseline")
class PlainStack(Stack):
    """`depth` distinct blocks applied in order."""

    def __init__(self, depth: int, make_block: Callable[[int], nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(make_block(i) for i in range(depth))

    @property
    def num_applications(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, *, cache: list | None = None, **kw) -> torch.Tensor:
        plans = self.lean_plans(x, self.blocks, cache=cache, **kw)
        masks = lean_masks(kw["mask"], x, plans) if plans and kw.get("mask") is not None else None
        for i, block in enumerate(self.blocks):
            if plans and plans[i] is not None:
                x = lean_block(plans[i], x, masks, positions=kw.get("positions"))
            else:
                x = self.run(block, x, cache=None if cache is None else cache[i], **kw)
        return x

    def lean_plans(self, x: torch.Tensor, blocks, **kw) -> list | None:
        """`block_plan` of each block (None for those that run as modules), or None where no block may run lean:
        autograd on, autocast, torch.compile tracing (it sees the modules), global module hooks, `run` overridden
        or replaced on the instance, a method of the classes a plan stands in for patched on the class (to read
        attention maps, say), or any keyword but a key mask of shape (B, N) and relative positions (a cache or packed
        seqlens)."""
        mask, positions = kw.pop("mask", None), kw.pop("positions", None)
        if (any(v is not None for v in kw.values()) or torch.is_grad_enabled() or autocast_on(x.device.type)
                or type(self).run is not Stack.run or "run" in self.__dict__ or torch.compiler.is_compiling()
                or _global_hooks() or not _classes_unpatched() or functorch_active()
                or (mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != x.shape[:2]))):
            return None  # (a mask of another shape: the module path says what is wrong with it)
        fold = (mask is None and positions is None  # as SoftmaxAttention.forward_split (`_folds_kv_bias`)
                and x.shape[0] * x.shape[1] >= FOLD_MIN_ROWS)
        return [block_plan(b, fold, masked=mask is not None) for b in blocks]

    def prefix_ok(self) -> bool:
        """Whether `forward_prefix` may run: the last block is a formers Block that allows it
        (`Block.prefix_ok`) and the stack itself has no hooks or replaced forward."""
        last = self.blocks[-1] if len(self.blocks) else None
        return type(last) is Block and last.prefix_ok() and hook_free(self) and forward_unpatched(self)

    def forward_prefix(self, x: torch.Tensor, n: int, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`self(x, mask=mask)[:, :n]` (B, N, D) -> (B, n, D), the last block computing only those rows
        (`Block.forward_prefix`); for models that read only their first token(s), where `prefix_ok()`."""
        *first, last = self.blocks
        kw = {} if mask is None else {"mask": mask}  # as forward, which passes a mask only when the model has one
        plans = self.lean_plans(x, first, mask=mask)
        masks = lean_masks(mask, x, plans) if plans and mask is not None else None
        for i, block in enumerate(first):
            x = lean_block(plans[i], x, masks) if plans and plans[i] is not None else self.run(block, x, **kw)
        return last.forward_prefix(x, n, mask=mask)


def build_stack(spec: Any, depth: int, make_block: Callable[[int], nn.Module], path: str = "model.stack") -> Stack:
    return build("stack", spec, path=path, reserved=("depth", "make_block"), depth=depth, make_block=make_block)


# every method of the classes whose module path a plan stands in for, as defined: a class-level patch turns plans off
_ORIGINAL = {(c, k): v for c in (Stack, PlainStack, Block, Placement, PreNorm, AddResidual, SoftmaxAttention, MLP)
             for k, v in vars(c).items() if callable(v) or isinstance(v, (staticmethod, classmethod))}


def _prefix_skips_unpatched() -> bool:
    """The methods the class-token prefix path runs in place of (the stack's and the last block's forward, the
    attention sublayer's PreNorm.forward, Stack.run) as defined: a class-level patch of one must run."""
    return all(vars(c).get(k) is _ORIGINAL[(c, k)] for c, k in ((Block, "forward"), (PreNorm, "forward"),
                                                                 (Stack, "forward"), (Stack, "run"),
                                                                 (PlainStack, "forward")) if (c, k) in _ORIGINAL)


def _classes_unpatched() -> bool:
    """No method of those classes patched (a user's wrapper that records attention, say): plans may stand in."""
    return all(vars(c).get(k) is v for (c, k), v in _ORIGINAL.items())


__all__ = ["Block", "BLOCK_DEFAULTS", "PlainStack", "add_matmul", "block_plan", "is_row_wise", "layer_specs",
           "lean_block", "linear_add", "build_stack", "merge_spec"]
