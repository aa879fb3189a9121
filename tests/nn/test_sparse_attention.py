"""Sparse/windowed mixers against naive references: each pattern is built here as an explicit N x N boolean matrix
from the paper's definition, and softmax attention is computed row by row over the allowed keys (float64)."""

import math

import pytest
import torch

import formers
from formers.nn import sparse_attention as sa
from formers.nn.attention import KVCache

D, H = 16, 2


def split_heads(x, w):
    """x (B, N, D) @ w^T -> (B, H, N, Dh)."""
    B, N, _ = x.shape
    return (x @ w.T).view(B, N, H, -1).transpose(1, 2)


def project(m, x, q_lin=None, kv_lin=None):
    wq, wkv = (q_lin or m.q).weight, (kv_lin or m.kv).weight
    return split_heads(x, wq), split_heads(x, wkv[:D]), split_heads(x, wkv[D:])


def naive(q, k, v, allowed, bias=None):
    """The explicit O(N^2) formula: softmax(q k^T / sqrt(d) + bias) with disallowed scores at -inf, every
    allowed (B or 1, H or 1, N, Nk) given; rows with no allowed key are zero."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    allowed = allowed.expand_as(s)
    empty = ~allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0), -1)
    return p.masked_fill(empty, 0.0) @ v


def merge(m, y):
    B, _, N, _ = y.shape
    return y.transpose(1, 2).reshape(B, N, D) @ m.out.weight.T


def band(N, window, causal):
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None]
    if causal:
        return (i - j >= 0) & (i - j < window)
    return (i - j >= -(window // 2)) & (i - j <= window - window // 2 - 1)


def local_ref(m, x, mask, positions):
    q, k, v, bias = heads_with_positions(m, x, positions)
    allowed = band(x.shape[1], m.window, m.causal)[None, None] & key_mask(mask, x)
    return merge(m, naive(q, k, v, allowed, bias))


def longformer_ref(m, x, mask, positions):
    N, g = x.shape[1], m.global_tokens
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    causal = (j <= i) if m.causal else torch.ones(N, N, dtype=torch.bool)
    sliding = (band(N, m.window, m.causal) | (j < g)) & causal
    q, k, v, bias = heads_with_positions(m, x, positions)
    y = naive(q, k, v, sliding[None, None] & key_mask(mask, x), bias)
    if m.separate_global:
        q, k, v, bias = heads_with_positions(m, x, positions, m.q_global, m.kv_global)
    yg = naive(q, k, v, causal[None, None] & key_mask(mask, x), bias)  # global rows: every (earlier) key
    return merge(m, torch.where((torch.arange(N) < g)[:, None], yg, y))


def bigbird_pattern(m, N):
    """(H, N, N) from the block rules; the random blocks are the top-r candidates by m.rand_scores, chosen here."""
    C, r, gb = m.block, m.random_blocks, m.global_blocks
    nb = -(-N // C)
    G = set(range(min(gb, nb))) | (set() if m.causal else set(range(max(0, nb - gb), nb)))
    allowed = torch.zeros(H, N, N, dtype=torch.bool)
    for h in range(H):
        for a in range(nb):
            win = {a - 1, a} if m.causal else {a - 1, a, a + 1}
            cands = [c for c in range(nb) if c not in win and c not in G and (c < a - 1 or not m.causal)]
            cands.sort(key=lambda c: -float(m.rand_scores[h, a, c]))
            blocks = ({c for c in win if 0 <= c < nb} | G | set(cands[:r]))
            if a in G and not m.causal:
                blocks = set(range(nb))
            for i in range(a * C, min(N, (a + 1) * C)):
                for c in blocks:
                    for j in range(c * C, min(N, (c + 1) * C)):
                        allowed[h, i, j] = j <= i or not m.causal
    return allowed


def sparse_pattern(m, N):
    l, c = m.stride, m.summary
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    if m.pattern == "strided":
        a1 = ((i - j >= 0) & (i - j <= l)) if m.causal else ((i - j).abs() <= l)
        a2 = (i - j) % l == 0
    else:
        a1 = i // l == j // l
        a2 = j % l >= l - c
    return (a1 | a2) & ((j <= i) if m.causal else torch.ones(N, N, dtype=torch.bool))


def pattern_ref(pattern):
    def ref(m, x, mask, positions):
        q, k, v, bias = heads_with_positions(m, x, positions)
        p = pattern(m, x.shape[1])
        return merge(m, naive(q, k, v, (p if p.dim() == 3 else p[None])[None] & key_mask(mask, x), bias))
    return ref


def heads_with_positions(m, x, positions, q_lin=None, kv_lin=None):
    q, k, v = project(m, x, q_lin, kv_lin)
    bias = None
    if positions is not None:
        pos = torch.arange(x.shape[1])
        q, k = positions.rotate(q, k, pos, pos)
        bias = positions.bias(pos, pos, H)
        bias = None if bias is None else bias.double()
    return q, k, v, bias


def key_mask(mask, x):
    return torch.ones(1, 1, 1, x.shape[1], dtype=torch.bool) if mask is None else mask[:, None, None, :]


CASES = {
    "local": ({"window": 5}, local_ref),
    "local_even": ({"window": 6}, local_ref),
    "longformer": ({"window": 6, "global_tokens": 2}, longformer_ref),
    "longformer_shared": ({"window": 5, "global_tokens": 3, "separate_global": False}, longformer_ref),
    "bigbird": ({"block": 2, "random_blocks": 1, "global_blocks": 1, "max_len": 32}, pattern_ref(bigbird_pattern)),
    "sparse_strided": ({"pattern": "strided", "stride": 4}, pattern_ref(sparse_pattern)),
    "sparse_fixed": ({"pattern": "fixed", "stride": 4, "summary": 2}, pattern_ref(sparse_pattern)),
}


def make(case, causal, **extra):
    name = case.split("_")[0]
    return formers.build("mixer", name, dim=D, heads=H, causal=causal, **{**CASES[case][0], **extra}).double()


def position(kind):
    return None if kind is None else formers.build("position", kind, dim=D)


@pytest.mark.parametrize("impl", ["blocked", "dense"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal, pos, N", [(False, None, 19), (True, None, 19), (False, "alibi", 19),
                                            (True, "alibi", 19), (True, "rope", 19), (False, "rope", 3),
                                            (True, None, 2)])
def test_matches_naive_pattern_values_and_grads(case, causal, pos, N, impl):
    """N = 19 spans several blocks; N = 2, 3 fit in one block (the unpadded single-block path). Both paths: the
    blocked gathers and the explicit pattern through the fused kernel."""
    m = make(case, causal, impl=impl)
    ref = CASES[case][1]
    positions = position(pos)
    x = torch.randn(2, N, D, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 14:] = False
    mask[1, 1] = False
    y = m(x, mask=mask, positions=positions)
    x2 = x.detach().clone().requires_grad_(True)
    r = ref(m, x2, mask, positions)
    torch.testing.assert_close(y, r, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    (gr,) = torch.autograd.grad((r * g).sum(), x2)
    torch.testing.assert_close(gx, gr, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_patterns_are_really_sparse(case):
    """The reference patterns keep well under all keys at N = 19, so the tests above check sparsity, not softmax."""
    m = make(case, causal=False)
    N = 19
    if case.startswith("local"):
        p = band(N, m.window, False)
    elif case.startswith("longformer"):
        p = band(N, m.window, False) | (torch.arange(N) < m.global_tokens)[None] | (torch.arange(N) < 3)[:, None]
    elif case == "bigbird":
        p = bigbird_pattern(m, N)
    else:
        p = sparse_pattern(m, N)
    assert p.float().mean() < 0.75
    assert p.any(-1).all()


@pytest.mark.parametrize("impl", ["blocked", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_causal_no_leak(case, impl):
    m = make(case, causal=True, impl=impl)
    x = torch.randn(2, 21, D, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 11:] = torch.randn(2, 10, D, dtype=torch.float64)
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :11], y2[:, :11], atol=0, rtol=0)
    assert not torch.allclose(y[:, 11:], y2[:, 11:])
    y[:, 10].sum().backward()
    assert x.grad[:, 11:].abs().max() == 0 and x.grad[:, :11].abs().max() > 0


@pytest.mark.parametrize("impl", ["blocked", "dense"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_cached_decoding_equals_full(case, pos, impl):
    """Chunks and single tokens through a KVCache equal one full pass (queries at an offset, keys growing)."""
    m = make(case, causal=True, impl=impl)
    positions = position(pos)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    full = m(x, positions=positions)
    for cuts in ([0, 5, 6, 13, 23], list(range(24))):
        cache = KVCache()
        parts = [m(x[:, a:b], cache=cache, positions=positions) for a, b in zip(cuts[:-1], cuts[1:])]
        assert cache.length == 23
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", ["blocked", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_padding_never_matters_and_empty_rows_are_zero(case, impl):
    m = make(case, causal=False, impl=impl)
    x = torch.randn(3, 17, D, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[0, 12:] = False
    mask[1] = False
    mask[2, ::3] = False
    y = m(x, mask=mask)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    x2 = x.detach().clone()
    x2[~mask] = torch.randn(int((~mask).sum()), D, dtype=torch.float64) * 10
    y2 = m(x2, mask=mask)
    torch.testing.assert_close(y2[mask], y[mask], atol=1e-12, rtol=1e-12)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name, opts, keys_per_query", [
    ("local", {"window": 16}, 2 * 16),
    ("longformer", {"window": 16, "global_tokens": 2}, 2 * 16 + 2),
    ("bigbird", {"block": 8, "random_blocks": 2, "max_len": 1024}, (2 + 3 + 2) * 8 + 2 * 8),  # + global rows
    ("sparse", {"pattern": "strided", "stride": 32}, 3 * 32 + 1024 // 32),
    ("sparse", {"pattern": "fixed", "stride": 32, "summary": 4}, 32 + 4 * 1024 // 32),
])
@pytest.mark.parametrize("causal", [False, True])
def test_score_tensors_are_not_quadratic(monkeypatch, name, opts, keys_per_query, causal):
    """No N x N score matrix: every softmax runs over at most ~keys_per_query candidates per query."""
    seen = []
    real = sa._attend

    def spy(parts, dropout, training):
        seen.append(sum(p.scores.numel() for p in parts))
        return real(parts, dropout, training)

    monkeypatch.setattr(sa, "_attend", spy)
    N = 1024
    m = formers.build("mixer", name, dim=D, heads=H, causal=causal, **opts)
    with torch.no_grad():
        m(torch.randn(1, N, D))
    assert 0 < max(seen) and sum(seen) <= H * N * (keys_per_query + 8) < H * N * N / 4


@pytest.mark.parametrize("name, opts, N, dense", [
    ("longformer", {"window": 512}, 1024, True),  # LRA's window covers most of a 1K input
    ("bigbird", {"block": 64, "max_len": 1024}, 1024, True),
    ("local", {"window": 128}, 2048, False),
    ("local", {"window": 16}, 1024, False),
])
def test_auto_path_goes_dense_only_when_the_pattern_is(monkeypatch, name, opts, N, dense):
    calls = []
    real = sa.F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sa.F, "scaled_dot_product_attention", spy)
    m = formers.build("mixer", name, dim=D, heads=H, **opts)
    with torch.no_grad():
        m(torch.randn(1, N, D))
    assert bool(calls) == dense
    with pytest.raises(formers.FormersError, match="impl must be"):
        formers.build("mixer", name, dim=D, heads=H, impl="fast")


def test_bigbird_random_blocks_fixed_by_seed():
    a = formers.build("mixer", "bigbird", dim=D, heads=H, max_len=64, block=4, seed=3)
    b = formers.build("mixer", "bigbird", dim=D, heads=H, max_len=64, block=4, seed=3)
    c = formers.build("mixer", "bigbird", dim=D, heads=H, max_len=64, block=4, seed=4)
    assert torch.equal(a.rand_scores, b.rand_scores) and not torch.equal(a.rand_scores, c.rand_scores)
    assert "rand_scores" not in a.state_dict()
    idx, ok = a.random_block_ids(0, 16, 16)
    # 3 random blocks per query block, never a window or global block, distinct, different across heads
    for h in range(H):
        for q in range(16):
            chosen = idx[h, q][ok[h, q]].tolist()
            assert len(chosen) == min(3, len([c for c in range(16) if abs(c - q) > 1 and c not in (0, 15)]))
            assert len(set(chosen)) == len(chosen) and all(abs(c - q) > 1 and c not in (0, 15) for c in chosen)
    assert not torch.equal(idx[0], idx[1])
    with pytest.raises(formers.FormersError, match="max_len"):
        a(torch.randn(1, 65, D))


def test_sparse_and_window_options_validated():
    with pytest.raises(formers.FormersError, match="pattern"):
        formers.build("mixer", "sparse", dim=D, heads=H, pattern="dilated")
    with pytest.raises(formers.FormersError, match="summary"):
        formers.build("mixer", "sparse", dim=D, heads=H, stride=4, summary=5)
    with pytest.raises(formers.FormersError, match="window"):
        formers.build("mixer", "local", dim=D, heads=H, window=0)
    with pytest.raises(formers.FormersError, match="divisible"):
        formers.build("mixer", "local", dim=D, heads=3)
    m = formers.build("mixer", "local", dim=D, heads=H)
    with pytest.raises(formers.FormersError, match="context"):
        m(torch.randn(1, 4, D), context=torch.randn(1, 3, D))
    with pytest.raises(formers.FormersError, match="causal"):
        m(torch.randn(1, 4, D), cache=KVCache())
    with pytest.raises(formers.FormersError, match="mask must have shape"):
        m(torch.randn(1, 4, D), mask=torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.parametrize("name", ["local", "longformer", "bigbird", "sparse"])
def test_lm_generation_cached_equals_uncached(name):
    opts = {"local": {"window": 4}, "longformer": {"window": 4, "global_tokens": 2},
            "bigbird": {"block": 4, "random_blocks": 1}, "sparse": {"stride": 4, "summary": 1}}[name]
    model = formers.create_model("lm", vocab=30, dim=32, depth=2, max_len=64, position="rope",
                                 block={"mixer": {"name": name, "heads": 4, **opts}}).eval()
    prompt = torch.randint(0, 30, (2, 5))
    a = model.generate(prompt, 20, greedy=True, use_cache=True)
    b = model.generate(prompt, 20, greedy=True, use_cache=False)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------- linformer


def linformer_ref(m, x, mask=None, context=None):
    """softmax(Q (E K)^T / sqrt(d)) (F V) with explicit sums over the sequence; padded keys/values zeroed."""
    src = x if context is None else context
    q, k, v = split_heads(x, m.q.weight), split_heads(src, m.kv.weight[:D]), split_heads(src, m.kv.weight[D:])
    B, _, M, Dh = k.shape
    E = m.E
    Fm = E if m.F is None else m.F
    out = torch.zeros(B, H, x.shape[1], Dh, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            real = [n for n in range(M) if mask is None or mask[b, n]]
            kp = sum(E[:, n, None] * k[b, h, n] for n in real) if real else torch.zeros(m.k, Dh, dtype=x.dtype)
            vp = sum(Fm[:, n, None] * v[b, h, n] for n in real) if real else torch.zeros(m.k, Dh, dtype=x.dtype)
            out[b, h] = torch.softmax(q[b, h] @ kp.T / math.sqrt(Dh), -1) @ vp
    return merge(m, out)


@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_matches_naive(share_kv):
    m = formers.build("mixer", "linformer", dim=D, heads=H, max_len=24, k=6, share_kv=share_kv).double()
    assert m.E.shape == (6, 24) and (m.F is None) == share_kv
    x = torch.randn(2, 13, D, dtype=torch.float64, requires_grad=True)  # shorter than max_len: first 13 columns
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    y = m(x, mask=mask)
    x2 = x.detach().clone().requires_grad_(True)
    r = linformer_ref(m, x2, mask)
    torch.testing.assert_close(y, r, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad((y * g).sum(), x)[0], torch.autograd.grad((r * g).sum(), x2)[0],
                               atol=1e-10, rtol=1e-10)
    x3 = x.detach().clone()
    x3[1, 9:] = 5.0  # padded tokens change nothing for the real ones
    torch.testing.assert_close(m(x3, mask=mask)[mask], y[mask].detach(), atol=1e-12, rtol=1e-12)
    empty = torch.zeros(2, 13, dtype=torch.bool)
    assert (m(x, mask=empty) == 0).all()


def test_linformer_cross_attention_limits_and_defaults():
    m = formers.build("mixer", "linformer", dim=D, heads=H, max_len=20, k=4).double()
    x, ctx = torch.randn(2, 7, D, dtype=torch.float64), torch.randn(2, 11, D, dtype=torch.float64)
    torch.testing.assert_close(m(x, context=ctx), linformer_ref(m, x, context=ctx), atol=1e-10, rtol=1e-10)
    with pytest.raises(formers.FormersError, match="max_len"):
        m(torch.randn(1, 21, D, dtype=torch.float64))
    with pytest.raises(formers.FormersError, match="causal"):
        formers.build("mixer", "linformer", dim=D, heads=H, causal=True)
    with pytest.raises(formers.FormersError, match="rope"):
        m(x, positions=position("alibi"))
    assert formers.build("mixer", "linformer", dim=D, heads=H, max_len=64).k == 64  # k = min(256, max_len)
    assert formers.build("mixer", "linformer", dim=D, heads=H, max_len=4096).k == 256
    assert formers.registry.get("mixer", "linformer").max_len is True


# ---------------------------------------------------------------------------------------------------- probsparse


def probsparse_ref(m, x, mask=None, causal=False):
    """Informer's steps written out: sampled-key measurement M, top-u (or online) selection, full rows for the
    active queries, mean(V) / cumsum(V) for the others. Uses the module's own key sample (its randomness)."""
    q, k, v = project(m, x)
    B, _, N, Dh = q.shape
    u = min(N, max(1, m.factor * math.ceil(math.log(N))))
    online = causal and m.causal_selection == "online"
    idx = m.sample_keys(N, N, online)
    real = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(B, H, N, Dh, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            M = []
            for i in range(N):
                vals = [float((q[b, h, i] @ k[b, h, j]).detach()) / math.sqrt(Dh)
                        for j in idx[i].tolist() if real[b, j]]
                Mi = max(vals) - sum(vals) / ((i + 1) if online else N) if vals else -math.inf
                M.append(Mi if real[b, i] else -math.inf)
            if online:
                active = [sum(M[j] >= M[i] for j in range(i)) < u for i in range(N)]
            else:
                top = sorted(range(N), key=lambda i: -M[i])[:u]
                active = [i in top for i in range(N)]
            for i in range(N):
                if active[i]:
                    js = [j for j in range(N) if real[b, j] and (j <= i or not causal)]
                    if js:
                        out[b, h, i] = torch.softmax(k[b, h, js] @ q[b, h, i] / math.sqrt(Dh), 0) @ v[b, h, js]
                elif causal:
                    out[b, h, i] = sum((v[b, h, j] for j in range(i + 1) if real[b, j]), torch.zeros(Dh))
                else:
                    js = [j for j in range(N) if real[b, j]]
                    if js:
                        out[b, h, i] = v[b, h, js].mean(0)
    return merge(m, out)


@pytest.mark.parametrize("causal, selection", [(False, "online"), (True, "online"), (True, "global")])
def test_probsparse_matches_naive(causal, selection):
    m = formers.build("mixer", "probsparse", dim=D, heads=H, causal=causal, factor=1,
                      causal_selection=selection).double()
    x = torch.randn(2, 40, D, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 31:] = False
    y = m(x, mask=mask)
    x2 = x.detach().clone().requires_grad_(True)
    r = probsparse_ref(m, x2, mask, causal)
    torch.testing.assert_close(y, r, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad((y * g).sum(), x)[0], torch.autograd.grad((r * g).sum(), x2)[0],
                               atol=1e-10, rtol=1e-10)


def test_probsparse_online_selection_is_causal():
    m = formers.build("mixer", "probsparse", dim=D, heads=H, causal=True, factor=1).double()
    x = torch.randn(2, 50, D, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 30:] = torch.randn(2, 20, D, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(m(x2)[:, :30], y[:, :30], atol=0, rtol=0)
    y[:, 29].sum().backward()
    assert x.grad[:, 30:].abs().max() == 0


def test_online_top_matches_rank_rule_across_chunks():
    """Active iff fewer than u earlier values are >= it; with ties, -inf and several chunks."""
    M = torch.randint(0, 12, (2, 3, 150)).double()
    M[0, 0, 40:60] = -math.inf
    for u in (1, 5, 70):
        got = sa.online_top(M, u, chunk=16)
        want = torch.tensor([[[int((M[b, h, :i] >= M[b, h, i]).sum()) < u for i in range(150)]
                              for h in range(3)] for b in range(2)])
        assert torch.equal(got, want)


def test_probsparse_sampling_seed_and_global_rng():
    m = formers.build("mixer", "probsparse", dim=D, heads=H, factor=1, seed=7).eval()
    x = torch.randn(2, 60, D)
    assert torch.equal(m(x), m(x))  # the same key sample every call
    assert torch.equal(m.sample_keys(60, 60, False), m.sample_keys(60, 60, False))
    other = formers.build("mixer", "probsparse", dim=D, heads=H, factor=1, seed=8)
    assert not torch.equal(m.sample_keys(60, 60, False), other.sample_keys(60, 60, False))
    free = formers.build("mixer", "probsparse", dim=D, heads=H, factor=1, seed=None)
    torch.manual_seed(1)
    a = free.sample_keys(60, 60, False)
    torch.manual_seed(1)
    assert torch.equal(a, free.sample_keys(60, 60, False)) and not torch.equal(a, free.sample_keys(60, 60, False))
    online = m.sample_keys(60, 60, True)
    assert (online <= torch.arange(60)[:, None]).all() and online.shape == (60, 5)  # U = ceil(ln 60) = 5
    with pytest.raises(formers.FormersError, match="cache"):
        m(x, cache=KVCache())
    assert formers.registry.get("mixer", "probsparse").obj.supports_cache is False


def test_registry_entries():
    expect = {"probsparse": ("P73", True, None), "linformer": ("P25", False, True), "local": ("P29", True, None),
              "longformer": ("P29", True, None), "bigbird": ("P29", True, True), "sparse": ("P29", True, None)}
    for name, (paper, causal_ok, max_len) in expect.items():
        e = formers.registry.get("mixer", name)
        assert (e.paper, e.causal_ok, e.max_len) == (paper, causal_ok, max_len), name
        assert e.doc and paper in e.obj.__doc__  # a first line, and the paper cited
