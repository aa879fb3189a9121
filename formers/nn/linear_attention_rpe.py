"""Kernel attention with structure across tokens: `kernel_rpe` (a Toeplitz relative-position weight applied by
FFT) and `scattered` (linear attention inside variable-length windows of one packed sequence). The shared
machinery (projections, masks, cache, `kernel_sums`) is in `formers.nn.linear_attention`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.linear_attention import (
    Heads,
    KernelAttention,
    PositiveRandomFeatures,
    _check_positive,
    _safe_ratio,
)
from formers.registry import FormersError, register


def _outer_tokens_last(kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-token products kf_j v_j^T laid out (B, H, F, Dv, N), tokens contiguous for the FFTs."""
    kt = kf.transpose(-1, -2).contiguous()  # (B, H, F, N)
    vt = v.transpose(-1, -2).contiguous()  # (B, H, Dv, N)
    return kt[..., :, None, :] * vt[..., None, :, :]


def toeplitz_fft(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """out_i = sum_j t[i - j] (qf_i . kf_j) v_j over all i, j, by FFT in O(N log N F Dv).

    qf, kf (B, H, N, F); v (B, H, N, Dv); t (H, 2N - 1) holds the weight of offset d = i - j at index d + N - 1.
    The Toeplitz matrix [t[i - j]] is embedded in a circulant of size n >= 2N - 1 (P35)."""
    B, H, N, Fd = qf.shape
    n = 1 << (2 * N - 1).bit_length()  # power of two >= 2N
    c = t.new_zeros(H, n)  # circulant column: offsets 0..N-1 at the front, -(N-1)..-1 wrapped to the back
    c[:, :N] = t[:, N - 1:]
    c[:, n - N + 1:] = t[:, : N - 1]
    u = _outer_tokens_last(kf, v)  # (B, H, F, Dv, N)
    spec = torch.fft.rfft(u, n=n) * torch.fft.rfft(c)[None, :, None, None]  # tokens last: contiguous FFTs
    y = torch.fft.irfft(spec, n=n)[..., :N]  # (B, H, F, Dv, N): sum_j t[i - j] kf_j v_j^T
    return torch.einsum("bhnf,bhfdn->bhnd", qf, y)


def toeplitz_causal(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                    block: int) -> torch.Tensor:
    """out_i = sum_{j <= i} t[i - j] (qf_i . kf_j) v_j in O(N log^2 N F Dv), exactly causal.

    t (H, N) holds the weights of offsets d = 0..N-1. One FFT over the whole sequence would mix rounding errors
    of later tokens into earlier outputs, so this divides and conquers instead: inside blocks of `block` tokens
    the masked quadratic form; then, for segment sizes s = block, 2 block, ..., every left half of a 2s-segment
    reaches its right half through one batched FFT convolution of size 2s. Every term of out_i comes from
    tokens j <= i only, so earlier outputs are bit-identical whatever follows."""
    B, H, N, Fd = qf.shape
    Dv = v.shape[-1]
    L = max(1, min(block, N))
    size = L << max(0, math.ceil(math.log2(math.ceil(N / L))))  # block * 2^k >= N
    if size > N:  # zero tokens: no weight as keys, dropped as queries
        qf, kf, v = (F.pad(x, (0, 0, 0, size - N)) for x in (qf, kf, v))
    tc = F.pad(t, (0, size - N))  # (H, size); offsets >= N only pair padded queries
    nb = size // L
    d = torch.arange(L, device=t.device)
    d = d[:, None] - d[None, :]  # (L, L): i - j inside a block
    w = tc[:, d.clamp_min(0)].masked_fill(d < 0, 0.0)  # (H, L, L)
    qb = qf.reshape(B, H, nb, L, Fd)  # (B, H, nb, L, F)
    kb = kf.reshape(B, H, nb, L, Fd)  # (B, H, nb, L, F)
    out = ((qb @ kb.transpose(-1, -2)) * w[None, :, None]) @ v.reshape(B, H, nb, L, Dv)  # (B, H, nb, L, Dv)
    out = out.reshape(B, H, size, Dv)
    u = _outer_tokens_last(kf, v)  # (B, H, F, Dv, size)
    s = L
    while s < size:
        P = size // (2 * s)
        left = u.reshape(B, H, Fd, Dv, P, 2, s)[..., 0, :]  # (B, H, F, Dv, P, s): inputs of each left half
        g = tc[:, 1: 2 * s]  # (H, 2s - 1): offsets 1..2s-1 between a left input and a right output
        # output s + a of a segment sums g[s + a - 1 - b] u_b, b < s: a linear convolution whose needed terms
        # never wrap around a circle of size 2s
        spec = torch.fft.rfft(left, n=2 * s) * torch.fft.rfft(g, n=2 * s)[None, :, None, None, None]
        y = torch.fft.irfft(spec, n=2 * s)[..., s - 1: 2 * s - 1]  # (B, H, F, Dv, P, s)
        right_q = qf.reshape(B, H, P, 2, s, Fd)[:, :, :, 1]  # (B, H, P, s, F)
        add = torch.einsum("bhpsf,bhfdps->bhpsd", right_q, y)  # (B, H, P, s, Dv)
        out = out + torch.stack([torch.zeros_like(add), add], 3).reshape(B, H, size, Dv)
        s *= 2
    return out[:, :, :N]


@register("mixer", "kernel_rpe", paper="P35", causal_ok=True, max_len=True)
class KernelRPEAttention(KernelAttention):
    """Kernelized attention with relative positional encoding: Performer features times a Toeplitz exp(b_{i-j}).

    P35 "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding" (Luo et al. 2021).
    Softmax attention with an additive bias, exp(q_i.k_j / sqrt(Dh) + b_{i-j}), kernelised with the FAVOR+
    features phi of `PositiveRandomFeatures`:
        y_i = phi(q_i)^T sum_j c_{i-j} phi(k_j) v_j^T / phi(q_i)^T sum_j c_{i-j} phi(k_j),   c = exp(b)
    C = [c_{i-j}] is Toeplitz, so both sums are computed for every feature channel by FFT (circulant embedding)
    in O(N log N m Dv). b is learned per head for offsets |i - j| < max_len (zeros at init); causal keeps j <= i
    (the FFT is then organised so that no later token can touch an earlier output, see `toeplitz_causal`). A
    relative position module with a bias (ALiBi) adds its bias to b; it must depend on i - j only. Decoding
    caches phi(k) and v and evaluates the new rows explicitly. `block_size`: sequences up to this length, and
    the blocks of the causal scheme, are computed directly (128: the FFTs run over m Dv channels, so for short
    sequences the direct form is the cheaper one).
    `features` = 64 (the paper's defaults were not retrieved; 64 is the m of the fact sheet's FFT check).
    q, k, v (B, H, N, Dh); x (B, N, D) -> (B, N, D).
    """

    mixer_name = "kernel_rpe"
    supports_context = False
    takes_bias = True

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, max_len: int = 1024, features: int = 64,
                 redraw_every: int = 0, seed: int = 0, block_size: int = 128, head_dim: int | None = None,
                 bias: bool = False):
        super().__init__(dim, heads, causal, head_dim, bias)
        _check_positive("kernel_rpe", max_len=max_len, features=features, block_size=block_size)
        if redraw_every < 0:
            raise FormersError(f"mixer 'kernel_rpe': redraw_every must be >= 0 (0 = never), got {redraw_every}")
        self.max_len, self.block_size = max_len, block_size
        self.prf = PositiveRandomFeatures(self.head_dim, features, redraw_every, seed)
        self.rel_bias = nn.Parameter(torch.zeros(heads, 2 * max_len - 1))  # b_d at index d + max_len - 1

    def log_weights(self, span: int, positions) -> torch.Tensor:
        """b_d (plus a positional bias) for d = i - j in [-(span - 1), span - 1] -> (H, 2 span - 1)."""
        mid = self.max_len - 1
        b = self.rel_bias[:, mid - (span - 1): mid + span]
        if positions is not None and positions.has_bias:
            k_pos = torch.arange(2 * span - 1, device=b.device)
            q_pos = torch.full((1,), span - 1, device=b.device)
            extra = positions.bias(q_pos, k_pos, self.heads)[:, 0]  # (H, 2 span - 1); index k <-> d = span-1-k
            b = b + extra.flip(-1).to(b.dtype)
        return b

    def mix(self, h: Heads) -> torch.Tensor:
        self.check_length(h, self.max_len)
        qf, kf = self.prf(h.q, query=True), self.prf(h.k, query=False)  # (B, H, N, m)
        if h.key_mask is not None:
            kf = kf.masked_fill(~h.key_mask[:, None, :, None], 0.0)  # padded keys carry no weight
        v = h.v
        past = h.cache.length if h.cache is not None else 0
        if h.cache is not None:
            kf, v = h.cache.update(kf, v)  # (B, H, past + N, m), (B, H, past + N, Dh)
        va = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)  # (B, H, Nk, Dh + 1): last column -> denominator
        Nk = va.shape[2]
        t = self.log_weights(Nk, h.positions).exp()  # (H, 2 Nk - 1)
        if past or Nk <= self.block_size:  # decoding rows against every cached key, or one short block
            d = h.q_pos[:, None] - torch.arange(Nk, device=qf.device)[None, :]  # (N, Nk): i - j
            w = t[:, d + Nk - 1]  # (H, N, Nk): c_{i-j}
            if h.causal:
                w = w.masked_fill(d < 0, 0.0)
            out = ((qf @ kf.transpose(-1, -2)) * w) @ va  # (B, H, N, Dh + 1)
        elif h.causal:
            out = toeplitz_causal(qf, kf, va, t[:, Nk - 1:], self.block_size)
        else:
            out = toeplitz_fft(qf, kf, va, t)
        return _safe_ratio(out[..., :-1], out[..., -1])


