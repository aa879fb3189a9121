"""Kernel (linear) attention mixers against naive O(N^2) formulas written here, in float64: values and input
gradients, chunked == quadratic == token-by-token recurrent decoding, no causal leakage, padding masks."""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.nn.attention import KVCache
from formers.nn.position import ALiBi, RotaryPosition
from formers.registry import FormersError

CAUSAL = ["linear", "sla", "performer", "cosformer", "kernel_rpe"]
ALL = CAUSAL + ["scattered"]
DIM, HEADS = 16, 2


def make(name, causal=False, **kw):
    kw.setdefault("heads", HEADS)
    if name in ("sla", "cosformer", "kernel_rpe"):
        kw.setdefault("max_len", 32)
    m = formers.build("mixer", {"name": name, **kw}, dim=DIM, causal=causal).double()
    with torch.no_grad():  # make the learned position terms matter (they start at zero)
        if name == "sla":
            m.pos.normal_(0, 0.5)
        if name == "kernel_rpe":
            m.rel_bias.normal_(0, 0.5)
    return m


# ---------------------------------------------------------------------------------------------- naive reference


def split(t, H):
    B, N, _ = t.shape
    return t.view(B, N, H, -1).transpose(1, 2)  # (B, H, N, Dh)


def project(m, x, ctx=None):
    src = x if ctx is None else ctx
    H, Dh = m.heads, m.head_dim
    kv = src @ m.kv.weight.T
    return split(x @ m.q.weight.T, H), split(kv[..., : H * Dh], H), split(kv[..., H * Dh:], H)


