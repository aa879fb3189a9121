"""Softmax attention against a naive softmax(QK^T / sqrt(d) + bias) V written here, with masks and gradients."""

import math

import pytest
import torch

import formers
from formers.nn.attention import KVCache
from formers.nn.position import alibi_slopes


def naive_attention(m, x, context=None, causal=False, key_mask=None, bias=None):
    """Loops over batch and heads; every masked score set to -inf explicitly; empty rows give zeros."""
    B, N, D = x.shape
    src = x if context is None else context
    H, Hkv, Dh = m.heads, m.kv_heads, m.head_dim
    q = x @ m.q.weight.T
    kv = src @ m.kv.weight.T
    k, v = kv[..., : Hkv * Dh], kv[..., Hkv * Dh:]
    out = torch.zeros(B, N, H * Dh, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            qh = q[b, :, h * Dh:(h + 1) * Dh]
            kh = k[b, :, g * Dh:(g + 1) * Dh]
            vh = v[b, :, g * Dh:(g + 1) * Dh]
            s = qh @ kh.T / math.sqrt(Dh)
            if bias is not None:
                s = s + bias[h]
            for i in range(N):
                for j in range(src.shape[1]):
                    if (causal and j > i) or (key_mask is not None and not key_mask[b, j]):
                        s[i, j] = float("-inf")
            for i in range(N):
                if torch.isinf(s[i]).all():
                    continue  # stays zero
                out[b, i, h * Dh:(h + 1) * Dh] = torch.softmax(s[i], -1) @ vh
    return out @ m.out.weight.T


def make(dim=16, heads=4, causal=False, **kw):
    return formers.build("mixer", "softmax", dim=dim, heads=heads, causal=causal, **kw).double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_naive_values_and_grads(causal, explicit, kv_heads):
    m = make(causal=causal, explicit=explicit, kv_heads=kv_heads)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = naive_attention(m, x2, causal=causal)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    (gr,) = torch.autograd.grad((ref * g).sum(), x2)
    torch.testing.assert_close(gx, gr, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_and_empty_rows(causal):
    m = make(causal=causal)
    x = torch.randn(3, 6, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :] = False  # every key masked: the whole row must be zeros, not NaN
    mask[2, 0] = False  # with causal, query 0 sees no key at all
    y = m(x, mask=mask)
    ref = naive_attention(m, x.detach(), causal=causal, key_mask=mask)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    # the output projection has no bias, so fully masked rows are exactly zero
    assert (y[1] == 0).all()
    if causal:
        assert (y[2, 0] == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_cross_attention_with_context():
    m = make()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ctx = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    torch.testing.assert_close(m(x, context=ctx, mask=mask), naive_attention(m, x, ctx, key_mask=mask),
                               atol=1e-10, rtol=1e-10)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(heads=4, kv_heads=2)
    mha = make(heads=4, kv_heads=4)
    Dh = 4
    with torch.no_grad():
        mha.q.weight.copy_(gqa.q.weight)
        mha.out.weight.copy_(gqa.out.weight)
        k, v = gqa.kv.weight[: 2 * Dh], gqa.kv.weight[2 * Dh:]
        rep = lambda w: w.view(2, Dh, -1).repeat_interleave(2, 0).reshape(4 * Dh, -1)  # noqa: E731
        mha.kv.weight.copy_(torch.cat([rep(k), rep(v)]))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-12, rtol=1e-12)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "sinusoidal"])
def test_cache_chunks_equal_full_forward(position):
    """Feeding a sequence in chunks through the KV cache (queries shorter than keys) equals one full pass."""
    model = formers.create_model("lm", vocab=50, dim=32, depth=2, max_len=64, position=position).double().eval()
    ids = torch.randint(0, 50, (2, 13))
    full = model(ids)
    cache = model.new_cache()
    parts = [model(ids[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 10), (10, 13)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_cached_generation_equals_uncached(position):
    model = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=64, position=position).eval()
    prompt = torch.randint(0, 40, (2, 5))
    a = model.generate(prompt, 20, greedy=True, use_cache=True)
    b = model.generate(prompt, 20, greedy=True, use_cache=False)
    assert torch.equal(a, b)
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 20, temperature=1.0, top_k=10, use_cache=False,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_kv_cache_grows():
    c = KVCache()
    c.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    c.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert c.length == 4 and c.k[0, 0, 3].eq(1).all()


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "none"])
def test_lm_is_causal(position):
    """Changing future tokens leaves every earlier output unchanged."""
    model = formers.create_model("lm", vocab=30, dim=32, depth=3, max_len=32, position=position).double()
    ids = torch.randint(0, 30, (2, 16))
    ids2 = ids.clone()
    ids2[:, 9:] = torch.randint(0, 30, (2, 7))
    a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    # gradient of an early output w.r.t. later embeddings is exactly zero
    x = model.embed(ids).detach().requires_grad_(True)
    h = model.stack(model.position(x, 0) if model.position.kind == "absolute" else x,
                    positions=model._relative_positions())
    h[:, 4].sum().backward()
    assert x.grad[:, 5:].abs().max() == 0 and x.grad[:, :5].abs().max() > 0


