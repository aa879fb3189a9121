"""Kernel (linear) attention: softmax(q.k) replaced by a feature-map product phi(q).phi(k), so that

    y_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j (phi(q_i) . phi(k_j))      (j <= i when causal)

is computed as phi(q_i)^T (sum_j phi(k_j) v_j^T) in O(N F Dv) instead of O(N^2). Mixers here: `linear`
(elu + 1), `sla` (SLAB's ReLU attention with a depthwise conv), `performer` (FAVOR+ random features) and
`cosformer` (ReLU with cos re-weighting); `kernel_rpe` and `scattered` live in `linear_attention_rpe`.

Shared machinery: the projections `q`, `kv`, `out` as in `softmax`; `causal_linear` (the chunked causal form,
also the recurrent one when fed a state); the decoding state in `cache.state["kv"]`. The denominator rides along
as an extra all-ones value column, so one product yields numerator and normaliser together.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.attention import KVCache
from formers.registry import FormersError, register


def causal_linear(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, chunk: int,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention out_i = qf_i^T (state + sum_{j<=i} kf_j v_j^T), chunked.

    qf, kf (B, H, N, F); v (B, H, N, Dv); state (B, H, F, Dv) or None (= zeros): the sum over earlier tokens.
    Within a chunk of `chunk` tokens the masked quadratic form; across chunks a running sum of per-chunk
    kf^T v, so memory is O(N (chunk + F Dv / chunk)), never a per-token (F, Dv) tensor. Returns
    (out (B, H, N, Dv), new state (B, H, F, Dv)). Each output reads only its own and earlier tokens.
    """
    B, H, N, Fd = qf.shape
    Dv = v.shape[-1]
    L = max(1, min(chunk, N))
    pad = (-N) % L
    if pad:  # zero tokens: zero kf adds nothing to any sum, the zero queries' rows are dropped
        qf, kf, v = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v))
    C = (N + pad) // L
    qc = qf.reshape(B, H, C, L, Fd)  # (B, H, C, L, F)
    kc = kf.reshape(B, H, C, L, Fd)  # (B, H, C, L, F)
    vc = v.reshape(B, H, C, L, Dv)  # (B, H, C, L, Dv)
    future = torch.ones(L, L, dtype=torch.bool, device=qf.device).triu(1)
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(future, 0.0)  # (B, H, C, L, L), j <= i within the chunk
    out = scores @ vc  # (B, H, C, L, Dv)
    kv = kc.transpose(-1, -2) @ vc  # (B, H, C, F, Dv): each chunk's sum of kf_j v_j^T
    prefix = kv.cumsum(2)  # (B, H, C, F, Dv): inclusive running sums over chunks
    start = torch.cat([torch.zeros_like(prefix[:, :, :1]), prefix[:, :, :-1]], 2)  # sums before each chunk
    end = prefix[:, :, -1]  # (B, H, F, Dv)
    if state is not None:
        start = start + state[:, :, None]
        end = end + state
    out = out + qc @ start  # (B, H, C, L, Dv)
    return out.reshape(B, H, C * L, Dv)[:, :, :N], end


class Heads(NamedTuple):
    """What a kernel mixer's `mix` receives: projected heads and the bookkeeping of masks and positions."""

    q: torch.Tensor  # (B, H, N, Dh)
    k: torch.Tensor  # (B, H, M, Dh)
    v: torch.Tensor  # (B, H, M, Dh)
    key_mask: torch.Tensor | None  # (B, M) bool, True = real key
    q_pos: torch.Tensor  # (N,) absolute positions of the queries
    k_pos: torch.Tensor  # (M,) absolute positions of the keys
    causal: bool  # causal self-attention (False for cross-attention)
    cache: KVCache | None  # the decoding cache (None for cross-attention)
    positions: nn.Module | None  # relative position module (self-attention only)
    seqlens: torch.Tensor | None  # packed window offsets (only `scattered`)