def allowed_pairs(B, N, M, causal, key_mask=None, past=0):
    """(B, 1, N, M) bool: query i (at absolute position past + i) may use key j, built by explicit loops."""
    allowed = torch.ones(B, 1, N, M, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            for j in range(M):
                if (causal and j > past + i) or (key_mask is not None and not key_mask[b, j]):
                    allowed[b, 0, i, j] = False
    return allowed


def weighted_sums(qf, kf, v, allowed, weight=None):
    """Explicit score matrix A_ij = (qf_i . kf_j) * weight_ij on allowed pairs: sum_j A_ij v_j and sum_j A_ij."""
    A = torch.einsum("bhif,bhjf->bhij", qf, kf)
    if weight is not None:
        A = A * weight
    A = torch.where(allowed, A, torch.zeros_like(A))
    return A @ v, A.sum(-1, keepdim=True)


def prf(m, x):
    """FAVOR+ features straight from the formula, no stabilisation: exp(w.x' - |x'|^2 / 2), x' = x Dh^-1/4."""
    x = x * m.head_dim ** -0.25
    return torch.exp(x @ m.prf.proj.T - (x ** 2).sum(-1, keepdim=True) / 2)


def naive(m, x, *, causal, key_mask=None, ctx=None, positions=None):
    """The whole mixer, explicitly, for every registered kernel mixer."""
    name = m.mixer_name
    B, N, _ = x.shape
    q, k, v = project(m, x, ctx)
    M = k.shape[2]
    H, Dh = m.heads, m.head_dim
    allowed = allowed_pairs(B, N, M, causal and ctx is None, key_mask)
    pos = torch.arange(N)
    if positions is not None:
        q, k = positions.rotate(q, k, pos, pos)
    i, j = torch.arange(N)[:, None], torch.arange(M)[None, :]
    if name == "linear":
        elu1 = lambda t: torch.where(t > 0, t + 1, torch.exp(t))  # noqa: E731
        num, den = weighted_sums(elu1(q), elu1(k), v, allowed)
        y = num / (den + m.eps)
    elif name in ("sla", "scattered"):
        p = m.pos[:N].view(N, H, Dh).transpose(0, 1) if name == "sla" else 0
        num, den = weighted_sums(F.relu(q), F.relu(k + p), v, allowed)
        y = num / (den + m.eps)
        if name == "sla":
            vm = v if key_mask is None else v * key_mask[:, None, :, None]
            K = m.kernel_size
            seq = vm.reshape(B * H, N, Dh).transpose(1, 2)  # (B*H, Dh, N)
            seq = F.pad(seq, (K - 1, 0) if causal else ((K - 1) // 2, K // 2))
            dwc = F.conv1d(seq, m.dwc.weight, groups=Dh)  # PyTorch's own depthwise conv
            y = y + dwc.transpose(1, 2).reshape(B, H, N, Dh)
    elif name == "performer":
        num, den = weighted_sums(prf(m, q), prf(m, k), v, allowed)
        y = num / den
    elif name == "cosformer":
        scale = m.max_len if (causal and ctx is None) else max(N, M)
        weight = torch.cos(math.pi / 2 * (i - j).double() / scale)  # the re-weighting itself, not its decomposition
        num, den = weighted_sums(F.relu(q), F.relu(k), v, allowed, weight)
        y = num / den.clamp_min(m.eps)
    elif name == "kernel_rpe":
        weight = torch.exp(m.rel_bias[:, i - j + m.max_len - 1])  # (H, N, M): c_{i-j}
        if positions is not None and positions.has_bias:
            weight = weight * torch.exp(positions.bias(pos, pos, H).double())
        num, den = weighted_sums(prf(m, q), prf(m, k), v, allowed, weight)
        y = num / den
    y = torch.where(allowed.any(-1, keepdim=True), y, torch.zeros_like(y))  # rows without keys: zeros
    return y.transpose(1, 2).reshape(B, N, H * Dh) @ m.out.weight.T


def assert_values_and_grads(m, x, fn_mixer, fn_naive, tol=1e-10):
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y, ref = fn_mixer(x1), fn_naive(x2)
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x1)
    (gr,) = torch.autograd.grad((ref * g).sum(), x2)
    torch.testing.assert_close(gx, gr, atol=tol, rtol=tol)


# -------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name,causal", [(n, c) for n in ALL for c in (False, True) if c is False or n in CAUSAL])
def test_matches_naive_values_and_grads(name, causal):
    opts = {"chunk_size": 4} if name not in ("kernel_rpe",) else {"block_size": 4}
    m = make(name, causal, **opts)
    x = torch.randn(2, 13, DIM, dtype=torch.float64)  # 13: several chunks and a ragged last one
    assert_values_and_grads(m, x, m, lambda t: naive(m, t, causal=causal))


@pytest.mark.parametrize("name", CAUSAL)
def test_chunked_equals_quadratic_equals_recurrent(name):
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    key = "block_size" if name == "kernel_rpe" else "chunk_size"
    outs = []
    for size in (1, 3, 64):  # one token per chunk, ragged chunks, a single chunk (the quadratic form)
        torch.manual_seed(1)
        outs.append(make(name, True, **{key: size})(x))
    torch.testing.assert_close(outs[0], outs[2], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(outs[1], outs[2], atol=1e-10, rtol=1e-10)
    torch.manual_seed(1)
    m = make(name, True, **{key: 3})
    cache = KVCache()
    steps = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(11)], 1)  # recurrent: one token at a time
    torch.testing.assert_close(steps, outs[2], atol=1e-10, rtol=1e-10)
    assert cache.length == 11
    cache = KVCache()
    parts = torch.cat([m(x[:, a:b], cache=cache) for a, b in [(0, 4), (4, 5), (5, 11)]], 1)  # prompt, then pieces
    torch.testing.assert_close(parts, outs[2], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_does_not_leak(name):
    m = make(name, True, **({"block_size": 2} if name == "kernel_rpe" else {"chunk_size": 4}))
    x = torch.randn(2, 14, DIM, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 9:] = torch.randn(2, 5, DIM, dtype=torch.float64) * 3
    a, b = m(x), m(x2)
    assert torch.equal(a[:, :9], b[:, :9])  # bit-identical, whatever follows
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    (g,) = torch.autograd.grad(a[:, :9].sum(), x)
    assert torch.equal(g[:, 9:], torch.zeros_like(g[:, 9:]))


@pytest.mark.parametrize("name,causal", [(n, c) for n in ALL for c in (False, True) if c is False or n in CAUSAL])
def test_padding_mask(name, causal):
    m = make(name, causal)
    x = torch.randn(3, 9, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, :] = False  # no key at all: zeros, not NaN
    mask[2, 0] = False  # causal: query 0 sees no key
    y = m(x, mask=mask)
    torch.testing.assert_close(y, naive(m, x.detach(), causal=causal, key_mask=mask), atol=1e-10, rtol=1e-10)
    assert (y[1] == 0).all()
    if causal:
        assert (y[2, 0] == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # padded tokens influence no real token's output
    x2 = x.detach().clone()
    x2[0, 6:] = torch.randn(3, DIM, dtype=torch.float64) * 5
    real = m(x.detach(), mask=mask)[0, :6]
    torch.testing.assert_close(m(x2, mask=mask)[0, :6], real, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_sla_both_orders_agree(causal):
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    torch.manual_seed(2)
    lin = make("sla", causal, order="linear", chunk_size=5)
    torch.manual_seed(2)
    quad = make("sla", causal, order="quadratic")
    torch.testing.assert_close(lin(x), quad(x), atol=1e-10, rtol=1e-10)
    auto = make("sla", causal)  # the official cost rule: quadratic while N^2 (c + d) <= c d 2N, i.e. N <= Dh
    assert auto.quadratic(auto.head_dim, auto.head_dim) and not auto.quadratic(auto.head_dim + 1, auto.head_dim + 1)


def test_sla_conv_is_causal_and_cached():
    """The depthwise conv alone: with zero attention weights (q = 0) only DWC(V) is left."""
    m = make("sla", True, chunk_size=3)
    with torch.no_grad():
        m.q.weight.zero_()
    x = torch.randn(1, 8, DIM, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, 5] += 1.0
    d = (m(x2) - y).abs().sum(-1)[0]
    assert (d[:5] == 0).all() and (d[5:] > 0).all()  # left padding only: token 5 reaches 5..8, never 0..4
    cache = KVCache()
    torch.testing.assert_close(torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(8)], 1), y,
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_cross_attention_with_context(name):
    m = make(name, True)  # causal model: cross-attention itself is not causal
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    ctx = torch.randn(2, 9, DIM, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    assert_values_and_grads(m, x, lambda t: m(t, context=ctx, mask=mask),
                            lambda t: naive(m, t, causal=True, ctx=ctx, key_mask=mask))


def test_cosformer_cross_attention_uses_longer_length():
    m = make("cosformer")
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    ctx = torch.randn(1, 7, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x, context=ctx), naive(m, x, causal=False, ctx=ctx), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", CAUSAL)
def test_rotary_positions(name):
    m = make(name, True)
    rope = RotaryPosition(DIM)
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    assert_values_and_grads(m, x, lambda t: m(t, positions=rope), lambda t: naive(m, t, causal=True, positions=rope))
    cache = KVCache()
    steps = torch.cat([m(x[:, t:t + 1], positions=rope, cache=cache) for t in range(10)], 1)
    torch.testing.assert_close(steps, m(x, positions=rope), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["linear", "sla", "performer", "cosformer", "scattered"])
def test_score_bias_positions_are_rejected(name):
    with pytest.raises(FormersError, match="rope"):
        make(name)(torch.randn(1, 4, DIM, dtype=torch.float64), positions=ALiBi(DIM))


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_rpe_adds_alibi_to_its_bias(causal):
    m = make("kernel_rpe", causal, block_size=4)
    alibi = ALiBi(DIM)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y = m(x, positions=alibi)
    torch.testing.assert_close(y, naive(m, x, causal=causal, positions=alibi), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(y, m(x))
    if causal:
        cache = KVCache()
        steps = torch.cat([m(x[:, t:t + 1], positions=alibi, cache=cache) for t in range(11)], 1)
        torch.testing.assert_close(steps, y, atol=1e-10, rtol=1e-10)


def test_cosformer_causal_uses_max_len_and_bidirectional_the_length():
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    torch.manual_seed(3)
    a = make("cosformer", True, max_len=16)
    torch.manual_seed(3)
    b = make("cosformer", True, max_len=32)
    assert not torch.allclose(a(x), b(x))  # causal: M = max_len
    torch.manual_seed(3)
    c = make("cosformer", False, max_len=16)
    torch.manual_seed(3)
    d = make("cosformer", False, max_len=32)
    torch.testing.assert_close(c(x), d(x), atol=0, rtol=0)  # bidirectional: M = N


@pytest.mark.parametrize("name", ["sla", "cosformer", "kernel_rpe"])
def test_length_dependent_mixers_reject_longer_inputs(name):
    m = make(name, True, max_len=8)
    m(torch.randn(1, 8, DIM, dtype=torch.float64))
    with pytest.raises(FormersError, match="max_len=8"):
        m(torch.randn(1, 9, DIM, dtype=torch.float64))
    cache = KVCache()
    m(torch.randn(1, 8, DIM, dtype=torch.float64), cache=cache)
    with pytest.raises(FormersError, match="max_len=8"):
        m(torch.randn(1, 1, DIM, dtype=torch.float64), cache=cache)


def test_bad_options_and_arguments_raise():
    for name, opts in [("linear", {"chunk_size": 0}), ("performer", {"features": 0}),
                       ("performer", {"redraw_every": -1}), ("sla", {"kernel_size": 0}),
                       ("kernel_rpe", {"max_len": 0}), ("cosformer", {"eps": 0.0}), ("linear", {"heads": 3})]:
        with pytest.raises(FormersError):
            formers.build("mixer", {"name": name, **opts}, dim=DIM, causal=False)
    with pytest.raises(FormersError, match="order"):
        formers.build("mixer", {"name": "sla", "order": "fast"}, dim=DIM)
    with pytest.raises(FormersError, match="bidirectional"):
        formers.build("mixer", "scattered", dim=DIM, causal=True)
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    with pytest.raises(FormersError, match="causal=True"):
        make("linear")(x, cache=KVCache())
    with pytest.raises(FormersError, match="context"):
        make("sla")(x, context=x)
    with pytest.raises(FormersError, match="seqlens"):
        make("linear")(x, seqlens=torch.tensor([0, 4]))
    with pytest.raises(FormersError, match="mask"):
        make("linear")(x, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(FormersError, match="unsupported"):
        make("performer")(x, foo=1)


@pytest.mark.parametrize("name", CAUSAL)
def test_in_a_language_model_cached_generation_matches(name):
    model = formers.create_model("lm", vocab=30, dim=32, depth=2, max_len=48, position="rope",
                                 block={"mixer": {"name": name, "heads": 4}}).double().eval()
    prompt = torch.randint(0, 30, (2, 5))
    a = model.generate(prompt, 12, greedy=True, use_cache=True)
    b = model.generate(prompt, 12, greedy=True, use_cache=False)
    assert torch.equal(a, b)
    ids = torch.randint(0, 30, (2, 17))
    cache = model.new_cache()
    parts = torch.cat([model(ids[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 17)]], 1)
    torch.testing.assert_close(parts, model(ids), atol=1e-10, rtol=1e-10)
