"""P12 EfficientViT (cascaded group attention): published sizes, CGA and window attention against naive references,
the sandwich order, BN folding (`fuse()`), and the 28x28 tiny variant."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import formers
from formers.models.vision.efficientvit import (
    CONFIGS,
    CascadedGroupAttention,
    ConvBN,
    EfficientViTBlock,
    LocalWindowAttention,
    bias_index,
)
from formers.registry import FormersError

# README of microsoft/Cream EfficientViT (1000 classes, 224x224), rounded to 0.1M.
PUBLISHED_M = {"efficientvit_m0": 2.3, "efficientvit_m1": 3.0, "efficientvit_m2": 4.2, "efficientvit_m3": 6.9,
               "efficientvit_m4": 8.8, "efficientvit_m5": 12.4}


def _assert_close(a, b, tol):
    """|a - b| <= tol (1 + |b|) elementwise (torch.testing.assert_close imports torch.distributed: ~4 s here)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = ((a - b).abs() / (1 + b.abs())).max().item()
    assert err <= tol, err


def _convbn(cin, cout, k=1, groups=1):
    return cin // groups * cout * k * k + 2 * cout  # conv without bias + BN weight and bias


def _expected_params(embed_dim, depth, num_heads, kernels, classes=1000, img=224):
    """Parameter count written out from the official code (Cream efficientvit.py): stem, blocks, downsampling, head."""
    c0 = embed_dim[0]
    n = _convbn(3, c0 // 8, 3) + _convbn(c0 // 8, c0 // 4, 3) + _convbn(c0 // 4, c0 // 2, 3) + _convbn(c0 // 2, c0, 3)

    def dw(d):
        return _convbn(d, d, 3, groups=d)

    def ffn(d):
        return _convbn(d, 2 * d) + _convbn(2 * d, d)

    side = img // 16
    for i, (d, dp, h) in enumerate(zip(embed_dim, depth, num_heads)):
        if i > 0:
            p, hid = embed_dim[i - 1], 4 * embed_dim[i - 1]
            rd = hid // 4
            assert rd % 8 == 0  # timm's SE rounding to multiples of 8 leaves these widths unchanged
            se = hid * rd + rd + rd * hid + hid
            n += dw(p) + ffn(p) + _convbn(p, hid) + _convbn(hid, hid, 3, groups=hid) + se + _convbn(hid, d)
            n += dw(d) + ffn(d)
            side = (side - 1) // 2 + 1
        r = min(7, side)
        cga = sum(_convbn(d // h, 2 * 16 + d // h) + _convbn(16, 16, kernels[j], groups=16) for j in range(h))
        cga += _convbn(d, d) + h * r * r  # projection, attention-bias table
        n += dp * (2 * dw(d) + 2 * ffn(d) + cga)
    return n + 2 * embed_dim[-1] + embed_dim[-1] * classes + classes  # BN1d + Linear head


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_published_parameter_counts(name):
    with torch.device("meta"):
        m = formers.create_model(name)
    n = m.num_params()
    cfg = CONFIGS[name]
    assert n == _expected_params(cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["kernels"])
    # to the published digit: the README rounds (M1 2.98 -> 3.0) except M5 (12.47 -> 12.4, truncated; timm 12.5)
    assert PUBLISHED_M[name] in (round(n / 1e5) / 10, math.floor(n / 1e5) / 10), n


def test_bias_index_is_the_official_first_seen_offset_numbering():
    for side in (1, 4, 7):
        pts = list(itertools.product(range(side), range(side)))
        seen, idx = {}, []
        for p in pts:
            for q in pts:
                off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                seen.setdefault(off, len(seen))
                idx.append(seen[off])
        assert torch.equal(bias_index(side, side, side), torch.tensor(idx).view(side * side, side * side))


def _randomise(module, seed=0):
    """Non-trivial BN statistics and affine parameters (BN weights start at 0 in residual branches) and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g, dtype=mod.running_mean.dtype) * .1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g, dtype=mod.running_var.dtype) + .5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g, dtype=mod.weight.dtype) + .5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g, dtype=mod.bias.dtype) * .1)
            if isinstance(mod, CascadedGroupAttention):
                mod.attention_biases.copy_(torch.randn(mod.attention_biases.shape, generator=g,
                                                       dtype=mod.attention_biases.dtype))
    return module


def _convbn_naive(m: ConvBN, x):
    c, bn = m.conv, m.bn
    y = F.conv2d(x, c.weight, None, c.stride, c.padding, groups=c.groups)
    shape = (1, -1, 1, 1)
    return (y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * \
        bn.weight.view(shape) + bn.bias.view(shape)


def _cga_naive(m: CascadedGroupAttention, x):
    """Eq. (1)-(2) of the paper with explicit loops over heads, queries and keys (eval-mode BN)."""
    B, C, H, W = x.shape
    h, kd, vd, R = m.heads, m.key_dim, m.val_dim, m.resolution
    splits = [x[:, j * (C // h):(j + 1) * (C // h)] for j in range(h)]
    outs, prev = [], None
    for j in range(h):
        inp = splits[j] if prev is None else splits[j] + prev
        qkv = _convbn_naive(m.qkvs[j], inp)
        q, k, v = qkv[:, :kd], qkv[:, kd:2 * kd], qkv[:, 2 * kd:]
        q = _convbn_naive(m.dws[j], q)
        out = torch.zeros(B, vd, H, W, dtype=x.dtype)
        keys = list(itertools.product(range(H), range(W)))
        kf, vf = k.reshape(B, kd, H * W), v.reshape(B, vd, H * W)
        for y0, x0 in keys:  # one query at a time, its score against every key
            rel = torch.tensor([abs(y0 - y1) * R + abs(x0 - x1) for y1, x1 in keys])
            scores = (q[:, :, y0, x0, None] * kf).sum(1) / math.sqrt(kd) + m.attention_biases[j, rel]  # (B, N)
            a = scores.exp() / scores.exp().sum(-1, keepdim=True)
            out[:, :, y0, x0] = (a[:, None, :] * vf).sum(-1)
        outs.append(out)
        prev = out
    return _convbn_naive(m.proj, torch.relu(torch.cat(outs, 1)))


@pytest.mark.parametrize("hw", [(4, 4), (3, 2)])  # the whole table, and a smaller region indexing into it
def test_cascaded_group_attention_matches_naive(hw):
    m = _randomise(CascadedGroupAttention(dim=12, key_dim=4, heads=3, resolution=4, kernels=(3, 5, 3))).double()
    m.eval()
    x = torch.randn(2, 12, *hw, dtype=torch.float64)
    with torch.no_grad():
        _assert_close(m(x), _cga_naive(m, x), 1e-10)


def test_cascade_feeds_each_head_the_previous_output():
    """Head 2's input is X_2 + head 1's output: changing only X_1 changes head 2's attention output."""
    m = _randomise(CascadedGroupAttention(dim=8, key_dim=4, heads=2, resolution=3, kernels=(3, 3))).double().eval()
    seen = []
    m.dws[1].register_forward_hook(lambda mod, inp, out: seen.append(out.clone()))
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :4] += 1.0  # only the first head's split
    with torch.no_grad():
        m(x), m(x2)
    assert not torch.allclose(seen[0], seen[1])


def test_local_window_attention_matches_naive_partition():
    m = _randomise(LocalWindowAttention(dim=8, key_dim=4, heads=2, resolution=10, window=4, kernels=(3, 3)))
    m = m.double().eval()
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)
    xp = F.pad(x, (0, 3, 0, 2))  # zero-pad bottom/right to 12 x 12
    ref = torch.zeros_like(xp)
    with torch.no_grad():
        for i, j in itertools.product(range(3), range(3)):
            win = xp[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            ref[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = m.attn(win)
        _assert_close(m(x), ref[:, :, :10, :9], 1e-12)
        small = torch.randn(1, 8, 4, 3, dtype=torch.float64)  # fits one window: attended whole, no padding
        _assert_close(m(small), m.attn(small), 1e-12)


def test_sandwich_order():
    """x -> +DW -> +FFN -> +attention -> +DW -> +FFN (each residual), in that order."""
    blk = _randomise(EfficientViTBlock(dim=8, key_dim=4, heads=2, resolution=7, window=7, kernels=(3, 3)))
    blk = blk.double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = x
        for part in (blk.dw0, blk.ffn0, blk.mixer, blk.dw1, blk.ffn1):
            y = y + part.m(y)
        _assert_close(blk(x), y, 1e-12)
    assert isinstance(blk.dw0.m.conv, nn.Conv2d) and blk.dw0.m.conv.groups == 8
    assert isinstance(blk.mixer.m, LocalWindowAttention)


@pytest.mark.parametrize("side", [28, 32])
def test_fuse_folds_every_bn_with_equal_outputs(side):
    m = formers.create_model("efficientvit_tiny")
    _randomise(m).eval()
    fused = m.fuse()
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in fused.modules())
    assert not any(isinstance(mod, ConvBN) for mod in fused.modules())
    assert any(isinstance(mod, nn.BatchNorm1d) for mod in m.modules())  # the original is left as it was
    x = torch.randn(2, 1, side, side)
    with torch.no_grad():
        _assert_close(fused(x), m(x), 1e-5)


def test_tiny_forward_backward_and_stages():
    m = formers.create_model("efficientvit_tiny")
    assert 2e5 < m.num_params() < 2e6
    x = torch.randn(2, 1, 28, 28)
    assert m.patch_embed(x).shape[-2:] == (7, 7)  # 49 tokens in stage 1
    for stage in m.stages:  # cascaded group attention in every stage
        assert any(isinstance(mod, CascadedGroupAttention) for mod in stage.modules())
    y = m(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    assert m(torch.randn(2, 1, m.other_size, m.other_size)).shape == (2, 10)
    m.reset_classifier(0)
    assert m(x).shape == (2, 144)


def test_bad_config_and_input():
    with pytest.raises(FormersError, match="divisible"):
        formers.create_model("efficientvit_msra", embed_dim=(64, 130, 192))
    with pytest.raises(FormersError, match="in_chans"):
        formers.create_model("efficientvit_tiny")(torch.randn(1, 3, 28, 28))
