"""Packed variable-length batches (P37 ByteTransformer): no compute on padding.

P37 "ByteTransformer: A High-Performance Transformer Boosted for Variable-Length Inputs" (Zhai et al., IPDPS 2023;
facts sheet P37, official code bytedance/ByteTransformer `remove_padding.cu`, `attention_fused*.cu`,
`cutlass_attention.cu`): a prefix sum over the attention mask gives every valid token its offset in a packed
buffer; every position-wise op (QKV projection, FFN, add + LayerNorm, residuals) runs on the sum_i len_i packed
tokens instead of B * L_max; attention runs per sequence; padding is rebuilt only at the output.

Convention: `seqlens` are cumulative offsets, a 1-D integer tensor like tensor([0, 5, 12]) (sequence i holds
packed tokens seqlens[i]:seqlens[i+1]); packed hidden states are (1, T, D) with T = seqlens[-1].

    pack, unpack, pack_sequences    padded (B, N, ...) + mask  <->  packed (1, T, ...) + seqlens
    check_seqlens, sequence_ids, positions_in_sequence, lengths_to_seqlens    offset helpers
    varlen_attention, length_buckets    attention on (H, T, Dh) per sequence, never a T x T mask
    packed_self_attention           SoftmaxAttention's forward_split when it is given `seqlens`

The CUDA kernels (fused MHA, grouped GEMM with softmax in the epilogue) are out of scope: on CPU the attention runs
through `F.scaled_dot_product_attention` per length bucket (see `varlen_attention`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from formers.nn.hooks import torch_at_least
from formers.registry import FormersError

__all__ = ["check_seqlens", "lengths_to_seqlens", "sequence_ids", "positions_in_sequence", "pack", "unpack",
           "pack_sequences", "length_buckets", "varlen_attention", "packed_self_attention"]


# ------------------------------------------------------------------------------------------------ offset helpers

def check_seqlens(seqlens: torch.Tensor, total: int | None = None, what: str = "seqlens") -> torch.Tensor:
    """Validate cumulative offsets: 1-D integer, at least [0, n], starting at 0, never decreasing (an empty sequence
    is allowed), ending at `total` when given. Returns them as int64 on their device."""
    return _offsets(seqlens, total, what)[0]


def _offsets(seqlens: torch.Tensor, total: int | None, what: str = "seqlens") -> tuple[torch.Tensor, list[int]]:
    """`check_seqlens`, also returning the offsets as a host list: read from the device once (on a GPU every read
    is a synchronisation)."""
    if not isinstance(seqlens, torch.Tensor) or seqlens.dim() != 1 or seqlens.dtype.is_floating_point \
            or seqlens.dtype == torch.bool or seqlens.numel() < 2:
        shape = tuple(seqlens.shape) if isinstance(seqlens, torch.Tensor) else type(seqlens).__name__
        raise FormersError(f"{what} must be a 1-D integer tensor of cumulative offsets like tensor([0, 5, 12]), "
                           f"got {shape}")
    seqlens = seqlens.long()
    host = seqlens.tolist()
    if host[0] != 0 or any(b < a for a, b in zip(host, host[1:])):
        raise FormersError(f"{what} must start at 0 and never decrease (cumulative offsets, e.g. "
                           f"lengths [5, 7] -> [0, 5, 12]); got {host}")
    if total is not None and host[-1] != total:
        raise FormersError(f"{what} must end at the number of packed tokens {total}, got {host[-1]} "
                           f"(seqlens {host})")
    return seqlens, host


def lengths_to_seqlens(lengths: torch.Tensor | Sequence[int], device=None) -> torch.Tensor:
    """Lengths [5, 7] -> cumulative offsets tensor([0, 5, 12])."""
    raw = torch.as_tensor(lengths)
    if raw.dtype.is_floating_point or raw.dtype.is_complex or raw.dtype == torch.bool:  # 2.7 would become 2
        raise FormersError(f"lengths must be a 1-D list of non-negative integers, got {raw.tolist()} ({raw.dtype})")
    lengths = raw.to(dtype=torch.long, device=device)
    if lengths.dim() != 1 or bool((lengths < 0).any()):
        raise FormersError(f"lengths must be a 1-D list of non-negative integers, got {lengths.tolist()}")
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def sequence_ids(seqlens: torch.Tensor) -> torch.Tensor:
    """The sequence index of every packed token (T,): tensor([0, 2, 5]) -> [0, 0, 1, 1, 1]."""
    return torch.repeat_interleave(torch.arange(len(seqlens) - 1, device=seqlens.device), seqlens.diff())


def positions_in_sequence(seqlens: torch.Tensor) -> torch.Tensor:
    """Each packed token's position inside its own sequence (T,), restarting at 0: [0, 2, 5] -> [0, 1, 0, 1, 2]."""
    T = int(seqlens[-1])
    return torch.arange(T, device=seqlens.device) - seqlens[:-1].repeat_interleave(seqlens.diff())


