"""Three efficient-attention baselines of the Long Range Arena (P29): Synthesizer, Reformer (LSH) and Sinkhorn.

    synthesizer: softmax(B) V with B synthesised from each token alone (dense) or learned outright (random)
    reformer:    shared-QK attention restricted to angular-LSH buckets, sorted and chunked, several hash rounds
    sinkhorn:    block-local attention plus attention to a soft-permuted (Sinkhorn-sorted) block of keys

Each is written from its original paper (cited per class); the LRA code (google-research/long-range-arena,
`lra_benchmarks/models/*/*_attention.py`, Apache-2.0) was read for defaults only. Tests compare every mixer with
a naive loop implementation of the same definition in float64.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.attention import KVCache, attention_mask
from formers.registry import FormersError, register


def _attend(scores: torch.Tensor, allowed: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ v over the keys `allowed` (bool, broadcastable to scores; None = all keys).

    A row with no allowed key is computed over all keys (finite values and gradients) and then zeroed."""
    if allowed is None:
        return scores.softmax(-1) @ v
    empty = ~allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~(allowed | empty), float("-inf"))
    return (scores.softmax(-1) @ v).masked_fill(empty, 0.0)


def sinkhorn(logits: torch.Tensor, iters: int, temperature: float = 1.0) -> torch.Tensor:
    """Sinkhorn normalisation (Sinkhorn 1964; Adams & Zemel 2011) of (..., n, n) logits, in log space.

    S^0 = exp(logits / temperature);  S^k = F_c(F_r(S^{k-1})) with F_r / F_c dividing by row / column sums.
    The result tends to a doubly-stochastic matrix as `iters` grows (columns sum to 1 exactly after each step)."""
    log_p = logits / temperature
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(-1, keepdim=True)  # rows
        log_p = log_p - log_p.logsumexp(-2, keepdim=True)  # columns
    return log_p.exp()


class _LRAMixer(nn.Module):
    """Shared by the three mixers: head bookkeeping, argument checks and the output projection W_o."""

    mixer_name = ""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        if heads <= 0 or dim % heads:
            raise FormersError(f"mixer: dim={dim} is not divisible by heads={heads}; change heads")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, dim // heads, causal
        self.scale = self.head_dim ** -0.5
        self.out = nn.Linear(dim, dim, bias=False)

    def _reject(self, cache, context, seqlens, unused, *, cache_ok: bool = False) -> None:
        name = self.mixer_name
        if unused:
            raise FormersError(f"{name} mixer got unsupported arguments: {sorted(unused)}")
        if seqlens is not None:
            raise FormersError(f"the {name} mixer does not take packed `seqlens`; pad the batch and pass `mask`")
        if context is not None:
            raise FormersError(f"the {name} mixer is self-attention only; it takes no `context` "
                               "(use the softmax mixer for cross-attention)")
        if cache is not None and not (cache_ok and self.causal):
            raise FormersError(f"the {name} mixer has no incremental form here; decode without a cache")

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, N, Dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, N, H * Dh))  # (B, N, D)

    def _check_mask(self, mask: torch.Tensor | None, B: int, Nk: int) -> None:
        if mask is not None and tuple(mask.shape) != (B, Nk):
            raise FormersError(f"attention mask must have shape (batch, keys) = ({B}, {Nk}), got {tuple(mask.shape)}")


# ------------------------------------------------------------------------------------------------- synthesizer


