"""Softmax attention, the baseline token mixer (Vaswani et al., "Attention Is All You Need").

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_h) + B) V,  per head, B = relative-position bias or mask.

The fast path is `F.scaled_dot_product_attention` (`is_causal=True` rather than a mask tensor where it can);
the explicit path materialises the score matrix for subclasses that modify it (`score_mod`). Both are tested
against a naive softmax(QK^T)V written in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formers.registry import FormersError, register


class KVCache:
    """Per-layer decoding cache. Softmax-style mixers keep keys and values (B, H_kv, L, Dh), grown along L with
    `update`; recurrent mixers (linear attention, ...) keep whatever they need in `state` and call `advance(n)`.
    `length` is the number of tokens seen so far (the position offset of the next token)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values (B, H, n, Dh); returns all of them; advances `length` by n."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        self.length = self.k.shape[2]
        return self.k, self.v

    def advance(self, n: int) -> None:
        """For mixers that keep a recurrent state instead of keys: n more tokens were consumed."""
        self.length += n


def attention_mask(nq: int, nk: int, *, causal: bool, past: int = 0, key_mask: torch.Tensor | None = None,
                   device=None) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, Nq, Nk), True = may attend; query i sits at absolute position past + i.

    `key_mask` (B, Nk) marks real (True) and padded (False) keys. None when nothing is masked.
    """
    allowed = None
    if causal:
        q_pos = torch.arange(past, past + nq, device=device)
        allowed = (torch.arange(nk, device=device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Nq, Nk)
    if key_mask is not None:
        km = key_mask.bool()[:, None, None, :]  # (B, 1, 1, Nk)
        allowed = km if allowed is None else allowed & km
    return allowed


@register("mixer", "softmax", paper="baseline", causal_ok=True, aliases=("mha", "attention"))
class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention with GQA/MQA, KV cache, masks, cross-attention and relative positions.

    Paper: baseline (Vaswani et al. 2017); GQA from Ainslie et al. 2023 (`kv_heads` < `heads`; 1 = MQA).
    out = W_o concat_h softmax(q_h k_h^T * scale + bias) v_h.  x (B, N, D) -> (B, N, D); context (B, M, D).
    A query row whose keys are all masked outputs zeros.
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0, explicit: bool = False,
                 scale: float | None = None):
        super().__init__()
        kv_heads = kv_heads or heads
        head_dim = head_dim or dim // heads
        if head_dim * heads != dim and head_dim == dim // heads:
            raise FormersError(f"mixer: dim={dim} is not divisible by heads={heads}; change heads or set head_dim")
        if heads % kv_heads:
            raise FormersError(f"mixer: heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.causal, self.dropout, self.explicit = causal, dropout, explicit
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, dim, bias=bias)

    def score_mod(self, scores: torch.Tensor) -> torch.Tensor:
        """Hook for subclasses on the explicit path: scores (B, H, Nq, Nk) before masking and softmax."""
        return scores

    def probs(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Hook for subclasses on the explicit path: attention weights (B, H, Nq, Nk) from the scores and the
        boolean `allowed` mask (broadcastable to the scores, True = may attend; None = everything)."""
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1)

    def project(self, x: torch.Tensor, src: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for subclasses: q (B, N, H*Dh) from x and kv (B, M, 2*Hkv*Dh) from src. `cache` is passed only
        for self-attention; `mask` is the caller's key-padding mask (B, Nk) or None."""
        return self.q(x), self.kv(src)

    def output_mod(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Hook for subclasses: per-head outputs y (B, H, N, Dh) before the heads are merged; x is the input."""
        return y

    def _needs_explicit(self) -> bool:
        cls = type(self)
        return (self.explicit or cls.score_mod is not SoftmaxAttention.score_mod
                or cls.probs is not SoftmaxAttention.probs)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        if seqlens is not None:
            raise FormersError("the softmax mixer does not take packed `seqlens` yet (packed batches: issue 10)")
        if unused:
            raise FormersError(f"softmax mixer got unsupported arguments: {sorted(unused)}")
        B, N, _ = x.shape
        H, Hkv, Dh = self.heads, self.kv_heads, self.head_dim
        src = x if context is None else context
        M = src.shape[1]
        q, kv = self.project(x, src, mask, cache if context is None else None)
        q = q.view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
        k, v = kv.view(B, M, 2, Hkv, Dh).permute(2, 0, 3, 1, 4)  # each (B, Hkv, M, Dh)

        causal = self.causal and context is None
        past = cache.length if (cache is not None and context is None) else 0
        bias = None
        if positions is not None and context is None:
            q_pos = torch.arange(past, past + N, device=x.device)
            k_pos = torch.arange(past + M, device=x.device)
            q, k = positions.rotate(q, k, q_pos, k_pos[past:])
        if cache is not None and context is None:
            k, v = cache.update(k, v)  # (B, Hkv, past + N, Dh)
        Nk = k.shape[2]
        if positions is not None and context is None:
            bias = positions.bias(q_pos, k_pos, H)  # (H, N, Nk) or None
        if mask is not None and mask.shape != (B, Nk):
            raise FormersError(f"attention mask must have shape (batch, keys) = ({B}, {Nk}), got {tuple(mask.shape)}")
        if Hkv != H:  # GQA: every group of H/Hkv query heads shares one key/value head
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)

        drop = self.dropout if self.training else 0.0
        simple_causal = causal and past == 0 and mask is None and bias is None and N == Nk
        if simple_causal and not self._needs_explicit():
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=self.scale)
        else:
            allowed = attention_mask(N, Nk, causal=causal, past=past, key_mask=mask, device=x.device)
            empty = None
            if allowed is not None:
                empty = ~allowed.any(-1, keepdim=True)  # rows with no key at all
                allowed = allowed | empty  # attend anywhere, zeroed below: keeps values and gradients finite
            if self._needs_explicit():
                y = self._explicit(q, k, v, allowed, bias, drop)
            else:
                attn_mask = allowed
                if bias is not None:
                    attn_mask = bias.to(q.dtype)[None]
                    if allowed is not None:
                        attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=self.scale)
            if empty is not None and bool(empty.any()):
                y = y.masked_fill(empty, 0.0)
        y = self.output_mod(y, x)
        y = y.transpose(1, 2).reshape(B, N, H * Dh)  # (B, N, H*Dh)
        return self.out(y)

    def _explicit(self, q, k, v, allowed, bias, drop):
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Nq, Nk)
        if bias is not None:
            scores = scores + bias
        scores = self.score_mod(scores)
        attn = F.dropout(self.probs(scores, allowed), p=drop, training=drop > 0)
        return attn @ v  # (B, H, Nq, Dh)
