"""Softmax-variant mixers (clipped_softmax, gated, hard, topk, temperature, stickbreaking, mdha) against a naive
reference written here: loops over batch, heads and query rows, each row's weights built key by key."""

import math

import pytest
import torch

import formers
from formers.nn.attention import KVCache

DIM, HEADS = 8, 2


def softmax_row(s, vis, m):
    idx = [j for j in range(len(s)) if vis[j]]
    top = max(s[j] for j in idx).detach()
    e = {j: torch.exp(s[j] - top) for j in idx}
    z = sum(e.values())
    return torch.stack([e[j] / z if vis[j] else s[j] * 0 for j in range(len(s))])


def clipped_row(s, vis, m):
    gamma = m.gamma if m.alpha is None else -m.alpha / sum(vis)
    p = softmax_row(s, vis, m)
    return torch.stack([torch.clamp((m.zeta - gamma) * p[j] + gamma, 0.0, 1.0) for j in range(len(s))])


def hard_row(s, vis, m):
    """Straight-through: forward one-hot at the first visible maximum, gradient of the softmax."""
    idx = [j for j in range(len(s)) if vis[j]]
    best = idx[0]
    for j in idx:
        if s[j] > s[best]:
            best = j
    p = softmax_row(s, vis, m)
    onehot = torch.tensor([1.0 if j == best else 0.0 for j in range(len(s))], dtype=s.dtype)
    return p + (onehot - p).detach()


def topk_row(s, vis, m):
    idx = sorted((j for j in range(len(s)) if vis[j]), key=lambda j: -float(s[j].detach()))[: m.k]
    return softmax_row(s, [j in idx for j in range(len(s))], m)


def stick_row(s, vis, m, i):
    """a_ij = sigmoid(s_ij) * prod over visible m in (j, i] of (1 - sigmoid(s_im)); zero for j > i or masked."""
    out = []
    for j in range(len(s)):
        if not vis[j] or j > i:
            out.append(s[j] * 0)
            continue
        a = torch.sigmoid(s[j])
        for k in range(j + 1, i + 1):
            if vis[k]:
                a = a * (1 - torch.sigmoid(s[k]))
        out.append(a)
    return torch.stack(out)


def naive_dconv(u, w, causal, keep):
    """u (B, N, C), w (3, C); taps: current, previous, previous-but-one (causal) or next (bidirectional)."""
    B, N, _ = u.shape
    u = u * keep[..., None]
    shifts = (0, 1, 2) if causal else (0, 1, -1)
    rows = []
    for t in range(N):
        acc = 0
        for tap, sh in enumerate(shifts):
            if 0 <= t - sh < N:
                acc = acc + w[tap] * u[:, t - sh]
        rows.append(acc)
    return torch.stack(rows, 1)


def naive(m, x, *, causal, key_mask=None, row=softmax_row, positions=None):
    B, N, D = x.shape
    H, Hkv, Dh = m.heads, m.kv_heads, m.head_dim
    keep = torch.ones(B, N, dtype=x.dtype) if key_mask is None else key_mask.to(x.dtype)
    q, kv = x @ m.q.weight.T, x @ m.kv.weight.T
    if hasattr(m, "q_conv"):
        q = naive_dconv(q, m.q_conv, causal, keep)
        kv = naive_dconv(kv, m.kv_conv, causal, keep)
    k, v = kv[..., : Hkv * Dh], kv[..., Hkv * Dh:]
    out = [[None] * H for _ in range(B)]
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            qh, kh, vh = q[b, :, h * Dh:(h + 1) * Dh], k[b, :, g * Dh:(g + 1) * Dh], v[b, :, g * Dh:(g + 1) * Dh]
            if positions is not None:
                pos = torch.arange(N)
                qh, kh = positions.rotate(qh[None, None], kh[None, None], pos, pos)
                qh, kh = qh[0, 0], kh[0, 0]
            rows = []
            for i in range(N):
                vis = [(not causal or j <= i) and bool(keep[b, j]) for j in range(N)]
                if not any(vis):
                    rows.append(torch.zeros(Dh, dtype=x.dtype))
                    continue
                s = torch.stack([qh[i] @ kh[j] for j in range(N)]) * m.scale
                w = row(s, vis, m, i) if row is stick_row else row(s, vis, m)
                y = sum(w[j] * vh[j] for j in range(N))
                if hasattr(m, "gate_weight"):
                    y = y * torch.sigmoid(x[b, i, h * Dh:(h + 1) * Dh] @ m.gate_weight[h] + m.gate_bias[h])
                rows.append(y)
            out[b][h] = torch.stack(rows)  # (N, Dh)
    y = torch.stack([torch.cat(out[b], -1) for b in range(B)])  # (B, N, H*Dh)
    return y @ m.out.weight.T


