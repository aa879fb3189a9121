"""ViT options from two papers, switched on by keyword arguments of `ViT` (formers/models/vision/vit.py).

    TokenAwareAvgPool / install_tap    P07 TAP: token-aware average pooling before every block's attention
    attention_diversification_loss     P07 ADL: cosine of each attention row with the mean row (a training loss)
    ats_sample / ats_step              P40 ATS: adaptive token sampling by inverse-CDF of the CLS significance
    capture_attention                  reads the attention probabilities and values of a softmax mixer
    run_blocks                         the ViT's block loop when ADL (training) or ATS is on

P07: Guo et al., "Robustifying Token Attention for Vision Transformers" (ICCV 2023), https://arxiv.org/abs/2303.11126;
facts from the official code guoyongcs/TAPADL (`TAPADL_RVT/tap_robust_models.py`: DilationPredictor,
DilatedAvgPooling, Block; `TAPADL_RVT/engine.py`: AttentionDiversificationLoss; `main.py`: --num-scales 4,
--threshold 2, --adloss 1).
P40: Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers" (ECCV 2022),
https://arxiv.org/abs/2111.15667; facts from the official code adaptivetokensampling/ATS
(`libs/models/transformers/ats_block.py`, `transformer_block.py`, `vit.py`, `configs/ImageNet/DeiT_S.yaml`).

Why TAP is a hook and not a mixer: the official block computes x + Attn(LN(TAP(x))): TAP acts BEFORE the norm, and
the residual adds to the un-pooled x. A token mixer inside a formers placement only ever sees LN(x), and
TAP(LN(x)) != LN(TAP(x)) (the predictor also reads the un-normalised tokens), so a wrapper mixer (with `hw`) could
not be exact. Instead each Block owns a `tap` module that is a forward pre-hook on the input of its attention
sublayer's norm (`norm` for pre/lns, `norm_in` for peri; the mixer itself for post, which has no input norm): the
norm receives TAP(x), the placement still adds the branch to x. Placements, mixers and their state-dict keys stay
those of the plain ViT (plus `tap.*`); the grid is set on the TAP modules by the model before each forward.

Why ADL and ATS use their own block loop: both need the attention probabilities of every layer (ATS also the
values), and ATS changes the token set between blocks. `capture_attention` borrows the softmax mixer's explicit
path and its `probs`/`project` hooks for one call (instance attributes, removed afterwards: nothing persistent, so
copies, pickles and state dicts are unaffected); the result equals the fast path up to rounding. The loop runs
inside the stack's `run`, so gradient checkpointing recomputes the captures too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.blocks import Block, PlainStack, PostNorm
from formers.nn.attention import SoftmaxAttention
from formers.nn.hooks import report_aux
from formers.registry import FormersError

# --------------------------------------------------------------------------------------------------- P07: TAP


class TokenAwareAvgPool(nn.Module):
    """Token-aware average pooling (P07 TAP): each token mixes S dilated 3x3 means of its grid neighbourhood.

        x~ = sum_{s=0}^{S-1} m_s * AvgPool_{3x3, dilation s}(x)     (s = 0: the identity; zero padding s, /9)
        m  = softmax_s(Conv3x3(BN(Conv3x3(x))) / T)                   (per token; convs without bias, T = 1)

    Tokens (B, prefix + h*w, D) with `grid=(h, w)` -> (B, prefix + h*w, D); the `prefix` tokens (class token)
    pass unchanged. Official: DilationPredictor + DilatedAvgPooling in TAPADL_RVT/tap_robust_models.py (nn.Unfold
    with dilation s and padding s, then the mean of the 9 values, so padded zeros count).
    UNCERTAIN: the official models put no class token through TAP (RVT pools globally; FAN adds its class token
    only in the final class-attention blocks); we leave prefix tokens out of the grid and unchanged.
    """

    def __init__(self, dim: int, scales: int = 4, prefix: int = 0, temperature: float = 1.0):
        super().__init__()
        if scales < 1:
            raise FormersError(f"tap: scales must be >= 1 (1 = no pooling), got {scales}")
        if temperature <= 0:
            raise FormersError(f"tap: temperature must be > 0, got {temperature}")
        self.scales, self.prefix, self.temperature = scales, prefix, temperature
        self.proj = nn.Sequential(  # the official DilationPredictor.proj
            nn.Conv2d(dim, scales, 3, padding=1, bias=False),
            nn.BatchNorm2d(scales),
            nn.Conv2d(scales, scales, 3, padding=1, bias=False),
        )
        self.grid: tuple[int, int] | None = None  # set by the model before each forward

    def scale_weights(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map (B, D, h, w) -> per-token scale weights m (B, S, h, w), summing to 1 over S."""
        return (self.proj(fmap) / self.temperature).softmax(dim=1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        grid = grid or self.grid
        B, N, D = x.shape
        if grid is None or grid[0] * grid[1] != N - self.prefix:
            raise FormersError(f"tap: {N - self.prefix} grid tokens do not fit grid {grid}; the model sets the grid "
                               f"before each forward (call the model, not the block)")
        h, w = grid
        fmap = x[:, self.prefix:].transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
        m = self.scale_weights(fmap)  # (B, S, h, w)
        out = fmap * m[:, :1]
        for s in range(1, self.scales):
            kernel = fmap.new_full((D, 1, 3, 3), 1.0 / 9.0)  # depthwise 3x3 mean, dilation s, zero padding s
            out = out + F.conv2d(fmap, kernel, padding=s, dilation=s, groups=D) * m[:, s:s + 1]
        out = out.reshape(B, D, h * w).transpose(1, 2)  # (B, h*w, D)
        return torch.cat([x[:, :self.prefix], out], dim=1)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook: replace the hooked module's input tokens by TAP(tokens)."""
        return (self(args[0]),) + tuple(args[1:])

    def extra_repr(self) -> str:
        return f"scales={self.scales}, prefix={self.prefix}, temperature={self.temperature}"


def install_tap(stack: nn.Module, dim: int, scales: int, prefix: int) -> list[TokenAwareAvgPool]:
    """Give every Block in `stack` a `tap` module hooked on the input of its attention sublayer's norm
    (`norm_in` for peri, `norm` for pre/lns; the mixer for post). Returns the TAP modules."""
    taps, hooked = [], set()
    for block in stack.modules():
        if not isinstance(block, Block):
            continue
        place = block.attn
        if hasattr(place, "norm_in"):
            target = place.norm_in
        elif isinstance(place, PostNorm) or not hasattr(place, "norm"):
            target = place.fn  # no input norm: TAP feeds the mixer directly, the residual still adds to x
        else:
            target = place.norm
        if id(target) in hooked:  # e.g. post placement around a mixer shared by the layers (stack 'shared')
            raise FormersError("vit: tap_scales > 1 needs a per-layer norm or mixer to hook; use placement 'pre'")
        hooked.add(id(target))
        block.tap = TokenAwareAvgPool(dim, scales, prefix)
        target.register_forward_pre_hook(block.tap.pre_hook)
        taps.append(block.tap)
    return taps


# --------------------------------------------------------------------------------------------------- P07: ADL


def adl_layer(probs: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """One layer's attention diversification loss from its attention probabilities (B, H, N, N) -> scalar.

        A = mean_h P;  tau = threshold / N;  a = mean_i A_i (the mean row);  A, a <- entries > tau kept, others 0
        loss = mean_{b, i} cos(A_i, a)

    Official `AttentionDiversificationLoss` (TAPADL_RVT/engine.py) with torch's cosine_similarity (eps 1e-8, so an
    all-zero row scores 0). UNCERTAIN/changed: the official `.squeeze()` would make a batch of one average columns
    instead of rows; we keep the batch dimension."""
    a = probs.mean(dim=1)  # (B, N, N)
    tau = threshold / a.shape[-1]
    mean_row = a.mean(dim=1, keepdim=True)  # (B, 1, N)
    a = a * (a > tau)
    mean_row = mean_row * (mean_row > tau)
    return F.cosine_similarity(mean_row, a, dim=-1).mean()


def attention_diversification_loss(attns: Sequence[torch.Tensor], threshold: float = 2.0) -> torch.Tensor:
    """P07 ADL over layers: the mean of `adl_layer` over the per-layer probabilities (B, H, N, N) in `attns`.
    UNCERTAIN/changed: the official divides the sum by (layers + 1e-6); we take the plain mean."""
    if not attns:
        raise FormersError("attention_diversification_loss: no attention maps were given")
    return torch.stack([adl_layer(p, threshold) for p in attns]).mean()


# ------------------------------------------------------------------------------------------ attention capture


@contextmanager
def capture_attention(mixer: SoftmaxAttention) -> Iterator[dict[str, torch.Tensor]]:
    """For calls inside the block: the mixer takes its explicit path and records `probs` (B, H, Nq, Nk), the
    attention weights before dropout, and `kv` (B, Nk, 2 * Hkv * Dh), its key/value projection."""
    if not isinstance(mixer, SoftmaxAttention):
        raise FormersError(f"vit: ADL and ATS read softmax attention probabilities; the mixer "
                           f"{type(mixer).__name__} is not a softmax-family mixer (use mixer 'softmax' or a variant)")
    store: dict[str, torch.Tensor] = {}
    cls = type(mixer)

    def probs(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        store["probs"] = p = cls.probs(mixer, scores, allowed)
        return p

    def project(x, src, mask, cache):
        q, kv = cls.project(mixer, x, src, mask, cache)
        store["kv"] = kv
        return q, kv

    explicit = mixer.explicit
    mixer.explicit, mixer.probs, mixer.project = True, probs, project  # shadow the class methods for this call
    try:
        yield store
    finally:
        del mixer.probs, mixer.project
        mixer.explicit = explicit


# --------------------------------------------------------------------------------------------------- P40: ATS


def ats_sample(scores: torch.Tensor, tokens: int, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """P40 inverse-transform token sampling (official `inverse_transform_sampling`, `create_ys`,
    `get_unique_indices`), deterministic:

        sort the significance scores (B, T) ascending; cdf = cumsum; ncdf = (cdf - min) / (max - min)
        y_q = y_0 + q (1 - y_0) / (K - 2),  q = 0..K-2,  y_0 = the smallest non-zero ncdf
        pick, for each y_q, the sorted position with the nearest ncdf (the first on ties); drop duplicates

    K = max(tokens, 8) (the official floor). The least significant token (ncdf = 0) and zero-score tokens are never
    picked. `valid` (B, T) marks real tokens; filler rows (False) take no part, so that each image gets what the
    official code gives it alone. UNCERTAIN/changed: in the official batch the fillers' zero scores enter the CDF
    (its minimum becomes 0), so an image's selection depends on the other images of its batch; we exclude them.
    Returns `index` (B, M) into the block's tokens (CLS = 0 first, then the picked tokens in ascending
    significance, the official order; entries past an image's count are filler) and `keep` (B, M) bool;
    M = 1 + the largest count in the batch (the official DROP_TOKENS compaction).
    """
    B, T = scores.shape
    K = max(int(tokens), 8)
    q = K - 1  # quantile points
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    sorted_scores, order = torch.sort(torch.where(valid, scores, -1.0), dim=1)  # ascending; fillers first
    real = sorted_scores >= 0
    cdf = sorted_scores.clamp_min(0).cumsum(dim=1)
    lo = torch.where(real, cdf, torch.inf).amin(dim=1, keepdim=True)
    hi = cdf.amax(dim=1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, 1.0)  # a single real token (official: 0/0) is kept
    ncdf = torch.where(real, (cdf - lo) / span, torch.inf)  # (B, T); fillers can never be nearest
    start = (ncdf + (ncdf == 0).to(ncdf.dtype) * 1e8).amin(dim=1, keepdim=True)  # (B, 1)
    lin = torch.linspace(0, 1, q, dtype=ncdf.dtype, device=ncdf.device)  # official create_ys, literally
    steps = torch.arange(q, dtype=ncdf.dtype, device=ncdf.device)
    ys = start + (lin * (q - 1) - start * steps) / (q - 1)  # (B, q)
    pick = (ys[:, :, None] - ncdf[:, None, :]).abs().argmin(dim=2)  # (B, q) sorted positions
    chosen = torch.zeros(B, T, dtype=torch.bool, device=scores.device).scatter_(1, pick, True)
    counts = chosen.sum(dim=1) + 1  # (B,) with the CLS token
    M = int(counts.max())
    pos = torch.arange(T, device=scores.device).expand(B, T)
    first = torch.where(chosen, pos, pos + T).argsort(dim=1)[:, :M - 1]  # chosen sorted positions, ascending
    index = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=scores.device),
                       order.gather(1, first) + 1], dim=1)  # (B, M) token indices, CLS first
    keep = torch.arange(M, device=scores.device)[None] < counts[:, None]  # (B, M)
    return index, keep


def ats_significance(probs: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """P40 significance of the non-CLS tokens: S_j = (sum_h A_h[cls, j]) * ||V_j|| / sum_j (...), V_j the values of
    token j over all heads. probs (B, H, N, N), kv (B, N, 2 * Hkv * Dh) -> (B, N - 1). Masked (dropped) keys have
    A = 0 exactly, hence S = 0 (the official zeroes their values instead). With GQA (Hkv < H) the value norm is the
    shared heads' norm, a constant factor that the normalisation removes."""
    B, N = kv.shape[:2]
    v_norm = kv.view(B, N, 2, -1)[:, :, 1].norm(dim=-1)  # (B, N)
    s = (probs[:, :, 0].sum(dim=1) * v_norm)[:, 1:]  # (B, N - 1)
    return s / s.sum(dim=1, keepdim=True)


def ats_step(block: Block, x: torch.Tensor, keep: torch.Tensor | None = None, *, tokens: int,
             positions: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Block with ATS (official ATSBlock): attention over the current tokens, then only the sampled rows of its
    output go on through the FFN: x' = FFN(sample(x + Attn(LN(x)))), filler rows zero.

    x (B, N, D), CLS first; `keep` (B, N) bool marks real tokens (None: all) -> (x' (B, M, D), keep' (B, M),
    counts (B,)). The sampled rows of (x + A V W_o) are the official A_kept V W_o + x_kept (attention is row-wise).
    """
    with capture_attention(block.attn.fn) as cap:
        y = block.attn(x, mask=keep, positions=positions)  # (B, N, D)
    valid = None if keep is None else keep[:, 1:]
    index, new_keep = ats_sample(ats_significance(cap["probs"], cap["kv"]), tokens, valid)
    y = y.gather(1, index[..., None].expand(-1, -1, y.shape[-1])) * new_keep[..., None]  # (B, M, D)
    if block.has_ffn:
        y = block.ffn(y) * new_keep[..., None]
    return y, new_keep, new_keep.sum(dim=1)


def block_step(block: Block, x: torch.Tensor, keep: torch.Tensor | None = None, *, positions: Any = None,
               adl_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A plain Block on tokens that may carry filler rows (keys masked, rows zeroed as the official policy);
    with `adl_threshold`, also its ADL term."""
    if adl_threshold is None:
        y, term = block(x, mask=keep, positions=positions), None
    else:
        with capture_attention(block.attn.fn) as cap:
            y = block(x, mask=keep, positions=positions)
        term = adl_layer(cap["probs"], adl_threshold)
    if keep is not None:
        y = y * keep[..., None]
    return y, term


def ats_schedule(blocks: Sequence[int] | None, tokens: int | Sequence[int] | None, depth: int
                 ) -> dict[int, int | None]:
    """{block index: K (None = the number of tokens entering the first block, the official n_ref_tokens)}."""
    if not blocks:
        return {}
    blocks = [int(b) for b in blocks]
    if len(set(blocks)) != len(blocks) or not all(0 <= b < depth for b in blocks):
        raise FormersError(f"vit: ats_blocks must be distinct block indices in 0..{depth - 1}, got {blocks}")
    if tokens is None or isinstance(tokens, int):
        tokens = [tokens] * len(blocks)
    if len(tokens) != len(blocks):
        raise FormersError(f"vit: ats_tokens has {len(tokens)} entries for {len(blocks)} ats_blocks; give one "
                           f"number or one per block")
    if any(t is not None and t < 2 for t in tokens):
        raise FormersError(f"vit: ats_tokens must be >= 2 (values below 8 count as 8), got {list(tokens)}")
    return dict(sorted(zip(blocks, tokens, strict=True)))


def check_loop(stack: nn.Module) -> None:
    """ADL and ATS run their own loop over a plain stack of softmax-attention blocks."""
    if type(stack) is not PlainStack:  # not a subclass: the shared stack reuses modules
        raise FormersError("vit: adl_weight and ats_blocks need stack='plain'")
    for i, block in enumerate(stack.blocks):
        if not isinstance(block.attn.fn, SoftmaxAttention):
            raise FormersError(f"vit: adl_weight and ats_blocks need softmax-family mixers; block {i} has "
                               f"{type(block.attn.fn).__name__}")


def run_blocks(model: nn.Module, x: torch.Tensor, positions: Any = None) -> torch.Tensor:
    """The ViT's blocks with ATS sampling and/or ADL terms (training). Sets `model.last_kept`, the kept token
    counts (B,) after each ATS block (CLS included), and reports `adl` = weight * ADL on the model."""
    stack = model.stack
    n_ref = x.shape[1]
    adl = model.adl_threshold if (model.adl_weight > 0 and model.training) else None
    keep, kept, terms = None, [], []
    for i, block in enumerate(stack.blocks):
        if i in model.ats:
            step = partial(ats_step, block, tokens=model.ats[i] or n_ref)
            x, keep, counts = stack.run(step, x, keep=keep, positions=positions)
            kept.append(counts)
        else:
            x, term = stack.run(partial(block_step, block, adl_threshold=adl), x, keep=keep, positions=positions)
            if term is not None:
                terms.append(term)
    model.last_kept = kept
    if terms:
        report_aux(model, "adl", model.adl_weight * torch.stack(terms).mean())
    return x


__all__ = ["TokenAwareAvgPool", "install_tap", "adl_layer", "attention_diversification_loss", "capture_attention",
           "ats_sample", "ats_significance", "ats_step", "block_step", "ats_schedule", "check_loop", "run_blocks"]
