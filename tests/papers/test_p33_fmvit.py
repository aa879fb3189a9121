"""P33 FMViT ("FMViT: A multiple-frequency mixing Vision Transformer"): the checkable parts of our reading.

No official code exists and the paper's size table was not available (see formers/models/vision/fmvit.py for every
gap), so there is no published parameter count to match. What is tested:
- RLMHSA against a naive attention written here (explicit window means, BatchNorm formula, softmax by exp/sum);
  its keys/values see the map only through r x r window means (the low-frequency band);
- the re-parameterisations (multi-branch 3x3 conv, multi-group 1x1 conv, BN folds) equal their training form, each
  against a reference built here, and `fuse()` of the whole model gives the same logits;
- parameter counts of `fmvit_tiny` and `fmvit` (meta device) equal an arithmetic count of the documented design;
- the tiny model trains forward/backward on 28x28 and keeps a multi-frequency block in every stage.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import formers
from formers.models.vision.fmvit import FMB, RLMHSA, ConvBN, MultiGroupConv1x1, RepConv
from formers.registry import FormersError


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def _bn_ref(x, bn):
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) \
        * bn.weight.view(shape) + bn.bias.view(shape)


def _window_means(x, r):
    B, C, H, W = x.shape
    rows, cols = math.ceil(H / r), math.ceil(W / r)
    out = torch.zeros(B, C, rows, cols, dtype=x.dtype)
    for i in range(rows):
        for j in range(cols):
            out[:, :, i, j] = x[:, :, i * r:(i + 1) * r, j * r:(j + 1) * r].mean(dim=(2, 3))  # partial windows too
    return out


def _rlmhsa_ref(m: RLMHSA, x):
    B, C, H, W = x.shape
    s = x if m.pool == 1 else _bn_ref(_window_means(x, m.pool), m.sr_norm)
    X = x.flatten(2).transpose(1, 2)  # (B, N, C)
    S = s.flatten(2).transpose(1, 2)  # (B, M, C)
    q, k, v = X @ m.q.weight.T + m.q.bias, S @ m.k.weight.T + m.k.bias, S @ m.v.weight.T + m.v.bias
    dh = m.head_dim
    out = torch.zeros(B, m.heads * dh, H * W, dtype=x.dtype)
    for h in range(m.heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(dh)  # (B, N, M)
        p = torch.exp(scores - scores.max(-1, keepdim=True).values)
        p = p / p.sum(-1, keepdim=True)
        out[:, cols] = (p @ v[..., cols]).transpose(1, 2)
    return out.view(B, -1, H, W)


@pytest.mark.parametrize("pool,hw", [(1, (5, 6)), (2, (5, 7)), (3, (6, 6))])
def test_rlmhsa_matches_naive_attention(pool, hw):
    torch.manual_seed(0)
    m = RLMHSA(8, heads=2, head_dim=4, pool=pool).double().eval()
    _randomize_bn(m)
    x = torch.randn(2, 8, *hw, dtype=torch.float64)
    torch.testing.assert_close(m(x), _rlmhsa_ref(m, x), atol=1e-12, rtol=0)


def test_rlmhsa_keys_and_values_see_only_window_means():
    """A perturbation with zero mean over every r x r window leaves the keys/values of the pool-r band unchanged
    (it only reaches the output through the queries); the pool-1 band does see it."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    d = torch.randn(1, 8, 2, 2, dtype=torch.float64)
    d = (d - d.mean(dim=(2, 3), keepdim=True)).repeat(1, 1, 3, 3)  # tiled 2x2 zero-mean pattern
    seen = {}
    for pool in (2, 1):
        m = RLMHSA(8, heads=2, head_dim=4, pool=pool).double().eval()
        _randomize_bn(m)
        inputs = []
        hook = m.k.register_forward_hook(lambda mod, args, out, store=inputs: store.append(args[0]))
        m(x)
        m(x + d)
        hook.remove()
        seen[pool] = (inputs[1] - inputs[0]).abs().max().item()
    assert seen[2] < 1e-12
    assert seen[1] > 1e-3


