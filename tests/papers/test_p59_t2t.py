"""P59 Tokens-to-Token ViT: published sizes, the soft split, the T2T token layers and the re-structurization.

Published numbers: the README table of yitu-opensource/T2T-ViT (params 4.3/5.9/6.9/21.5/39.2/64.1M, 21.7M for
T2T-ViT-14 at 384, 21.5/39.2/64.1M for T2T-ViT_t), also in the fact sheet (P59). Those figures count
every parameter of the official model, including its frozen ones (the Performer random features, 2 x 32 x 64,
and the sinusoid table, (N + 1) x D), which formers keeps as buffers. The exact trainable count of T2T-ViT-14,
21,465,806, is a hand count of the official code (issue 6), re-derived below layer by layer.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.vision.t2t_vit import SoftSplit, T2TAttentionLayer, T2TPerformerLayer, T2TViT


def official_t2t_params(dim: int, depth: int, mlp_ratio: float, tokens: str, in_chans: int = 3,
                        classes: int = 1000, e: int = 64) -> int:
    """Trainable parameters of the official T2T_ViT (models/t2t_vit.py and its token layers), layer by layer."""
    def ln(d):
        return 2 * d

    def lin(i, o, bias=True):
        return i * o + (o if bias else 0)

    def token_layer(width):  # norm1, kqv (bias only in the Performer layer), proj, norm2, MLP e -> e -> e
        return ln(width) + lin(width, 3 * e, bias=tokens == "performer") + lin(e, e) + ln(e) + 2 * lin(e, e)

    t2t = token_layer(in_chans * 7 * 7) + token_layer(e * 3 * 3) + lin(e * 3 * 3, dim)
    h = int(dim * mlp_ratio)
    block = ln(dim) + lin(dim, 3 * dim, bias=False) + lin(dim, dim) + ln(dim) + lin(dim, h) + lin(h, dim)
    return t2t + dim + depth * block + ln(dim) + lin(dim, classes)  # + cls token, blocks, norm, head


# name -> (dim, depth, mlp_ratio, tokens, img_size, published M params)
PUBLISHED = {
    "t2t_vit_7": (256, 7, 2.0, "performer", 224, 4.3),
    "t2t_vit_10": (256, 10, 2.0, "performer", 224, 5.9),
    "t2t_vit_12": (256, 12, 2.0, "performer", 224, 6.9),
    "t2t_vit_14": (384, 14, 3.0, "performer", 224, 21.5),
    "t2t_vit_19": (448, 19, 3.0, "performer", 224, 39.2),
    "t2t_vit_24": (512, 24, 3.0, "performer", 224, 64.1),
    "t2t_vit_t_14": (384, 14, 3.0, "transformer", 224, 21.5),
    "t2t_vit_t_19": (448, 19, 3.0, "transformer", 224, 39.2),
    "t2t_vit_t_24": (512, 24, 3.0, "transformer", 224, 64.1),
}


def _meta(name, **kw):
    with torch.device("meta"):
        return formers.create_model(name, **kw)


def test_t2t_vit_14_trainable_params_exact():
    m = _meta("t2t_vit_14")
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == 21_465_806
    assert trainable == official_t2t_params(384, 14, 3.0, "performer")


@pytest.mark.parametrize("name,img", [(n, 224) for n in PUBLISHED] + [("t2t_vit_14", 384)])
def test_published_sizes(name, img):
    dim, depth, mlp, tokens, _, published = PUBLISHED[name]
    published = 21.7 if img == 384 else published  # README: T2T-ViT-14 trained at 384 px
    m = _meta(name, img_size=img)
    trainable = sum(p.numel() for p in m.parameters())
    assert trainable == official_t2t_params(dim, depth, mlp, tokens)
    n_tokens = (img // 16) ** 2
    frozen = (2 * 32 * 64 if tokens == "performer" else 0) + (n_tokens + 1) * dim  # the official frozen tensors
    assert sum(b.numel() for b in m.buffers()) == frozen  # ours are buffers, the same tables
    assert round((trainable + frozen) / 1e6, 1) == published


def test_token_counts_at_224_and_128():
    """The soft splits (7/4/2, 3/2/1, 3/2/1) reduce 224 px to 14 x 14 = 196 tokens and 128 px to 8 x 8 = 64."""
    m = _meta("t2t_vit_14")
    assert m.pos_embed.shape == (1, 197, 384) and m.t2t.grid(128, 128) == (8, 8)
    narrow = T2TViT(num_classes=0, dim=16, depth=1, heads=2, drop_path=0.0).eval()  # the paper's T2T module
    with torch.no_grad():  # a real forward (meta tensors would pull in torch._dynamo, seconds)
        assert narrow.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 197, 16)
        assert narrow.forward_features(torch.randn(1, 3, 128, 128)).shape == (1, 65, 16)


# ------------------------------------------------------------------------------------------- naive references


def naive_soft_split(x, k, s, p):
    """Loop over output cells: the zero-padded k x k window at (i s, j s), flattened channel-major."""
    B, C, H, W = x.shape
    xp = F.pad(x, (p, p, p, p))
    ho, wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    out = x.new_zeros(B, ho * wo, C * k * k)
    for i in range(ho):
        for j in range(wo):
            out[:, i * wo + j] = xp[:, :, i * s: i * s + k, j * s: j * s + k].reshape(B, -1)
    return out, (ho, wo)


def naive_mlp_residual(layer, y):
    h = F.layer_norm(y, y.shape[-1:], layer.norm2.weight, layer.norm2.bias, 1e-5)
    return y + F.linear(F.gelu(F.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)),
                        layer.mlp.fc2.weight, layer.mlp.fc2.bias)


def naive_performer_layer(layer, x):
    """T2T-ViT's Performer token layer with explicit per-pair kernel values (quadratic order)."""
    e = layer.token_dim
    h = F.layer_norm(x, x.shape[-1:], layer.norm1.weight, layer.norm1.bias, 1e-5)
    kqv = F.linear(h, layer.kqv.weight, layer.kqv.bias)
    k, q, v = kqv[..., :e], kqv[..., e: 2 * e], kqv[..., 2 * e:]
    w = layer.features
    m = w.shape[0]
    B, N, _ = x.shape
    att = torch.zeros(B, N, e, dtype=x.dtype)
    for b in range(B):
        for i in range(N):
            weights = []
            for j in range(N):
                phi_q = torch.exp(w @ q[b, i] - q[b, i].dot(q[b, i]) / 2)
                phi_k = torch.exp(w @ k[b, j] - k[b, j].dot(k[b, j]) / 2)
                weights.append(phi_q.dot(phi_k) / m)
            total = sum(weights)
            att[b, i] = sum(wj * v[b, j] for j, wj in enumerate(weights)) / (total + 1e-8)
    y = v + F.linear(att, layer.proj.weight, layer.proj.bias)
    return naive_mlp_residual(layer, y)


