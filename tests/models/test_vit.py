"""ViT baseline and the shared vision parts (formers/models/vision/vit.py, formers/nn/vision.py).

Parameter counts are timm's (`vision_transformer.py` configs with 1000 classes, counted by timm); logits are compared
with HF transformers' ViTForImageClassification after loading the same weights; positions and the patch embedding
against naive formulas written here."""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.vision.vit import VIT_CONFIGS, ViT
from formers.nn.vision import (
    LearnedPosition2d,
    PatchEmbed,
    RotaryPosition2d,
    SinCosPosition2d,
    resample_grid,
    sincos_2d_table,
)
from formers.registry import FormersError

# ---------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name,count", [
    ("vit_tiny_patch16_224", 5_717_416),  # timm's exact counts (1000 classes)
    ("vit_small_patch16_224", 22_050_664),
    ("vit_base_patch16_224", 86_567_656),
])
def test_timm_param_counts(name, count):
    with torch.device("meta"):
        m = formers.create_model(name)
    assert m.num_params() == count


def test_vit_large_param_count_to_published_digit():
    with torch.device("meta"):
        m = formers.create_model("vit_large_patch16_224")
    assert round(m.num_params() / 1e6, 1) == 304.3  # timm model card: 304.3M


@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_named_configs_have_their_published_heads(name):
    with torch.device("meta"):
        m = formers.create_model(name)
    heads = {b.attn.fn.heads for b in m.stack.blocks}
    assert heads == {VIT_CONFIGS[name][3]}, f"{name}: heads {heads}, published {VIT_CONFIGS[name][3]}"
    assert {b.attn.fn.head_dim for b in m.stack.blocks} == {64}  # every timm ViT size uses 64-dim heads


def test_vit_tiny_size_and_tokens():
    m = formers.create_model("vit_tiny")
    assert 0.2e6 < m.num_params() < 2e6
    x = torch.randn(2, 1, 28, 28)
    assert m.forward_features(x).shape == (2, 49, 96)  # 7x7 patch tokens, no class token (avg pooling)
    assert m(torch.randn(2, 1, m.other_size, m.other_size)).shape == (2, 10)


def test_layer_scale_and_drop_path_params():
    base = formers.create_model("vit_tiny", drop_path=0.1)
    ls = formers.create_model("vit_tiny", layer_scale=1e-5)
    assert base.num_params() == formers.create_model("vit_tiny").num_params()  # drop-path has no parameters
    gammas = [p for n, p in ls.named_parameters() if n.endswith("ls.gamma")]
    assert len(gammas) == 2 * 6 and all(torch.all(g == 1e-5) for g in gammas)
    assert ls.num_params() == base.num_params() + 2 * 6 * 96


def test_branch_residual_layer_scale_and_drop_path():
    from formers.blocks import AddResidual
    from formers.models.vision.vit import BranchResidual

    torch.manual_seed(0)
    r = BranchResidual(AddResidual(4), 4, drop_path=0.5, layer_scale=0.1)
    x, u = torch.randn(64, 3, 4), torch.randn(64, 3, 4)
    torch.testing.assert_close(r.eval()(x, u), x + 0.1 * u)
    y = r.train()(x, u)
    kept = torch.isclose(y, x + 0.2 * u).flatten(1).all(1)  # survivors scaled by 1 / (1 - p)
    dropped = torch.isclose(y, x).flatten(1).all(1)
    assert bool((kept ^ dropped).all()) and 0 < int(kept.sum()) < 64  # per sample: the whole branch or nothing


# ------------------------------------------------------------------------------------------------ patch embedding


