"""Softmax attention, the baseline token mixer (Vaswani et al., "Attention Is All You Need").

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_h) + B) V,  per head, B = relative-position bias or mask.

The fast path is `F.scaled_dot_product_attention` (`is_causal=True` rather than a mask tensor where it can);
the explicit path materialises the score matrix for subclasses that modify it (`score_mod`). Both are tested
against a naive softmax(QK^T)V written in the tests. Further fast paths (issue 10; tests/test_fast_paths.py checks
each against the plain computation):

- fused QKV: in training, self-attention takes q, k, v from one matmul with the stacked weight [W_q; W_kv] (the
  parameters stay `q` and `kv`); skipped when `project` is overridden or q/kv are not plain hook-free nn.Linear;
- no mask tensor when nothing is masked: a single causal query (a decoding step) sees every cached key;
- GQA through SDPA's `enable_gqa` (torch >= 2.5) instead of copying the shared key/value heads;
- `KVCache` writes decoded keys/values into a pre-allocated buffer instead of re-concatenating them;
- causal training on a CPU at lengths CAUSAL_BLOCKS_LEN: `BlockCausalAttention`, the scores in row blocks of
  `causal_block` queries, each block only against the keys it may see, with batched matmuls. Measured on a 2-core
  Xeon VM, the attention alone (benchmarks/attention_blocks.py, forward + backward from the fused QKV output):
  1.09-1.11x SDPA's CPU flash kernel at 256 tokens, 1.15-1.30x at 384-512, 1.01-1.09x at 768-1024 in two runs; at
  128-192 0.93-0.98x in one and 1.02-1.03x in the other, not a clear gain, so those keep SDPA. An earlier version
  of the kernel (blocks of 128, 0.95x flash alone at 256 tokens) made the benchmark LM's whole training step
  1.035-1.08x faster than flash in paired A/Bs; this one another 1.013-1.028x. Those are the PyTorch body's numbers;
- in float32 the same blocks run in C++ (`formers.nn.cpu_kernels`, formers/csrc/causal_attention.cpp), one (batch,
  head) pair per thread so that each pair's data stays in L2 between its matmuls: 1.56-1.67x SDPA's flash kernel at
  256 tokens, 1.63-1.72x at 384-512, 1.07-1.29x at 768 and 1.33-1.42x at 128 (where it starts,
  CAUSAL_KERNEL_FROM), in three runs of the same benchmark. It is built on first use with the system's g++; where it
  cannot be, the PyTorch body runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn import cpu_kernels
from formers.nn.hooks import autocast_on, forward_unpatched, functorch_active, hook_free, torch_at_least, vmapped
from formers.registry import FormersError, register


class Affine:
    """y -> y W^T + b for a weight and bias that are not a module's own (a folded bias): what `forward_split`
    returns in place of the output projection when it changed its bias (`linear_add` accumulates it too)."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return F.linear(y, self.weight, self.bias)


