"""Sparse and windowed softmax attention: ProbSparse (Informer), Linformer, and the LRA sparse-pattern baselines.

Every mixer here is softmax attention restricted to a subset S_i of keys per query i:

    y_i = sum_{j in S_i} softmax_j(q_i . k_j / sqrt(d_h) + bias(i - j)) v_j

The pattern mixers (`local`, `longformer`, `bigbird`, `sparse`) never build an N x N mask: queries are cut into
blocks of C positions, each block gathers the key blocks its pattern can reach (and/or a shared key set, such as
global tokens), and one softmax runs over the concatenated candidate scores with a token-level mask that removes
what the pattern forbids and every duplicate. Memory is O(N x keys-per-query). A relative-position bias (ALiBi)
is looked up from a table over offsets i - j, so it is assumed to depend on i - j only (true of ALiBi).
A query with no visible key outputs zeros. The tests compare each mixer with an explicit N x N pattern.

When the pattern is dense anyway (the blocked candidates per query are at least a quarter of all keys, e.g. LRA's
512-token Longformer window on 1K inputs), the gathers and masks of the blocked path cost more than they save, so
`impl="auto"` (the default) builds the (n, N) boolean pattern instead and runs one fused
`F.scaled_dot_product_attention` with it: same values and gradients, O(N^2) memory, several times faster on CPU
at these sizes. `impl="blocked"` or `"dense"` forces one; the tests run both against the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.attention import KVCache
from formers.registry import FormersError, register

# ------------------------------------------------------------------------------------------------------- helpers


class _Part(NamedTuple):
    """One group of candidate keys for a grid of queries: scores and mask (B, H, nq, C, K), and how to turn the
    probabilities (B, H, nq, C, K) into values (B, H, nq, C, Dh)."""

    scores: torch.Tensor
    allowed: torch.Tensor
    combine: Callable[[torch.Tensor], torch.Tensor]


def _offset_table(positions, heads: int, span: int, like: torch.Tensor) -> torch.Tensor | None:
    """`positions.bias` as a (H, 2*span - 1) table over offsets d = i - j in [-(span - 1), span - 1]."""
    if positions is None or not positions.has_bias:
        return None
    d = torch.arange(-(span - 1), span, device=like.device)
    zero = torch.zeros(1, dtype=torch.long, device=like.device)
    return positions.bias(zero, -d, heads)[:, 0].to(like.dtype)  # (H, 2*span - 1); query 0, key -d


def _lookup(table: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Biases for offsets `off` (1 or H, ...) -> (H, ...), from a table made by `_offset_table`."""
    H, width = table.shape
    idx = (off + (width - 1) // 2).clamp(0, width - 1)
    if off.shape[0] == 1:
        return table[:, idx[0]]
    return table.gather(1, idx.reshape(H, -1)).view(idx.shape)  # per-head offsets


def _attend(parts: list[_Part], dropout: float, training: bool) -> torch.Tensor:
    """One softmax over the union of all parts' keys; rows with no allowed key give zeros. -> (B, H, nq, C, Dh)."""
    scores = torch.cat([p.scores for p in parts], dim=-1)  # (B, H, nq, C, K_total)
    allowed = torch.cat([torch.broadcast_to(p.allowed, p.scores.shape) for p in parts], dim=-1)
    empty = ~allowed.any(-1, keepdim=True)
    # an empty row attends anywhere and is zeroed afterwards: no all -inf row, so no NaN in values or gradients
    probs = scores.masked_fill(~(allowed | empty), float("-inf")).softmax(-1).masked_fill(empty, 0.0)
    probs = F.dropout(probs, p=dropout, training=training and dropout > 0)
    chunks = probs.split([p.scores.shape[-1] for p in parts], dim=-1)
    out = parts[0].combine(chunks[0])
    for p, c in zip(parts[1:], chunks[1:]):
        out = out + p.combine(c)
    return out


def _query_grid(q: torch.Tensor, start: int, C: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Queries (B, H, n, Dh) at absolute positions start.. -> blocks (B, H, nq, C, Dh) aligned to multiples of C,
    their positions (nq, C), and the number of dummy slots before the first query. Queries that all fall in one
    block (decoding, short inputs) stay one unpadded row of width n: no work on dummy slots."""
    B, H, n, Dh = q.shape
    lead = start % C
    if lead + n <= C:
        return q[:, :, None], torch.arange(start, start + n, device=q.device)[None], 0  # (B, H, 1, n, Dh)
    nq = -(-(lead + n) // C)
    grid = F.pad(q, (0, 0, lead, nq * C - lead - n)).view(B, H, nq, C, Dh)  # (B, H, nq, C, Dh)
    qpos = (start - lead + torch.arange(nq * C, device=q.device)).view(nq, C)  # (nq, C)
    return grid, qpos, lead


def _key_grid(t: torch.Tensor, C: int) -> torch.Tensor:
    """Keys or values (B, H, Nk, Dh) at positions 0.. -> blocks (B, H, ceil(Nk / C), C, Dh), zero-padded."""
    B, H, Nk, Dh = t.shape
    nb = -(-Nk // C)
    return F.pad(t, (0, 0, 0, nb * C - Nk)).view(B, H, nb, C, Dh)  # (B, H, nb, C, Dh)


def _real_grid(key_real: torch.Tensor | None, B: int, Nk: int, C: int, device) -> torch.Tensor:
    """(B, ceil(Nk / C), C) bool: a real key (inside the sequence and not padding)."""
    real = torch.ones(B, Nk, dtype=torch.bool, device=device) if key_real is None else key_real
    nb = -(-Nk // C)
    return F.pad(real, (0, nb * C - Nk), value=False).view(B, nb, C)  # (B, nb, C)


def _block_part(qg, qpos, kg, vg, real, idx, valid, rule, table) -> _Part:
    """Each query block attends the key blocks `idx` (1 or H, nq, s) where `valid`, filtered per token by
    rule(q_pos, k_pos). qg (B, H, nq, Cq, Dh) pre-scaled; kg, vg (B, H, nbk, C, Dh); real (B, nbk, C)."""
    B, H, nq, _, Dh = qg.shape
    C = kg.shape[3]
    Hh, _, s = idx.shape
    ci = idx.clamp(0, kg.shape[2] - 1)
    if Hh == 1:
        kb, vb = kg[:, :, ci[0]], vg[:, :, ci[0]]  # (B, H, nq, s, C, Dh)
    else:
        heads = torch.arange(H, device=qg.device)[:, None, None]
        kb, vb = kg[:, heads, ci], vg[:, heads, ci]  # (B, H, nq, s, C, Dh): a different block list per head
    kb, vb = kb.reshape(B, H, nq, s * C, Dh), vb.reshape(B, H, nq, s * C, Dh)  # (B, H, nq, K, Dh)
    kpos = (ci[..., None] * C + torch.arange(C, device=qg.device)).view(Hh, nq, s * C)  # (Hh, nq, K)
    kreal = (real[:, ci] & valid[None, ..., None]).view(B, Hh, nq, s * C)  # (B, Hh, nq, K)
    allowed = kreal[:, :, :, None, :] & rule(qpos[None, :, :, None], kpos[:, :, None, :])  # (B, Hh, nq, Cq, K)
    scores = qg @ kb.transpose(-1, -2)  # (B, H, nq, Cq, K)
    if table is not None:
        scores = scores + _lookup(table, qpos[None, :, :, None] - kpos[:, :, None, :])
    return _Part(scores, allowed, lambda p: p @ vb)


def _shared_part(qg, qpos, k, v, kpos, kreal, rule, table) -> _Part:
    """Every query block attends the same keys k, v (B, H, K, Dh) at positions kpos (K,), real where kreal (B, K),
    filtered per token by rule(q_pos, k_pos)."""
    allowed = kreal[:, None, None, None, :] & rule(qpos[:, :, None], kpos)[None, None]  # (B, 1, nq, C, K)
    scores = qg @ k.transpose(-1, -2)[:, :, None]  # (B, H, nq, C, K)
    if table is not None:
        scores = scores + _lookup(table, (qpos[:, :, None] - kpos)[None])
    return _Part(scores, allowed, lambda p: p @ v[:, :, None])


def _check_heads(name: str, dim: int, heads: int) -> int:
    if heads < 1 or dim % heads:
        raise FormersError(f"mixer '{name}': dim={dim} is not divisible by heads={heads}; change heads")
    return dim // heads


# ------------------------------------------------------------------------------------------------ shared base


class _SparseBase(nn.Module):
    """Projections (`q`, `kv`, `out`, laid out as in the softmax mixer) and the forward plumbing of the pattern
    mixers: rotary positions, KV cache, key-padding mask, bias table. Subclasses implement `_mix`."""

    name = "sparse"

    def __init__(self, dim: int, heads: int, causal: bool, dropout: float, impl: str = "auto"):
        super().__init__()
        if impl not in ("auto", "blocked", "dense"):
            raise FormersError(f"mixer '{self.name}': impl must be 'auto', 'blocked' or 'dense', got {impl!r}")
        self.dim, self.heads, self.causal, self.dropout, self.impl = dim, heads, causal, dropout, impl
        self.head_dim = _check_heads(self.name, dim, heads)
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _project(self, x: torch.Tensor, q_proj: nn.Linear, kv_proj: nn.Linear):
        B, N, _ = x.shape
        H, Dh = self.heads, self.head_dim
        q = q_proj(x).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
        k, v = kv_proj(x).view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        return q, k, v

    def _reject(self, cache, context, seqlens, unused) -> None:
        if unused:
            raise FormersError(f"mixer '{self.name}' got unsupported arguments: {sorted(unused)}")
        if seqlens is not None:
            raise FormersError(f"mixer '{self.name}' does not take packed `seqlens`; pad the batch instead")
        if context is not None:
            raise FormersError(f"mixer '{self.name}' is self-attention only (no `context`); "
                               f"use 'softmax' for cross-attention")
        if cache is not None and not self.causal:
            raise FormersError(f"mixer '{self.name}': a KV cache is for causal decoding, but this mixer has "
                               f"causal=False")

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        self._reject(cache, context, seqlens, unused)
        B, n, D = x.shape
        past = cache.length if cache is not None else 0
        q, k, v = self._project(x, self.q, self.kv)
        pos = torch.arange(past, past + n, device=x.device)
        if positions is not None:
            q, k = positions.rotate(q, k, pos, pos)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, past + n, Dh)
        Nk = k.shape[2]
        if mask is not None and mask.shape != (B, Nk):
            raise FormersError(f"attention mask must have shape (batch, keys) = ({B}, {Nk}), got {tuple(mask.shape)}")
        key_real = None if mask is None else mask.bool()
        # allowed pairs have both positions in 0..Nk-1; offsets of masked or dummy pairs are clamped by _lookup
        table = _offset_table(positions, self.heads, Nk, q)
        y = self._mix(x, q * self.scale, k, v, past, key_real, table, positions, cache)  # (B, H, n, Dh)
        return self.out(y.transpose(1, 2).reshape(B, n, D))

    def _mix(self, x, q, k, v, past, key_real, table, positions, cache) -> torch.Tensor:
        raise NotImplementedError

    def _keys_per_query(self, Nk: int) -> int:
        """Candidate keys per query on the blocked path (what its score tensors hold)."""
        raise NotImplementedError

    def _pattern(self, qpos: torch.Tensor, Nk: int) -> torch.Tensor:
        """The allowed pattern (1 or H, n, Nk) bool for queries at positions qpos (n,) over keys 0 .. Nk - 1."""
        raise NotImplementedError

    def _use_dense(self, Nk: int) -> bool:
        if self.impl != "auto":
            return self.impl == "dense"
        return 4 * self._keys_per_query(Nk) >= Nk

    def _dense_attend(self, q, k, v, past, key_real, table, allowed=None) -> torch.Tensor:
        """Fused softmax attention over the explicit pattern. q (B, H, n, Dh) pre-scaled -> (B, H, n, Dh)."""
        n, Nk = q.shape[2], k.shape[2]
        qpos = torch.arange(past, past + n, device=q.device)
        if allowed is None:
            allowed = self._pattern(qpos, Nk)[None]  # (1, 1 or H, n, Nk)
        if key_real is not None:
            allowed = allowed & key_real[:, None, None, :]
        empty = ~allowed.any(-1, keepdim=True)  # attend anywhere, zero afterwards: no NaN in values or gradients
        allowed = allowed | empty
        mask = allowed
        if table is not None:
            bias = _lookup(table, (qpos[:, None] - torch.arange(Nk, device=q.device))[None])  # (H, n, Nk)
            mask = bias.masked_fill(~allowed, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.masked_fill(empty, 0.0) if bool(empty.any()) else y


def _window_span(window: int, causal: bool) -> tuple[int, int]:
    """(left, right): a query i sees keys j with -right <= i - j <= left; `window` keys in all (LRA convention:
    bidirectional windows give the left side the extra key when `window` is even)."""
    if causal:
        return window - 1, 0
    right = window // 2
    return window - right - 1, right


def _band_parts(qg, qpos, kg, vg, real, left, right, C, table, extra_rule=None) -> _Part:
    """Sliding-window key blocks for query blocks of size C: key blocks a - ceil(left/C) .. a + ceil(right/C)."""
    nbk = kg.shape[2]
    nl, nr = min(-(-left // C), nbk - 1), min(-(-right // C), nbk - 1)
    a = qpos[:, 0] // C  # (nq,) absolute block index of each query block
    idx = (a[:, None] + torch.arange(-nl, nr + 1, device=qg.device))[None]  # (1, nq, s)
    valid = (idx >= 0) & (idx < nbk)

    def rule(qp, kp):
        ok = (qp - kp <= left) & (kp - qp <= right)
        return ok if extra_rule is None else ok & extra_rule(qp, kp)

    return _block_part(qg, qpos, kg, vg, real, idx, valid, rule, table)


# ----------------------------------------------------------------------------------------------------- local


@register("mixer", "local", paper="P29", causal_ok=True)
class LocalAttention(_SparseBase):
    """Sliding-window softmax attention: each query sees the `window` nearest keys (LRA's "Local Attention").

    P29 Long Range Arena (Tay et al. 2021), baseline "Local Attention". S_i = {j : i - window < j <= i} (causal) or
    {j : -(window // 2) <= i - j <= window - window // 2 - 1} (bidirectional: `window` keys, centred; the convention
    of LRA's longformer code). LRA's own local baseline (lra_benchmarks/models/local) attends within fixed blocks;
    we use the sliding window the LRA paper describes. Computed in query blocks of C ~ window: O(N * window) memory.
    KV cache keeps every key (exact). x (B, N, D) -> (B, N, D).
    """

    name = "local"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, window: int = 128, dropout: float = 0.0,
                 impl: str = "auto"):
        super().__init__(dim, heads, causal, dropout, impl)
        if window < 1:
            raise FormersError(f"mixer 'local': window must be >= 1, got {window}")
        self.window = window

    def _keys_per_query(self, Nk: int) -> int:
        left, right = _window_span(self.window, self.causal)
        C = max(1, min(max(left, right), Nk))
        nbk = -(-Nk // C)
        return (min(-(-left // C), nbk - 1) + min(-(-right // C), nbk - 1) + 1) * C

    def _pattern(self, qpos, Nk):
        left, right = _window_span(self.window, self.causal)
        d = qpos[:, None] - torch.arange(Nk, device=qpos.device)  # (n, Nk) i - j
        return ((d <= left) & (-d <= right))[None]

    def _mix(self, x, q, k, v, past, key_real, table, positions, cache):
        Nk = k.shape[2]
        if self._use_dense(Nk):
            return self._dense_attend(q, k, v, past, key_real, table)
        left, right = _window_span(self.window, self.causal)
        C = max(1, min(max(left, right), Nk))
        qg, qpos, lead = _query_grid(q, past, C)
        real = _real_grid(key_real, k.shape[0], Nk, C, k.device)
        part = _band_parts(qg, qpos, _key_grid(k, C), _key_grid(v, C), real, left, right, C, table)
        y = _attend([part], self.dropout, self.training)  # (B, H, nq, C, Dh)
        return y.flatten(2, 3)[:, :, lead:lead + q.shape[2]]


# ------------------------------------------------------------------------------------------------ longformer


@register("mixer", "longformer", paper="P29", causal_ok=True)
class LongformerAttention(_SparseBase):
    """Longformer attention: a sliding window plus `global_tokens` leading positions that see and are seen by all.

    P29 Long Range Arena, baseline "Longformer" (Beltagy et al. 2020). Non-global query i (sliding projections
    q, kv): S_i = window(i) (as `local`) U {j < g}; global query i < g (separate projections `q_global`,
    `kv_global`, Longformer Sec. 3.1 and LRA's lra_benchmarks/models/longformer/longformer_attention.py, unless
    separate_global=False): S_i = all keys. Causal: every S_i is also cut to j <= i, so global tokens are seen only
    by later positions. Blocked window plus a shared global-key part: O(N * (window + g)) memory.
    """

    name = "longformer"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, window: int = 512, global_tokens: int = 1,
                 separate_global: bool = True, dropout: float = 0.0, impl: str = "auto"):
        super().__init__(dim, heads, causal, dropout, impl)
        if window < 1 or global_tokens < 0:
            raise FormersError(f"mixer 'longformer': need window >= 1 and global_tokens >= 0, got window={window}, "
                               f"global_tokens={global_tokens}")
        self.window, self.global_tokens, self.separate_global = window, global_tokens, separate_global
        if separate_global:
            self.q_global = nn.Linear(dim, dim, bias=False)
            self.kv_global = nn.Linear(dim, 2 * dim, bias=False)

    def _keys_per_query(self, Nk: int) -> int:
        return LocalAttention._keys_per_query(self, Nk) + min(self.global_tokens, Nk)

    def _pattern(self, qpos, Nk):
        """Non-global rows: the window (keys j >= g) and the global keys j < g (j <= i when causal)."""
        j = torch.arange(Nk, device=qpos.device)
        glob = (j < self.global_tokens)[None]
        if self.causal:
            glob = glob & (j[None] <= qpos[:, None])
        return LocalAttention._pattern(self, qpos, Nk) | glob[None]

    def _mix(self, x, q, k, v, past, key_real, table, positions, cache):
        g, n = self.global_tokens, q.shape[2]
        B, Nk = k.shape[0], k.shape[2]
        if self._use_dense(Nk):
            y = self._dense_attend(q, k, v, past, key_real, table)
            rows = min(g - past, n)
            if rows <= 0:
                return y
            return torch.cat([self._global_rows(x, q, k, v, past, rows, key_real, table, positions, cache),
                              y[:, :, rows:]], dim=2)
        left, right = _window_span(self.window, self.causal)
        C = max(1, min(max(left, right), Nk))
        qg, qpos, lead = _query_grid(q, past, C)
        real = _real_grid(key_real, B, Nk, C, k.device)
        # keys j < g come through the global part only, so the band skips them (no key counted twice)
        parts = [_band_parts(qg, qpos, _key_grid(k, C), _key_grid(v, C), real, left, right, C, table,
                             extra_rule=lambda qp, kp: kp >= g)]
        ng = min(g, Nk)
        if ng:
            kreal = torch.ones(B, ng, dtype=torch.bool, device=k.device) if key_real is None else key_real[:, :ng]
            rule = (lambda qp, kp: kp <= qp) if self.causal else (lambda qp, kp: kp >= 0)
            parts.append(_shared_part(qg, qpos, k[:, :, :ng], v[:, :, :ng],
                                      torch.arange(ng, device=k.device), kreal, rule, table))
        y = _attend(parts, self.dropout, self.training).flatten(2, 3)[:, :, lead:lead + n]  # (B, H, n, Dh)
        rows = min(g - past, n)  # new tokens that are global queries
        if rows <= 0:
            return y
        return torch.cat([self._global_rows(x, q, k, v, past, rows, key_real, table, positions, cache),
                          y[:, :, rows:]], dim=2)

    def _global_rows(self, x, q, k, v, past, rows, key_real, table, positions, cache) -> torch.Tensor:
        """Outputs (B, H, rows, Dh) of the global queries among the new tokens (positions past .. past + rows - 1)."""
        B, H, Dh = x.shape[0], self.heads, self.head_dim
        if self.separate_global:
            # causal global queries only see keys < g, so only those tokens need global keys (kept in the cache)
            src = x[:, :rows] if self.causal else x
            m = src.shape[1]
            q = self.q_global(x[:, :rows]).view(B, rows, H, Dh).transpose(1, 2) * self.scale  # (B, H, rows, Dh)
            k, v = self.kv_global(src).view(B, m, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, m, Dh)
            if positions is not None:
                kp = torch.arange(past, past + m, device=x.device)
                q, k = positions.rotate(q, k, kp[:rows], kp)
            if cache is not None:
                if "k_global" in cache.state:
                    k = torch.cat([cache.state["k_global"], k], dim=2)
                    v = torch.cat([cache.state["v_global"], v], dim=2)
                cache.state["k_global"], cache.state["v_global"] = k, v
        else:
            q = q[:, :, :rows]
        nk = k.shape[2]  # separate causal global keys cover 0 .. past + rows - 1 only; others every key
        kreal = torch.ones(B, nk, dtype=torch.bool, device=x.device) if key_real is None else key_real[:, :nk]
        qpos = torch.arange(past, past + rows, device=x.device)[None]  # (1, rows)
        rule = (lambda qp, kp: kp <= qp) if self.causal else (lambda qp, kp: kp >= 0)
        part = _shared_part(q[:, :, None], qpos, k, v, torch.arange(nk, device=x.device), kreal, rule, table)
        return _attend([part], self.dropout, self.training)[:, :, 0]  # (B, H, rows, Dh)


# --------------------------------------------------------------------------------------------------- bigbird


@register("mixer", "bigbird", paper="P29", causal_ok=True, max_len=True)
class BigBirdAttention(_SparseBase):
    """BigBird block-sparse attention: window blocks + global blocks + `random_blocks` random key blocks per block.

    P29 Long Range Arena, baseline "BigBird" (Zaheer et al. 2020, ITC variant; LRA's
    lra_benchmarks/models/bigbird/bigbird_attention.py). Blocks of `block` tokens; query block a sees key blocks
    {a-1, a, a+1} U G U R_h(a). G = the first and last `global_blocks` blocks, which also see every key. R_h(a):
    per head, the `random_blocks` candidates c (not in the window, not global) with the largest score
    rand[h, a, c], a table drawn once at construction from torch.Generator().manual_seed(seed) for max_len, so the
    pattern is deterministic. (LRA draws per-head permutations with numpy and only among the first 1024 tokens; we
    draw among all blocks.) Causal variant: window {a-1, a}, G = the first blocks only, R_h(a) among blocks < a-1,
    and every key j <= i; the KV cache keeps all keys (exact). Memory O(N * block * (|G| + 3 + r)).
    """

    name = "bigbird"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, max_len: int = 1024, block: int = 64,
                 random_blocks: int = 3, global_blocks: int = 1, seed: int = 0, dropout: float = 0.0,
                 impl: str = "auto"):
        super().__init__(dim, heads, causal, dropout, impl)
        if block < 1 or random_blocks < 0 or global_blocks < 0:
            raise FormersError(f"mixer 'bigbird': need block >= 1, random_blocks >= 0, global_blocks >= 0; got "
                               f"block={block}, random_blocks={random_blocks}, global_blocks={global_blocks}")
        self.max_len, self.block, self.random_blocks, self.global_blocks = max_len, block, random_blocks, global_blocks
        nb = -(-max_len // block)
        gen = torch.Generator().manual_seed(seed)
        # random-block priorities, regenerated from the seed (not saved): row a never depends on the sequence
        # length in the causal variant, so cached decoding sees the same blocks as a full pass
        self.register_buffer("rand_scores", torch.rand(heads, nb, nb, generator=gen), persistent=False)

    def global_block_ids(self, nb: int) -> list[int]:
        """Global block indices for a sequence of nb blocks."""
        first = set(range(min(self.global_blocks, nb)))
        last = set() if self.causal else set(range(max(0, nb - self.global_blocks), nb))
        return sorted(first | last)

    def random_block_ids(self, a0: int, nq: int, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random key blocks (H, nq, r) and their validity for query blocks a0 .. a0 + nq - 1 of nb blocks."""
        dev = self.rand_scores.device
        a = torch.arange(a0, a0 + nq, device=dev)[:, None]  # (nq, 1)
        c = torch.arange(nb, device=dev)[None]  # (1, nb)
        cand = (c < a - 1) if self.causal else ((c - a).abs() > 1)
        glob = torch.zeros(nb, dtype=torch.bool, device=dev)
        glob[self.global_block_ids(nb)] = True
        cand = cand & ~glob  # (nq, nb)
        pri = self.rand_scores[:, a0:a0 + nq, :nb].masked_fill(~cand, -1.0)  # (H, nq, nb)
        top = pri.topk(min(self.random_blocks, nb), dim=-1)
        return top.indices, top.values >= 0

    def _keys_per_query(self, Nk: int) -> int:
        nb = -(-Nk // self.block)
        return (len(self.global_block_ids(nb)) + 3 + self.random_blocks) * self.block

    def _pattern(self, qpos, Nk):
        """(H, n, Nk): query block a sees the global, window and random key blocks; global query blocks see all."""
        C, dev = self.block, qpos.device
        nb = -(-Nk // C)
        a0 = int(qpos[0]) // C
        nq = int(qpos[-1]) // C - a0 + 1
        a = torch.arange(a0, a0 + nq, device=dev)[:, None]  # (nq, 1)
        c = torch.arange(nb, device=dev)[None]  # (1, nb)
        gids = torch.tensor(self.global_block_ids(nb), dtype=torch.long, device=dev)
        is_global = torch.zeros(nb, dtype=torch.bool, device=dev)
        is_global[gids] = True
        lo = -1
        hi = 0 if self.causal else 1
        blocks = ((c - a >= lo) & (c - a <= hi)) | is_global[None]  # (nq, nb)
        blocks = blocks[None].expand(self.heads, -1, -1).clone()  # (H, nq, nb)
        if self.random_blocks:
            r_idx, r_ok = self.random_block_ids(a0, nq, nb)
            blocks.scatter_(2, r_idx, r_ok | blocks.gather(2, r_idx))
        if not self.causal:
            blocks = blocks | is_global[a0:a0 + nq][None, :, None]
        tok = blocks[:, qpos // C - a0][:, :, torch.arange(Nk, device=dev) // C]  # (H, n, Nk)
        if self.causal:
            tok = tok & (torch.arange(Nk, device=dev)[None] <= qpos[:, None])[None]
        return tok

    def _mix(self, x, q, k, v, past, key_real, table, positions, cache):
        B, H, Nk, _ = k.shape
        C, n = self.block, q.shape[2]
        if Nk > self.max_len:
            raise FormersError(f"mixer 'bigbird': sequence of {Nk} tokens exceeds max_len={self.max_len}; "
                               f"set model.max_len higher")
        if self._use_dense(Nk):
            return self._dense_attend(q, k, v, past, key_real, table)
        qg, qpos, lead = _query_grid(q, past, C)
        kg, vg, real = _key_grid(k, C), _key_grid(v, C), _real_grid(key_real, B, Nk, C, k.device)
        nb, nq, a0 = kg.shape[2], qg.shape[2], past // C
        dev = q.device
        a = torch.arange(a0, a0 + nq, device=dev)[:, None]  # (nq, 1)
        gids = torch.tensor(self.global_block_ids(nb), dtype=torch.long, device=dev)
        is_global = torch.zeros(nb + 2, dtype=torch.bool, device=dev)
        is_global[gids] = True
        win = a + torch.arange(-1, 1 if self.causal else 2, device=dev)  # (nq, 2 or 3) window blocks
        win_ok = (win >= 0) & (win < nb) & ~is_global[win.clamp(0, nb)]  # global blocks come through G
        idx = [gids[None].expand(nq, -1), win]
        ok = [torch.ones(nq, len(gids), dtype=torch.bool, device=dev), win_ok]
        idx = torch.cat(idx, dim=1)[None].expand(H, -1, -1)  # (H, nq, |G| + window)
        ok = torch.cat(ok, dim=1)[None].expand(H, -1, -1)
        if self.random_blocks:
            r_idx, r_ok = self.random_block_ids(a0, nq, nb)
            idx, ok = torch.cat([idx, r_idx], dim=2), torch.cat([ok, r_ok], dim=2)  # (H, nq, s)
        rule = (lambda qp, kp: kp <= qp) if self.causal else (lambda qp, kp: kp >= 0)
        y = _attend([_block_part(qg, qpos, kg, vg, real, idx, ok, rule, table)], self.dropout, self.training)
        if not self.causal and len(gids):  # global query blocks see every key (bidirectional: no cache, a0 = 0)
            allk = torch.arange(nb * C, device=dev)
            part = _shared_part(qg[:, :, gids], qpos[gids], kg.flatten(2, 3), vg.flatten(2, 3), allk,
                                real.flatten(1), rule, table)
            y = y.index_copy(2, gids, _attend([part], self.dropout, self.training))
        return y.flatten(2, 3)[:, :, lead:lead + n]


# ---------------------------------------------------------------------------------------------------- sparse


@register("mixer", "sparse", paper="P29", causal_ok=True)
class SparseTransformerAttention(_SparseBase):
    """Sparse Transformer factorized attention (Child et al. 2019), "strided" or "fixed", as one merged head.

    P29 Long Range Arena, baseline "Sparse Trans."; patterns from "Generating Long Sequences with Sparse
    Transformers" (factorized self-attention), l = `stride`, c = `summary`; every head attends the union
    A(1) U A(2) (the paper's "merged head" option, also LRA's):
      strided: A(1)_i = {max(0, i - l) .. i},  A(2)_i = {j : (i - j) mod l = 0}
      fixed:   A(1)_i = {j : floor(j / l) = floor(i / l)},  A(2)_i = {j : j mod l in {l - c .. l - 1}}
    and j <= i when causal. Bidirectional (our choice, the paper is autoregressive): |i - j| <= l for strided A(1),
    no j <= i cut otherwise. LRA (lra_benchmarks/models/sparse_transformer) defaults to fixed, l = 128, c = 32;
    its fixed A(2) also adds j mod l = 0, which we leave out, following the paper. Computed in blocks of l:
    O(N * (l + N / l)) memory for strided, O(N * (l + c N / l)) for fixed.
    """

    name = "sparse"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, pattern: Literal["strided", "fixed"] = "fixed",
                 stride: int = 128, summary: int = 32, dropout: float = 0.0, impl: str = "auto"):
        super().__init__(dim, heads, causal, dropout, impl)
        if pattern not in ("strided", "fixed"):
            raise FormersError(f"mixer 'sparse': pattern must be 'strided' or 'fixed', got {pattern!r}")
        if stride < 1 or (pattern == "fixed" and not 1 <= summary <= stride):
            raise FormersError(f"mixer 'sparse': need stride >= 1 and 1 <= summary <= stride, got stride={stride}, "
                               f"summary={summary}")
        self.pattern, self.stride, self.summary = pattern, stride, summary

    def _keys_per_query(self, Nk: int) -> int:
        l, nb = self.stride, -(-Nk // self.stride)
        return 3 * l + nb if self.pattern == "strided" else l + self.summary * nb

    def _pattern(self, qpos, Nk):
        l, i, j = self.stride, qpos[:, None], torch.arange(Nk, device=qpos.device)[None]
        if self.pattern == "strided":
            a1 = ((i - j >= 0) & (i - j <= l)) if self.causal else ((i - j).abs() <= l)
            a2 = (i - j) % l == 0
        else:
            a1 = i // l == j // l
            a2 = j % l >= l - self.summary
        p = a1 | a2
        return (p & (j <= i) if self.causal else p)[None]

    def _mix(self, x, q, k, v, past, key_real, table, positions, cache):
        B, Nk = k.shape[0], k.shape[2]
        l, n = self.stride, q.shape[2]
        if self._use_dense(Nk):
            return self._dense_attend(q, k, v, past, key_real, table)
        qg, qpos, lead = _query_grid(q, past, l)
        kg, vg, real = _key_grid(k, l), _key_grid(v, l), _real_grid(key_real, B, Nk, l, k.device)
        causal = (lambda qp, kp: kp <= qp) if self.causal else (lambda qp, kp: kp >= 0)
        if self.pattern == "strided":
            parts = [_band_parts(qg, qpos, kg, vg, real, l, 0 if self.causal else l, l, table),
                     self._column_part(qg, qpos, kg, vg, real, table)]
        else:
            a = qpos[:, :1] // l  # (nq, 1)
            own = _block_part(qg, qpos, kg, vg, real, a[None], torch.ones_like(a, dtype=torch.bool)[None],
                              causal, table)
            nb, c = kg.shape[2], self.summary
            spos = (torch.arange(nb, device=q.device)[:, None] * l + torch.arange(l - c, l, device=q.device))
            # summaries of the query's own block are already in A(1)
            parts = [own, _shared_part(qg, qpos, kg[:, :, :, l - c:].flatten(2, 3), vg[:, :, :, l - c:].flatten(2, 3),
                                       spos.flatten(), real[:, :, l - c:].flatten(1),
                                       lambda qp, kp: (kp // l != qp // l) & causal(qp, kp), table)]
        y = _attend(parts, self.dropout, self.training)
        return y.flatten(2, 3)[:, :, lead:lead + n]

    def _column_part(self, qg, qpos, kg, vg, real, table) -> _Part:
        """Strided A(2): query (a, r) sees keys (a', r) of its column with |a - a'| >= 2 (closer ones are in A(1))."""
        l, nb = self.stride, kg.shape[2]
        a = qpos[:, 0] // l  # (nq,)
        cols = qpos[0] % l  # (Cq,) the same for every query block: full aligned blocks, or a single one
        kc, vc = kg[:, :, :, cols], vg[:, :, :, cols]  # (B, H, nb, Cq, Dh): each query slot's column
        dist = a[:, None] - torch.arange(nb, device=qg.device)  # (nq, nb) block distance a - a'
        near = (dist >= 2) if self.causal else (dist.abs() >= 2)
        allowed = real[:, :, cols].transpose(1, 2)[:, None, None] & near[None, None, :, None, :]  # (B, 1, nq, Cq, nb)
        scores = torch.einsum("bhard,bhcrd->bharc", qg, kc)  # (B, H, nq, Cq, nb)
        if table is not None:
            scores = scores + _lookup(table, (dist * l)[None, :, None, :])  # offset i - j = (a - a') l
        return _Part(scores, allowed, lambda p: torch.einsum("bharc,bhcrd->bhard", p, vc))


# -------------------------------------------------------------------------------------------------- linformer


@register("mixer", "linformer", paper="P25", causal_ok=False, max_len=True)
class LinformerAttention(nn.Module):
    """Linformer: keys and values projected along the sequence to `k` rows by learned E, F of shape (k, max_len).

    P25 Greenformers (its Linformer comparison) and the P29 LRA baseline (Wang et al. 2020):
    head_h = softmax(Q_h (E K_h)^T / sqrt(d_h)) (F V_h), E, F in R^{k x max_len}; an input of N <= max_len tokens
    uses the first N columns. k defaults to 256, capped at max_len. share_kv=True uses E for both (Linformer's
    key-value sharing; LRA's lra_benchmarks/models/linformer shares one kernel, initialised as a dense kernel with
    fan-in max_len: we draw E, F ~ N(0, 1 / max_len)). Padded keys and values are zeroed before the projection.
    Bidirectional only. Cross-attention: keys/values from `context` (at most max_len tokens).
    x (B, N, D) -> (B, N, D); scores (B, H, N, k).
    """

    mixer_name = "linformer"
    takes_bias = False  # no per-key score matrix to add a relative position bias (ALiBi) to; checked at build
    supports_cache = False

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, max_len: int = 1024, k: int = 256,
                 share_kv: bool = False, dropout: float = 0.0):
        super().__init__()
        if causal:
            raise FormersError("mixer 'linformer' mixes the whole sequence through E and F and cannot be causal; "
                               "use it in a bidirectional model (encoder)")
        if k < 1 or max_len < 1:
            raise FormersError(f"mixer 'linformer': need k >= 1 and max_len >= 1, got k={k}, max_len={max_len}")
        self.dim, self.heads, self.causal, self.dropout = dim, heads, causal, dropout
        self.head_dim = _check_heads("linformer", dim, heads)
        self.max_len, self.k = max_len, min(k, max_len)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.E = nn.Parameter(torch.randn(self.k, max_len) / math.sqrt(max_len))
        self.F = None if share_kv else nn.Parameter(torch.randn(self.k, max_len) / math.sqrt(max_len))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        if unused:
            raise FormersError(f"mixer 'linformer' got unsupported arguments: {sorted(unused)}")
        if cache is not None or seqlens is not None:
            raise FormersError("mixer 'linformer' takes no KV cache (bidirectional) and no packed `seqlens`")
        B, N, D = x.shape
        H, Dh = self.heads, self.head_dim
        src = x if context is None else context
        M = src.shape[1]
        if M > self.max_len:
            raise FormersError(f"mixer 'linformer': {M} keys exceed max_len={self.max_len} (E and F have max_len "
                               f"columns); set model.max_len higher")
        if mask is not None and mask.shape != (B, M):
            raise FormersError(f"attention mask must have shape (batch, keys) = ({B}, {M}), got {tuple(mask.shape)}")
        q = self.q(x).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(src).view(B, M, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, M, Dh)
        if positions is not None and context is None:
            if positions.has_bias:
                raise FormersError("mixer 'linformer' has no per-key scores to add a position bias to (alibi); "
                                   "use position 'rope', 'learned' or 'sinusoidal'")
            pos = torch.arange(N, device=x.device)
            q, k = positions.rotate(q, k, pos, pos)
        if mask is not None:
            real = mask.to(k.dtype)[:, None, :, None]  # (B, 1, M, 1)
            k, v = k * real, v * real
        E = self.E[:, :M]
        Fm = E if self.F is None else self.F[:, :M]
        kp = torch.einsum("rm,bhmd->bhrd", E, k)  # (B, H, k, Dh)
        vp = torch.einsum("rm,bhmd->bhrd", Fm, v)  # (B, H, k, Dh)
        attn = ((q @ kp.transpose(-1, -2)) * self.head_dim ** -0.5).softmax(-1)  # (B, H, N, k)
        attn = F.dropout(attn, p=self.dropout, training=self.training and self.dropout > 0)
        y = (attn @ vp).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.out(y)


# ------------------------------------------------------------------------------------------------ probsparse


def online_top(M: torch.Tensor, u: int, chunk: int = 64) -> torch.Tensor:
    """(B, H, L) bool: query i is active when fewer than u earlier queries j < i have M_j >= M_i, i.e. it ranks
    in the top u of M_0 .. M_i. Runs over chunks keeping the u largest earlier values: O(L (u + chunk)) memory."""
    B, H, L = M.shape
    if L <= u:
        return torch.ones_like(M, dtype=torch.bool)
    chunk = max(chunk, u)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=M.device).tril(-1)  # j < i within a chunk
    top = M.new_empty(B, H, 0)
    out = []
    for s in range(0, L, chunk):
        m = M[..., s:s + chunk]  # (B, H, c)
        c = m.shape[-1]
        before = (top[..., None, :] >= m[..., None]).sum(-1)  # earlier chunks: enough to count among their top u
        within = ((m[..., None, :] >= m[..., None]) & tri[:c, :c]).sum(-1)
        out.append(before + within < u)
        top = torch.cat([top, m], dim=-1)
        top = top.topk(min(u, top.shape[-1]), dim=-1).values
    return torch.cat(out, dim=-1)


@register("mixer", "probsparse", paper="P73", causal_ok=True)
class ProbSparseAttention(nn.Module):
    """ProbSparse self-attention (Informer): softmax attention for the top-u "active" queries, a cheap mean elsewhere.

    P73 Informer (Zhou et al. 2021), ProbSparse self-attention; facts from zhouhaoyi/Informer2020 models/attn.py
    (ProbAttention) and utils/masking.py (ProbMask):
      1. each query i samples U = factor * ceil(ln L_K) keys (uniform, with replacement, as torch.randint there);
      2. M(q_i) = max_j s_ij - sum_j s_ij / L_K over the sampled keys, s_ij = q_i k_j^T / sqrt(d) (+ bias); the
         official code divides by L_K, not by U, and so do we;
      3. the u = factor * ceil(ln L_Q) queries with the largest M get softmax attention over all keys (causal
         mask when causal); U and u are at least 1 and at most L_K, L_Q;
      4. every other query outputs mean_j v_j, or, causal, cumsum_{j <= i} v_j (the official V.cumsum: a sum).
    Causal selection: Informer takes the top u over the whole sequence with keys sampled anywhere, which lets
    future tokens decide whether a past query is active (fine for its one-shot decoder, a leak for a language
    model). causal_selection="online" (default) keeps the mixer causal: query i samples keys j <= i, divides by
    i + 1, and is active when it ranks in the top u of M_0 .. M_i (see `online_top`; the active count is then
    about u (1 + ln(L / u)), at most L). "global" is the official rule.
    Sampling: seed=int draws from torch.Generator().manual_seed(seed) afresh on every call, so a given length
    always samples the same keys (train and eval); seed=None uses the global torch RNG (fresh keys every call, as
    the official code). Cross-attention (`context`): full softmax attention as in Informer's decoder, or ProbSparse
    with sparse_cross=True. Padded queries (self-attention) are never preferred to real ones. No KV cache.
    x (B, N, D) -> (B, N, D); active scores (B, H, u, L_K).
    """

    supports_cache = False

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, factor: int = 5, seed: int | None = 0,
                 causal_selection: Literal["online", "global"] = "online", sparse_cross: bool = False):
        super().__init__()
        if factor < 1:
            raise FormersError(f"mixer 'probsparse': factor must be >= 1, got {factor}")
        if causal_selection not in ("online", "global"):
            raise FormersError(f"mixer 'probsparse': causal_selection must be 'online' or 'global', "
                               f"got {causal_selection!r}")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = _check_heads("probsparse", dim, heads)
        self.factor, self.seed, self.causal_selection, self.sparse_cross = factor, seed, causal_selection, sparse_cross
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def budget(self, length: int) -> int:
        """factor * ceil(ln length), clipped to [1, length]: U for keys, u for queries."""
        return min(length, max(1, self.factor * math.ceil(math.log(length))))

    def sample_keys(self, nq: int, nk: int, online: bool, device=None) -> torch.Tensor:
        """(nq, U) sampled key indices per query: uniform over all nk keys, or over 0..i when online. Drawn on the
        CPU and moved to `device`, so that a seed samples the same keys on every device (a CUDA generator with the
        same seed draws other numbers; tests/test_cuda.py)."""
        gen = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        r = torch.rand(nq, self.budget(nk), generator=gen, dtype=torch.float64)
        limit = torch.arange(1, nq + 1)[:, None] if online else torch.full((1, 1), nk)
        return torch.minimum((r * limit).long(), limit - 1).to(device)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        if unused:
            raise FormersError(f"mixer 'probsparse' got unsupported arguments: {sorted(unused)}")
        if cache is not None:
            raise FormersError("mixer 'probsparse' has no exact incremental form (its query selection changes "
                               "with every new token); generate without a cache")
        if seqlens is not None:
            raise FormersError("mixer 'probsparse' does not take packed `seqlens`; pad the batch instead")
        B, N, D = x.shape
        H, Dh = self.heads, self.head_dim
        src = x if context is None else context
        M = src.shape[1]
        if mask is not None and mask.shape != (B, M):
            raise FormersError(f"attention mask must have shape (batch, keys) = ({B}, {M}), got {tuple(mask.shape)}")
        q = self.q(x).view(B, N, H, Dh).transpose(1, 2) * Dh ** -0.5  # (B, H, N, Dh), pre-scaled
        k, v = self.kv(src).view(B, M, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, M, Dh)
        table = None
        if positions is not None and context is None:
            pos = torch.arange(N, device=x.device)
            q, k = positions.rotate(q, k, pos, pos)
            table = _offset_table(positions, H, N, q)
        key_real = torch.ones(B, M, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        if context is not None and not self.sparse_cross:
            allowed = key_real[:, None, None, None, :]  # (B, 1, 1, 1, M)
            part = _Part((q @ k.transpose(-1, -2))[:, :, None], allowed, lambda p: p @ v[:, :, None])
            y = _attend([part], 0.0, False)[:, :, 0]  # (B, H, N, Dh)
        else:
            causal = self.causal and context is None
            y = self._probsparse(q, k, v, key_real, causal, table, key_real if context is None else None)
        return self.out(y.transpose(1, 2).reshape(B, N, D))

    def _probsparse(self, q, k, v, key_real, causal, table, query_real) -> torch.Tensor:
        B, H, Lq, Dh = q.shape
        Lk = k.shape[2]
        online = causal and self.causal_selection == "online"
        u = self.budget(Lq)
        with torch.no_grad():  # the selection is discrete: no gradient flows through M
            idx = self.sample_keys(Lq, Lk, online, q.device)  # (Lq, U)
            s = torch.einsum("bhid,bhiud->bhiu", q, k[:, :, idx])  # (B, H, Lq, U) sampled scores
            if table is not None:
                s = s + _lookup(table, (torch.arange(Lq, device=q.device)[:, None] - idx)[None])
            ok = key_real[:, idx][:, None]  # (B, 1, Lq, U): padded keys never count
            div = torch.arange(1, Lq + 1, device=q.device) if online else Lk
            Ms = s.masked_fill(~ok, float("-inf")).amax(-1) - s.masked_fill(~ok, 0.0).sum(-1) / div  # (B, H, Lq)
            if query_real is not None:
                Ms = Ms.masked_fill(~query_real[:, None], float("-inf"))
            if online:
                active = online_top(Ms, u)
            else:
                active = torch.zeros_like(Ms, dtype=torch.bool).scatter(-1, Ms.topk(u, dim=-1).indices, True)
            count = int(active.sum(-1).max())
            # active queries first (ascending), then inactive ones: each row of `sel` is distinct positions
            sel = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :count]  # (B, H, K)
        qs = q.gather(2, sel[..., None].expand(-1, -1, -1, Dh))  # (B, H, K, Dh)
        scores = qs @ k.transpose(-1, -2)  # (B, H, K, Lk)
        kpos = torch.arange(Lk, device=q.device)
        if table is not None:
            off = (sel[..., None] - kpos).transpose(0, 1)  # (H, B, K, Lk)
            scores = scores + _lookup(table, off).transpose(0, 1)
        allowed = key_real[:, None, None, :]  # (B, 1, 1, Lk)
        if causal:
            allowed = allowed & (kpos <= sel[..., None])
        ys = _attend([_Part(scores[:, :, None], allowed[:, :, None], lambda p: p @ v[:, :, None])], 0.0, False)
        vr = v * key_real[:, None, :, None].to(v.dtype)  # padded values contribute nothing to the lazy context
        if causal:
            lazy = vr.cumsum(dim=2)  # (B, H, Lq, Dh)
        else:
            n_real = key_real.sum(-1).clamp(min=1).to(v.dtype)[:, None, None, None]
            lazy = (vr.sum(2, keepdim=True) / n_real).expand(-1, -1, Lq, -1)  # (B, H, Lq, Dh)
        full = torch.zeros_like(lazy).scatter(2, sel[..., None].expand(-1, -1, -1, Dh), ys[:, :, 0])
        return torch.where(active[..., None], full, lazy)
