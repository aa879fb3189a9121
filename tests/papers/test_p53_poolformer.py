"""P53 PoolFormer: published sizes, HF transformers parity, the pooling token mixer against a naive reference.

Sources: official sail-sg/poolformer README (12M/21M/31M/56M/73M parameters; drop-path 0.1/0.1/0.2/0.3/0.4) and
`models/poolformer.py` (layers, dims, layer-scale init 1e-5 or 1e-6); HF transformers
`PoolFormerForImageClassification` (the peer the issue names: exact parameter counts and logits).
"""

import re

import pytest
import torch
import torch.nn.functional as F
from transformers import PoolFormerConfig, PoolFormerForImageClassification

import formers
from formers.models.vision.base import LayerScale
from formers.models.vision.poolformer import GroupNorm1, MetaFormerBlock, Pooling

S, M = [64, 128, 320, 512], [96, 192, 384, 768]
# name, layers, dims, layer-scale init (official code), params in the README (millions), drop-path (README)
CONFIGS = [
    ("poolformer_s12", [2, 2, 6, 2], S, 1e-5, 12, 0.1),
    ("poolformer_s24", [4, 4, 12, 4], S, 1e-5, 21, 0.1),
    ("poolformer_s36", [6, 6, 18, 6], S, 1e-6, 31, 0.2),
    ("poolformer_m36", [6, 6, 18, 6], M, 1e-6, 56, 0.3),
    ("poolformer_m48", [8, 8, 24, 8], M, 1e-6, 73, 0.4),
]

# HF PoolFormerForImageClassification key -> formers PoolFormer key: every rule is applied in order
KEY_MAP = [
    (r"^poolformer\.encoder\.patch_embeddings\.(\d+)\.projection\.", r"stages.\1.embed.proj."),
    (r"^poolformer\.encoder\.block\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.before_norm\.", ".norm1."),
    (r"\.after_norm\.", ".norm2."),
    (r"\.output\.conv1\.", ".mlp.fc1."),
    (r"\.output\.conv2\.", ".mlp.fc2."),
    (r"\.layer_scale_1$", ".ls1.gamma"),
    (r"\.layer_scale_2$", ".ls2.gamma"),
    (r"^classifier\.", "head."),
]


def hf_to_formers(key: str) -> str:
    for pat, rep in KEY_MAP:
        key = re.sub(pat, rep, key)
    return key


@pytest.mark.parametrize("name,depths,dims,ls,readme_m,dpr", CONFIGS)
def test_published_configs(name, depths, dims, ls, readme_m, dpr, monkeypatch):
    """Parameter count = HF's with the same config and the README's rounded figure; layer-scale init and
    drop-path as the official code / README."""
    seen = set()
    init = LayerScale.__init__

    def spy(self, dim, init_value=1e-5, channels_first=False):  # meta tensors have no values: watch the init
        seen.add(init_value)
        init(self, dim, init_value, channels_first)

    monkeypatch.setattr(LayerScale, "__init__", spy)
    with torch.device("meta"):
        m = formers.create_model(name)
        hf = PoolFormerForImageClassification(PoolFormerConfig(depths=depths, hidden_sizes=dims, num_labels=1000))
    n = m.num_params()
    assert n == sum(p.numel() for p in hf.parameters())
    assert round(n / 1e6) == readme_m
    blocks = [b for s in m.stages for b in s.blocks]
    assert [len(s.blocks) for s in m.stages] == depths and m.num_features == dims[-1]
    # drop-path rises linearly from 0 to the README rate over all blocks (official `basic_blocks`)
    assert blocks[0].drop_path.p == 0 and blocks[-1].drop_path.p == pytest.approx(dpr)
    assert seen == {ls}  # 1e-5 for S12/S24, 1e-6 for S36/M36/M48 (official code)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights, norm affines and layer scales of order 1, so the token mixer and every block matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dim() == 1 and (name.endswith("weight") or name.endswith("gamma")):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))


def test_logits_equal_hf():
    """Same weights through the key map -> the same logits as HF (float64); a small config of the same code path."""
    cfg = PoolFormerConfig(depths=[1, 2, 2, 1], hidden_sizes=[8, 16, 24, 32], num_labels=7)
    with torch.device("meta"):
        hf = PoolFormerForImageClassification(cfg)
        m = formers.create_model("poolformer", num_classes=7, depths=(1, 2, 2, 1), dims=(8, 16, 24, 32))
    hf, m = hf.to_empty(device="cpu").double().eval(), m.to_empty(device="cpu").double().eval()
    randomize_(m)
    sd = m.state_dict()
    hf.load_state_dict({k: sd[hf_to_formers(k)] for k in hf.state_dict()}, strict=True)
    assert len(sd) == len(hf.state_dict())  # the key map is a bijection
    x = torch.randn(2, 3, 72, 56, dtype=torch.float64)  # not square; 18x14 -> 9x7 -> 5x4 -> 3x2
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, rtol=1e-10, atol=1e-10)


