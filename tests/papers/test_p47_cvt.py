"""P47 CvT: published sizes, HF transformers parity, convolutional projections against a naive reference.

Sources: paper Table 2 (CvT-13 20M, CvT-21 32M parameters); HF transformers `CvtForImageClassification` (the peer
the issue names: exact parameter counts and logits with the same weights); official microsoft/CvT
`lib/models/cls_cvt.py` for the mechanism.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import CvtConfig, CvtForImageClassification

import formers
from formers.models.vision.cvt import ConvAttention, QuickGELU

# HF CvtForImageClassification key -> formers CvT key: every rule is applied in order
_QKV = r"([qkv])(?:uery|ey|alue)"  # query/key/value -> q/k/v
KEY_MAP = [
    (r"^cvt\.encoder\.stages\.", "stages."),
    (r"\.embedding\.convolution_embeddings\.projection\.", ".embed.proj."),
    (r"\.embedding\.convolution_embeddings\.normalization\.", ".embed.norm."),
    (r"\.layers\.", ".blocks."),
    (rf"\.attention\.attention\.convolution_projection_{_QKV}\.convolution_projection\.convolution\.",
     r".attn.conv_\1.conv."),
    (rf"\.attention\.attention\.convolution_projection_{_QKV}\.convolution_projection\.normalization\.",
     r".attn.conv_\1.bn."),
    (rf"\.attention\.attention\.projection_{_QKV}\.", r".attn.proj_\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def hf_to_formers(key: str) -> str:
    for pat, rep in KEY_MAP:
        key = re.sub(pat, rep, key)
    return key


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights and BatchNorm statistics (so every parameter and buffer shows up in the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.zero_()
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            elif t.dim() == 1 and name.endswith("weight"):  # norm scales
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))


def hf_pair(cfg: CvtConfig, **ours):
    """A formers CvT and an HF CvT of the same config, on CPU in float64, with the same random weights."""
    with torch.device("meta"):
        hf = CvtForImageClassification(cfg)
        m = formers.create_model("cvt", act="gelu", **ours)
    hf, m = hf.to_empty(device="cpu").double().eval(), m.to_empty(device="cpu").double().eval()
    randomize_(m)
    sd = m.state_dict()
    hf.load_state_dict({k: sd[hf_to_formers(k)] for k in hf.state_dict()}, strict=True)
    assert len(sd) == len(hf.state_dict())  # the key map is a bijection
    return m, hf


def hf_count(**cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CvtForImageClassification(CvtConfig(num_labels=1000, **cfg)).parameters())


@pytest.mark.parametrize("name,depth,paper_m", [("cvt_13", [1, 2, 10], 20), ("cvt_21", [1, 4, 16], 32)])
def test_parameter_counts_equal_hf_and_paper(name, depth, paper_m):
    with torch.device("meta"):
        m = formers.create_model(name)
    n = m.num_params()
    assert n == hf_count(depth=depth)  # HF CvtConfig() is CvT-13; CvT-21 differs only in depth
    assert round(n / 1e6) == paper_m  # paper Table 2: 20M / 32M


def test_logits_equal_hf_small_config():
    # HF indexes its per-stage drop-path list by the stage number, so it needs depth[i] > i; its no-class-token
    # head fails (it indexes a missing output), so only the published layout (class token in stage 3) is compared
    cfg = CvtConfig(embed_dim=[16, 24, 48], num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=5)
    m, hf = hf_pair(cfg, num_classes=5, dims=(16, 24, 48), heads=(1, 2, 4), depths=(1, 2, 3))
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)  # not square: catches transposed grids
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, rtol=1e-10, atol=1e-10)


def naive_conv_attention(attn: ConvAttention, x: torch.Tensor, h: int, w: int, stride_kv: int) -> torch.Tensor:
    """Eval-mode CvT attention written with loops: depthwise 3x3 conv (zero padding 1) + BatchNorm per output pixel,
    the class token kept out of the conv, then per-head softmax(q k^T / sqrt(D)) v."""
    B, N, D = x.shape
    extra = N - h * w
    grid = x[:, extra:].reshape(B, h, w, D)  # token index = row * w + col

    def dw_bn(proj, stride):
        wt, bn = proj.conv.weight[:, 0], proj.bn  # (D, 3, 3)
        rows = []
        for i in range(0, h, stride):
            for j in range(0, w, stride):
                acc = torch.zeros(B, D, dtype=x.dtype)
                for di in range(3):
                    for dj in range(3):
                        r, c = i - 1 + di, j - 1 + dj
                        if 0 <= r < h and 0 <= c < w:
                            acc = acc + grid[:, r, c] * wt[:, di, dj]
                rows.append((acc - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
        return torch.cat([x[:, :extra], torch.stack(rows, 1)], 1)  # (B, T + pixels, D)

    q = F.linear(dw_bn(attn.conv_q, 1), attn.proj_q.weight, attn.proj_q.bias)
    k = F.linear(dw_bn(attn.conv_k, stride_kv), attn.proj_k.weight, attn.proj_k.bias)
    v = F.linear(dw_bn(attn.conv_v, stride_kv), attn.proj_v.weight, attn.proj_v.bias)
    H = attn.heads
    Dh = D // H
    out = torch.zeros(B, N, D, dtype=x.dtype)
    for hd in range(H):
        sl = slice(hd * Dh, (hd + 1) * Dh)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(D)  # official scale: model width
        out[..., sl] = torch.softmax(s, -1) @ v[..., sl]
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("cls", [0, 1])
def test_conv_projection_attention_matches_naive(cls):
    h, w, D = 5, 6, 12
    attn = ConvAttention(D, heads=3).double()
    randomize_(attn, seed=1)
    attn.eval()
    x = torch.randn(2, cls + h * w, D, dtype=torch.float64)
    kv_lens = []
    attn.conv_k.register_forward_hook(lambda mod, i, o: kv_lens.append(o.shape[1]))
    y = attn(x, (h, w))
    torch.testing.assert_close(y, naive_conv_attention(attn, x, h, w, 2), rtol=1e-10, atol=1e-10)
    # stride 2 for keys/values: ceil(5/2) * ceil(6/2) = 9 of the 30 query pixels (a quarter on even grids)
    assert kv_lens == [math.ceil(h / 2) * math.ceil(w / 2)]


def test_kv_quarter_length_and_cls_only_in_last_stage():
    m = formers.create_model("cvt_tiny").eval()
    assert [s.cls_token is not None for s in m.stages] == [False, False, True]
    assert not any("pos" in n for n, _ in m.named_parameters())  # no position embedding
    q_len, kv_len = [], []
    for s in m.stages:
        s.blocks[0].attn.conv_q.register_forward_hook(lambda mod, i, o: q_len.append(o.shape[1]))
        s.blocks[0].attn.conv_k.register_forward_hook(lambda mod, i, o: kv_len.append(o.shape[1]))
    with torch.no_grad():
        tokens = m.forward_features(torch.randn(2, 1, 28, 28))
    assert q_len == [196, 49, 16] and kv_len == [49, 16, 4]  # 14x14 -> 7x7, 7x7 -> 4x4, 4x4 -> 2x2
    assert tokens.shape == (2, 1 + 16, 128)  # class token + the last 4x4 map


def test_quick_gelu_is_the_official_activation():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))
    assert isinstance(formers.create_model("cvt_tiny").stages[0].blocks[0].mlp.act, QuickGELU)


def test_tiny_forward_backward():
    m = formers.create_model("cvt_tiny")
    assert 200_000 <= m.num_params() <= 2_000_000
    x = torch.randn(2, 1, 28, 28)
    out = m(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    zero = set()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if p.grad.abs().sum() == 0:
            zero.add(name)
    # the head reads only the class token, whose query skips the conv: the last block's query conv cannot matter
    assert zero == {f"stages.2.blocks.2.attn.conv_q.{n}" for n in ("conv.weight", "bn.weight", "bn.bias")}
    assert m.eval()(torch.randn(2, 1, m.other_size, m.other_size)).shape == (2, 10)


def test_fuse_folds_batchnorm_exactly():
    m = formers.create_model("cvt_tiny").double()
    randomize_(m, seed=2)
    m.eval()
    fused = m.fuse()
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fused.modules())
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-10, atol=1e-10)


def test_bad_options_raise_formers_error():
    with pytest.raises(formers.FormersError, match="divisible"):
        formers.create_model("cvt", dims=(16, 24, 50), heads=(1, 2, 4), depths=(1, 1, 1))
    with pytest.raises(formers.FormersError, match="one per stage"):
        formers.create_model("cvt", depths=(1, 2))
    with pytest.raises(formers.FormersError, match="method"):
        formers.create_model("cvt", method="dw")
    with pytest.raises(formers.FormersError, match="act"):
        formers.create_model("cvt_tiny", act="relu")
    with pytest.raises(formers.FormersError, match="channels"):
        formers.create_model("cvt_tiny")(torch.randn(1, 3, 28, 28))