def test_patch_embed_equals_unfold_matmul():
    torch.manual_seed(0)
    pe = PatchEmbed(in_chans=3, dim=8, patch_size=4).double()
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    cols = F.unfold(x, kernel_size=4, stride=4)  # (B, C*4*4, N), patches row-major
    ref = (pe.proj.weight.reshape(8, -1) @ cols).transpose(1, 2) + pe.proj.bias  # (B, N, D)
    assert pe.grid(12, 8) == (3, 2)
    torch.testing.assert_close(pe(x), ref, rtol=0, atol=1e-12)
    with pytest.raises(FormersError, match="multiple of the patch"):
        pe(torch.randn(1, 3, 10, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------ sin-cos


def test_sincos_2d_matches_naive_formula():
    dim, h, w = 16, 3, 5
    table = sincos_2d_table(dim, (h, w), dtype=torch.float64)
    q = dim // 4
    for r in range(h):
        for c in range(w):
            row = table[r * w + c]
            for i in range(q):
                om = 10000.0 ** (-i / q)
                assert math.isclose(row[i].item(), math.sin(c * om), abs_tol=1e-12)
                assert math.isclose(row[q + i].item(), math.cos(c * om), abs_tol=1e-12)
                assert math.isclose(row[2 * q + i].item(), math.sin(r * om), abs_tol=1e-12)
                assert math.isclose(row[3 * q + i].item(), math.cos(r * om), abs_tol=1e-12)


def test_sincos_position_module_prefix_zero_and_other_grid():
    pos = SinCosPosition2d(8, grid=(2, 2), prefix=1)
    x = torch.zeros(1, 1 + 9, 8)
    y = pos(x, grid=(3, 3))
    assert torch.all(y[0, 0] == 0)
    torch.testing.assert_close(y[0, 1:], sincos_2d_table(8, 3))
    with pytest.raises(FormersError, match="grid"):
        pos(torch.zeros(1, 7, 8))


# ---------------------------------------------------------------------------------------- learned + resampling


def test_resample_keeps_values_at_their_relative_places():
    # a field linear in (row, col): bicubic resampling must reproduce it exactly wherever the 4x4 kernel stays
    # inside the old grid (align_corners=False: new cell j sits at old coordinate (j + 0.5) * old / new - 0.5)
    h = w = 8
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    field = torch.stack([0.3 * r - 0.2 * c + 1.0, 0.5 * c], dim=-1).reshape(h * w, 2)
    up = resample_grid(field, (h, w), (16, 16)).reshape(16, 16, 2)
    for j in range(16):
        for k in range(16):
            y, x = (j + 0.5) / 2 - 0.5, (k + 0.5) / 2 - 0.5
            if 1 <= math.floor(y) <= h - 3 and 1 <= math.floor(x) <= w - 3:
                torch.testing.assert_close(up[j, k], torch.tensor([0.3 * y - 0.2 * x + 1.0, 0.5 * x],
                                                                  dtype=torch.float64), rtol=0, atol=1e-10)


def test_resample_same_size_identity_and_round_trip():
    torch.manual_seed(0)
    t = torch.randn(49, 4)
    assert torch.equal(resample_grid(t, (7, 7), (7, 7)), t)
    const = torch.full((49, 3), 0.7, dtype=torch.float64)
    torch.testing.assert_close(resample_grid(const, (7, 7), (11, 9)), torch.full((99, 3), 0.7, dtype=torch.float64))
    r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.stack([torch.cos(r / 5) * torch.sin(c / 6 + 0.3)], -1).reshape(64, 1).double()
    back = resample_grid(resample_grid(smooth, (8, 8), (16, 16)), (16, 16), (8, 8))
    assert (back - smooth).abs().max() < 0.02  # of a field of range ~1: the antialiased way down blurs a little


def test_learned_resample_matches_on_the_fly_positions():
    torch.manual_seed(0)
    m = formers.create_model("vit_tiny", global_pool="token").eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        on_the_fly = m(x)
        m.pos.resample((8, 8))
        assert m.pos.emb.shape == (1 + 64, 96)
        torch.testing.assert_close(m(x), on_the_fly, rtol=0, atol=1e-6)
    pos = LearnedPosition2d(4, grid=(2, 2), prefix=1)
    assert torch.equal(pos.table((2, 2)), pos.emb)


# --------------------------------------------------------------------------------------------------- 2-D RoPE


def naive_rope_2d(x, rows, cols, base):
    """Rotate every (i, i + Dh/4) pair of the first half by row * theta_i and of the second half by col * theta_i."""
    out = x.clone()
    dh = x.shape[-1]
    quarter = dh // 4
    for n in range(x.shape[-2]):
        for half, p in ((0, rows[n]), (dh // 2, cols[n])):
            for i in range(quarter):
                a = base ** (-4 * i / dh) * float(p)
                rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=x.dtype)
                idx = [half + i, half + quarter + i]
                out[..., n, idx] = x[..., n, idx] @ rot.T
    return out


def test_rope_2d_rotates_by_row_and_column():
    torch.manual_seed(0)
    rope = RotaryPosition2d(16, base=100.0).bind((3, 4), prefix=1)
    q = torch.randn(2, 2, 13, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 13, 8, dtype=torch.float64)
    pos = torch.arange(13)
    rq, rk = rope.rotate(q, k, pos, pos)
    rows = [0] + [(t - 1) // 4 for t in range(1, 13)]
    cols = [0] + [(t - 1) % 4 for t in range(1, 13)]
    torch.testing.assert_close(rq, naive_rope_2d(q, rows, cols, 100.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rk, naive_rope_2d(k, rows, cols, 100.0), rtol=0, atol=1e-12)
    assert torch.equal(rq[..., 0, :], q[..., 0, :])  # the class token is not rotated


def test_rope_2d_scores_depend_on_relative_cells_only():
    torch.manual_seed(1)
    rope = RotaryPosition2d(8).bind((6, 6), prefix=0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(cq, ck):
        tq, tk = torch.tensor([cq[0] * 6 + cq[1]]), torch.tensor([ck[0] * 6 + ck[1]])
        a, b = rope.rotate(q, k, tq, tk)
        return (a * b).sum().item()

    s = score((1, 2), (3, 0))
    assert math.isclose(s, score((2, 5), (4, 3)), abs_tol=1e-12)  # both cells shifted by (1, 3)
    assert not math.isclose(s, score((1, 2), (0, 3)), abs_tol=1e-6)  # a transposed offset changes it
    with pytest.raises(FormersError, match="grid"):
        RotaryPosition2d(8).rotate(q, k, torch.arange(1), torch.arange(1))


def test_rope_2d_through_the_softmax_mixer_equals_naive_attention():
    torch.manual_seed(0)
    attn = formers.build("mixer", "softmax", dim=16, heads=2, causal=False).double()
    x = torch.randn(2, 1 + 6, 16, dtype=torch.float64)
    rope = RotaryPosition2d(16).bind((2, 3), prefix=1)
    y = attn(x, positions=rope)
    q = attn.q(x).view(2, 7, 2, 8).transpose(1, 2)
    k, v = attn.kv(x).view(2, 7, 2, 2, 8).permute(2, 0, 3, 1, 4)
    rows, cols = [0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 0, 1, 2]
    q, k = naive_rope_2d(q, rows, cols, 100.0), naive_rope_2d(k, rows, cols, 100.0)
    ref = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ v
    torch.testing.assert_close(y, attn.out(ref.transpose(1, 2).reshape(2, 7, 16)), rtol=0, atol=1e-12)


def test_vit_with_rope_runs_at_two_sizes():
    m = formers.create_model("vit_tiny", pos_embed="rope", global_pool="token")
    assert sum(p.numel() for p in m.pos.parameters()) == 0
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert m(torch.randn(2, 1, 36, 32)).shape == (2, 10)


# ----------------------------------------------------------------------------------------- composability, errors


def test_temperature_attention_in_a_vit():
    m = formers.create_model("vit_tiny", block={"mixer": {"name": "temperature", "temperature": 0.5}})
    mixers = [b.attn.fn for b in m.stack.blocks]
    assert all(type(a).__name__ == "TemperatureAttention" for a in mixers)
    assert all(a.heads == 3 and a.q.bias is not None for a in mixers)  # heads and qkv bias filled from the model
    assert mixers[0].scale == pytest.approx(32 ** -0.5 / 0.5)
    y = m(torch.randn(2, 1, 28, 28))
    y.sum().backward()
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_per_layer_override_and_block_spec_errors():
    m = formers.create_model("vit_tiny", layers={"0": {"mixer": {"name": "temperature", "temperature": 2.0}}})
    assert type(m.stack.blocks[0].attn.fn).__name__ == "TemperatureAttention"
    assert type(m.stack.blocks[1].attn.fn).__name__ == "SoftmaxAttention"
    with pytest.raises(FormersError, match="hedas"):
        formers.create_model("vit_tiny", block={"mixer": {"name": "softmax", "hedas": 2}})


def test_bad_options_and_inputs():
    with pytest.raises(FormersError, match="class_token"):
        ViT(img_size=28, patch_size=4, dim=32, depth=1, heads=2, class_token=False, global_pool="token")
    with pytest.raises(FormersError, match="multiple"):
        ViT(img_size=30, patch_size=4, dim=32, depth=1, heads=2)
    m = formers.create_model("vit_tiny")
    with pytest.raises(FormersError, match="channels"):
        m(torch.randn(2, 3, 28, 28))
    with pytest.raises(FormersError, match="multiple of the patch"):
        m(torch.randn(2, 1, 30, 30))


# ----------------------------------------------------------------------------------------------- HF parity


def test_logits_equal_hf_transformers_vit():
    transformers = pytest.importorskip("transformers")
    # 2 heads: not the block defaults' 4, so a model that ignored `heads` would fail here
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 image_size=16, patch_size=4, num_channels=3, num_labels=5, layer_norm_eps=1e-6,
                                 qkv_bias=True, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).double().eval()
    with torch.no_grad():  # HF's init leaves biases/cls at 0: randomise so the map is really exercised
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ViT(img_size=16, patch_size=4, in_chans=3, num_classes=5, dim=32, depth=2, heads=2).double().eval()
    sd = hf.state_dict()
    new = {"cls_token": sd["vit.embeddings.cls_token"], "pos.emb": sd["vit.embeddings.position_embeddings"][0],
           "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["vit.layernorm.weight"], "norm.bias": sd["vit.layernorm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(2):
        s, o = f"vit.layers.{i}.", f"stack.blocks.{i}."
        for t in ("weight", "bias"):
            new[o + f"attn.fn.q.{t}"] = sd[s + f"attention.q_proj.{t}"]
            new[o + f"attn.fn.kv.{t}"] = torch.cat([sd[s + f"attention.k_proj.{t}"], sd[s + f"attention.v_proj.{t}"]])
            new[o + f"attn.fn.out.{t}"] = sd[s + f"attention.o_proj.{t}"]
            new[o + f"attn.norm.{t}"] = sd[s + f"layernorm_before.{t}"]
            new[o + f"ffn.norm.{t}"] = sd[s + f"layernorm_after.{t}"]
            new[o + f"ffn.fn.fc1.{t}"] = sd[s + f"mlp.fc1.{t}"]
            new[o + f"ffn.fn.fc2.{t}"] = sd[s + f"mlp.fc2.{t}"]
    assert set(new) == set(ours.state_dict())
    ours.load_state_dict(new)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        # HF's eager attention takes its softmax in float32 (modeling_vit.py), hence 1e-7 and not 1e-12 in float64
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=0, atol=1e-7)
        # forward ran its class-token-only last block; every token through the whole stack gives the same logits
        assert ours._class_token_only()
        full = ours.forward_head(ours.forward_features(x))
        torch.testing.assert_close(full, hf(pixel_values=x).logits, rtol=0, atol=1e-7)