class KernelAttention(nn.Module):
    """Base of the kernel-attention mixers (not registered): projections, masks, positions, cache, output.

    Subclasses implement `mix(h: Heads) -> (B, H, N, Dh)`. Shapes: x (B, N, D), context (B, M, D)."""

    mixer_name = "kernel attention"  # the registered name, for messages
    supports_context = True  # cross-attention over `context`
    takes_bias = False  # whether it can add a relative position score bias (ALiBi); checked when a model is built
    takes_seqlens = False

    def __init__(self, dim: int, heads: int, causal: bool, head_dim: int | None, bias: bool):
        super().__init__()
        if heads < 1 or dim < 1:
            raise FormersError(f"mixer: dim and heads must be positive, got dim={dim}, heads={heads}")
        head_dim = head_dim or dim // heads
        if head_dim < 1 or (head_dim * heads != dim and head_dim == dim // heads):
            raise FormersError(f"mixer: dim={dim} is not divisible by heads={heads}; change heads or set head_dim")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        self.q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * heads * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, dim, bias=bias)

    def mix(self, h: Heads) -> torch.Tensor:
        raise NotImplementedError

    def token_positions(self, n: int, past: int, seqlens: torch.Tensor | None, device) -> torch.Tensor:
        """Absolute positions of n new tokens after `past` earlier ones (windows override this)."""
        return torch.arange(past, past + n, device=device)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        if unused:
            raise FormersError(f"mixer '{self.mixer_name}' got unsupported arguments: {sorted(unused)}")
        B, N, _ = x.shape
        H, Dh = self.heads, self.head_dim
        if seqlens is not None and not self.takes_seqlens:
            raise FormersError(f"mixer '{self.mixer_name}' does not take packed `seqlens`; use mixer 'scattered'")
        if context is not None and not self.supports_context:
            raise FormersError(f"mixer '{self.mixer_name}' has no cross-attention (context); use softmax, linear or "
                               "performer for cross-attention")
        own = context is None
        if cache is not None and own and not self.causal:
            raise FormersError(f"mixer '{self.mixer_name}' is bidirectional: a decoding cache needs causal=True")
        q = self.q(x).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
        src = x if own else context
        M = src.shape[1]
        k, v = self.kv(src).view(B, M, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, M, Dh)
        past = cache.length if (cache is not None and own) else 0
        q_pos = self.token_positions(N, past, seqlens, x.device)
        k_pos = q_pos if own else torch.arange(M, device=x.device)
        if positions is not None and own:
            if positions.has_bias and not self.takes_bias:
                raise FormersError(f"mixer '{self.mixer_name}' never forms a score matrix, so it cannot add the "
                                   f"{type(positions).__name__} score bias; use model.position = rope, learned, "
                                   "sinusoidal or none")
            q, k = positions.rotate(q, k, q_pos, k_pos)
        if mask is not None:
            if own and past and mask.shape == (B, past + N):
                mask = mask[:, past:]  # earlier keys are already folded into the cache
            if mask.shape != (B, M):
                raise FormersError(f"mixer '{self.mixer_name}': mask must have shape (batch, keys) = ({B}, {M}), "
                                   f"got {tuple(mask.shape)}")
            mask = mask.bool()
        h = Heads(q, k, v, mask, q_pos, k_pos, self.causal and own, cache if own else None,
                  positions if own else None, seqlens)
        y = self.mix(h)  # (B, H, N, Dh)
        return self.out(y.transpose(1, 2).reshape(B, N, H * Dh))  # (B, N, D)

    def check_length(self, h: Heads, max_len: int) -> None:
        """Length-dependent mixers: every position must lie below max_len."""
        last = int(max(h.q_pos[-1], h.k_pos[-1])) + 1 if len(h.q_pos) else 0
        if last > max_len:
            raise FormersError(f"mixer '{self.mixer_name}': a sequence of {last} tokens exceeds its max_len={max_len}; "
                               "set model.max_len higher")

    def kernel_sums(self, qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, h: Heads, chunk: int,
                    quadratic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Numerator sum_j (qf_i.kf_j) v_j (B, H, N, Dv) and denominator sum_j qf_i.kf_j (B, H, N).

        Bidirectional: qf (kf^T v), or (qf kf^T) v when `quadratic`. Causal: chunked (`quadratic` = one chunk),
        continuing from and updating the decoding state in `cache.state["kv"]`."""
        if h.key_mask is not None:
            kf = kf.masked_fill(~h.key_mask[:, None, :, None], 0.0)  # padded keys carry no weight
        va = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)  # (B, H, M, Dv + 1): last column -> denominator
        if not h.causal:
            if quadratic:
                out = (qf @ kf.transpose(-1, -2)) @ va  # (B, H, N, Dv + 1)
            else:
                out = qf @ (kf.transpose(-1, -2) @ va)  # (B, H, N, Dv + 1)
        else:
            cache = h.cache
            state = cache.state.get("kv") if cache is not None else None
            out, state = causal_linear(qf, kf, va, qf.shape[2] if quadratic else chunk, state)
            if cache is not None:
                cache.state["kv"] = state
                cache.advance(qf.shape[2])
        return out[..., :-1], out[..., -1]


def _check_positive(name: str, **values: int | float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise FormersError(f"mixer '{name}': {key} must be positive, got {value}")


# ------------------------------------------------------------------------------------------------------ linear


@register("mixer", "linear", paper="P29", causal_ok=True)
class LinearAttention(KernelAttention):
    """Linear attention with the elu + 1 feature map (Katharopoulos et al. 2020, "Transformers are RNNs").

    An LRA baseline (P29, "Long Range Arena"). phi(x) = elu(x) + 1;
        y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),  S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)
    over j <= i when causal (chunked over `chunk_size` tokens in training, a recurrent (S, z) state when decoding),
    over all j otherwise (phi(K)^T V first, O(N Dh^2)). q, k, v (B, H, N, Dh); x (B, N, D) -> (B, N, D).
    """

    mixer_name = "linear"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, chunk_size: int = 64, eps: float = 1e-6,
                 head_dim: int | None = None, bias: bool = False):
        super().__init__(dim, heads, causal, head_dim, bias)
        _check_positive("linear", chunk_size=chunk_size)
        if eps < 0:
            raise FormersError(f"mixer 'linear': eps must be >= 0, got {eps}")
        self.chunk_size, self.eps = chunk_size, eps

    def mix(self, h: Heads) -> torch.Tensor:
        qf, kf = F.elu(h.q) + 1, F.elu(h.k) + 1  # (B, H, N, Dh), (B, H, M, Dh): positive features
        num, den = self.kernel_sums(qf, kf, h.v, h, self.chunk_size)
        return num / (den[..., None] + self.eps)


# --------------------------------------------------------------------------------------------------------- sla


@register("mixer", "sla", paper="P06", causal_ok=True, max_len=True)
class SimplifiedLinearAttention(KernelAttention):
    """Simplified linear attention (SLA) of SLAB: ReLU kernel, learned key positions, depthwise conv on V.

    P06 "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized BatchNorm".
        Q' = ReLU(Q),  K' = ReLU(K + P),  P a learned (max_len, D) table (zeros at init, as in the code)
        O_i = sum_j (Q'_i . K'_j) V_j / (Q'_i . sum_j K'_j + 1e-6) + DWC(V)_i,   then the output projection.
    DWC: a depthwise conv (kernel 5) over the tokens with Dh channels shared by all heads; causal models pad only
    on the left and keep the last kernel-1 values in the cache. The official conv's bias is left out: it is a
    constant per channel (an output-projection bias), and without it a query that sees no key outputs zeros.
    Both multiplication orders, Q'(K'^T V) and (Q'K'^T)V, are implemented; `order="auto"` takes the quadratic
    one when N^2 (F + Dv) <= 2 N F Dv (the rule of the official code). Causal training is chunked like `linear`.
    Source read for facts: xinghaochen/SLAB classification/models/slab_deit.py (Attention). The causal form is
    this library's extension (SLAB's LLaMA experiment uses softmax attention with PRepBN).
    """

    mixer_name = "sla"
    supports_context = False

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, max_len: int = 1024, kernel_size: int = 5,
                 order: Literal["auto", "linear", "quadratic"] = "auto", chunk_size: int = 64, eps: float = 1e-6,
                 head_dim: int | None = None, bias: bool = False):
        super().__init__(dim, heads, causal, head_dim, bias)
        _check_positive("sla", max_len=max_len, kernel_size=kernel_size, chunk_size=chunk_size)
        if order not in ("auto", "linear", "quadratic"):
            raise FormersError(f"mixer 'sla': order must be 'auto', 'linear' or 'quadratic', got {order!r}")
        self.max_len, self.kernel_size, self.order = max_len, kernel_size, order
        self.chunk_size, self.eps = chunk_size, eps
        self.pos = nn.Parameter(torch.zeros(max_len, heads * self.head_dim))  # P, added to the keys
        self.dwc = nn.Conv1d(self.head_dim, self.head_dim, kernel_size, groups=self.head_dim, bias=False)

    def quadratic(self, n: int, m: int) -> bool:
        if self.order != "auto":
            return self.order == "quadratic"
        c = d = self.head_dim
        return n * m * (c + d) <= c * d * (n + m)

    def mix(self, h: Heads) -> torch.Tensor:
        self.check_length(h, self.max_len)
        B, H, N, Dh = h.q.shape
        start = int(h.k_pos[0])  # the keys are the tokens start, start + 1, ...: a slice, not a gather
        p = self.pos[start: start + h.k.shape[2]].view(-1, H, Dh).transpose(0, 1)  # (H, M, Dh)
        qf, kf = F.relu(h.q), F.relu(h.k + p)
        num, den = self.kernel_sums(qf, kf, h.v, h, self.chunk_size, self.quadratic(N, h.k.shape[2]))
        return num / (den[..., None] + self.eps) + self.local(h)

    def local(self, h: Heads) -> torch.Tensor:
        """DWC(V): (B, H, N, Dh) -> (B, H, N, Dh); padded tokens are zeroed first so they reach no neighbour."""
        v = h.v
        B, H, N, Dh = v.shape
        K = self.kernel_size
        if h.key_mask is not None:
            v = v.masked_fill(~h.key_mask[:, None, :, None], 0.0)
        if h.causal:
            tail = h.cache.state.get("v_tail") if h.cache is not None else None
            if tail is None:
                tail = v.new_zeros(B, H, K - 1, Dh)  # the left zero padding
            seq = torch.cat([tail, v], 2)  # (B, H, K - 1 + N, Dh)
            if h.cache is not None:
                h.cache.state["v_tail"] = seq[:, :, seq.shape[2] - (K - 1):]
        else:
            seq = F.pad(v, (0, 0, (K - 1) // 2, K // 2))  # (B, H, N + K - 1, Dh)
        y = self.dwc(seq.transpose(-1, -2).reshape(B * H, Dh, -1))  # (B*H, Dh, N); contiguous input: fast conv
        return y.view(B, H, Dh, N).transpose(-1, -2)  # (B, H, N, Dh)


# --------------------------------------------------------------------------------------------------- performer


class PositiveRandomFeatures(nn.Module):
    """FAVOR+ positive orthogonal random features (Choromanski et al. 2021, "Rethinking Attention with Performers").

    phi(x) = exp(w_f^T x - |x|^2 / 2) / sqrt(m), f = 1..m, x = head vector * Dh^-1/4 (so phi(q).phi(k) estimates
    exp(q.k / sqrt(Dh))); the w_f come in orthogonal blocks of Dh rows with chi-distributed norms. Stabilisation
    without leaking across tokens: keys are divided by the fixed c_f = exp(max(0, |w_f|^2/2 - 40)) (so no key
    feature exceeds e^40, since w.k - |k|^2/2 <= |w|^2/2) and queries multiplied by c_f and divided by their row
    maximum. Both constants (and 1/sqrt(m)) cancel in the attention ratio, and none depends on other tokens, so
    causal outputs and cached decoding stay exact (the price: a key far from every w_f, all its features below
    float32's range, gets zero weight). Buffers: `proj` (m, Dh), `salt`, `drawn_at`.

    `set_step(step)` redraws every `redraw_every` steps (0 = never) from a generator seeded with (seed, salt,
    step rounded down to a multiple of redraw_every): a resumed run draws identical features; `salt` comes from
    the global RNG at construction so layers differ.
    """

    def __init__(self, head_dim: int, features: int = 256, redraw_every: int = 0, seed: int = 0):
        super().__init__()
        self.head_dim, self.features, self.redraw_every, self.seed = head_dim, features, redraw_every, seed
        self.register_buffer("proj", torch.empty(features, head_dim))
        self.register_buffer("salt", torch.randint(0, 2**31 - 1, ()))
        self.register_buffer("drawn_at", torch.zeros((), dtype=torch.long))
        self.draw(0)

    def draw(self, step: int) -> None:
        """Set `proj` to the features of `step` (deterministic in seed, salt and step)."""
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + int(self.salt)) * 1_000_003 + step) % 2**63)
        d = self.head_dim
        blocks = [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T
                  for _ in range(math.ceil(self.features / d))]  # orthonormal rows
        w = torch.cat(blocks)[: self.features]  # (m, Dh)
        norms = torch.randn(self.features, d, generator=g, dtype=torch.float64).norm(dim=1)  # chi(Dh) lengths
        with torch.no_grad():
            self.proj.copy_(w * norms[:, None])
            self.drawn_at.fill_(step)

    def set_step(self, step: int) -> None:
        if self.redraw_every > 0:
            at = step - step % self.redraw_every
            if at != int(self.drawn_at):
                self.draw(at)

    def forward(self, x: torch.Tensor, *, query: bool) -> torch.Tensor:
        """Head vectors (..., N, Dh) -> features (..., N, m)."""
        x = x * self.head_dim ** -0.25
        w = self.proj.to(x.dtype)
        logits = x @ w.T - (x * x).sum(-1, keepdim=True) / 2  # (..., N, m)
        shift = ((w * w).sum(-1) / 2 - 40).clamp_min(0)  # (m,) log c_f
        if query:
            logits = logits + shift
            logits = logits - logits.amax(-1, keepdim=True).detach()  # a per-query factor: cancels exactly
        else:
            logits = logits - shift
        return logits.exp()


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den for den >= 0 without eps (the feature scales cancel exactly); den = 0 (no key) gives zeros."""
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


@register("mixer", "performer", paper="P29", causal_ok=True)
class Performer(KernelAttention):
    """Performer (FAVOR+) attention: softmax attention estimated with positive orthogonal random features.

    Choromanski et al. 2021, an LRA baseline (P29 "Long Range Arena") and the token layer of T2T-ViT (P59).
        y_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j)  ~  softmax(q k^T / sqrt(Dh)) v
    with `PositiveRandomFeatures` (m = `features`, 256 by default); causal uses the chunked scheme of
    `linear` and a recurrent state when decoding. `redraw_every` steps (0 = never) the features are redrawn
    deterministically (see `PositiveRandomFeatures`). q, k, v (B, H, N, Dh); x (B, N, D) -> (B, N, D).
    """

    mixer_name = "performer"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, features: int = 256,
                 redraw_every: int = 1000, seed: int = 0, chunk_size: int = 64, head_dim: int | None = None,
                 bias: bool = False):
        super().__init__(dim, heads, causal, head_dim, bias)
        _check_positive("performer", features=features, chunk_size=chunk_size)
        if redraw_every < 0:
            raise FormersError(f"mixer 'performer': redraw_every must be >= 0 (0 = never), got {redraw_every}")
        self.chunk_size = chunk_size
        self.prf = PositiveRandomFeatures(self.head_dim, features, redraw_every, seed)

    def mix(self, h: Heads) -> torch.Tensor:
        qf, kf = self.prf(h.q, query=True), self.prf(h.k, query=False)  # (B, H, N, m), (B, H, M, m)
        return _safe_ratio(*self.kernel_sums(qf, kf, h.v, h, self.chunk_size))