# -------------------------------------------------------------------------------------------------- pack / unpack

def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the padding: x (B, N, ...) (token ids or hidden states) and mask (B, N) (True = valid token)
    -> (packed (1, T, ...), seqlens (B + 1,)), tokens in row-major order, T = mask.sum().

    This is P37's prefix sum over the mask; valid tokens need not be contiguous within a row."""
    if mask.dim() != 2 or x.shape[:2] != mask.shape:
        raise FormersError(f"pack: mask must have shape (batch, length) = {tuple(x.shape[:2])}, "
                           f"got {tuple(mask.shape)}")
    mask = mask.bool()
    seqlens = lengths_to_seqlens(mask.sum(1), device=mask.device)
    return x[mask][None], seqlens  # boolean indexing keeps row-major order


def unpack(packed: torch.Tensor, seqlens: torch.Tensor, *, mask: torch.Tensor | None = None,
           length: int | None = None, fill: float = 0.0) -> torch.Tensor:
    """Rebuild the padding: packed (1, T, ...) or (T, ...) -> padded (B, N, ...), padding = `fill`; differentiable.

    With `mask` (B, N) (the one given to `pack`) the tokens return to their original places, so
    unpack(*pack(x, mask), mask=mask) equals x on the valid tokens. Without it sequence i fills row i from the
    left, N = `length` (default: the longest sequence)."""
    seqlens = check_seqlens(seqlens)
    flat = packed[0] if packed.dim() >= 2 and packed.shape[0] == 1 and packed.shape[1] == int(seqlens[-1]) \
        else packed
    T = int(seqlens[-1])
    if flat.shape[0] != T:
        raise FormersError(f"unpack: packed tokens {tuple(packed.shape)} do not match seqlens total {T}; "
                           "pass the (1, T, ...) tensor that goes with these seqlens")
    B = len(seqlens) - 1
    if mask is not None:
        mask = mask.bool()
        if mask.dim() != 2 or mask.shape[0] != B or not torch.equal(mask.sum(1), seqlens.diff().to(mask.device)):
            raise FormersError(f"unpack: mask {tuple(mask.shape)} does not hold the {B} sequences of lengths "
                               f"{seqlens.diff().tolist()}; pass the mask that was given to pack")
        rows, cols = mask.nonzero(as_tuple=True)  # row-major, as pack took them
        N = mask.shape[1]
    else:
        longest = int(seqlens.diff().max()) if B else 0
        N = longest if length is None else length
        if N < longest:
            raise FormersError(f"unpack: length={length} is shorter than the longest sequence ({longest})")
        rows, cols = sequence_ids(seqlens), positions_in_sequence(seqlens)
    out = flat.new_full((B, N, *flat.shape[1:]), fill)
    return out.index_put((rows.to(flat.device), cols.to(flat.device)), flat)