class KVCache:
    """Per-layer decoding cache. Softmax-style mixers keep keys and values (B, H_kv, L, Dh), appended along L with
    `update`; recurrent mixers (linear attention, ...) keep whatever they need in `state` and call `advance(n)`.
    `length` is the number of tokens seen so far (the position offset of the next token).

    Static storage: under `torch.no_grad()` (decoding) `update` writes into buffers (B, H_kv, capacity, Dh)
    allocated on the first update with room for `capacity` tokens (`LM.generate` asks for exactly the tokens it
    feeds: the prompt and every new token but the last) and doubled when full, so appending a token copies only
    that token. `k` / `v` are views of the filled
    part. With autograd recording (training through a cache) `update` concatenates instead, so that no tensor
    saved for backward is ever written in place. Assigning `cache.k = t` stores `t` with no spare room: the next
    update moves it into a fresh buffer, so a cache built from another cache's tensors (`_copy_cache`) never writes
    into the other's storage."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self._k: torch.Tensor | None = None  # storage (B, H, cap, Dh); the first `_n` positions are filled
        self._v: torch.Tensor | None = None
        self._n = 0
        self.state: dict[str, torch.Tensor] = {}
        self.length = 0

    def _filled(self, buf: torch.Tensor | None) -> torch.Tensor | None:
        """The filled part of a key or value buffer: a view of its first `_n` positions."""
        return buf if buf is None or buf.shape[2] == self._n else buf.narrow(2, 0, self._n)

    @property
    def k(self) -> torch.Tensor | None:
        return self._filled(self._k)

    @k.setter
    def k(self, t: torch.Tensor | None) -> None:
        self._k, self._n = t, 0 if t is None else t.shape[2]

    @property
    def v(self) -> torch.Tensor | None:
        return self._filled(self._v)

    @v.setter
    def v(self, t: torch.Tensor | None) -> None:
        self._v, self._n = t, 0 if t is None else t.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values (B, H, n, Dh); returns all of them (B, H, L, Dh); advances `length` to L."""
        start, end = self._n, self._n + k.shape[2]
        if torch.is_grad_enabled():  # autograd records: build new tensors, never write in place
            if self._k is None:
                self._k, self._v = k, v
            else:
                self._k, self._v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        else:
            if self._k is None or end > self._k.shape[2] or end > self._v.shape[2]:  # first update, or full
                room = max(end, self.capacity, 0 if self._k is None else 2 * self._k.shape[2])
                self._k, self._v = self._moved(self._k, k, room), self._moved(self._v, v, room)
            self._k.narrow(2, start, end - start).copy_(k)
            self._v.narrow(2, start, end - start).copy_(v)
        self._n = self.length = end
        return self.k, self.v

    def _moved(self, buf: torch.Tensor | None, new: torch.Tensor, room: int) -> torch.Tensor:
        """A fresh buffer (B, H, room, Dh) (shaped and typed like `new`) holding the filled part of `buf`."""
        out = new.new_empty(new.shape[0], new.shape[1], room, new.shape[3])
        if buf is not None and self._n:
            out.narrow(2, 0, self._n).copy_(buf.narrow(2, 0, self._n))
        return out

    def advance(self, n: int) -> None:
        """For mixers that keep a recurrent state instead of keys: n more tokens were consumed."""
        self.length += n