@register("mixer", "synthesizer", paper="P29", causal_ok=True, max_len=True)
class SynthesizerAttention(_LRAMixer):
    """Synthesizer attention: attention weights synthesised without query-key dot products.

    Tay et al. 2020, "Synthesizer: Rethinking Self-Attention for Transformer Models" (arXiv 2005.00743), an LRA
    (P29) baseline. Per head h, Y_h = softmax(B_h) V_h with V_h = x W_v,h and logits B_h (N, N):
      dense:             B_h[i] = W2_h relu(W1 x_i + b1)_h + b2_h   (Sec. 3.1; W1 is D x D, head h reads its
                         Dh-slice of the hidden layer, W2_h is Dh x max_len, so W2 is D x max_len as in the paper)
      random:            B_h = R_h, a max_len x max_len matrix, learned or fixed (`trainable`; Sec. 3.2)
      factorized_random: B_h = R1_h R2_h^T with R1_h, R2_h of shape max_len x `rank` (Sec. 3.2)
    `vanilla` adds the dot-product logits q k^T / sqrt(Dh) (the paper's "+ Vanilla" mixtures; summed as in the
    LRA code, whose LRA Table 1 Synthesizer is kind="random", vanilla=True). Shorter inputs use the top-left
    N x N block; causal masks j > i before the softmax. Relative positions: RoPE rotates q, k of the vanilla
    part; ALiBi adds its bias to the logits. x (B, N, D) -> (B, N, D), N <= max_len.
    """

    mixer_name = "synthesizer"

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, max_len: int = 512,
                 kind: Literal["dense", "random", "factorized_random"] = "dense", trainable: bool = True,
                 rank: int = 8, vanilla: bool = False):
        super().__init__(dim, heads, causal)
        if kind not in ("dense", "random", "factorized_random"):
            raise FormersError(f"mixer: synthesizer kind must be 'dense', 'random' or 'factorized_random', "
                               f"got {kind!r}")
        if max_len <= 0 or rank <= 0:
            raise FormersError(f"mixer: synthesizer needs max_len > 0 and rank > 0 (got {max_len}, {rank})")
        if kind == "dense" and not trainable:
            raise FormersError("mixer: synthesizer trainable=False fixes the random matrices; use kind='random'")
        self.kind, self.max_len, self.vanilla = kind, max_len, vanilla
        H, Dh, L = heads, self.head_dim, max_len
        self.v = nn.Linear(dim, dim, bias=False)
        if vanilla:
            self.qk = nn.Linear(dim, 2 * dim, bias=False)
        if kind == "dense":
            self.w1 = nn.Linear(dim, dim)
            bound = Dh ** -0.5  # nn.Linear's default init for a Dh -> max_len layer
            self.w2 = nn.Parameter(torch.empty(H, Dh, L).uniform_(-bound, bound))
            self.b2 = nn.Parameter(torch.zeros(H, L))
        else:
            shapes = [(H, L, L)] if kind == "random" else [(H, L, rank), (H, L, rank)]
            for i, shape in enumerate(shapes):
                t = torch.empty(shape)
                for h in range(H):  # Xavier-uniform per head, the LRA code's initialiser
                    nn.init.xavier_uniform_(t[h])
                name = "r" if kind == "random" else f"r{i + 1}"
                if trainable:
                    setattr(self, name, nn.Parameter(t))
                else:
                    self.register_buffer(name, t)

    def _synthetic(self, x: torch.Tensor, past: int, total: int) -> torch.Tensor:
        """Logits for queries past..total-1 over keys 0..total-1: (B, H, N, total)."""
        B, N, _ = x.shape
        if self.kind == "dense":
            h = F.relu(self.w1(x)).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
            return torch.einsum("bhnd,hdl->bhnl", h, self.w2[..., :total]) + self.b2[:, None, :total]
        if self.kind == "random":
            logits = self.r[:, past:total, :total]  # (H, N, total)
        else:
            logits = self.r1[:, past:total] @ self.r2[:, :total].transpose(-1, -2)  # (H, N, total)
        return logits[None].expand(B, -1, -1, -1)  # (B, H, N, total)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        self._reject(cache, context, seqlens, unused, cache_ok=True)
        B, N, _ = x.shape
        past = cache.length if cache is not None else 0
        total = past + N
        if total > self.max_len:
            raise FormersError(f"synthesizer: sequence of {total} tokens exceeds its max_len={self.max_len} "
                               "(its attention logits are defined over max_len positions); raise model.max_len")
        self._check_mask(mask, B, total)
        q_pos = torch.arange(past, total, device=x.device)
        k_pos = torch.arange(total, device=x.device)
        scores = self._synthetic(x, past, total)  # (B, H, N, total)
        v = self._split(self.v(x))  # (B, H, N, Dh)
        if self.vanilla:
            q, k = self.qk(x).view(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
            if positions is not None:
                q, k = positions.rotate(q, k, q_pos, q_pos)
        if cache is not None:  # keep values (and vanilla keys) of every token seen so far
            if past:
                v = torch.cat([cache.state["v"], v], dim=2)  # (B, H, total, Dh)
                if self.vanilla:
                    k = torch.cat([cache.state["k"], k], dim=2)
            cache.state["v"] = v
            if self.vanilla:
                cache.state["k"] = k
            cache.advance(N)
        if self.vanilla:
            scores = scores + (q @ k.transpose(-1, -2)) * self.scale
        if positions is not None and positions.has_bias:
            scores = scores + positions.bias(q_pos, k_pos, self.heads).to(scores.dtype)
        allowed = attention_mask(N, total, causal=self.causal, past=past, key_mask=mask, device=x.device)
        return self._merge(_attend(scores, allowed, v))


# ---------------------------------------------------------------------------------------------------- reformer


@register("mixer", "reformer", paper="P29", causal_ok=True)
class ReformerAttention(_LRAMixer):
    """Reformer LSH attention: shared-QK attention within angular-LSH buckets, sorted and chunked.

    Kitaev, Kaiser & Levskaya 2020, "Reformer: The Efficient Transformer" (ICLR 2020, Sec. 2), an LRA (P29)
    baseline. Per head and hash round r: q = x W_qk, keys k_j = q_j / |q_j| (shared QK); bucket
    h_r(x) = argmax([x R_r ; -x R_r]) with a random rotation R_r (Dh x buckets/2). Tokens are sorted by
    (bucket, position) and cut into chunks of `chunk` slots; query i may attend key j iff they share the bucket
    and j's chunk is i's chunk or the one before (no wrap-around), j is not padding, and j <= i when causal. Self
    gets a -1e5 penalty: it is attended only when nothing else is. Rounds combine as in the paper:
    o_i = sum_r exp(z_i^r - z_i) o_i^r, z = logsumexp of the scores, each score lowered by log N_ij (N_ij = rounds
    in which i may attend j), so the result is exactly softmax over the union of the rounds' key sets.

    Causal chunking: sorted positions depend on the count of later tokens in lower buckets, which would leak
    the future, so when causal every bucket starts a new chunk (chunks are cut per bucket by position): then
    i's keys depend only on tokens <= i. Bidirectional chunking is the paper's (one global sorted order).
    Rotations are drawn once from `seed` (a buffer, saved with the model); `redraw` draws fresh ones at every
    training forward as the paper does. Scores use 1/sqrt(Dh). No exact incremental form: `supports_cache` is
    False. RoPE rotates q; ALiBi is rejected. x (B, N, D) -> (B, N, D); cost O(N * chunk * hashes).
    """

    mixer_name = "reformer"
    takes_bias = False  # no per-key score matrix to add a relative position bias (ALiBi) to; checked at build
    supports_cache = False
    self_penalty = 1e5  # the paper's value for masking attention to self

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, buckets: int = 8, chunk: int = 16,
                 hashes: int = 2, seed: int = 0, redraw: bool = False):
        super().__init__(dim, heads, causal)
        if buckets < 2 or buckets % 2:
            raise FormersError(f"mixer: reformer buckets must be an even number >= 2, got {buckets}")
        if chunk <= 0 or hashes <= 0:
            raise FormersError(f"mixer: reformer chunk and hashes must be positive (got {chunk}, {hashes})")
        self.buckets, self.chunk, self.hashes, self.redraw = buckets, chunk, hashes, redraw
        self.qk = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("rotations", torch.randn(heads, hashes, self.head_dim, buckets // 2, generator=g))

    def hash(self, qk: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Bucket ids (B, H, R, N) in 0..buckets-1 of qk (B, H, N, Dh); padding tokens get the extra id `buckets`."""
        rot = self.rotations
        if self.redraw and self.training:
            rot = torch.randn_like(rot)
        proj = torch.einsum("bhnd,hrdk->bhrnk", qk.detach(), rot.to(qk.dtype))  # (B, H, R, N, buckets/2)
        ids = torch.cat([proj, -proj], dim=-1).argmax(-1)  # (B, H, R, N)
        return ids.masked_fill(~valid[:, None, None, :], self.buckets)

    def slots(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Slot of every token (B, H, R, N) in the sorted, chunked layout, and the number of slots S."""
        N, m, nb = ids.shape[-1], self.chunk, self.buckets + 1
        pos = torch.arange(N, device=ids.device)
        order = torch.argsort(ids * N + pos, dim=-1)  # sort by (bucket, position)
        sorted_at = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))  # (B, H, R, N)
        if not self.causal:
            return sorted_at, -(-N // m) * m
        counts = torch.zeros(*ids.shape[:-1], nb, dtype=torch.long, device=ids.device)
        counts.scatter_add_(-1, ids, torch.ones_like(ids))  # tokens per bucket (B, H, R, nb)
        rank = sorted_at - (counts.cumsum(-1) - counts).gather(-1, ids)  # rank inside its bucket
        padded = -(-counts // m) * m  # every bucket starts a fresh chunk
        start = padded.cumsum(-1) - padded
        S = -(-(N + min(nb, N) * (m - 1)) // m) * m  # enough for any bucket sizes
        return start.gather(-1, ids) + rank, S

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        self._reject(cache, context, seqlens, unused)
        B, N, _ = x.shape
        H, R, m, Dh = self.heads, self.hashes, self.chunk, self.head_dim
        self._check_mask(mask, B, N)
        pos = torch.arange(N, device=x.device)
        qk = self._split(self.qk(x))  # (B, H, N, Dh)
        v = self._split(self.v(x))  # (B, H, N, Dh)
        if positions is not None:
            if positions.has_bias:
                raise FormersError("reformer: attends within hashed chunks and cannot add a score bias; "
                                   "use position=rope, learned or sinusoidal, not alibi")
            qk, _ = positions.rotate(qk, qk, pos, pos)
        k = F.normalize(qk, dim=-1)
        valid = mask.bool() if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)

        ids = self.hash(qk, valid)  # (B, H, R, N)
        slot, S = self.slots(ids)  # (B, H, R, N)
        C = S // m
        tok = torch.full((B, H, R, S), N, dtype=torch.long, device=x.device)  # token in each slot; N = empty
        tok.scatter_(-1, slot, pos.expand(B, H, R, N))
        filled = tok < N
        tok_c = tok.clamp(max=N - 1)

        def to_slots(t: torch.Tensor) -> torch.Tensor:  # (B, H, N, Dh) -> (B, H, R, C, m, Dh)
            return torch.take_along_dim(t[:, :, None], tok_c[..., None], dim=3).view(B, H, R, C, m, Dh)

        def window(t: torch.Tensor) -> torch.Tensor:  # (B, H, R, C, m, ...) -> (B, H, R, C, 2m, ...)
            """Keys of a query chunk: the previous chunk's slots, then its own."""
            return torch.cat([t.roll(1, dims=3), t], dim=4)

        q_s, k_w, v_w = to_slots(qk), window(to_slots(k)), window(to_slots(v))
        key_ok = filled & valid.gather(1, tok_c.view(B, -1)).view(B, H, R, S)  # (B, H, R, S)
        q_tok, k_tok = tok.view(B, H, R, C, m), window(tok.view(B, H, R, C, m))
        q_id = ids.gather(-1, tok_c).view(B, H, R, C, m)
        k_id = window(q_id)
        first_half = torch.arange(2 * m, device=x.device) < m
        not_first = torch.arange(C, device=x.device) > 0
        chunk_ok = ~first_half | not_first[:, None]  # (C, 2m): chunk 0 has no previous chunk
        allowed = (window(key_ok.view(B, H, R, C, m))[..., None, :] & chunk_ok[:, None, :]
                   & (q_id[..., :, None] == k_id[..., None, :]))  # (B, H, R, C, m, 2m)
        if self.causal:
            allowed = allowed & (k_tok[..., None, :] <= q_tok[..., :, None])

        scores = (q_s @ k_w.transpose(-1, -2)) * self.scale  # (B, H, R, C, m, 2m)
        is_self = k_tok[..., None, :] == q_tok[..., :, None]
        penalty = min(self.self_penalty, torch.finfo(scores.dtype).max / 4)
        scores = scores - penalty * is_self.to(scores.dtype)
        if R > 1:
            scores = scores - self._round_counts(ids, slot, q_tok, k_tok, allowed).to(scores.dtype).log()
        empty = ~allowed.any(-1, keepdim=True)  # (B, H, R, C, m, 1)
        scores = scores.masked_fill(~(allowed | empty), float("-inf"))
        lse = scores.logsumexp(-1, keepdim=True)  # (B, H, R, C, m, 1)
        o = (scores - lse).exp() @ v_w  # (B, H, R, C, m, Dh)

        # back to token order: per round outputs (B, H, R, N, Dh) and log-normalisers (B, H, R, N)
        o = torch.take_along_dim(o.view(B, H, R, S, Dh), slot[..., None], dim=3)
        lse = torch.take_along_dim(lse.view(B, H, R, S), slot, dim=3)
        empty = torch.take_along_dim(empty.view(B, H, R, S), slot, dim=3)
        lse = lse.masked_fill(empty, float("-inf"))
        none = empty.all(2, keepdim=True)  # (B, H, 1, N): no key in any round
        w = lse.masked_fill(none, 0.0).softmax(2)  # (B, H, R, N) round weights exp(z^r - z)
        y = (w[..., None] * o).sum(2).masked_fill(none[:, :, 0, :, None], 0.0)  # (B, H, N, Dh)
        return self._merge(y)

    def _round_counts(self, ids, slot, q_tok, k_tok, allowed) -> torch.Tensor:
        """N_ij: in how many rounds query token i may attend key token j (same bucket and chunk rule),
        for every window entry (B, H, R, C, m, 2m); 1 where not allowed (those scores are masked anyway)."""
        B, H, R, C, m = q_tok.shape
        N = ids.shape[-1]
        chunk = slot // self.chunk  # (B, H, R, N)
        info = torch.stack([ids, chunk], dim=-1).transpose(2, 3)  # (B, H, N, R, 2)

        def per_round(tok: torch.Tensor) -> torch.Tensor:  # token ids (B, H, R, C, w) -> (B, H, R, C, w, R, 2)
            flat = tok.clamp(max=N - 1).reshape(B, H, -1)  # (B, H, R*C*w)
            got = torch.take_along_dim(info, flat[..., None, None], dim=2)  # (B, H, R*C*w, R, 2)
            return got.view(*tok.shape, R, 2)

        qi, ki = per_round(q_tok)[..., :, None, :, :], per_round(k_tok)[..., None, :, :, :]
        same = qi[..., 0] == ki[..., 0]
        gap = qi[..., 1] - ki[..., 1]
        counts = (same & ((gap == 0) | (gap == 1))).sum(-1)  # (B, H, R, C, m, 2m)
        return torch.where(allowed, counts, 1)


# ---------------------------------------------------------------------------------------------------- sinkhorn


@register("mixer", "sinkhorn", paper="P29", causal_ok=False, max_len=True)
class SinkhornAttention(_LRAMixer):
    """Sparse Sinkhorn attention: each query block attends to its own block and a Sinkhorn-sorted key block.

    Tay et al. 2020, "Sparse Sinkhorn Attention" (ICML 2020, Sec. 3), an LRA (P29) baseline. Per head, split
    q, k, v into NB = ceil(N / block) blocks (padding masked). SortNet (Sec. 3.1): block summaries s_j = sum of
    the block's keys (per-head keys as in the LRA code), logits R = relu(W_B relu(W_P s + b_P) + b_B) of shape
    NB x NB (W_B has max_len / block outputs; the first NB are used), P = Sinkhorn(R / temperature, iters)
    (`sinkhorn` above). Sorted blocks K'_i = sum_j P_ij K_j, V'_i likewise. Query block i attends, in one
    softmax, to [K_i ; K'_i] with values [V_i ; V'_i] (local + sorted, Sec. 3.2). Padded keys are zeroed before
    summaries and sorting and masked in the local part; a sorted slot is masked when every block is padding
    there. With a single block this is exactly full softmax attention. Bidirectional only (the paper's causal
    Sinkhorn balancing is not implemented). Defaults: temperature 0.75 and 5 iterations (sinkhorn-transformer's;
    the paper tunes both), block 32 (LRA's code uses 50). RoPE rotates q, k; ALiBi is rejected.
    x (B, N, D) -> (B, N, D), N <= max_len; cost O(N * block).
    """

    mixer_name = "sinkhorn"
    takes_bias = False  # no per-key score matrix to add a relative position bias (ALiBi) to; checked at build

    def __init__(self, dim: int, heads: int = 8, causal: bool = False, max_len: int = 512, block: int = 32,
                 iters: int = 5, temperature: float = 0.75):
        super().__init__(dim, heads, causal)
        if causal:
            raise FormersError("mixer: sinkhorn is bidirectional only; use it in an encoder")
        if block <= 0 or iters <= 0 or temperature <= 0 or max_len <= 0:
            raise FormersError(f"mixer: sinkhorn needs block, iters, temperature and max_len > 0 "
                               f"(got {block}, {iters}, {temperature}, {max_len})")
        self.max_len, self.block, self.iters, self.temperature = max_len, block, iters, temperature
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.sort_hidden = nn.Linear(self.head_dim, self.head_dim)
        self.sort_out = nn.Linear(self.head_dim, -(-max_len // block))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        self._reject(cache, context, seqlens, unused)
        B, N, _ = x.shape
        H, Dh, b = self.heads, self.head_dim, self.block
        if N > self.max_len:
            raise FormersError(f"sinkhorn: sequence of {N} tokens exceeds its max_len={self.max_len} "
                               "(the sorting network has max_len / block outputs); raise model.max_len")
        self._check_mask(mask, B, N)
        q = self._split(self.q(x))  # (B, H, N, Dh)
        k, v = self.kv(x).view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        if positions is not None:
            if positions.has_bias:
                raise FormersError("sinkhorn: sorted key blocks mix positions, so it cannot add a score bias; "
                                   "use position=rope, learned or sinusoidal, not alibi")
            pos = torch.arange(N, device=x.device)
            q, k = positions.rotate(q, k, pos, pos)
        NB = -(-N // b)
        pad = NB * b - N
        valid = mask.bool() if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
        valid = F.pad(valid, (0, pad), value=False)  # (B, NB*b)
        keep = valid[:, None, :, None].to(k.dtype)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        k, v = k * keep, v * keep  # padded keys carry nothing into the summaries or the sorted blocks
        qb, kb, vb = (t.view(B, H, NB, b, Dh) for t in (q, k, v))  # (B, H, NB, b, Dh)

        summary = kb.sum(3)  # (B, H, NB, Dh)
        logits = F.relu(self.sort_out(F.relu(self.sort_hidden(summary))))[..., :NB]  # (B, H, NB, NB)
        perm = sinkhorn(logits, self.iters, self.temperature)  # (B, H, NB, NB), row i mixes blocks j
        k_sorted = torch.einsum("bhij,bhjsd->bhisd", perm, kb)  # (B, H, NB, b, Dh)
        v_sorted = torch.einsum("bhij,bhjsd->bhisd", perm, vb)
        validb = valid.view(B, 1, NB, b)
        sorted_ok = torch.einsum("bhij,bzjs->bhis", perm, validb.to(perm.dtype)) > 0  # (B, H, NB, b)

        keys = torch.cat([kb, k_sorted], dim=3)  # (B, H, NB, 2b, Dh)
        vals = torch.cat([vb, v_sorted], dim=3)
        allowed = torch.cat([validb.expand(B, H, NB, b), sorted_ok], dim=-1)[..., None, :]  # (B, H, NB, 1, 2b)
        scores = (qb @ keys.transpose(-1, -2)) * self.scale  # (B, H, NB, b, 2b)
        y = _attend(scores, allowed, vals).view(B, H, NB * b, Dh)[:, :, :N]  # (B, H, N, Dh)
        return self._merge(y)