def pack_sequences(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of sequences (L_i, ...) (ids or features, same trailing shape) -> (packed (1, T, ...), seqlens)."""
    if not seqs:
        raise FormersError("pack_sequences: got an empty list; give at least one sequence")
    tail = seqs[0].shape[1:]
    if any(s.dim() < 1 or s.shape[1:] != tail for s in seqs):
        raise FormersError(f"pack_sequences: every sequence must be (length, ...) with the same trailing shape; "
                           f"got {[tuple(s.shape) for s in seqs]}")
    seqlens = lengths_to_seqlens([s.shape[0] for s in seqs], device=seqs[0].device)
    return torch.cat(list(seqs))[None], seqlens


# --------------------------------------------------------------------------------------------- varlen attention

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
                  torch.Tensor]


def length_buckets(lengths: list[int], tol: float) -> list[list[int]]:
    """Group sequence indices, longest first, so that every member of a bucket is at least (1 - tol) times as long
    as the bucket's longest one (tol = 0: only equal lengths share a bucket). Empty sequences are left out."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] >= (1.0 - tol) * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor,
                     scale: float | None = None, causal: bool = False, *, dropout_p: float = 0.0,
                     bias: Callable[[int], torch.Tensor] | None = None, attend: Attend | None = None,
                     tol: float = 0.0) -> torch.Tensor:
    """Softmax attention inside each packed sequence: q, k, v (H, T, Dh) -> (H, T, Dh); token t attends only to
    the tokens of its own sequence (and, with `causal`, only to those not after it).

    Sequences are sorted by length and grouped into buckets whose members are at least (1 - tol) times the longest
    (`length_buckets`); each bucket is gathered into a padded (n_b, H, m_b, Dh) batch, m_b its longest length, and
    goes through one `F.scaled_dot_product_attention` call, with a key mask over the bucket's own padding only (none
    when it has none; `is_causal` when causal, since right padding comes after every valid key). No T x T mask is
    ever built: memory is O(n_b H m_b^2) per bucket. The default tol = 0 groups only equal lengths, i.e. a loop
    over the sequences with no padding and no mask at all: on CPU (one thread, 4 heads of 64, 32 lengths uniform
    in [16, 512]) it was as fast as or faster than tol = 0.05 ... 0.3 (fewer, larger but padded SDPA calls), so
    larger tol only pays where per-call overhead dominates (many very short sequences).

    `bias(n)` gives a score bias (H, n, n) for a sequence of n tokens at positions 0..n-1 (ALiBi).
    `attend(q, k, v, allowed, bias)` replaces SDPA for one bucket (explicit-path subclasses): q, k, v
    (n_b, H, m, Dh), `allowed` a boolean mask broadcastable to (n_b, H, m, m) (True = may attend, causal included)
    or None, `bias` (H, m, m) or None; it returns (n_b, H, m, Dh). Rows of padded queries are discarded.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise FormersError(f"varlen_attention: expected q, k (H, T, Dh) of one shape and v (H, T, Dv), got "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    seqlens, host = _offsets(seqlens, q.shape[1])
    return _varlen(q, k, v, seqlens, host, scale, causal, dropout_p, bias, attend, tol)


def _varlen(q, k, v, seqlens: torch.Tensor, host: list[int], scale, causal, dropout_p, bias, attend,
            tol) -> torch.Tensor:
    """`varlen_attention` on checked inputs: `seqlens` int64 offsets and `host` the same as a list."""
    H, T, _ = q.shape
    lengths = [b - a for a, b in zip(host, host[1:])]
    starts = host[:-1]
    dev = q.device
    if (dev.type == "cuda" and _JAGGED_SDPA and not causal and attend is None and bias is None and lengths
            and min(lengths) > 0):  # torch's jagged SDPA takes no is_causal
        return _jagged_attention(q, k, v, seqlens, scale, dropout_p, min(lengths), max(lengths))
    # token-major (T, H, Dh): a bucket is then a gather of whole rows (a free view for the projections' layout;
    # gathering along T of a head-major tensor would copy all of it once per bucket)
    qt, kt, vt = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    outs, order = [], []
    for bucket in length_buckets(lengths, tol):
        n, m = len(bucket), lengths[bucket[0]]
        lens = torch.tensor([lengths[i] for i in bucket], device=dev)  # (n_b,)
        start = torch.tensor([starts[i] for i in bucket], device=dev)  # (n_b,)
        steps = torch.arange(m, device=dev)
        valid = steps[None, :] < lens[:, None]  # (n_b, m)
        # padding slots repeat the sequence's last token: finite values, discarded after the attention
        idx = (start[:, None] + torch.minimum(steps[None, :], lens[:, None] - 1)).reshape(-1)  # (n_b * m,)
        qb, kb, vb = (t.index_select(0, idx).view(n, m, H, -1).transpose(1, 2)
                      for t in (qt, kt, vt))  # (n_b, H, m, Dh)
        padded = any(lengths[i] < m for i in bucket)  # from the host's lengths: no device sync
        key_mask = valid[:, None, None, :] if padded else None  # (n_b, 1, 1, m)
        b = bias(m) if bias is not None else None  # (H, m, m)
        if attend is not None:
            allowed = key_mask
            if causal:
                tril = torch.ones(m, m, dtype=torch.bool, device=dev).tril()[None, None]  # (1, 1, m, m)
                allowed = tril if allowed is None else allowed & tril
            y = attend(qb, kb, vb, allowed, b)
        elif b is None:
            y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=None if causal else key_mask,
                                               dropout_p=dropout_p, is_causal=causal, scale=scale)
        else:
            attn_mask = b.to(q.dtype)[None]  # (1, H, m, m)
            if key_mask is not None:
                attn_mask = attn_mask.masked_fill(~key_mask, float("-inf"))
            if causal:
                attn_mask = attn_mask.masked_fill(torch.ones(m, m, dtype=torch.bool, device=dev).triu(1),
                                                  float("-inf"))
            y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        y = y.transpose(1, 2).reshape(n * m, H, -1)  # (n_b * m, H, Dv), token-major
        keep = valid.reshape(-1)  # (n_b * m,)
        outs.append(y[keep] if padded else y)
        order.append(idx[keep] if padded else idx)
    if not outs:  # every sequence is empty (T = 0)
        return v.new_zeros(v.shape)
    y = torch.cat(outs)  # (T, H, Dv): tokens in bucket order
    where = torch.empty(T, dtype=torch.long, device=dev)
    where[torch.cat(order)] = torch.arange(T, device=dev)  # packed position -> place in bucket order
    return y.index_select(0, where).transpose(0, 1)  # (H, T, Dv), a view of token-major storage


_JAGGED_SDPA = torch_at_least(2, 5)  # SDPA on jagged nested tensors


def _jagged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor,
                      scale: float | None, dropout_p: float, shortest: int | None = None,
                      longest: int | None = None) -> torch.Tensor:
    """`varlen_attention` on a CUDA GPU, not causal, with no bias and no explicit path: one SDPA call on jagged
    nested tensors (torch's variable-length kernels, offsets = seqlens) instead of a loop over length buckets, where
    a GPU pays for every launch and host sync. q, k, v (H, T, Dh) -> (H, T, Dv); tests/test_cuda.py checks values
    and gradients against a naive loop over the sequences (and tests/test_packed.py the same on the CPU, where
    torch's math kernel runs it). `shortest` and `longest` (known on the host) spare torch a device read of each."""
    off = seqlens.to(device=q.device, dtype=torch.int64)  # a caller may hand CPU offsets with CUDA q, k, v
    qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t.transpose(0, 1).contiguous(), off, min_seqlen=shortest,
                                                         max_seqlen=longest).transpose(1, 2)
                  for t in (q, k, v))  # (B, H, j, Dh)
    y = F.scaled_dot_product_attention(qn, kn, vn, dropout_p=dropout_p, scale=scale)
    return y.transpose(1, 2).values().transpose(0, 1)  # (H, T, Dv)