def check_key_mask(mask, batch: int, keys: int | tuple[int, ...], what: str = "attention mask") -> None:
    """A key mask (batch, keys), True or 1 = may attend, else a one-line FormersError: not a tensor, another shape
    (`keys`: the key count, or the counts allowed, e.g. with a cache the new keys alone or all of them, as some
    mixers take either), or a float mask with values other than 0 and 1 (an additive mask, 0 = keep and -inf =
    pad, would read inverted: pass `mask == 0`)."""
    if not isinstance(mask, torch.Tensor):
        raise FormersError(f"{what} must be a tensor (batch, keys) of True/1 = may attend, got {type(mask).__name__}")
    counts = (keys,) if isinstance(keys, int) else keys
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in counts:
        want = " or ".join(f"({batch}, {n})" for n in counts)
        raise FormersError(f"{what} must have shape (batch, keys) = {want}, got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point and bool(((mask != 0) & (mask != 1)).any()):
        raise FormersError(f"{what} is read as True/1 = may attend; a float mask must hold only 0 and 1 (an "
                           "additive mask of 0 = keep and -inf = pad would read inverted: pass `mask == 0`)")


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


CAUSAL_BLOCK = 64  # query rows per block of `BlockCausalAttention` up to CAUSAL_BLOCK_WIDE_FROM tokens; twice that
CAUSAL_BLOCK_WIDE_FROM = 513  # from there (measured: blocks of 64 faster at 256 and 512 tokens, 128 at 768)
CAUSAL_BLOCKS_LEN = (256, 768)  # sequence lengths at which CPU causal training takes it (SDPA outside)
# with the C++ kernel (float32, formers/csrc) from this length on; measured (benchmarks/attention_blocks.py, 2-core
# Xeon VM, batch 8, 4 heads, Dh 64): 1.33-1.42x SDPA at 128 tokens in three runs, 1.09 at 64 and 1.25 at 96 in one
CAUSAL_KERNEL_FROM = 128
# rows (batch x tokens) from which inference folds the value bias into the output bias (`_folds_kv_bias`): the fold
# is one small matrix-vector product per call, the bias it saves a pass over the (rows, 2 * kv dim) projection. At
# dim 192 on this machine's 2 threads the bias cost 14.6 us of the projection at 65 rows, the fold 12.0 us
FOLD_MIN_ROWS = 64


class BlockCausalAttention(torch.autograd.Function):
    """Causal softmax attention of q, k, v (B, H, N, Dh) -> (B, H, N, Dh) for training on a CPU.

    Rows are cut into blocks of `block` queries; block [s, e) needs keys [0, e) only, so its scores
    S = q[s:e] k[:e]^T * scale + M (M = -inf above the diagonal) take one batched matmul over every (batch, head)
    pair, P = softmax(S) is kept for the backward, and y[s:e] = P v[:e]. With b blocks this multiplies (b + 1) / 2b
    of the full score matrix (5/8 at 256 tokens in blocks of 64), in matmuls large enough for the BLAS to run near
    its peak, where SDPA's CPU flash kernel computes the whole square in 32-64 row tiles and masks it. Every batched
    matmul writes a fresh or a whole contiguous tensor: into a row slice ATen's bmm falls back to one matrix at a
    time. The backward is the softmax one, dS = P * (dP - rowsum(dP * P)) with dP = dy v^T:
    dv += P^T dy, dq = dS k * scale, dk += dS^T q * scale, blocks taken last first so the last (all keys) writes
    dk and dv and the others add to their leading rows. Memory: the kept P is about N / (6 Dh) times the size of
    q, k, v together (what `CAUSAL_BLOCKS_LEN` bounds). tests/test_fast_paths.py checks values and gradients
    against a naive masked softmax and SDPA.

    In float32, where `cpu_kernels.causal_attention()` loads, the C++ kernel computes the same blocks one (batch,
    head) pair per thread and keeps P as one (B * H, N, N) tensor (its causal part written): N / (3 Dh) times the
    size of q, k, v together, 1.6x the PyTorch body's at 256 tokens in blocks of 64. tests/test_cpu_kernels.py checks
    it against a naive softmax and this PyTorch body.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, block: int):
        if block < 1:
            raise ValueError(f"BlockCausalAttention: block must be a positive number of query rows, got {block}")
        ctx.scale, ctx.block = scale, block
        kern = cpu_kernels.causal_attention() if cpu_kernels.CausalAttentionKernel.usable(q, k, v) else None
        ctx.kernel = kern
        if kern is not None:  # the same blocks in C++, one (batch, head) pair per thread (formers/csrc)
            y, P, qkv = kern.forward(q, k, v, scale, block)
            ctx.save_for_backward(*qkv, P)
            return y
        B, H, N, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, N, D) for t in (q, k, v))  # one copy each: bmm takes one batch dim
        out = cpu_kernels.heads_last(q, B, H, N, D)  # merged heads as the caller wants; returned itself, no view
        y = out.transpose(1, 2)  # (B, N, H, D), written block by block
        mask = _causal_mask(block, q.dtype, q.device)
        probs = []
        for s in range(0, N, block):
            e = min(s + block, N)
            # S = scale * q k^T (beta=0: the output is not read), then the mask on the diagonal square only: the
            # keys before s are all visible (the same bits as adding a zero there)
            scores = torch.baddbmm(q3.new_empty(B * H, e - s, e), q3[:, s:e], k3[:, :e].transpose(1, 2), beta=0,
                                   alpha=scale)  # (B*H, e - s, e)
            scores[:, :, s:e] += mask[: e - s, : e - s]
            p = torch.softmax(scores, -1)
            y[:, s:e] = torch.bmm(p, v3[:, :e]).view(B, H, e - s, D).transpose(1, 2)
            probs.append(p)
        ctx.save_for_backward(q3, k3, v3, *probs)
        ctx.heads = H
        return out

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: this backward is not differentiable (nor is SDPA's flash)
            raise RuntimeError("BlockCausalAttention: higher-order gradients through formers' block-causal CPU "
                               "attention are not supported; run the model under `with torch.nn.attention."
                               "sdpa_kernel(torch.nn.attention.SDPBackend.MATH):` for a differentiable backward")
        if ctx.kernel is not None:
            q, k, v, P = ctx.saved_tensors
            if vmapped(dy):  # batched gradients: no data pointer to hand the C++ kernel; the same formulas in ops
                return (*_causal_backward_from_probs(dy, q, k, v, P, ctx.scale), None, None)
            return (*ctx.kernel.backward(dy, q, k, v, P, ctx.scale, ctx.block), None, None)
        q, k, v, *probs = ctx.saved_tensors
        scale, block, H = ctx.scale, ctx.block, ctx.heads
        BH, N, D = q.shape
        dy = dy.reshape(BH, N, D)
        dk = dv = None  # made by the last block (taken first)
        dqs = []  # per block, fresh: a batched matmul into a row slice of dq (not contiguous) runs one matrix at a
        starts = range(0, N, block)  # time (ATen's fallback), 0.9 ms more per layer here than this and one cat
        for s, p in zip(reversed(starts), reversed(probs)):
            e = min(s + block, N)
            dys = dy[:, s:e]
            if e == N:  # the last block sees every key: it makes dk and dv whole, the others add to them
                dv = torch.bmm(p.transpose(1, 2), dys)  # (no out=: vmap, e.g. is_grads_batched, has no rule for it)
            else:
                dv[:, :e] += torch.bmm(p.transpose(1, 2), dys)
            ds = torch._softmax_backward_data(torch.bmm(dys, v[:, :e].transpose(1, 2)), p, -1, q.dtype)
            # dq = scale * dS k, dk = scale * dS^T q: the scale rides in the matmuls (beta=0: out not read)
            dqs.append(torch.baddbmm(q.new_empty(BH, e - s, D), ds, k[:, :e], beta=0, alpha=scale))
            if e == N:
                dk = torch.baddbmm(q.new_empty(BH, N, D), ds.transpose(1, 2), q[:, s:e], beta=0, alpha=scale)
            else:
                dk[:, :e] += torch.baddbmm(q.new_empty(BH, e, D), ds.transpose(1, 2), q[:, s:e], beta=0,
                                           alpha=scale)
        dq = torch.cat(dqs[::-1], 1) if len(dqs) > 1 else dqs[0]
        shape = (BH // H, H, N, D)
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None


def _causal_backward_from_probs(dy, q, k, v, P, scale: float):
    """dq, dk, dv of causal attention from the C++ kernel's kept probabilities P (B * H, N, N), whose columns past
    each row's block are not written (`tril` keeps the causal part), with whole-square matmuls: for batched
    gradients (vmap over dy), where the kernel cannot run."""
    B, H, N, D = q.shape
    p = P.view(B, H, N, N).tril()
    dp = dy @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dy


def causal_block(n: int) -> int:
    """Query rows per block of `BlockCausalAttention` at n tokens: CAUSAL_BLOCK, twice that from
    CAUSAL_BLOCK_WIDE_FROM (benchmarks/attention_blocks.py)."""
    return CAUSAL_BLOCK * (2 if n >= CAUSAL_BLOCK_WIDE_FROM else 1)


_MASKS: dict = {}


def _causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An additive causal mask of at least (n, n), 0 where key <= query and -inf above; one per dtype and device,
    grown to the longest length seen. Rows s..e-1 over keys 0..e-1 are its slice [s:e, :e]."""
    m = _MASKS.get((dtype, device))
    if m is None or m.shape[0] < n:
        i = torch.arange(n, device=device)
        m = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(i[None] > i[:, None], float("-inf"))
        _MASKS[(dtype, device)] = m
    return m


def _takes_causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: float) -> bool:
    """CPU training of a fresh causal block (no mask, bias or dropout; grouped key/value heads are repeated for it,
    which in a paired A/B here still ran 1.03-1.20x SDPA's GQA kernel at 256-512 tokens) of a length in
    CAUSAL_BLOCKS_LEN (from CAUSAL_KERNEL_FROM where the C++ kernel runs; in float32 only with at least one (batch,
    head) pair per thread, as the kernel splits the pairs over the threads), float32 or float64, with SDPA's flash
    kernel allowed (the block kernel stands in for it; a user who selected the math backend, e.g. for a double
    backward, gets it), no autocast (the kernel computes in its inputs' dtype), no torch.func transform (it has no
    functorch rules) and not under torch.compile (which compiles SDPA itself; tracing this Function, whose mask
    cache is written inside it, failed on a first call)."""
    if not (torch.is_grad_enabled() and not torch.compiler.is_compiling() and q.device.type == "cpu" and not drop
            and q.shape[1] % k.shape[1] == 0 and q.dtype in (torch.float32, torch.float64)
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and torch.backends.cuda.flash_sdp_enabled() and not autocast_on("cpu") and not functorch_active()):
        return False
    lo, hi = CAUSAL_BLOCKS_LEN
    N = q.shape[2]
    if q.dtype == torch.float32 and min(lo, CAUSAL_KERNEL_FROM) <= N <= hi:
        # the C++ kernel splits the (batch, head) pairs over the threads: with fewer pairs than threads SDPA runs (one
        # pair on two threads read 0.93x SDPA at 256 tokens, and the PyTorch body 0.57x); the kernel is looked up
        # (built, or warned about) only where it would run
        if q.shape[0] * q.shape[1] < torch.get_num_threads():
            return False
        if cpu_kernels.causal_attention() is not None:
            return True
    return lo <= N <= hi


