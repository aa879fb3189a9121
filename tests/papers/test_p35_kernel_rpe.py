"""P35 "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding" (Luo et al. 2021).

Claims checked: (1) the FFT (Toeplitz) path equals the explicit O(n^2) formula
sum_j c_{i-j} phi(q_i).phi(k_j) v_j / sum_j c_{i-j} phi(q_i).phi(k_j) to 1e-10 in float64 (n = 256, d = 32,
m = 64, random b), bidirectional and causal; the causal path is exactly causal; (3) as m grows the output
approaches exact softmax attention with the RPE bias. (2), the runtime curve, is not timed here.
"""

import math

import pytest
import torch

import formers
from formers.nn.attention import KVCache
from formers.nn.linear_attention_rpe import toeplitz_causal, toeplitz_fft


def explicit(qf, kf, v, c, causal):
    """out_i = sum_j c[i - j] (qf_i . kf_j) v_j with the full (N, N) Toeplitz matrix materialised."""
    N = qf.shape[2]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    C = c[:, i - j + N - 1]  # (H, N, N): C_ij = c_{i-j}
    if causal:
        C = C * (j <= i)
    return (torch.einsum("bhif,bhjf->bhij", qf, kf) * C) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_toeplitz_products_equal_the_explicit_sum(causal):
    B, H, N, m, dv = 1, 2, 256, 64, 33
    qf, kf = torch.rand(B, H, N, m, dtype=torch.float64), torch.rand(B, H, N, m, dtype=torch.float64)
    v = torch.randn(B, H, N, dv, dtype=torch.float64)
    c = torch.exp(torch.randn(H, 2 * N - 1, dtype=torch.float64))
    ref = explicit(qf, kf, v, c, causal)
    out = toeplitz_causal(qf, kf, v, c[:, N - 1:], 16) if causal else toeplitz_fft(qf, kf, v, c)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def features(x, proj):
    x = x * x.shape[-1] ** -0.25
    return torch.exp(x @ proj.T - (x ** 2).sum(-1, keepdim=True) / 2)


@pytest.mark.parametrize("causal", [False, True])
def test_mixer_equals_the_paper_formula(causal):
    """n = 256, d = 32 (one head), m = 64, random b: the mixer equals the normalised explicit formula."""
    N, d = 256, 32
    mix = formers.build("mixer", {"name": "kernel_rpe", "heads": 1, "features": 64, "block_size": 16},
                        dim=d, causal=causal, max_len=N).double()
    with torch.no_grad():
        mix.rel_bias.normal_(0, 1)
    x = torch.randn(1, N, d, dtype=torch.float64)
    q = (x @ mix.q.weight.T)[:, None]  # (1, 1, N, d)
    k, v = (x @ mix.kv.weight.T)[:, None].split(d, -1)
    c = mix.rel_bias.exp()[:, mix.max_len - N: mix.max_len + N - 1]  # c_{i-j}, i - j in [-(N-1), N-1]
    qf, kf = features(q, mix.prf.proj), features(k, mix.prf.proj)
    num = explicit(qf, kf, v, c, causal)
    den = explicit(qf, kf, torch.ones_like(v[..., :1]), c, causal)
    ref = (num / den)[:, 0] @ mix.out.weight.T
    torch.testing.assert_close(mix(x), ref, atol=1e-10, rtol=1e-10)
    if causal:  # and the cache path (explicit rows against cached features) agrees
        cache = KVCache()
        steps = torch.cat([mix(x[:, a:b], cache=cache) for a, b in [(0, 100), (100, 101), (101, 256)]], 1)
        torch.testing.assert_close(steps, ref, atol=1e-10, rtol=1e-10)


def test_causal_fft_is_exactly_causal():
    """Earlier outputs are bit-identical when later tokens change (one FFT over everything would not be)."""
    B, H, N, m = 1, 2, 200, 16
    qf, kf = torch.rand(B, H, N, m, dtype=torch.float64), torch.rand(B, H, N, m, dtype=torch.float64)
    v = torch.randn(B, H, N, 5, dtype=torch.float64)
    c = torch.exp(torch.randn(H, N, dtype=torch.float64))
    a = toeplitz_causal(qf, kf, v, c, 8)
    kf2, v2 = kf.clone(), v.clone()
    kf2[:, :, 130:] *= 7
    v2[:, :, 130:] = torch.randn(B, H, N - 130, 5, dtype=torch.float64)
    b = toeplitz_causal(qf, kf2, v2, c, 8)
    assert torch.equal(a[:, :, :130], b[:, :, :130])
    assert not torch.allclose(a[:, :, 130:], b[:, :, 130:])


def test_more_features_approach_softmax_attention_with_rpe():
    """Error against exact softmax(q k^T / sqrt(d) + b_{i-j}) v falls as m grows (mean over 4 seeds)."""
    N, d = 48, 16
    errors = []
    for m in (16, 64, 256, 1024):
        errs = []
        for seed in range(4):
            torch.manual_seed(0)  # same projections and b; only the features change with `seed`
            mix = formers.build("mixer", {"name": "kernel_rpe", "heads": 1, "features": m, "seed": seed},
                                dim=d, causal=False, max_len=N).double()
            with torch.no_grad():
                mix.q.weight.mul_(0.5)
                mix.kv.weight.mul_(0.5)
                mix.rel_bias.normal_(0, 1)
            x = torch.randn(1, N, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            q = x @ mix.q.weight.T
            k, v = (x @ mix.kv.weight.T).split(d, -1)
            i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
            scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mix.rel_bias[0, i - j + N - 1]
            exact = scores.softmax(-1) @ v @ mix.out.weight.T
            errs.append(((mix(x) - exact).norm() / exact.norm()).item())
        errors.append(sum(errs) / len(errs))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
