"""Packed variable-length batches (P37 ByteTransformer, formers/nn/packed.py): varlen attention against a naive
per-sequence softmax(QK^T)V written here, softmax mixers run packed against the same mixer run on each sequence
alone, the packed encoder against the padded encoder with a key-padding mask (outputs and gradients, float64),
pack/unpack round trips, and the errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.nn.attention import KVCache
from formers.nn.packed import (
    check_seqlens,
    lengths_to_seqlens,
    pack,
    pack_sequences,
    positions_in_sequence,
    unpack,
    varlen_attention,
)
from formers.registry import FormersError

LENGTHS = [5, 1, 9, 9, 0, 3, 7]  # equal lengths, a single token and an empty sequence


def naive_attention(q, k, v, scale, causal=False, bias=None):
    """softmax(q k^T * scale + bias) v for one sequence, q, k, v (H, L, Dh), every weight written out."""
    H, L, _ = q.shape
    out = torch.zeros_like(v)
    for h in range(H):
        for i in range(L):
            keys = range(i + 1) if causal else range(L)
            s = [float(q[h, i] @ k[h, j]) * scale + (0.0 if bias is None else float(bias[h, i, j])) for j in keys]
            top = max(s)
            w = [math.exp(x - top) for x in s]
            z = sum(w)
            for j, wj in zip(keys, w):
                out[h, i] += wj / z * v[h, j]
    return out


def naive_varlen(q, k, v, lengths, scale, causal=False, bias=None):
    outs, s = [], 0
    for n in lengths:
        outs.append(naive_attention(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n], scale, causal,
                                    None if bias is None else bias(n)))
        s += n
    return torch.cat(outs, dim=1)


def alibi_like(n):
    p = torch.arange(n, dtype=torch.float64)
    return -torch.tensor([0.5, 0.25])[:, None, None].double() * (p[:, None] - p[None, :]).abs()  # (2, n, n)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tol", [0.0, 0.5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_varlen_attention_matches_naive_per_sequence(causal, tol, with_bias):
    T = sum(LENGTHS)
    q, k, v = (torch.randn(2, T, 4, dtype=torch.float64) for _ in range(3))
    seqlens = lengths_to_seqlens(LENGTHS)
    bias = alibi_like if with_bias else None
    y = varlen_attention(q, k, v, seqlens, 0.3, causal, bias=bias, tol=tol)
    torch.testing.assert_close(y, naive_varlen(q, k, v, LENGTHS, 0.3, causal, bias), atol=1e-12, rtol=0)


def test_jagged_attention_matches_naive_per_sequence():
    """The GPU's one-call path (SDPA on jagged nested tensors), run here on torch's CPU math kernel: values and
    gradients equal the naive loop over the sequences (no empty sequence: the GPU path steps aside for those)."""
    from formers.nn.packed import _jagged_attention

    lengths = [n for n in LENGTHS if n > 0]
    T = sum(lengths)
    q, k, v = (torch.randn(2, T, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    seqlens = lengths_to_seqlens(lengths)
    y = _jagged_attention(q, k, v, seqlens, 0.3, 0.0)
    ref = naive_varlen(q, k, v, lengths, 0.3)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    # gradients: the same loop over the sequences in differentiable tensor ops (naive_attention reads scores as
    # Python floats), softmax written out
    outs, s = [], 0
    for n in lengths:
        e = torch.exp(q[:, s:s + n] @ k[:, s:s + n].transpose(1, 2) * 0.3)
        outs.append(e / e.sum(-1, keepdim=True) @ v[:, s:s + n])
        s += n
    ref = torch.cat(outs, dim=1)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (q, k, v), g)
    gb = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_explicit_attend_gets_bucket_masks(causal):
    """A custom `attend` (the explicit path) sees each bucket's padding and causality through `allowed`."""
    T = sum(LENGTHS)
    q, k, v = (torch.randn(2, T, 4, dtype=torch.float64) for _ in range(3))

    def attend(qb, kb, vb, allowed, bias):
        s = qb @ kb.transpose(-2, -1) * 0.3
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return s.softmax(-1) @ vb

    y = varlen_attention(q, k, v, lengths_to_seqlens(LENGTHS), 0.3, causal, attend=attend, tol=0.9)
    torch.testing.assert_close(y, naive_varlen(q, k, v, LENGTHS, 0.3, causal), atol=1e-12, rtol=0)


