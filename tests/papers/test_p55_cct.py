"""P55 Compact Convolutional Transformers (CCT): published sizes, sequence pooling, the hybrid-norm layer, the tiny
variant. Exact parameter counts were computed by building the official models (SHI-Labs/Compact-Transformers,
`src/cct.py`, default num_classes, learnable positions); the rounded figures are the paper's and the README's."""

import math

import pytest
import torch

import formers
from formers.models.vision.cct import CCTLayer, SeqPool, sine_positions
from formers.registry import FormersError

# name -> (exact count from the official code, published figure in millions as printed, tokens)
PUBLISHED = {
    "cct_2_3x2_32": (283_723, 0.28, 64),  # paper abstract/table: 0.28M
    "cct_7_3x1_32": (3_760_139, 3.76, 256),  # paper table: 3.76M; 256 tokens at 32x32 (10 classes)
    "cct_14_7x2_224": (22_367_273, 22.36, 196),  # README ImageNet table: 22.36M
    "cct_14_7x2_384": (22_513_193, 22.51, 576),  # README ImageNet table: 22.51M
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    exact, millions, tokens = PUBLISHED[name]
    with torch.device("meta"):
        model = formers.create_model(name)
        feats = model.forward_features(torch.empty(1, 3, model.img_size, model.img_size))
    n = model.num_params()
    assert n == exact
    assert math.floor(n / 1e4) / 100 == millions  # the published figures are truncated to two decimals
    assert feats.shape == (1, tokens, model.num_features)  # no class token: the tokens are the conv grid


def _naive_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_seqpool_is_a_softmax_weighted_sum():
    pool = SeqPool(8).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    w, b = pool.score.weight[0].detach(), pool.score.bias[0].detach()
    expected = torch.zeros(3, 8, dtype=torch.float64)
    for i in range(3):
        scores = [float(x[i, n] @ w + b) for n in range(5)]
        z = sum(math.exp(s) for s in scores)
        for n in range(5):
            expected[i] += math.exp(scores[n]) / z * x[i, n]
    torch.testing.assert_close(pool(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(pool.weights(x).sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_model_head_is_seqpool_then_linear():
    model = formers.create_model("cct_tiny").double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    feats = model.forward_features(x)
    a = torch.softmax(feats @ model.seq_pool.score.weight[0] + model.seq_pool.score.bias, dim=1)  # (B, N)
    pooled = (a[:, :, None] * feats).sum(1)
    torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias, atol=1e-12, rtol=0)


def test_layer_hybrid_norm_matches_naive_reference():
    """x = x + Attn(LN0(x)); x = LN1(x); x = x + MLP(x) — the official layer, written out by hand."""
    dim, heads = 12, 3
    layer = CCTLayer(dim, heads, mlp_ratio=2.0, attn_drop=0.0).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    a = layer.attn
    assert a.q.bias is None and a.kv.bias is None and a.out.bias is not None  # qkv without bias, proj with

    h = _naive_layer_norm(x, layer.norm0.weight, layer.norm0.bias, 1e-5)
    q = h @ a.q.weight.T
    k, v = (h @ a.kv.weight.T).split(dim, dim=-1)
    dh = dim // heads
    out = torch.zeros_like(x)
    for hd in range(heads):
        sl = slice(hd * dh, (hd + 1) * dh)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        out[..., sl] = (p / p.sum(-1, keepdim=True)) @ v[..., sl]
    x1 = x + out @ a.out.weight.T + a.out.bias
    x2 = _naive_layer_norm(x1, layer.norm1.weight, layer.norm1.bias, 1e-5)
    u = x2 @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias
    u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    expected = x2 + u @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)


def test_sine_positions_match_the_formula():
    n, d = 6, 8
    pe = sine_positions(n, d)[0]
    for p in range(n):
        for i in range(d):
            angle = p / 10000 ** (2 * (i // 2) / d)
            assert abs(pe[p, i].item() - (math.sin(angle) if i % 2 == 0 else math.cos(angle))) < 1e-6


def test_tiny_forward_backward_and_other_size():
    model = formers.create_model("cct_tiny")
    assert model.grid ** 2 >= 49 and 2e5 < model.num_params() < 2e6
    x = torch.randn(2, 1, 28, 28)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model(torch.randn(2, 1, model.other_size, model.other_size)).shape == (2, 10)
    sine = formers.create_model("cct_tiny", pos_embed="sine")
    assert sine(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert sine.num_params() == model.num_params() - 49 * 128  # sine positions are fixed, not parameters


def test_bad_options_raise():
    with pytest.raises(FormersError, match="pos_embed"):
        formers.create_model("cct_tiny", pos_embed="rope")