CASES = {  # name -> (options, row function, causal settings)
    "clipped_softmax": ({"gamma": -0.08}, clipped_row, (False, True)),
    "clipped_alpha": ({"alpha": 0.5}, clipped_row, (False, True)),
    "gated": ({}, softmax_row, (False, True)),
    "hard": ({}, hard_row, (False, True)),
    "topk": ({"k": 3}, topk_row, (False, True)),
    "temperature": ({"temperature": 2.5}, softmax_row, (False, True)),
    "stickbreaking": ({}, stick_row, (True,)),
    "mdha": ({}, softmax_row, (False, True)),
}
NAME = {"clipped_alpha": "clipped_softmax"}


def make(case, causal, **kw):
    opts, _, _ = CASES[case]
    torch.manual_seed(0)
    m = formers.build("mixer", NAME.get(case, case), dim=DIM, heads=HEADS, causal=causal, **{**opts, **kw}).double()
    if case == "mdha":  # random taps, so that every tap is exercised
        with torch.no_grad():
            m.q_conv.normal_()
            m.kv_conv.normal_()
    return m


PARAMS = [(c, causal) for c in CASES for causal in CASES[c][2]]


@pytest.mark.parametrize("case,causal", PARAMS)
def test_values_and_input_grads_match_naive(case, causal):
    m = make(case, causal)
    torch.manual_seed(1)
    x = torch.randn(2, 6, DIM, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, ref = m(x), naive(m, x2, causal=causal, row=CASES[case][1])
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    (gr,) = torch.autograd.grad((ref * g).sum(), x2)
    torch.testing.assert_close(gx, gr, atol=1e-10, rtol=1e-10)
    assert gx.abs().max() > 0


@pytest.mark.parametrize("case,causal", PARAMS)
def test_padding_mask_matches_naive_and_padding_has_no_influence(case, causal):
    m = make(case, causal)
    torch.manual_seed(2)
    x = torch.randn(3, 6, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False  # right padding
    mask[1, :] = False  # nothing visible: zeros, not NaN
    mask[2, :2] = False  # left padding: with causal, queries 0 and 1 see no key
    y = m(x, mask=mask)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, naive(m, x.detach(), causal=causal, key_mask=mask, row=CASES[case][1]),
                               atol=1e-10, rtol=1e-10)
    assert (y[1] == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # changing padded tokens leaves every real token's output unchanged
    x2 = x.detach().clone()
    x2[~mask] = torch.randn(int((~mask).sum()), DIM, dtype=torch.float64) * 10
    torch.testing.assert_close(m(x2, mask=mask)[mask], y.detach()[mask], atol=1e-12, rtol=1e-12)


CAUSAL = [c for c in CASES if True in CASES[c][2]]


@pytest.mark.parametrize("case", CAUSAL)
def test_causal_no_leakage(case):
    m = make(case, True)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 4, DIM, dtype=torch.float64)
    a, b = m(x), m(x2)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("case", CAUSAL)
@pytest.mark.parametrize("position", [None, "rope"])
def test_cache_one_token_and_chunks_equal_full_pass(case, position):
    m = make(case, True)
    pos = None if position is None else formers.build("position", position, dim=DIM)
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    full = m(x, positions=pos)
    for cuts in ([(i, i + 1) for i in range(8)], [(0, 3), (3, 4), (4, 8)]):
        cache = KVCache()
        parts = torch.cat([m(x[:, a:b], positions=pos, cache=cache) for a, b in cuts], 1)
        torch.testing.assert_close(parts, full, atol=1e-10, rtol=1e-10)
        assert cache.length == 8


def test_rope_matches_naive_for_stickbreaking_and_mdha():
    rope = formers.build("position", "rope", dim=DIM)
    for case in ("stickbreaking", "mdha"):
        m = make(case, True)
        x = torch.randn(2, 5, DIM, dtype=torch.float64)
        torch.testing.assert_close(m(x, positions=rope), naive(m, x, causal=True, row=CASES[case][1], positions=rope),
                                   atol=1e-10, rtol=1e-10)


def test_topk_weights_have_exactly_k_nonzeros_and_k_ge_n_is_softmax():
    m = make("topk", False, k=3)
    s = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    w = m.probs(s, None)
    assert ((w > 0).sum(-1) == 3).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    kept = w > 0  # the kept keys are the 3 largest scores of each row
    assert (s.masked_fill(~kept, float("inf")).amin(-1) >= s.masked_fill(kept, float("-inf")).amax(-1)).all()
    dense = formers.build("mixer", "softmax", dim=DIM, heads=HEADS).double()
    big = make("topk", False, k=50)
    dense.load_state_dict(big.state_dict())
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    torch.testing.assert_close(big(x), dense(x), atol=1e-12, rtol=1e-12)


def test_hard_attention_picks_the_argmax_value_and_passes_softmax_gradients():
    m = make("hard", False)
    s = torch.randn(1, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    w = m.probs(s, None)
    assert torch.equal(w.detach(), torch.nn.functional.one_hot(s.argmax(-1), 6).double())
    g = torch.randn_like(w)
    (gs,) = torch.autograd.grad((w * g).sum(), s)
    s2 = s.detach().clone().requires_grad_(True)
    (gp,) = torch.autograd.grad((s2.softmax(-1) * g).sum(), s2)
    torch.testing.assert_close(gs, gp, atol=1e-14, rtol=1e-14)


def test_temperature_is_a_rescaled_softmax_and_flattens_weights():
    hot = make("temperature", False, temperature=4.0)
    base = formers.build("mixer", "softmax", dim=DIM, heads=HEADS, scale=1 / (4.0 * math.sqrt(DIM // HEADS)))
    base = base.double()
    base.load_state_dict(hot.state_dict())
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    torch.testing.assert_close(hot(x), base(x), atol=1e-12, rtol=1e-12)
    # a huge temperature gives uniform weights: the output is the projected mean of the values
    flat = make("temperature", False, temperature=1e12)
    v = (x @ flat.kv.weight.T)[..., DIM:].mean(1, keepdim=True)
    torch.testing.assert_close(flat(x), (v @ flat.out.weight.T).expand(-1, 6, -1), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name,opts,match", [
    ("clipped_softmax", {"gamma": 0.1}, "gamma <= 0"),
    ("clipped_softmax", {"zeta": 0.9}, "zeta >= 1"),
    ("clipped_softmax", {"alpha": -1.0}, "alpha"),
    ("gated", {"gate_init": 1.5}, "gate_init"),
    ("gated", {"head_dim": 8}, "heads \\* head_dim"),
    ("topk", {"k": 0}, "k >= 1"),
    ("temperature", {"temperature": 0.0}, "temperature"),
    ("stickbreaking", {"causal": False}, "causal"),
])
def test_bad_options_raise(name, opts, match):
    with pytest.raises(formers.FormersError, match=match):
        formers.build("mixer", name, **{"dim": DIM, "heads": HEADS, **opts})


@pytest.mark.parametrize("name", ["stickbreaking", "mdha"])
def test_no_cross_attention(name):
    m = formers.build("mixer", name, dim=DIM, heads=HEADS, causal=True)
    with pytest.raises(formers.FormersError, match="cross-attention"):
        m(torch.randn(1, 3, DIM), context=torch.randn(1, 4, DIM))


def test_cross_attention_for_gated_uses_query_input_gate():
    m = make("gated", False)
    x, ctx = torch.randn(2, 3, DIM, dtype=torch.float64), torch.randn(2, 5, DIM, dtype=torch.float64)
    plain = formers.build("mixer", "softmax", dim=DIM, heads=HEADS).double()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("gate")})
    B, N = 2, 3
    y_heads = []  # plain attention per head, gated by the query-side input, through the shared output projection
    q = (x @ m.q.weight.T).view(B, N, HEADS, -1).transpose(1, 2)
    kv = (ctx @ m.kv.weight.T).view(B, 5, 2, HEADS, -1).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ kv[0].transpose(-1, -2) * m.scale, -1) @ kv[1]  # (B, H, N, Dh)
    for h in range(HEADS):
        gate = torch.sigmoid(x[..., h * 4:(h + 1) * 4] @ m.gate_weight[h] + m.gate_bias[h])  # (B, N)
        y_heads.append(att[:, h] * gate[..., None])
    ref = torch.cat(y_heads, -1) @ m.out.weight.T
    torch.testing.assert_close(m(x, context=ctx), ref, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(m(x, context=ctx), plain(x, context=ctx))