_SDPA_GQA = torch_at_least(2, 5)  # `enable_gqa` came in torch 2.5


def relative_positions(positions, q: torch.Tensor, k: torch.Tensor, past: int):
    """A relative encoding on self-attention heads q (B, H, N, Dh), k (B, Hkv, N, Dh) whose query and key i sit at
    position past + i (a cache holds the first `past`): (rotated q, rotated k, score bias (H, N, past + N) or None).
    `SoftmaxAttention.forward_split` and the lean inference blocks (formers/blocks.py) both call it."""
    N = q.shape[2]
    q_pos = torch.arange(past, past + N, device=q.device)
    q, k = positions.rotate(q, k, q_pos, q_pos)
    return q, k, positions.bias(q_pos, torch.arange(past + N, device=q.device), q.shape[1])


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                bias: torch.Tensor | None, drop: float, scale: float) -> torch.Tensor:
    """SDPA with a boolean `allowed` mask (True = may attend) and/or a score bias (H, Nq, Nk): the bias with -inf
    where not allowed, else the boolean mask itself."""
    attn_mask = allowed
    if bias is not None:
        attn_mask = bias.to(q.dtype)[None]
        if allowed is not None:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    return _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=scale)


def zero_empty_rows(y: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
    """Attention outputs y (B, H, Nq, Dh) with the query rows that have no key to attend (`empty`, from
    `SoftmaxAttention._allowed`) set to zero; on a GPU the fill costs less than the host reading `empty.any()`."""
    if empty is not None and (y.device.type != "cpu" or functorch_active() or bool(empty.any())):
        y = y.masked_fill(empty, 0.0)  # (under vmap the host cannot read `empty`: filled always)
    return y


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA for q (B, H, Nq, Dh) and k, v (B, Hkv, Nk, Dh), Hkv dividing H (GQA: each group of H/Hkv query heads
    shares one key/value head); without copying the shared heads where torch can."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kw)


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
                or cls.probs is not SoftmaxAttention.probs or "score_mod" in self.__dict__ or "probs" in self.__dict__)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        y, out = self.forward_split(x, mask=mask, positions=positions, cache=cache, context=context,
                                    seqlens=seqlens, **unused)
        return out(y)

    def forward_split(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                      cache: KVCache | None = None, context: torch.Tensor | None = None,
                      seqlens: torch.Tensor | None = None, **unused) -> tuple[torch.Tensor, nn.Module | Affine]:
        """`forward` stopped before the output projection: (y, out) with `self(x, ...) == out(y)`, y the merged
        heads (B, N, H*Dh) and out `self.out` (an `Affine` with its weight when inference folds the value bias into
        its bias, `_folds_kv_bias`). A Pre-LN block uses it to add the projection straight into its residual
        stream (`PreNorm`, `linear_add`; in training too)."""
        if seqlens is not None:  # packed variable-length batch (P37): attention per sequence, formers/nn/packed.py
            from formers.nn.packed import packed_self_attention
            return packed_self_attention(self, x, seqlens, mask=mask, positions=positions, cache=cache,
                                         context=context, **unused), self.out
        if unused:
            raise FormersError(f"softmax mixer got unsupported arguments: {sorted(unused)}")
        B, N, _ = x.shape
        H, Hkv, Dh = self.heads, self.kv_heads, self.head_dim
        own = context is None  # self-attention: the cache, causality and positions apply
        fold = own and B * N >= FOLD_MIN_ROWS and self._folds_kv_bias(mask, positions, cache)
        if own and self._fusable():
            q, k, v = self._fused_qkv(x, kv_bias=not fold)  # (B, H, N, Dh), (B, Hkv, N, Dh) x 2
        else:
            src = x if own else context
            M = src.shape[1]
            q, kv = self.project(x, src, mask, cache if own else None)
            q = q.view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
            k, v = kv.view(B, M, 2, Hkv, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, Hkv, M, Dh)

        causal = self.causal and own
        past = cache.length if (cache is not None and own) else 0
        bias = None
        if positions is not None and own:
            q, k, bias = relative_positions(positions, q, k, past)
        if cache is not None and own:
            k, v = cache.update(k, v)  # (B, Hkv, past + N, Dh)
        Nk = k.shape[2]
        if mask is not None:
            check_key_mask(mask, B, Nk)

        drop = self.dropout if self.training else 0.0
        # query i sits at position past + i and sees keys 0..past + i: with Nk <= past + 1 (a decoding step, one
        # query after `past` cached keys) the causal mask is all True and is dropped
        needs_causal = causal and Nk > past + 1
        if self._needs_explicit():
            if Hkv != H:  # GQA: every group of H/Hkv query heads shares one key/value head
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            allowed, empty = self._allowed(N, Nk, causal, past, mask, x.device)
            y = self._explicit(q, k, v, allowed, bias, drop)
        elif mask is None and bias is None and (not needs_causal or (past == 0 and N == Nk)):
            # no mask tensor: nothing is masked, or a fresh causal block (is_causal)
            if needs_causal and _takes_causal_blocks(q, k, v, drop):
                if Hkv != H:  # GQA: each key/value head repeated for its group (its backward sums the group)
                    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
                y = BlockCausalAttention.apply(q, k, v, self.scale, causal_block(N))
            else:
                y = _sdpa(q, k, v, dropout_p=drop, is_causal=needs_causal, scale=self.scale)
            empty = None
        else:
            allowed, empty = self._allowed(N, Nk, needs_causal, past, mask, x.device)
            y = masked_sdpa(q, k, v, allowed, bias, drop, self.scale)
        y = self.output_mod(zero_empty_rows(y, empty), x)
        out = self.out
        if fold:
            out = Affine(out.weight, self._folded_out_bias())
        return y.transpose(1, 2).reshape(B, N, H * Dh), out  # (B, N, H*Dh), the output projection

    def _folds_kv_bias(self, mask, positions, cache) -> bool:
        """Inference, self-attention through `_fused_qkv` and SDPA, nothing masked (every row keeps weights that sum
        to 1), no positions (a rotation would make q . b_k depend on the key), no cache (its keys must stay whole for
        every later path), no output_mod, a plain output projection: the key bias adds the same q . b_k to every
        score of a row, which softmax ignores, and the value bias adds b_v to every output row, so the key/value
        projection may run without its bias (no broadcast copy of it) and W_o b_v joins the output bias.
        tests/test_fast_paths.py checks the result equal to the plain path."""
        kv, o = self.kv, self.out
        return (not torch.is_grad_enabled() and kv.bias is not None and mask is None and positions is None
                and cache is None and not (self.training and self.dropout) and not self._needs_explicit()
                and type(self).output_mod is SoftmaxAttention.output_mod and "output_mod" not in self.__dict__
                and self._fusable() and type(o) is nn.Linear and hook_free(o) and forward_unpatched(o))

    def _folded_out_bias(self) -> torch.Tensor:
        """b_o + W_o b_v, b_v the value bias per query head: where `_folds_kv_bias` holds, the value bias, which every
        softmax row (weights summing to 1) passes on whole, joins the output projection's bias."""
        H, Hkv, Dh, o = self.heads, self.kv_heads, self.head_dim, self.out
        bv = self.kv.bias[Hkv * Dh:]
        if Hkv != H:  # per query head
            bv = bv.view(Hkv, 1, Dh).expand(Hkv, H // Hkv, Dh).reshape(H * Dh)
        return o.weight @ bv if o.bias is None else torch.addmv(o.bias, o.weight, bv)

    def _fusable(self) -> bool:
        """Whether q, k, v may come from one matmul: `project` not overridden (by a subclass or on the instance)
        and `q`, `kv` plain nn.Linear layers without hooks of any kind (theirs or global ones), since the fused
        path does not call them."""
        q, kv = self.q, self.kv
        return (type(self).project is SoftmaxAttention.project and "project" not in self.__dict__
                and type(q) is nn.Linear and type(kv) is nn.Linear and hook_free(q, kv)
                and forward_unpatched(q, kv))  # a forward replaced on them (or on nn.Linear) must run

    def _fused_qkv(self, x: torch.Tensor, kv_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention q (B, H, N, Dh), k, v (B, Hkv, N, Dh), equal to `project` (the tests compare values and
        gradients). With autograd recording (training) one matmul with the stacked weight [W_q; W_kv]
        ((H + 2 Hkv) Dh, D); without (decoding, evaluation) two, since stacking copies the weights on every call,
        as much memory traffic as the matmul itself when a single token is decoded. `kv_bias=False` leaves the
        key/value bias out; only inference asks for that (`_folds_kv_bias` adds it back after the attention)."""
        B, N, _ = x.shape
        H, Hkv, Dh = self.heads, self.kv_heads, self.head_dim
        wq, bq, wkv, bkv = self.q.weight, self.q.bias, self.kv.weight, self.kv.bias
        if not torch.is_grad_enabled():
            q = F.linear(x, wq, bq).view(B, N, H, Dh).transpose(1, 2)
            k, v = F.linear(x, wkv, bkv if kv_bias else None).view(B, N, 2, Hkv, Dh).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        b = None
        if bq is not None or bkv is not None:  # a folded norm (P54) may give only one of them a bias
            b = torch.cat([bq if bq is not None else wq.new_zeros(H * Dh),
                           bkv if bkv is not None else wkv.new_zeros(2 * Hkv * Dh)])
        qkv = F.linear(x, torch.cat([wq, wkv]), b)  # (B, N, (H + 2 Hkv) Dh)
        q, k, v = qkv.view(B, N, H + 2 * Hkv, Dh).split([H, Hkv, Hkv], dim=2)  # (B, N, h, Dh) each
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def _allowed(nq, nk, causal, past, key_mask, device):
        """The boolean mask (or None) and the rows left with no key at all (or None); those rows are opened to
        every key (finite values and gradients) and zeroed after the attention."""
        allowed = attention_mask(nq, nk, causal=causal, past=past, key_mask=key_mask, device=device)
        if key_mask is None:  # a causal query always sees key 0: no empty rows
            return allowed, None
        empty = ~allowed.any(-1, keepdim=True)
        return allowed | empty, empty

    def _explicit(self, q, k, v, allowed, bias, drop):
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Nq, Nk)
        if bias is not None:  # (ALiBi's is float32: in the scores' dtype, as masked_sdpa does)
            scores = scores + bias.to(scores.dtype)
        scores = self.score_mod(scores)
        attn = F.dropout(self.probs(scores, allowed), p=drop, training=drop > 0)
        return attn @ v  # (B, H, Nq, Dh)