def naive_attention_layer(layer, x):
    """T2T-ViT_t's token layer: one softmax head scaled by the INPUT width^-1/2, value residual."""
    e = layer.qkv.weight.shape[0] // 3
    h = F.layer_norm(x, x.shape[-1:], layer.norm1.weight, layer.norm1.bias, 1e-5)
    qkv = F.linear(h, layer.qkv.weight)
    q, k, v = qkv[..., :e], qkv[..., e: 2 * e], qkv[..., 2 * e:]
    scores = q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])
    y = v + F.linear(scores.softmax(-1) @ v, layer.proj.weight, layer.proj.bias)
    return naive_mlp_residual(layer, y)


# ----------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("k,s,p", [(7, 4, 2), (3, 2, 1), (3, 1, 1), (7, 2, 3)])
def test_soft_split_matches_loops(k, s, p):
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64)
    tokens, hw = SoftSplit(k, s, p)(x)
    ref, ref_hw = naive_soft_split(x, k, s, p)
    assert hw == ref_hw
    torch.testing.assert_close(tokens, ref, rtol=0, atol=0)


def test_performer_token_layer_matches_naive():
    layer = T2TPerformerLayer(dim=27, token_dim=8, kernel_ratio=0.5).double().eval()
    x = torch.randn(2, 6, 27, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_performer_layer(layer, x), rtol=1e-10, atol=1e-10)