def test_rope_scores_depend_only_on_offset():
    rope = formers.build("position", "rope", dim=32)
    q = torch.randn(1, 2, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 1, 16, dtype=torch.float64)

    def score(m, n):
        qr, kr = rope.rotate(q, k, torch.tensor([m]), torch.tensor([n]))
        return (qr * kr).sum(-1)

    for m, n, s in [(3, 1, 10), (0, 7, 100), (20, 20, 5)]:
        torch.testing.assert_close(score(m, n), score(m + s, n + s), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(score(3, 1), score(3, 2))
    # rotation preserves norms
    qr, _ = rope.rotate(q, k, torch.tensor([5]), torch.tensor([5]))
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))


def test_rope_partial_rotary_leaves_tail_untouched():
    rope = formers.build("position", "rope", dim=32, fraction=0.5)
    q = torch.randn(1, 1, 3, 16)
    qr, _ = rope.rotate(q, q, torch.arange(3) + 4, torch.arange(3) + 4)
    assert torch.equal(qr[..., 8:], q[..., 8:]) and not torch.allclose(qr[..., :8], q[..., :8])


@pytest.mark.parametrize("fraction,dtype", [(1.0, torch.float32), (0.5, torch.float64)])
def test_rope_equals_the_formula_with_shared_and_separate_positions(fraction, dtype):
    """q and k rotated at one positions tensor (the angles computed once for both) equal the RoFormer formula
    written here, and equal the rotation at an equal but separate tensor, to the bit; GQA-shaped k (fewer heads)
    too; a later change of `base` takes effect."""
    rope = formers.build("position", "rope", dim=32, fraction=fraction)
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16, dtype=dtype), torch.randn(2, 2, 7, 16, dtype=dtype)
    pos = torch.arange(5, 12)

    def formula(x):
        rd = int(16 * fraction) // 2 * 2
        i = torch.arange(rd // 2, dtype=torch.float64)
        ang = pos.double()[:, None] * rope.base ** (-2 * i / rd)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        x1, x2, tail = x[..., : rd // 2], x[..., rd // 2: rd], x[..., rd:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, tail], -1)

    for base in (10000.0, 500000.0):  # a longer context's base, set on the module after a first call
        rope.base = base
        qs, ks = rope.rotate(q, k, pos, pos)
        qa, ka = rope.rotate(q, k, pos, pos.clone())
        assert torch.equal(qs, qa) and torch.equal(ks, ka)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(qs, formula(q), atol=tol, rtol=tol)
        torch.testing.assert_close(ks, formula(k), atol=tol, rtol=tol)


def test_alibi_slopes_as_in_paper():
    # Press et al. (ALiBi), Sec. 3: for 8 heads the slopes are 1/2^1 ... 1/2^8; for 16 heads 1/2^0.5 ... 1/2^8.
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2.0 ** (-0.5 * i) for i in range(1, 17)]))
    # Non-power-of-two (official code): the 8-head slopes, then every other 16-head slope.
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(
        [2.0 ** -i for i in range(1, 9)] + [2.0 ** (-0.5 * i) for i in (1, 3, 5, 7)]))


def test_alibi_attention_matches_naive_bias():
    m = make(causal=True)
    alibi = formers.build("position", "alibi", dim=16)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    i = torch.arange(6)
    bias = -alibi_slopes(4).double()[:, None, None] * (i[:, None] - i[None, :]).abs()
    torch.testing.assert_close(m(x, positions=alibi), naive_attention(m, x, causal=True, bias=bias),
                               atol=1e-10, rtol=1e-10)


def test_sinusoidal_table():
    pe = formers.build("position", "sinusoidal", dim=8)
    t = pe.table(torch.arange(5))
    for p in range(5):
        for i in range(4):
            assert abs(t[p, 2 * i] - math.sin(p / 10000 ** (2 * i / 8))) < 1e-12
            assert abs(t[p, 2 * i + 1] - math.cos(p / 10000 ** (2 * i / 8))) < 1e-12


def test_bad_shapes_have_clear_errors():
    m = make()
    with pytest.raises(formers.FormersError, match="mask must have shape"):
        m(torch.randn(2, 5, 16, dtype=torch.float64), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(formers.FormersError, match="divisible"):
        formers.build("mixer", "softmax", dim=30, heads=4)
    lm = formers.create_model("lm", vocab=10, dim=16, depth=1, max_len=8)
    with pytest.raises(formers.FormersError, match="max_len"):
        lm(torch.randint(0, 10, (1, 9)))
    with pytest.raises(formers.FormersError, match="integer token ids"):
        lm(torch.randn(1, 4, 16))
