"""P39 Transformer in Transformer: published sizes, visual words per patch, the TNT block, inner locality.

Published numbers: TNT-S 23.8M and TNT-B 65.6M parameters (the official readme and the P39 fact sheet:
huawei-noah/Efficient-AI-Backbones tnt_pytorch/readme.md). The official tnt.py also holds an unused frozen
parameter `outer_tokens` (1, N, D) that its parameter sum counts; formers leaves it out. Our trainable count
equals the official layer list re-derived below (and timm's non-legacy `tnt_s_patch16_224`, which drops
`outer_tokens` too): 23,768,584 (23.8M) for TNT-S; for TNT-B, 65,428,680 (65.4M) reaches the published 65.6M
only with the official code's 196 x 640 frozen entries added, which the test states explicitly.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.vision.tnt import TNT, TNTBlock, WordEmbed


def official_tnt_params(dim: int, inner: int, depth: int = 12, patch: int = 16, img: int = 224, words: int = 16,
                        in_chans: int = 3, classes: int = 1000, mlp: float = 4.0) -> int:
    """Trainable parameters of the official TNT (tnt_pytorch/tnt.py), layer by layer."""
    def ln(d):
        return 2 * d

    def lin(i, o, bias=True):
        return i * o + (o if bias else 0)

    def vit_block(d):  # norm, attention (qk and v without bias, proj with bias), norm, MLP
        h = int(d * mlp)
        return ln(d) + lin(d, 2 * d, False) + lin(d, d, False) + lin(d, d) + ln(d) + lin(d, h) + lin(h, d)

    n = (img // patch) ** 2
    embed = in_chans * inner * 7 * 7 + inner  # the 7x7 word conv
    stem = ln(words * inner) + lin(words * inner, dim) + ln(dim)
    tokens = dim + (n + 1) * dim + words * inner  # cls token, outer and inner positions
    block = vit_block(inner) + ln(words * inner) + lin(words * inner, dim, False) + ln(dim) + vit_block(dim)
    return embed + stem + tokens + depth * block + ln(dim) + lin(dim, classes)


@pytest.mark.parametrize("name,dim,inner,published", [("tnt_s_patch16_224", 384, 24, 23.8),
                                                      ("tnt_b_patch16_224", 640, 40, 65.6)])
def test_published_sizes(name, dim, inner, published):
    with torch.device("meta"):
        m = formers.create_model(name)
    trainable = sum(p.numel() for p in m.parameters())
    assert trainable == official_tnt_params(dim, inner)
    assert not list(m.buffers())
    outer_tokens = 196 * dim  # the official code's unused frozen (1, N, D) parameter
    assert round((trainable + outer_tokens) / 1e6, 1) == published
    assert m.outer_pos.shape == (1, 197, dim) and m.words.num_words == 16  # 14 x 14 patches of 4 x 4 words


def test_tnt_s_exact_count():
    with torch.device("meta"):
        m = formers.create_model("tnt_s_patch16_224")
    assert m.num_params() == 23_768_584
    assert round(m.num_params() / 1e6, 1) == 23.8  # without the frozen placeholder too


# ------------------------------------------------------------------------------------------- naive references


def naive_vit_block(blk, x):
    """Pre-LN block with per-head explicit softmax(q k^T / sqrt(dh)) v; x (S, L, d)."""
    d = x.shape[-1]
    H = blk.attn.heads
    dh = d // H
    h = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    q = h @ blk.attn.q.weight.T
    kv = h @ blk.attn.kv.weight.T
    k, v = kv[..., :d], kv[..., d:]
    att = torch.zeros_like(x)
    for i in range(H):
        s = slice(i * dh, (i + 1) * dh)
        att[..., s] = (q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(dh)).softmax(-1) @ v[..., s]
    x = x + att @ blk.attn.out.weight.T + blk.attn.out.bias
    h = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    return x + F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight,
                        blk.mlp.fc2.bias)


def test_tnt_block_matches_naive():
    B, N, W, c, D = 2, 4, 9, 6, 12
    blk = TNTBlock(dim=D, inner_dim=c, num_words=W, heads=3, inner_heads=2).double()
    words = torch.randn(B * N, W, c, dtype=torch.float64)
    patches = torch.randn(B, 1 + N, D, dtype=torch.float64)
    words_ref = naive_vit_block(blk.inner, words)
    flat = words_ref.reshape(B, N, W * c)
    sent = F.layer_norm(F.layer_norm(flat, (W * c,), blk.proj_norm1.weight, blk.proj_norm1.bias, 1e-5)
                        @ blk.proj.weight.T, (D,), blk.proj_norm2.weight, blk.proj_norm2.bias, 1e-5)
    mixed = patches.clone()
    mixed[:, 1:] += sent  # the class token gets no word information
    patches_ref = naive_vit_block(blk.outer, mixed)
    w_out, p_out = blk(words, patches)
    torch.testing.assert_close(w_out, words_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p_out, patches_ref, rtol=1e-10, atol=1e-10)


def test_words_are_convolved_per_patch():
    """Each 16x16 patch is convolved alone (zero padding at the patch border), words in row-major patch order."""
    emb = WordEmbed(in_chans=3, inner_dim=5, patch_size=16, inner_stride=4, inner_kernel=7).double()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    words, hw = emb(x)
    assert hw == (2, 3) and words.shape == (2 * 6, 16, 5)
    ref = []
    for b in range(2):
        for i in range(2):
            for j in range(3):
                crop = x[b: b + 1, :, 16 * i: 16 * (i + 1), 16 * j: 16 * (j + 1)]
                out = F.conv2d(crop, emb.proj.weight, emb.proj.bias, stride=4, padding=3)  # (1, 5, 4, 4)
                ref.append(out.flatten(2).transpose(1, 2)[0])
    torch.testing.assert_close(words, torch.stack(ref), rtol=1e-12, atol=1e-12)
    whole = F.conv2d(x, emb.proj.weight, emb.proj.bias, stride=4, padding=3)  # timm's legacy order: conv, then split
    legacy = F.unfold(whole, 4, stride=4).transpose(1, 2).reshape(12, 5, 16).transpose(1, 2)
    assert not torch.allclose(words, legacy)  # they differ at the patch borders


def test_inner_transformer_stays_inside_its_patch():
    """Changing the pixels of one patch changes that patch's words only (through every block); the outer
    transformer spreads the change to every patch token."""
    m = formers.create_model("tnt_tiny").double().eval()
    x = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    y = x.clone()
    y[..., 8:12, 12:16] += 1.0  # patch (2, 3) of the 7 x 7 grid: index 17

    def run(img):
        words, patches = m.embed(img)
        for blk in m.blocks:
            words, patches = blk(words, patches)
        return words, patches

    with torch.no_grad():
        (wx, px), (wy, py) = run(x), run(y)
    changed = (wx - wy).abs().amax(dim=(1, 2)) > 1e-9  # per patch
    assert changed.nonzero().flatten().tolist() == [17]
    assert ((px - py).abs().amax(dim=-1) > 1e-6).all()  # every patch token (and the class token) moved


def test_tiny_forward_backward():
    m = formers.create_model("tnt_tiny")
    assert isinstance(m, TNT) and 0.2e6 < m.num_params() < 2e6
    x = torch.randn(2, 1, 28, 28)
    assert m.forward_features(x).shape == (2, 1 + 49, 128)  # 49 patches + the class token
    assert m.words(x)[0].shape == (2 * 49, 16, 16)  # 16 words of width 16 per patch
    logits = m(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    other = m.forward_features(torch.randn(2, 1, m.other_size, m.other_size))  # 32 px: 8 x 8 patches
    assert other.shape == (2, 1 + 64, 128) and torch.isfinite(other).all()