def test_performer_features_as_official():
    """Fixed orthonormal rows scaled by sqrt(m), m = token_dim * kernel_ratio (64 * 0.5 = 32 in the paper)."""
    layer = T2TPerformerLayer(dim=147)
    w = layer.features.double()
    assert w.shape == (32, 64)
    torch.testing.assert_close(w @ w.T, 32 * torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-4)
    assert not any(b.requires_grad for b in layer.buffers())


def test_performer_feature_map_estimates_exp_dot():
    """phi(q).phi(k) = mean_f exp(w_f.q - |q|^2/2) exp(w_f.k - |k|^2/2) -> exp(q.k) for Gaussian w_f (the
    positive random features of FAVOR+; the code's kernel has no 1/sqrt(e) temperature)."""
    layer = T2TPerformerLayer(dim=8, token_dim=4, kernel_ratio=10000).double()  # m = 40000 features
    layer.features.copy_(torch.randn_like(layer.features))
    q, k = 0.3 * torch.randn(1, 5, 4, dtype=torch.float64), 0.3 * torch.randn(1, 5, 4, dtype=torch.float64)
    est = layer.feature_map(q) @ layer.feature_map(k).transpose(1, 2)
    # relative std of the estimate: sqrt((exp|q + k|^2 - 1) / m), about 1% here
    torch.testing.assert_close(est, torch.exp(q @ k.transpose(1, 2)), rtol=0.05, atol=0)


def test_attention_token_layer_matches_naive():
    layer = T2TAttentionLayer(dim=27, token_dim=8).double()
    x = torch.randn(2, 6, 27, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_attention_layer(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_t2t_module_restructurization(tokens_type):
    """Tokens -> image (token i w + j at pixel (i, j)) -> soft split, on a non-square image."""
    m = T2TViT(num_classes=0, in_chans=2, img_size=28, dim=16, depth=1, heads=2, token_dim=4, tokens_type=tokens_type,
               kernels=(7, 3, 3), strides=(2, 2, 1), paddings=(3, 1, 1)).double().eval()
    t2t = m.t2t
    x = torch.randn(2, 2, 20, 28, dtype=torch.float64)
    t, (h, w) = naive_soft_split(x, 7, 2, 3)
    for layer, (k, s, p) in zip(t2t.layers, [(3, 2, 1), (3, 1, 1)]):
        t = layer(t)  # (B, h w, e), checked above against the naive layers
        img = t.new_zeros(2, t.shape[-1], h, w)
        for i in range(h):
            for j in range(w):
                img[:, :, i, j] = t[:, i * w + j]
        t, (h, w) = naive_soft_split(img, k, s, p)
    ref = F.linear(t, t2t.project.weight, t2t.project.bias)
    out, hw = t2t(x)
    assert hw == (h, w) == (5, 7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_tiny_forward_backward():
    m = formers.create_model("t2t_vit_tiny")
    assert 0.2e6 < m.num_params() < 2e6
    assert all(isinstance(layer, T2TPerformerLayer) for layer in m.t2t.layers) and len(m.t2t.layers) == 2
    x = torch.randn(2, 1, 28, 28)
    assert m.forward_features(x).shape == (2, 1 + 49, 128)  # 49 image tokens + the class token
    logits = m(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    other = m.forward_features(torch.randn(2, 1, m.other_size, m.other_size))  # 32 px: 8 x 8 tokens
    assert other.shape == (2, 1 + 64, 128) and torch.isfinite(other).all()