def naive_pool_mixer(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Mean of the in-bounds k x k neighbours (padding not counted) minus the centre, by loops."""
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    r = k // 2
    for i in range(H):
        for j in range(W):
            patch = x[:, :, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
            out[:, :, i, j] = patch.mean(dim=(2, 3)) - x[:, :, i, j]
    return out


@pytest.mark.parametrize("k", [3, 5])
def test_pooling_mixer_matches_naive(k):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    mixer = Pooling(k)
    assert sum(p.numel() for p in mixer.parameters()) == 0  # the token mixer has no parameters
    torch.testing.assert_close(mixer(x), naive_pool_mixer(x, k), rtol=1e-12, atol=1e-12)
    # padding is not counted: a constant map is mixed to exactly zero, borders included
    assert torch.equal(mixer(torch.full((1, 2, 5, 4), 3.5)), torch.zeros(1, 2, 5, 4))


def test_groupnorm1_and_block_match_naive():
    dim = 6
    x = torch.randn(2, dim, 4, 5, dtype=torch.float64)
    blk = MetaFormerBlock(dim).double()
    randomize_(blk, seed=3)

    def gn(norm: GroupNorm1, t):  # statistics of each sample over all of (C, H, W), per-channel affine
        mu = t.mean(dim=(1, 2, 3), keepdim=True)
        var = t.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]

    torch.testing.assert_close(blk.norm1(x), gn(blk.norm1, x), rtol=1e-12, atol=1e-12)

    def mlp(t):  # 1x1 convs = a per-pixel MLP
        tt = t.permute(0, 2, 3, 1)  # (B, H, W, C)
        hdn = F.gelu(tt @ blk.mlp.fc1.weight[:, :, 0, 0].T + blk.mlp.fc1.bias)
        return (hdn @ blk.mlp.fc2.weight[:, :, 0, 0].T + blk.mlp.fc2.bias).permute(0, 3, 1, 2)

    g1, g2 = blk.ls1.gamma[:, None, None], blk.ls2.gamma[:, None, None]
    y = x + g1 * naive_pool_mixer(gn(blk.norm1, x))
    y = y + g2 * mlp(gn(blk.norm2, y))
    torch.testing.assert_close(blk(x), y, rtol=1e-10, atol=1e-10)


def test_tiny_forward_backward_and_pooling_mixes_in_every_stage():
    m = formers.create_model("poolformer_tiny")
    assert 200_000 <= m.num_params() <= 2_000_000
    sides = []
    for s in m.stages:
        s.blocks[0].token_mixer.register_forward_hook(
            lambda mod, i, o: sides.append((o.shape[-2], o.shape[-1], bool(o.abs().amax() > 0))))
    x = torch.randn(2, 1, 28, 28)
    out = m(x)
    assert out.shape == (2, 10)
    # 196 tokens in the first stage; every map is at least 2x2, so Pool(x) - x is not identically zero
    assert sides == [(14, 14, True), (7, 7, True), (4, 4, True), (2, 2, True)]
    F.cross_entropy(out, torch.tensor([3, 8])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert m.eval()(torch.randn(2, 1, m.other_size, m.other_size)).shape == (2, 10)


def test_pooling_adds_no_parameters_over_the_identity_metaformer():
    """The paper's ablation baseline (mixer='identity') has exactly the parameters of PoolFormer-S12."""
    with torch.device("meta"):
        pool = formers.create_model("poolformer_s12")
        ident = formers.create_model("poolformer", mixer="identity")
    assert isinstance(ident.stages[0].blocks[0].token_mixer, torch.nn.Identity)
    assert pool.num_params() == ident.num_params()


def test_bad_options_raise_formers_error():
    with pytest.raises(formers.FormersError, match="one per stage"):
        formers.create_model("poolformer", depths=(2, 2, 6))
    with pytest.raises(formers.FormersError, match="pool_size"):
        formers.create_model("poolformer", pool_size=4)
    with pytest.raises(formers.FormersError, match="mixer"):
        formers.create_model("poolformer", mixer="attention")
    with pytest.raises(formers.FormersError, match="channels"):
        formers.create_model("poolformer_tiny")(torch.randn(1, 3, 28, 28))