# --------------------------------------------------------------------------------------------------- cosformer


@register("mixer", "cosformer", paper="P52", causal_ok=True, max_len=True)
class CosFormerAttention(KernelAttention):
    """cosFormer attention: ReLU features re-weighted by cos(pi/2 (i - j) / M), linear via cos(a-b) expansion.

    The re-weighting stays linear because cos(a - b) = cos a cos b + sin a sin b.

    P52 "Neural Architecture Search on Efficient Transformers and Beyond" searches per layer between softmax and
    this attention (Qin et al. 2022, "cosFormer"). With theta_i = pi/2 (i + 1) / M:
        phi(q_i) = [ReLU(q_i) cos theta_i, ReLU(q_i) sin theta_i]  (likewise k_j),  F = 2 Dh
        y_i = sum_j phi(q_i).phi(k_j) v_j / max(sum_j phi(q_i).phi(k_j), eps)
    M is the sequence length (max(N, M_context) for cross-attention) as in the paper and its code, except for
    causal self-attention, where M = max_len: a fixed M makes training, chunking and cached decoding agree
    exactly (a length-dependent M would change every earlier weight as the sequence grows). Longer inputs raise.
    P52's mixed model (softmax in some layers, cosformer in others) is a `model.layers` recipe, e.g.
    block.mixer = cosformer and layers = {"0,2": {"mixer": {"name": "softmax"}}}.
    Source read for facts: OpenNLPLab/cosFormer cosformer.py (1-based index, clamp_min(eps) denominator).
    """

    mixer_name = "cosformer"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, max_len: int = 1024, chunk_size: int = 64,
                 eps: float = 1e-6, head_dim: int | None = None, bias: bool = False):
        super().__init__(dim, heads, causal, head_dim, bias)
        _check_positive("cosformer", max_len=max_len, chunk_size=chunk_size, eps=eps)
        self.max_len, self.chunk_size, self.eps = max_len, chunk_size, eps

    def mix(self, h: Heads) -> torch.Tensor:
        self.check_length(h, self.max_len)
        scale = self.max_len if h.causal else max(h.q.shape[2], h.k.shape[2])

        def features(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            theta = (math.pi / 2) * (pos + 1).to(x.dtype) / scale  # (N,)
            x = F.relu(x)
            return torch.cat([x * theta.cos()[:, None], x * theta.sin()[:, None]], -1)  # (B, H, N, 2 Dh)

        num, den = self.kernel_sums(features(h.q, h.q_pos), features(h.k, h.k_pos), h.v, h, self.chunk_size)
        return num / den.clamp_min(self.eps)[..., None]


from formers.nn import linear_attention_rpe  # noqa: E402,F401  (registers kernel_rpe and scattered)