def _convbn_ref(x, cb: ConvBN):
    c = cb.conv
    return _bn_ref(F.conv2d(x, c.weight, None, c.stride, c.padding, 1, c.groups), cb.bn)


@pytest.mark.parametrize("cin,cout,stride,groups", [(8, 8, 1, 2), (8, 16, 2, 4), (4, 4, 1, 1), (6, 6, 2, 3)])
def test_repconv_fuses_into_one_conv(cin, cout, stride, groups):
    torch.manual_seed(0)
    m = RepConv(cin, cout, 3, stride, groups).double().eval()
    _randomize_bn(m)
    x = torch.randn(2, cin, 7, 7, dtype=torch.float64)
    ref = _convbn_ref(x, m.main) + _convbn_ref(x, m.scale)
    if cin == cout and stride == 1:
        ref = ref + _bn_ref(x, m.identity)
    else:
        assert m.identity is None
    fused = m.fuse()
    assert isinstance(fused, nn.Conv2d) and fused.kernel_size == (3, 3) and fused.groups == groups
    torch.testing.assert_close(m(x), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(fused(x), ref, atol=1e-12, rtol=0)


def test_multi_group_conv_is_a_sum_of_block_diagonal_matrices():
    torch.manual_seed(0)
    cin, cout, groups = 8, 12, (1, 2, 4)
    m = MultiGroupConv1x1(cin, cout, groups).double().eval()
    _randomize_bn(m)
    dense, bias = torch.zeros(cout, cin, dtype=torch.float64), torch.zeros(cout, dtype=torch.float64)
    for g, br in zip(groups, m.branches):
        scale = br.bn.weight / torch.sqrt(br.bn.running_var + br.bn.eps)
        bias += br.bn.bias - br.bn.running_mean * scale
        o_per, i_per = cout // g, cin // g
        for o in range(cout):
            grp = o // o_per
            for i in range(grp * i_per, (grp + 1) * i_per):
                dense[o, i] += scale[o] * br.conv.weight[o, i - grp * i_per, 0, 0]
    fused = m.fuse()
    torch.testing.assert_close(fused.weight[:, :, 0, 0], dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(fused.bias, bias, atol=1e-12, rtol=0)
    x = torch.randn(2, cin, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), m(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(m(x), torch.einsum("oi,bihw->bohw", dense, x) + bias[:, None, None], atol=1e-12,
                               rtol=0)


def test_fmb_mixes_one_high_and_several_low_bands():
    torch.manual_seed(0)
    m = FMB(16, 16, head_dim=8, attn_ratio=1.0, pools=(1, 2, 4)).double().eval()
    _randomize_bn(m)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    n = _bn_ref(x, m.norm1)
    rep = m.high[0]
    high = torch.relu(_convbn_ref(n, rep.main) + _convbn_ref(n, rep.scale) + _bn_ref(n, rep.identity))
    bands = [high] + [_rlmhsa_ref(a, n) for a in m.low]
    assert [a.pool for a in m.low] == [1, 2, 4] and all(b.shape[1] == 8 for b in bands[1:])  # 16/(8*3) -> 1 head
    ref = torch.einsum("oi,bihw->bohw", m.fuse_proj.weight[:, :, 0, 0], torch.cat(bands, 1))
    torch.testing.assert_close(m.mix(x), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fuse_gives_the_same_logits(dtype, tol):
    torch.manual_seed(0)
    model = formers.create_model("fmvit_tiny").to(dtype)
    _randomize_bn(model)
    model.eval()
    fused = model.fuse()
    x = torch.randn(2, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=tol, rtol=0)
    kinds = {type(m) for m in fused.modules()}
    assert not kinds & {RepConv, MultiGroupConv1x1, ConvBN}
    assert sum(isinstance(m, RepConv) for m in model.modules()) > 0  # the original is untouched
    assert fused.num_params() < model.num_params()


# ---- parameter counts: arithmetic of the documented design (no published FMViT count exists) ----------------------
def _convbn(cin, cout, k=1, g=1):
    return cout * (cin // g) * k * k + 2 * cout  # conv without bias + BN weight and bias


def _down(cin, cout, stride):
    return _convbn(cin, cout) if stride == 2 or cin != cout else 0


def _gmlp(d, ratio, groups):
    step = math.lcm(32, *groups)
    h = max(step, int(d * ratio + step / 2) // step * step)
    return sum(_convbn(d, h, 1, g) + _convbn(h, d, 1, g) for g in groups)


def _repconv(d, g):
    return _convbn(d, d, 3, g) + _convbn(d, d, 1, g) + 2 * d


def _count(c):
    n = sum(_convbn(a, b, 3) for a, b in zip((c["in_chans"],) + c["stem_chs"], c["stem_chs"]))
    cin = c["stem_chs"][-1]
    for i, d in enumerate(c["dims"]):
        for j in range(c["depths"][i]):
            s = c["strides"][i] if j == 0 else 1
            g = d // c["head_dim"]
            if c["fmb_every"][i] and (j + 1) % c["fmb_every"][i] == 0:
                pools = c["pools"][i]
                heads = max(1, round(0.5 * d / (c["head_dim"] * len(pools))))
                inner = heads * c["head_dim"]
                attn = sum(3 * (d * inner + inner) + (2 * d if r > 1 else 0) for r in pools)
                n += _down(cin, d, s) + 2 * d + _repconv(d, g) + attn + (d + len(pools) * inner) * d + 2 * d \
                    + _gmlp(d, 2.0, (1, 2, 4))
            else:
                n += _down(cin, d, s) + _repconv(d, g) + d * d + 2 * d + _gmlp(d, 3.0, (1, 2, 4))
            cin = d
    return n + 2 * cin + cin * c["num_classes"] + c["num_classes"]


TINY = dict(num_classes=10, in_chans=1, stem_chs=(16, 32), dims=(32, 64, 128), depths=(2, 2, 2), strides=(1, 2, 2),
            fmb_every=(2, 2, 2), pools=((2, 4), (1, 2), (1, 2)), head_dim=16)
DEFAULT = dict(num_classes=1000, in_chans=3, stem_chs=(64, 32, 64, 64), dims=(96, 192, 384, 768),
               depths=(3, 4, 10, 3), strides=(1, 2, 2, 2), fmb_every=(0, 4, 5, 3),
               pools=((8, 16), (4, 8), (2, 4), (1, 2)), head_dim=32)


@pytest.mark.parametrize("name,config", [("fmvit_tiny", TINY), ("fmvit", DEFAULT)])
def test_parameter_count_on_meta(name, config):
    with torch.device("meta"):
        model = formers.create_model(name)
    assert model.num_params() == _count(config)


def test_tiny_forward_backward_and_a_mixing_block_in_every_stage():
    torch.manual_seed(0)
    model = formers.create_model("fmvit_tiny")
    assert 2e5 < model.num_params() < 2e6
    x = torch.randn(2, 1, 28, 28)
    assert model.stem(x).shape[-2:] == (14, 14)  # 196 >= 49 tokens in the first stage
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    widths = {}
    for block in model.blocks:
        widths.setdefault(block.norm2.num_features if isinstance(block, FMB) else block.norm.num_features,
                          []).append(block)
    assert len(widths) == 3
    for blocks in widths.values():
        fmbs = [b for b in blocks if isinstance(b, FMB)]
        assert fmbs and all(len({a.pool for a in b.low}) >= 2 for b in fmbs)
    assert model(torch.randn(2, 1, model.other_size, model.other_size)).shape == (2, 10)


def test_bad_configs_raise_formers_error():
    with pytest.raises(FormersError, match="head_dim"):
        formers.create_model("fmvit", dims=(48, 64, 128, 256))  # 48 is not a multiple of head_dim=32
    with pytest.raises(FormersError, match="one entry per stage"):
        formers.create_model("fmvit", depths=(1, 1, 1))
    with pytest.raises(FormersError, match="mlp_groups"):
        MultiGroupConv1x1(6, 8, (1, 4))