def test_varlen_attention_never_builds_a_mask_over_the_pack(monkeypatch):
    """P37's point: attention per sequence; no SDPA call (scores or mask) spans more than one sequence's length."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape[-2:])))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    lengths = [30, 2, 17, 29, 8]
    T = sum(lengths)
    q = torch.randn(2, T, 4)
    for tol in (0.0, 0.5):
        varlen_attention(q, q, q, lengths_to_seqlens(lengths), tol=tol)
    assert seen and all(nq <= 30 and nk <= 30 and (m is None or max(m) <= 30) for nq, nk, m in seen)


# ------------------------------------------------------------------------------------------------ mixers, packed

MIXERS = [("softmax", {}, False), ("softmax", {"kv_heads": 2}, True), ("gated", {}, False),
          ("clipped_softmax", {"alpha": 2.0}, True), ("topk", {"k": 3}, False), ("stickbreaking", {}, True),
          ("temperature", {"temperature": 2.0}, False)]


@pytest.mark.parametrize("name,opts,causal", MIXERS)
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_mixer_packed_equals_each_sequence_alone(name, opts, causal, position):
    """mixer(pack, seqlens) == concat of mixer(sequence_i): nothing leaks across sequences and relative positions
    restart at 0 in every sequence (rotary, ALiBi), for the SDPA path, GQA, causal and the explicit hooks."""
    dim, lengths = 16, [4, 7, 1, 7]
    m = formers.build("mixer", {"name": name, "heads": 4, **opts}, dim=dim, causal=causal).double().eval()
    pos = formers.build("position", position, dim=dim)
    x = torch.randn(1, sum(lengths), dim, dtype=torch.float64)
    y = m(x, seqlens=lengths_to_seqlens(lengths), positions=pos)
    ref, s = [], 0
    for n in lengths:
        ref.append(m(x[:, s:s + n], positions=pos))
        s += n
    torch.testing.assert_close(y, torch.cat(ref, dim=1), atol=1e-12, rtol=0)


def test_mixer_packed_rejects_what_it_cannot_honour():
    m = formers.build("mixer", "softmax", dim=16, heads=4)
    x, sl = torch.randn(1, 6, 16), torch.tensor([0, 2, 6])
    with pytest.raises(FormersError, match="KV cache"):
        m(x, seqlens=sl, cache=KVCache())
    with pytest.raises(FormersError, match="not both"):
        m(x, seqlens=sl, mask=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(FormersError, match="cross-attention"):
        m(x, seqlens=sl, context=torch.randn(1, 3, 16))
    with pytest.raises(FormersError, match=r"\(1, T, D\)"):
        m(torch.randn(2, 3, 16), seqlens=torch.tensor([0, 3]))
    with pytest.raises(FormersError, match="end at"):
        m(x, seqlens=torch.tensor([0, 2, 5]))
    mdha = formers.build("mixer", "mdha", dim=16, heads=4)  # its convolution would cross sequence boundaries
    with pytest.raises(FormersError, match="projection"):
        mdha(x, seqlens=sl)


# ------------------------------------------------------------------------------------------------ the encoder

CONFIGS = [("cls", "sequence", "learned"), ("mean", "sequence", "learned"), ("cls", "sequence", "rope"),
           ("mean", "sequence", "rope"), ("cls", "token", "learned"), ("mean", "token", "rope"),
           ("cls", "sequence", "alibi"), ("mean", "sequence", "sinusoidal")]


def _encoder(pool, level, position, **kw):
    return formers.create_model("encoder", vocab=40, dim=16, depth=2, max_len=12, num_classes=3, pool=pool,
                                level=level, position=position, block={"mixer": {"name": "softmax", "heads": 4}},
                                **kw).double()


def _batch(lengths=(5, 12, 1, 8)):
    N = max(lengths)
    idx = torch.randint(0, 40, (len(lengths), N))
    mask = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    return idx, mask


@pytest.mark.parametrize("pool,level,position", CONFIGS)
def test_packed_encoder_equals_padded_with_mask(pool, level, position):
    model = _encoder(pool, level, position)
    idx, mask = _batch()
    padded = model(idx, mask=mask)
    packed = model(idx, mask=mask, packed=True)
    ids, seqlens = pack(idx, mask)
    direct = model.forward_packed(ids, seqlens)
    if level == "sequence":
        assert packed.shape == direct.shape == (4, 3)
        torch.testing.assert_close(packed, padded, atol=1e-10, rtol=0)
        torch.testing.assert_close(direct, padded, atol=1e-10, rtol=0)
    else:
        assert packed.shape == padded.shape and direct.shape == (int(mask.sum()), 3)
        torch.testing.assert_close(packed[mask], padded[mask], atol=1e-10, rtol=0)
        torch.testing.assert_close(direct, padded[mask], atol=1e-10, rtol=0)
        assert bool((packed[~mask] == 0).all())


@pytest.mark.parametrize("pool,level,position", [("cls", "sequence", "learned"), ("mean", "sequence", "rope"),
                                                 ("mean", "token", "learned")])
def test_packed_encoder_gradients_equal_padded(pool, level, position):
    model = _encoder(pool, level, position)
    idx, mask = _batch()
    out_w = torch.randn(4, 3, dtype=torch.float64) if level == "sequence" else \
        torch.randn(*idx.shape, 3, dtype=torch.float64) * mask[..., None]

    def grads(packed):
        model.zero_grad()
        (model(idx, mask=mask, packed=packed) * out_w).sum().backward()  # the loss reads valid tokens only
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_pad, g_pack = grads(False), grads(True)
    names = {n for n, _ in model.named_parameters()}
    assert set(g_pad) == set(g_pack) == names
    for n in names:
        torch.testing.assert_close(g_pack[n], g_pad[n], atol=1e-10, rtol=0, msg=n)


def test_packed_offsets_are_read_once_per_forward_not_per_layer(monkeypatch):
    """Offsets on a device (where a read is a synchronisation; `_host_readable` False stands in for a GPU here): the
    stack hands every layer the same seqlens, and only the first layer reads and checks them, so a packed forward
    reads offsets twice (the model's check of the caller's seqlens, and the first layer's of the shifted ones) at
    any depth, with the padded forward's output; a seqlens changed in place, or another tensor, is read again."""
    from formers.nn import packed

    monkeypatch.setattr(packed, "_host_readable", lambda s: False)
    monkeypatch.setattr(packed, "_SEEN", [None])
    calls = []
    real = packed._offsets
    monkeypatch.setattr(packed, "_offsets", lambda *a, **k: calls.append(1) or real(*a, **k))
    idx, mask = _batch()
    for depth in (2, 6):
        torch.manual_seed(0)
        m = formers.create_model("encoder", vocab=50, dim=32, depth=depth, max_len=64, num_classes=3).eval()
        calls.clear()
        with torch.no_grad():
            y = m(idx, mask=mask, packed=True)
        assert len(calls) == 2
        torch.testing.assert_close(y, m(idx, mask=mask), atol=1e-5, rtol=1e-5)
    attn = formers.build("mixer", "softmax", dim=16, heads=2)
    x = torch.randn(1, 7, 16)
    s = torch.tensor([0, 3, 7])
    calls.clear()
    a = packed.packed_self_attention(attn, x, s)
    packed.packed_self_attention(attn, x, s)
    assert len(calls) == 1
    s[1] = 5  # in place: sequences of 5 and 2 tokens now
    b = packed.packed_self_attention(attn, x, s)
    assert len(calls) == 2 and not torch.allclose(a, b)
    torch.testing.assert_close(b, packed.packed_self_attention(attn, x, torch.tensor([0, 5, 7])))
    assert len(calls) == 3
    with torch.inference_mode():  # no version counter: read every time, so a change in place still shows
        s = torch.tensor([0, 3, 7])
        a2 = packed.packed_self_attention(attn, x, s)
        s[1] = 5
        torch.testing.assert_close(packed.packed_self_attention(attn, x, s), b)
        assert len(calls) == 5
        torch.testing.assert_close(a2, a)
        y = m(idx, mask=mask, packed=True)  # a whole packed forward under inference mode
    torch.testing.assert_close(y, m(idx, mask=mask), atol=1e-5, rtol=1e-5)


def test_packed_offsets_in_host_memory_are_compared_by_value(monkeypatch):
    """Offsets on the CPU are read by every layer (no synchronisation) and checked again only when their values
    change, however they changed: also through a numpy array sharing the tensor's memory or through `.data`, which
    leave its version counter alone (a data loader refilling one offsets buffer per batch). Each forward must
    equal the padded one for the offsets it was given."""
    import numpy as np

    from formers.nn import packed

    monkeypatch.setattr(packed, "_SEEN", [None])
    calls = []
    real = packed._offsets
    monkeypatch.setattr(packed, "_offsets", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = formers.create_model("encoder", vocab=40, dim=16, depth=3, max_len=40, num_classes=3, pool="mean",
                             position="rope").eval()  # rotary: every layer places its tokens by the offsets
    ids = torch.randint(0, 40, (12,))
    buf = np.array([0, 3, 12], dtype=np.int64)
    s = torch.from_numpy(buf)  # shares buf's memory

    def padded(lengths):  # the same sequences padded, with their key mask: the reference
        rows = list(torch.split(ids, lengths))
        x = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        mask = torch.zeros(len(rows), max(lengths), dtype=torch.bool)
        for i, r in enumerate(rows):
            x[i, : len(r)], mask[i, : len(r)] = r, True
        return m(x, mask=mask)

    with torch.no_grad():
        calls.clear()
        torch.testing.assert_close(m.forward_packed(ids, s), padded([3, 9]), atol=1e-5, rtol=1e-5)
        assert len(calls) == 2  # the model's check and the first layer's; the other two layers reuse it
        v = s._version
        for write, lengths in ((lambda: buf.__setitem__(1, 8), [8, 4]),
                               (lambda: s.data.__setitem__(1, 5), [5, 7]),
                               (lambda: setattr(s, "data", torch.tensor([0, 2, 12])), [2, 10])):
            write()
            torch.testing.assert_close(m.forward_packed(ids, s), padded(lengths), atol=1e-5, rtol=1e-5)
        assert s._version == v  # none of these writes moved the version counter
        calls.clear()
        m.forward_packed(ids, torch.tensor([0, 2, 12]))  # another tensor, the same values: nothing to check again
        assert len(calls) == 1  # the model's own check only
        s1 = torch.tensor([0, 3, 12])
        m.forward_packed(ids, s1)
        s1[1] = 8  # the offsets reused below were read from s1: they must not change with it
        torch.testing.assert_close(m.forward_packed(ids, torch.tensor([0, 3, 12])), padded([3, 9]), atol=1e-5,
                                   rtol=1e-5)


def test_packed_constructor_flag_and_cls_layout():
    """Encoder(packed=True) packs inside forward; with cls pooling sequence i's cls row is seqlens[i] + i."""
    torch.manual_seed(0)
    plain = _encoder("cls", "sequence", "learned")
    torch.manual_seed(0)
    packed = _encoder("cls", "sequence", "learned", packed=True)
    idx, mask = _batch()
    torch.testing.assert_close(packed(idx, mask=mask), plain(idx, mask=mask), atol=1e-10, rtol=0)
    ids, seqlens = pack(idx, mask)
    h = plain.forward_features_packed(ids, seqlens)  # (1, T + S, D)
    assert h.shape == (1, int(mask.sum()) + 4, 16)
    hp = plain.forward_features(idx, mask=mask)  # (B, 1 + N, D), cls first
    torch.testing.assert_close(h[0, seqlens[:-1] + torch.arange(4)], hp[:, 0], atol=1e-10, rtol=0)


def test_packed_encoder_errors():
    model = _encoder("mean", "sequence", "learned")
    idx, mask = _batch()
    ids, seqlens = pack(idx, mask)
    with pytest.raises(FormersError, match="never decrease"):
        model.forward_packed(ids, torch.tensor([0, 12, 5, 26]))
    with pytest.raises(FormersError, match="end at"):
        model.forward_packed(ids, seqlens[:-1])
    with pytest.raises(FormersError, match="start at 0"):
        model.forward_packed(ids, seqlens + 1)
    with pytest.raises(FormersError, match="integer"):
        model.forward_packed(ids, seqlens.double())
    for given in (seqlens.tolist(), tuple(seqlens.tolist())):  # a list: the same one-line error, at every entry
        with pytest.raises(FormersError, match="1-D integer tensor of cumulative offsets"):
            model.forward_packed(ids, given)
        with pytest.raises(FormersError, match="1-D integer tensor of cumulative offsets"):
            model.stack.blocks[0].attn.fn(torch.randn(1, ids.shape[-1], 16, dtype=torch.float64), seqlens=given)
    with pytest.raises(FormersError, match="non-negative integers"):  # 2.7 is no length (it would become 2)
        lengths_to_seqlens([2.7, 3])
    with pytest.raises(FormersError, match="right-padded"):
        model(idx, mask=mask.flip(1), packed=True)
    with pytest.raises(FormersError, match="max_len"):
        model.forward_packed(torch.zeros(13, dtype=torch.long), torch.tensor([0, 13]))
    dual = formers.create_model("dual_encoder", vocab=40, dim=16, depth=1, max_len=8).double()
    with pytest.raises(FormersError, match="does not run packed"):
        dual(torch.zeros(2, 2, 8, dtype=torch.long), mask=torch.ones(2, 2, 8, dtype=torch.bool), packed=True)


def test_packed_token_level_with_one_token_and_one_class():
    """A token-level encoder with one class on a batch of one valid token: (T, C) = (1, 1) logits still unpack to
    (B, N, 1), as the padded forward gives (they once read as (1, T) packed ids and lost the class axis)."""
    torch.manual_seed(0)
    m = formers.create_model("encoder", vocab=40, dim=16, depth=1, max_len=12, num_classes=1, level="token",
                             pool="mean").double()
    idx, mask = _batch((1, 0))
    padded, packed_ = m(idx, mask=mask), m(idx, mask=mask, packed=True)
    assert packed_.shape == padded.shape == (2, 1, 1)
    torch.testing.assert_close(packed_[mask], padded[mask], atol=1e-10, rtol=0)


# -------------------------------------------------------------------------------------------------- pack / unpack

def test_pack_unpack_round_trip():
    x = torch.randn(3, 6, 5)
    mask = torch.rand(3, 6) < 0.6  # holes anywhere
    mask[1] = False  # an empty row
    packed, seqlens = pack(x, mask)
    assert packed.shape == (1, int(mask.sum()), 5)
    assert seqlens.tolist() == [0, *mask.sum(1).cumsum(0).tolist()]
    back = unpack(packed, seqlens, mask=mask, fill=-1.0)
    torch.testing.assert_close(back[mask], x[mask], atol=0, rtol=0)
    assert bool((back[~mask] == -1.0).all())
    # right-padded rows: unpacking left-aligned rebuilds the padded batch
    lengths = torch.tensor([4, 0, 6])
    right = torch.arange(6)[None] < lengths[:, None]
    p, s = pack(x, right)
    torch.testing.assert_close(unpack(p, s, length=6), x * right[..., None], atol=0, rtol=0)
    # a list of sequences packs to the same as the padded batch
    q, s2 = pack_sequences([x[i, :n] for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(q, p, atol=0, rtol=0)
    assert torch.equal(s2, s)
    assert positions_in_sequence(torch.tensor([0, 2, 2, 5])).tolist() == [0, 1, 0, 1, 2]


def test_seqlens_checks():
    with pytest.raises(FormersError, match="never decrease"):
        check_seqlens(torch.tensor([0, 4, 3]))
    with pytest.raises(FormersError, match="end at"):
        check_seqlens(torch.tensor([0, 4, 6]), total=7)
    with pytest.raises(FormersError, match="1-D integer"):
        check_seqlens(torch.tensor([0.0, 3.0]))
    with pytest.raises(FormersError, match="does not hold"):
        unpack(torch.randn(1, 5, 2), torch.tensor([0, 2, 5]), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(FormersError, match="end at"):
        varlen_attention(torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.tensor([0, 2, 6]))
