"""P73 Informer: ProbSparse self-attention claims, checked against full softmax attention written here (float64).

(a) when u = c * ceil(ln L) >= L every query is active and ProbSparse is full attention (bidirectional, causal);
(b) for any L, exactly u query rows per head are full-attention rows and every other row is the lazy context,
    mean(V) (encoder) or cumsum(V) (masked decoder, as V.cumsum in the official models/attn.py);
(c) only u x L_K query-key scores are formed for the active queries.
"""

import math

import pytest
import torch

import formers
from formers.nn import sparse_attention as sa

D, H = 16, 2


def heads(x, w):
    B, N, _ = x.shape
    return (x @ w.T).view(B, N, H, -1).transpose(1, 2)  # (B, H, N, Dh)


def full_attention(m, x, context=None, causal=False, mask=None, project=True):
    """softmax(Q K^T / sqrt(d)) V per head with explicit -inf masking; rows with no key are zero."""
    src = x if context is None else context
    q, k, v = heads(x, m.q.weight), heads(src, m.kv.weight[:D]), heads(src, m.kv.weight[D:])
    s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    allowed = torch.ones_like(s, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(x.shape[1], src.shape[1], dtype=torch.bool).tril()
    if mask is not None:
        allowed &= mask[:, None, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    y = torch.softmax(s.masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ v
    if not project:
        return y, v
    return y.transpose(1, 2).reshape(x.shape[0], x.shape[1], D) @ m.out.weight.T


@pytest.mark.parametrize("causal, selection", [(False, "online"), (True, "online"), (True, "global")])
def test_every_query_active_equals_full_attention(causal, selection):
    # L = 10, c = 5: u = 5 * ceil(ln 10) = 15 >= 10 (the fact sheet's claim test a)
    m = formers.build("mixer", "probsparse", dim=D, heads=H, causal=causal, factor=5,
                      causal_selection=selection).double()
    x = torch.randn(3, 10, D, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 0] = False
    y = m(x, mask=mask)
    x2 = x.detach().clone().requires_grad_(True)
    ref = full_attention(m, x2, causal=causal, mask=mask)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad((y * g).sum(), x)[0],
                               torch.autograd.grad((ref * g).sum(), x2)[0], atol=1e-10, rtol=1e-10)


def test_cross_attention_full_by_default_and_sparse_on_request():
    x, ctx = torch.randn(2, 9, D, dtype=torch.float64), torch.randn(2, 30, D, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False
    m = formers.build("mixer", "probsparse", dim=D, heads=H, causal=True, factor=1).double()
    # Informer's decoder: full cross-attention, never causal, however small the factor
    torch.testing.assert_close(m(x, context=ctx, mask=mask), full_attention(m, x, ctx, mask=mask),
                               atol=1e-10, rtol=1e-10)
    sparse = formers.build("mixer", "probsparse", dim=D, heads=H, factor=5, sparse_cross=True).double()
    sparse.load_state_dict(m.state_dict())
    torch.testing.assert_close(sparse(x, context=ctx, mask=mask), full_attention(m, x, ctx, mask=mask),
                               atol=1e-10, rtol=1e-10)  # u = 5 * ceil(ln 9) >= 9 queries: all active


@pytest.mark.parametrize("causal", [False, True])
def test_u_rows_are_full_attention_the_rest_lazy(causal):
    """Per head, exactly u = c * ceil(ln L) rows equal full attention and the others mean(V) or cumsum(V)."""
    L = 30
    m = formers.build("mixer", "probsparse", dim=D, heads=H, causal=causal, factor=1,
                      causal_selection="global").double()
    with torch.no_grad():
        m.out.weight.copy_(torch.eye(D))  # the output is then the concatenated head outputs
    x = torch.randn(2, L, D, dtype=torch.float64)
    y = m(x).view(2, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
    full, v = full_attention(m, x, causal=causal, project=False)
    lazy = v.cumsum(2) if causal else v.mean(2, keepdim=True).expand_as(v)
    is_full = (y - full).abs().amax(-1) < 1e-10  # (B, H, L)
    is_lazy = (y - lazy).abs().amax(-1) < 1e-10
    u = math.ceil(math.log(L))
    assert (is_full | is_lazy).all()
    if causal:  # row 0 sees only v_0: full attention and cumsum agree there, whether it was selected or not
        is_full, is_lazy = is_full[..., 1:], is_lazy[..., 1:]
        assert (is_full ^ is_lazy).all() and ((is_full.sum(-1) == u) | (is_full.sum(-1) == u - 1)).all()
    else:
        assert (is_full ^ is_lazy).all() and (is_full.sum(-1) == u).all()


def test_only_u_by_lk_scores_for_the_active_queries(monkeypatch):
    shapes = []
    real = sa._attend

    def spy(parts, dropout, training):
        shapes.append(tuple(parts[0].scores.shape))
        return real(parts, dropout, training)

    monkeypatch.setattr(sa, "_attend", spy)
    m = formers.build("mixer", "probsparse", dim=D, heads=H, factor=5)
    for L in (96, 384):
        m(torch.randn(2, L, D))
        u = 5 * math.ceil(math.log(L))
        assert shapes[-1] == (2, H, 1, u, L) and u < L / 3
