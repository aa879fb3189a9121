"""Softmax attention with a modified softmax, gate, temperature or input convolution (family `mixer`).

Each mixer is a `SoftmaxAttention` subclass that replaces one piece through its hooks: `probs` (the weights from
the scores, explicit path), `output_mod` (per-head outputs before the output projection) or `project` (the q/kv
projections). Masks, KV cache, GQA, cross-attention and relative positions come from the base class unchanged.

    clipped_softmax  P58  clip((zeta - gamma) softmax(s) + gamma, 0, 1)
    gated            P58  sigmoid(G_h(x_h)) * softmax(q k^T / sqrt(d)) v, per head and token
    hard, topk       P27  one-hot argmax (straight-through) / softmax over the k largest scores
    temperature      P32  softmax(q k^T / (sqrt(d) T)) v through SDPA
    stickbreaking    P24  a_ij = sigmoid(s_ij) prod_{j<m<=i} (1 - sigmoid(s_im)), causal only
    mdha             P79  causal depthwise conv (width 3) on q, k, v, then SDPA
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.attention import KVCache, SoftmaxAttention
from formers.registry import FormersError, register


@register("mixer", "clipped_softmax", paper="P58", causal_ok=True)
class ClippedSoftmaxAttention(SoftmaxAttention):
    """Attention with the clipped softmax, which can give exact zeros (and zero gradient) from finite scores.

    P58 "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing", Eq. 4.1:
        A = clip((zeta - gamma) * softmax(s) + gamma, 0, 1),   gamma <= 0, zeta >= 1.
    Weights p < -gamma / (zeta - gamma) become exactly 0; rows sum to <= 1 when zeta = 1.
    Defaults gamma = -0.025, zeta = 1 are the BERT setting of the official code (Qualcomm-AI-research/
    outlier-free-transformers, `softmax.py`, `scripts/bert_base_clipped_softmax.sh`). With `alpha` set,
    gamma = -alpha / T as in the OPT runs, T = the number of keys the query row sees (the official code divides by
    the fixed max_seq_length instead; per-row T keeps cached decoding equal to the full pass). Explicit path.
    x (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0,
                 gamma: float = -0.025, zeta: float = 1.0, alpha: float | None = None):
        super().__init__(dim, heads, causal, kv_heads, head_dim, bias, dropout)
        if gamma > 0 or zeta < 1:
            raise FormersError(f"mixer: clipped_softmax needs gamma <= 0 and zeta >= 1 (got gamma={gamma}, "
                               f"zeta={zeta}); the paper uses gamma=-0.025, zeta=1")
        if alpha is not None and alpha < 0:
            raise FormersError(f"mixer: clipped_softmax alpha must be >= 0 (gamma = -alpha / T), got {alpha}")
        self.gamma, self.zeta, self.alpha = gamma, zeta, alpha

    def probs(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        p = super().probs(scores, allowed)  # (B, H, Nq, Nk); masked keys are exactly 0 and stay 0 after clipping
        gamma: float | torch.Tensor = self.gamma
        if self.alpha is not None:
            seen = scores.shape[-1] if allowed is None else allowed.sum(-1, keepdim=True).to(p.dtype)
            gamma = -self.alpha / seen  # (B or 1, 1, Nq, 1): T = keys visible to each query
        return torch.clamp((self.zeta - gamma) * p + gamma, 0.0, 1.0)


@register("mixer", "gated", paper="P58", causal_ok=True)
class GatedAttention(SoftmaxAttention):
    """Gated attention: each head's output is scaled by a sigmoid gate computed from that head's slice of the input.

    P58 "Quantizable Transformers", Sec. 4.2, `conditional_per_token` gate of the official code
    (`opt_attention.py`): out_h = sigmoid(x_h w_h + b_h) * softmax(q_h k_h^T / sqrt(d_h)) v_h, then W_o, where
    x_h (B, N, Dh) is head h's slice of the layer input and w_h (Dh,), b_h are per head. The bias starts at
    logit(gate_init) (the OPT runs use gate_init = 0.25; None keeps the default Linear init). A gate near 0 lets a
    head do nothing without pushing its scores to extremes. Attention itself goes through SDPA.
    x (B, N, D) -> (B, N, D), needs D = heads * head_dim.
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0,
                 gate_init: float | None = 0.25):
        super().__init__(dim, heads, causal, kv_heads, head_dim, bias, dropout)
        if self.heads * self.head_dim != dim:
            raise FormersError(f"mixer: gated attention gates each head from its slice of the input, so it needs "
                               f"heads * head_dim = dim (got {self.heads} * {self.head_dim} != {dim})")
        if gate_init is not None and not 0.0 < gate_init < 1.0:
            raise FormersError(f"mixer: gate_init is the initial gate probability, in (0, 1); got {gate_init}")
        bound = self.head_dim ** -0.5  # nn.Linear(head_dim, 1)'s default init range
        self.gate_weight = nn.Parameter(torch.empty(self.heads, self.head_dim).uniform_(-bound, bound))
        if gate_init is None:
            self.gate_bias = nn.Parameter(torch.empty(self.heads).uniform_(-bound, bound))
        else:
            self.gate_bias = nn.Parameter(torch.full((self.heads,), math.log(gate_init / (1 - gate_init))))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Gate probabilities (B, H, N, 1) from the layer input x (B, N, D)."""
        B, N, _ = x.shape
        xh = x.view(B, N, self.heads, self.head_dim)  # (B, N, H, Dh): head h reads its own slice
        logit = torch.einsum("bnhd,hd->bhn", xh, self.gate_weight) + self.gate_bias[:, None]  # (B, H, N)
        return torch.sigmoid(logit)[..., None]

    def output_mod(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y * self.gate(x)


@register("mixer", "hard", paper="P27", causal_ok=True)
class HardAttention(SoftmaxAttention):
    """Hard attention: each query takes the value of its single highest-scoring visible key.

    P27 AxFormer "Accuracy-driven Approximation of Transformers" (selective hard attention; no official code):
        A_ij = 1 if j = argmax_j' s_ij' else 0 (first index on ties).
    Gradients are straight-through: the forward value is the one-hot row, the backward pass is that of
    softmax(s) (A = onehot + p - stopgrad(p)); `topk` with k=1 gives the same forward with zero score gradient.
    Explicit path. x (B, N, D) -> (B, N, D).
    """

    def probs(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = scores.softmax(-1)  # (B, H, Nq, Nk)
        onehot = torch.zeros_like(p).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)
        return onehot + (p - p.detach())  # value exactly one-hot, gradient of the softmax


@register("mixer", "topk", paper="P27", causal_ok=True)
class TopKAttention(SoftmaxAttention):
    """Top-k attention: softmax over only the k largest scores of each query row, zero weight elsewhere.

    P27 AxFormer (selective hard attention keeps the most relevant scores per query; the paper's k is not known,
    default 8 here): A_i = softmax(s_i restricted to topk_j(s_ij)). Rows with fewer than k visible keys keep
    them all, so k >= N equals dense softmax attention. Explicit path. x (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0, k: int = 8):
        super().__init__(dim, heads, causal, kv_heads, head_dim, bias, dropout)
        if k < 1:
            raise FormersError(f"mixer: topk needs k >= 1 keys per query, got k={k}")
        self.k = k

    def probs(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        idx = scores.topk(min(self.k, scores.shape[-1]), dim=-1).indices  # (B, H, Nq, k)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
        if allowed is not None:
            keep = keep & allowed  # short rows: topk also picked masked keys
        return scores.masked_fill(~keep, float("-inf")).softmax(-1)


@register("mixer", "temperature", paper="P32", causal_ok=True)
class TemperatureAttention(SoftmaxAttention):
    """Softmax attention with a temperature: T > 1 flattens the weights so that no single key (patch) dominates.

    P32 "Are Vision Transformers Robust to Patch Perturbations?" (temperature scaling against adversarial
    patches): A = softmax(q k^T / (sqrt(d_h) * T)). The paper's T was not retrieved, so the default T = 1 is plain
    softmax attention; set `temperature`. Runs through SDPA with scale = 1 / (sqrt(d_h) T). x (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0, temperature: float = 1.0):
        super().__init__(dim, heads, causal, kv_heads, head_dim, bias, dropout)
        if temperature <= 0:
            raise FormersError(f"mixer: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.scale = self.head_dim ** -0.5 / temperature


@register("mixer", "stickbreaking", paper="P24", causal_ok=True, bidirectional_ok=False)
class StickBreakingAttention(SoftmaxAttention):
    """Stick-breaking attention: the nearest keys take their share of the weight first, no softmax; causal only.

    P24 "ModuleFormer: Learning Modular Large Language Models From Uncurated Data" (IBM/ModuleFormer
    `modeling_moduleformer.py`, via the fact sheet):
        beta_ij = sigmoid(s_ij),  s_ij = q_i k_j / sqrt(d_h) (+ position bias),
        A_ij = beta_ij * prod_{j < m <= i} (1 - beta_im)    for j <= i (the diagonal is included), else 0.
    Computed in log space: log A_ij = -softplus(-s_ij) - sum_{j<m<=i} softplus(s_im), the sum a reverse cumsum over
    keys (no loop over tokens). Rows sum to 1 - prod_m (1 - beta_im) <= 1; padded keys take no share and break no
    stick. Explicit path, O(N^2). x (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = True, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0):
        if not causal:
            raise FormersError("mixer: stickbreaking attention is defined only for causal models (each query "
                               "breaks the stick over its preceding keys); use it in an lm, not an encoder")
        super().__init__(dim, heads, causal, kv_heads, head_dim, bias, dropout)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, **kw) -> torch.Tensor:
        if context is not None:
            raise FormersError("the stickbreaking mixer orders keys by position and has no cross-attention; "
                               "use softmax for a context")
        return super().forward(x, **kw)

    def probs(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        # allowed is never None here: the mixer is causal and takes no context
        log_keep = (-F.softplus(scores)).masked_fill(~allowed, 0.0)  # log(1 - beta_im); masked keys break nothing
        after = log_keep.flip(-1).cumsum(-1).flip(-1)  # (B, H, Nq, Nk): sum over m >= j
        after = F.pad(after[..., 1:], (0, 1))  # sum over m > j (shifted, not subtracted: exact)
        return (after - F.softplus(-scores)).masked_fill(~allowed, float("-inf")).exp()


@register("mixer", "mdha", paper="P79", causal_ok=True)
class MultiDConvHeadAttention(SoftmaxAttention):
    """Multi-DConv-Head Attention: a width-3 depthwise convolution over the sequence after the Q, K and V projections.

    P79 "Primer: Searching for Efficient Transformers for Language Modeling" (google-research `primer/t5_models.py`
    via the fact sheet): per channel c of the flattened heads,
        causal:         u'_t = w0 u_t + w1 u_{t-1} + w2 u_{t-2}   (zeros before the start)
        bidirectional:  u'_t = w0 u_t + w1 u_{t-1} + w2 u_{t+1}   (zeros past both ends)
    for u in {q, k, v}; then softmax attention through SDPA. w has shape (3, channels) per projection, init
    (0.5, 1/6, 1/6); with w = (1, 0, 0) this is plain softmax attention. Padded tokens are zeroed before the
    convolution so they cannot leak into neighbours. Decoding keeps the last two projected inputs in
    cache.state. Self-attention only. x (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0):
        super().__init__(dim, heads, causal, kv_heads, head_dim, bias, dropout)
        init = torch.tensor([0.5, 1 / 6, 1 / 6])[:, None]  # (3, 1): taps current, previous, next/previous-but-one
        self.q_conv = nn.Parameter(init.repeat(1, self.heads * self.head_dim))  # (3, H*Dh)
        self.kv_conv = nn.Parameter(init.repeat(1, 2 * self.kv_heads * self.head_dim))  # (3, 2*Hkv*Dh)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, **kw) -> torch.Tensor:
        if context is not None:
            raise FormersError("the mdha mixer convolves along its own sequence and has no cross-attention; "
                               "use softmax for a context")
        return super().forward(x, **kw)

    def project(self, x: torch.Tensor, src: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        q, kv = self.q(x), self.kv(x)  # (B, N, H*Dh), (B, N, 2*Hkv*Dh)
        N = x.shape[1]
        if mask is not None:
            past = cache.length if cache is not None else 0
            if mask.shape != (x.shape[0], past + N):
                raise FormersError(f"attention mask must have shape (batch, keys) = ({x.shape[0]}, {past + N}), "
                                   f"got {tuple(mask.shape)}")
            keep = mask[:, past:, None].to(q.dtype)  # (B, N, 1): the new tokens' entries
            q, kv = q * keep, kv * keep
        state = cache.state if cache is not None else {}
        out = []
        for key, u, w in (("mdha_q", q, self.q_conv), ("mdha_kv", kv, self.kv_conv)):  # u (B, N, C), w (3, C)
            if not self.causal:
                pad = F.pad(u, (0, 0, 1, 1))  # (B, N + 2, C): one zero row at each end
                out.append(w[0] * u + w[1] * pad[:, :-2] + w[2] * pad[:, 2:])
                continue
            prev = state.get(key, u.new_zeros(u.shape[0], 2, u.shape[2]))  # the two inputs before u
            full = torch.cat([prev, u], dim=1)  # (B, N + 2, C)
            out.append(w[0] * full[:, 2:] + w[1] * full[:, 1:-1] + w[2] * full[:, :-2])
            if cache is not None:
                cache.state[key] = full[:, -2:]
        return out[0], out[1]


__all__ = [
    "ClippedSoftmaxAttention", "GatedAttention", "HardAttention", "TopKAttention", "TemperatureAttention",
    "StickBreakingAttention", "MultiDConvHeadAttention",
]