# ----------------------------------------------------------------------------------- the softmax mixer, packed

_SEEN: list = [None]  # the last offsets read: (key, checked offsets on the layer's device, host list)


def _host_readable(seqlens: torch.Tensor) -> bool:
    """Whether reading seqlens' values costs no device synchronisation (they are in host memory)."""
    return seqlens.device.type == "cpu"


def _layer_offsets(seqlens: torch.Tensor, device: torch.device, T: int) -> tuple[torch.Tensor, list[int]]:
    """`_offsets` of the seqlens a stack hands every layer, checked by the first layer only where the next layers
    cannot tell a change without reading them again.

    - seqlens on the CPU: read every time (a host read, no device synchronisation) and compared with the last
      offsets read, whose checked copy on the layer's device (a GPU's: no copy and no synchronisation per layer) is
      reused when the values are equal. Values, not the tensor's version counter: a CPU tensor can change without
      it (a numpy array sharing its memory, writes through `.data`), as a data loader refilling one buffer does.
    - seqlens on a GPU: reading them is a synchronisation, so the next layers reuse the first one's read while it is
      the same tensor object, unchanged by its version counter (a change that bypasses the counter, e.g. through
      `.data`, is not seen there), for the same device and token count.
    - An inference tensor (made under torch.inference_mode) has no version counter: read every time. Nothing is
      reused across inference mode and outside it (a copy made inside could not be saved for backward outside)."""
    if not isinstance(seqlens, torch.Tensor) or seqlens.is_inference():
        return _offsets(seqlens.to(device) if isinstance(seqlens, torch.Tensor) else seqlens, T)
    mode = torch.is_inference_mode_enabled()
    seen = _SEEN[0]
    if _host_readable(seqlens):
        if seqlens.dim() == 1 and not (seqlens.dtype.is_floating_point or seqlens.dtype == torch.bool):
            now = seqlens.tolist()
            if seen is not None and seen[0] == ("cpu", device, T, mode) and seen[2] == now:
                return seen[1], seen[2]
        checked, host = _offsets(seqlens, T)
        # a copy of our own: the caller's tensor may change later, the reused offsets must not
        checked = checked.to(device, copy=True)
        _SEEN[0] = (("cpu", device, T, mode), checked, host)
        return checked, host
    try:
        ref = weakref.ref(seqlens)
    except TypeError:  # a tensor subclass without weak references: read every time
        return _offsets(seqlens.to(device), T)
    if (seen is not None and seen[0][0] == "ref" and seen[0][1]() is seqlens
            and seen[0][2:] == (seqlens._version, device, T, mode)):
        return seen[1], seen[2]
    checked, host = _offsets(seqlens.to(device), T)
    _SEEN[0] = (("ref", ref, seqlens._version, device, T, mode), checked, host)
    return checked, host


