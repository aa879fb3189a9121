"""P68 Activator ("Activator: GLU Activations as The Core Functions of a Vision Transformer").

- Parameter counts of the two published CIFAR-10 models (meta device) equal the counts of the official code
  (github.com/Abdullah-88/Activator, `activator.py` + `train.py`: 2,650,890, also in the fact sheet;
  `activator_only_GEGLU.py` + `train_only_GEGLU.py`: 1,599,242), and a formula for other widths.
- The gating unit and the block against naive versions written here (LayerNorm by its formula, one LN shared).
- The defining property: no token mixing after the patch conv, so the blocks are permutation-equivariant and the
  logits do not change when the image's patches are shuffled.
- The tiny variant runs forward/backward on 28x28 and takes another size.
"""

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.vision.activator import ActivatorBlock, ActivatorGatingUnit
from formers.registry import FormersError

OFFICIAL_CIFAR10 = 2_650_890  # ACTIVATORImageClassification() of the official train.py
OFFICIAL_CIFAR10_GLU_ONLY = 1_599_242  # the same with activator_only_GEGLU.py (no FFN in the blocks)


def _formula(dim, hidden, depth, patch, chans, classes, with_ffn=True):
    gu = 2 * (dim * hidden + hidden) + hidden * dim + dim + 2 * hidden  # W1, W2, W3 and one shared LN(hidden)
    ffn = dim * hidden + hidden + hidden * dim + dim if with_ffn else 0
    block = 2 * dim + gu + ffn  # one LN(dim) shared by both sublayers
    return chans * patch * patch * dim + dim + depth * block + dim * classes + classes


@pytest.mark.parametrize("name,expected", [("activator_patch4_32", OFFICIAL_CIFAR10),
                                           ("activator_glu_only_patch4_32", OFFICIAL_CIFAR10_GLU_ONLY)])
def test_published_parameter_counts(name, expected):
    with torch.device("meta"):
        model = formers.create_model(name)
    assert model.num_params() == expected
    assert expected == _formula(256, 512, 4, 4, 3, 10, with_ffn=name == "activator_patch4_32")


@pytest.mark.parametrize("dim,hidden,depth,patch,classes,ffn", [(64, 96, 3, 2, 100, True), (48, 192, 2, 7, 5, False)])
def test_parameter_formula(dim, hidden, depth, patch, classes, ffn):
    with torch.device("meta"):
        model = formers.create_model("activator", dim=dim, hidden=hidden, depth=depth, patch=patch, img_size=28,
                                     num_classes=classes, with_ffn=ffn)
    assert model.num_params() == _formula(dim, hidden, depth, patch, 3, classes, with_ffn=ffn)


def _ln(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _lin(x, lin):
    return x @ lin.weight.T + lin.bias


def _gu_ref(x, gu, act):
    u = _ln(act(_lin(x, gu.proj_u)), gu.norm_u)
    v = _ln(_lin(x, gu.proj_v), gu.norm_v)
    return _lin(u * v, gu.proj_out)


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("act,fn", [("gelu", F.gelu), ("silu", F.silu), ("relu", F.relu)])
def test_gating_unit_matches_naive(act, fn):
    torch.manual_seed(0)
    gu = ActivatorGatingUnit(16, hidden=24, act=act).double()
    _randomize(gu)
    assert gu.norm_u is gu.norm_v  # one LayerNorm for the gate and the value, as the official code
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(gu(x), _gu_ref(x, gu, fn), atol=1e-12, rtol=0)
    separate = ActivatorGatingUnit(16, hidden=24, shared_norm=False)
    assert separate.norm_u is not separate.norm_v
    assert sum(p.numel() for p in separate.parameters()) == sum(p.numel() for p in gu.parameters()) + 2 * 24


@pytest.mark.parametrize("with_ffn", [True, False])
def test_block_matches_naive(with_ffn):
    torch.manual_seed(0)
    block = ActivatorBlock(12, 20, with_ffn=with_ffn).double().eval()
    _randomize(block)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    y = x + _gu_ref(_ln(x, block.norm), block.gu, F.gelu)
    if with_ffn:
        f = block.ffn
        y = y + _lin(F.gelu(_lin(_ln(y, block.norm), f[0])), f[3])  # the same LN module again
    torch.testing.assert_close(block(x), y, atol=1e-12, rtol=0)


def test_blocks_are_permutation_equivariant_and_logits_ignore_patch_order():
    torch.manual_seed(0)
    model = formers.create_model("activator_tiny").double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    tokens = torch.randn(2, 49, 128, dtype=torch.float64)
    perm = torch.randperm(49)
    for block in model.blocks:
        torch.testing.assert_close(block(tokens[:, perm]), block(tokens)[:, perm], atol=1e-12, rtol=0)
    # shuffle the 7x7 grid of 4x4 patches: the tokens are permuted, the mean over them is not
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 1, 49, 4, 4)[:, :, perm]  # (B, C, 49, 4, 4)
    shuffled = patches.reshape(2, 1, 7, 7, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(2, 1, 28, 28)
    assert not torch.equal(shuffled, x)
    torch.testing.assert_close(model.forward_features(shuffled), model.forward_features(x)[:, perm], atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(model(shuffled), model(x), atol=1e-12, rtol=0)


def test_gating_unit_is_a_registered_channel_mixer():
    ffn = formers.build("ffn", "activator_gu", dim=32, act="silu")
    assert isinstance(ffn, ActivatorGatingUnit) and ffn.proj_u.out_features == 64  # mult 2 (d_ffn 512 / d 256)
    model = formers.create_model("encoder", vocab=16, dim=32, depth=1, max_len=8, num_classes=2,
                                 block={"mixer": {"name": "softmax", "heads": 4}, "ffn": "activator_gu"})
    assert model(torch.randint(0, 16, (2, 8))).shape[0] == 2


def test_tiny_forward_backward_and_other_size():
    torch.manual_seed(0)
    model = formers.create_model("activator_tiny")
    assert 2e5 < model.num_params() < 2e6
    x = torch.randn(2, 1, 28, 28)
    assert model.forward_features(x).shape == (2, 49, 128)  # 7x7 patches of 4x4
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.other_size == 32
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(FormersError, match="divisible"):
        model(torch.randn(2, 1, 30, 30))
    with pytest.raises(FormersError, match="divisible"):
        formers.create_model("activator", img_size=30)