@register("mixer", "scattered", paper="P09", causal_ok=False)
class ScatteredLinearAttention(KernelAttention):
    """Scattered linear attention (ScatterFormer): ReLU linear attention inside the windows of a packed sequence.

    P09 "ScatterFormer" (voxels sorted by window, one packed sequence, no padding). Per window w and head:
        KV_w = sum_{j in w} K'_j V_j^T,  s_w = sum_{j in w} K'_j,  y_i = Q'_i KV_w(i) / (Q'_i . s_w(i) + 1e-6)
    with Q' = ReLU(Q), K' = ReLU(K), then the output projection. `seqlens` are cumulative window offsets of the
    single packed sequence (batch 1), e.g. tensor([0, 5, 12, 20]); the window sums are segment sums (index_add)
    over `chunk_size` tokens at a time, so memory is O(windows + chunk), with no padding and no loop over
    windows. Rotary positions count from each window's start. Without `seqlens` every sequence is one window.
    Bidirectional only. x (1, N, D) -> (1, N, D). Source read for facts: the P09 fact sheet (the official code,
    skyhehe123/ScatterFormer scatterformer.py, uses Triton kernels over the sorted segments).
    """

    mixer_name = "scattered"
    supports_context = False
    takes_seqlens = True

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, chunk_size: int = 512, eps: float = 1e-6,
                 head_dim: int | None = None, bias: bool = False):
        if causal:
            raise FormersError("mixer 'scattered' is bidirectional (each window sees all its tokens); "
                               "use it in an encoder")
        super().__init__(dim, heads, causal, head_dim, bias)
        _check_positive("scattered", chunk_size=chunk_size)
        self.chunk_size, self.eps = chunk_size, eps

    def windows(self, seqlens: torch.Tensor, n: int) -> torch.Tensor:
        """Validate cumulative offsets and return each token's window id (n,)."""
        if seqlens.dim() != 1 or seqlens.dtype.is_floating_point or seqlens.numel() < 2:
            raise FormersError("mixer 'scattered': seqlens must be a 1-D integer tensor of cumulative offsets "
                               f"like tensor([0, 5, 12]), got {tuple(seqlens.shape)} {seqlens.dtype}")
        counts = seqlens.diff()
        if int(seqlens[0]) != 0 or int(seqlens[-1]) != n or bool((counts < 0).any()):
            raise FormersError(f"mixer 'scattered': seqlens must start at 0, never decrease and end at the "
                               f"sequence length {n}; got {seqlens.tolist()}")
        return torch.repeat_interleave(torch.arange(len(counts), device=seqlens.device), counts)

    def token_positions(self, n: int, past: int, seqlens: torch.Tensor | None, device) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        if seqlens is None:
            return pos
        seqlens = seqlens.to(device)
        return pos - seqlens[self.windows(seqlens, n)]  # positions inside each window

    def mix(self, h: Heads) -> torch.Tensor:
        qf, kf = F.relu(h.q), F.relu(h.k)  # (B, H, N, Dh)
        if h.seqlens is None:
            num, den = self.kernel_sums(qf, kf, h.v, h, self.chunk_size)
            return num / (den[..., None] + self.eps)
        B, H, N, Dh = qf.shape
        if B != 1:
            raise FormersError(f"mixer 'scattered': packed windows (seqlens) need batch size 1, got {B}")
        seg = self.windows(h.seqlens.to(qf.device), N)  # (N,)
        if h.key_mask is not None:
            kf = kf.masked_fill(~h.key_mask[:, None, :, None], 0.0)
        q1 = qf[0].transpose(0, 1)  # (N, H, F)
        k1 = kf[0].transpose(0, 1)  # (N, H, F)
        v1 = torch.cat([h.v, h.v.new_ones(B, H, N, 1)], -1)[0].transpose(0, 1)  # (N, H, Dv + 1): ones -> s_w
        kv = q1.new_zeros(len(h.seqlens) - 1, H, Dh, Dh + 1)  # (W, H, F, Dv + 1): KV_w and s_w
        T = self.chunk_size
        for a in range(0, N, T):  # segment sums, a chunk of tokens at a time
            kv.index_add_(0, seg[a:a + T], k1[a:a + T, :, :, None] * v1[a:a + T, :, None, :])
        out = torch.cat([torch.einsum("thf,thfd->thd", q1[a:a + T], kv[seg[a:a + T]])
                         for a in range(0, N, T)])  # (N, H, Dv + 1)
        out = out.transpose(0, 1)[None]  # (1, H, N, Dv + 1)
        return out[..., :-1] / (out[..., -1:] + self.eps)