def packed_self_attention(attn, x: torch.Tensor, seqlens: torch.Tensor, *, mask: torch.Tensor | None = None,
                          positions=None, cache=None, context: torch.Tensor | None = None,
                          **unused) -> torch.Tensor:
    """`SoftmaxAttention.forward_split(x, seqlens=...)` (and its subclasses'): x (1, T, D) packed -> the merged
    heads (1, T, H*Dh), before the output projection `attn.out`.

    q, k, v (and then the caller's output projection) run on the T packed tokens; attention runs per sequence through
    `varlen_attention`; relative positions (rotary, ALiBi) restart at 0 in every sequence. The explicit path
    (`score_mod` / `probs` hooks) runs per bucket with the bucket's own mask; `output_mod` sees (1, H, T, Dh).
    Unsupported, with a FormersError: a KV cache, cross-attention (`context`), a key-padding `mask` (packing
    already removed the padding), batch size != 1, and subclasses that override `project` (it may mix
    neighbouring tokens, e.g. mdha's convolution, which would leak across sequence boundaries).
    """
    from formers.nn.attention import SoftmaxAttention

    name = type(attn).__name__
    if unused:
        raise FormersError(f"{name} got unsupported arguments: {sorted(unused)}")
    if cache is not None:
        raise FormersError(f"{name}: packed sequences (seqlens) take no KV cache; decode each sequence with its "
                           "own cache, unpacked")
    if context is not None:
        raise FormersError(f"{name}: packed sequences (seqlens) do not support cross-attention (context); "
                           "pad the batch instead")
    if mask is not None:
        raise FormersError(f"{name}: pass either packed `seqlens` or a key-padding `mask`, not both (packing "
                           "already removed the padding)")
    if type(attn).project is not SoftmaxAttention.project:
        raise FormersError(f"{name} overrides the q/kv projection, which may mix neighbouring tokens across "
                           "packed sequences; pad the batch and pass `mask` instead of `seqlens`")
    if x.dim() != 3 or x.shape[0] != 1:
        raise FormersError(f"{name}: packed sequences (seqlens) need x of shape (1, T, D), got {tuple(x.shape)}")
    _, T, _ = x.shape
    H, Hkv, Dh = attn.heads, attn.kv_heads, attn.head_dim
    seqlens, host = _layer_offsets(seqlens, x.device, T)
    fusable = getattr(attn, "_fusable", None)
    if fusable is not None and fusable():  # one matmul for q, k, v where the mixer offers it
        q, k, v = attn._fused_qkv(x)  # (1, H, T, Dh), (1, Hkv, T, Dh) x 2
    else:
        q, kv = attn.project(x, x, None, None)
        q = q.view(1, T, H, Dh).transpose(1, 2)  # (1, H, T, Dh)
        k, v = kv.view(1, T, 2, Hkv, Dh).permute(2, 0, 3, 1, 4)  # each (1, Hkv, T, Dh)
    bias = None
    if positions is not None:
        pos = positions_in_sequence(seqlens)  # (T,): restarts at 0 in every sequence
        q, k = positions.rotate(q, k, pos, pos)
        if getattr(positions, "has_bias", False):
            def bias(n: int) -> torch.Tensor:
                p = torch.arange(n, device=x.device)
                return positions.bias(p, p, H)  # (H, n, n)
    q, k, v = q[0], k[0], v[0]  # (H or Hkv, T, Dh)
    if Hkv != H:  # GQA: every group of H/Hkv query heads shares one key/value head
        k, v = k.repeat_interleave(H // Hkv, dim=0), v.repeat_interleave(H // Hkv, dim=0)
    drop = attn.dropout if attn.training else 0.0
    attend = None
    if attn._needs_explicit():
        def attend(qb, kb, vb, allowed, b):
            return attn._explicit(qb, kb, vb, allowed, b, drop)
    y = _varlen(q, k, v, seqlens, host, attn.scale, attn.causal, drop, bias, attend, 0.0)  # seqlens checked above
    y = attn.output_mod(y[None], x)  # (1, H, T, Dh)
    return y.transpose(1, 2).reshape(1, T, H * Dh)
