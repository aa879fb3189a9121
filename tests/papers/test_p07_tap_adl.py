"""P07 TAP + ADL (Robustifying Token Attention) as ViT options, against naive references written here.

Sources: official guoyongcs/TAPADL, `TAPADL_RVT/tap_robust_models.py` (DilationPredictor, DilatedAvgPooling: nn.Unfold
with dilation s and padding s, mean of the 9 values; Block: x + Attn(LN(TAP(x)))) and `TAPADL_RVT/engine.py`
(AttentionDiversificationLoss: head-mean attention, threshold th/N, cosine of each row with the mean row).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.vision.vit import ViT
from formers.models.vision.vit_options import TokenAwareAvgPool, attention_diversification_loss
from formers.registry import FormersError

SMALL = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, dim=16, depth=2, heads=2)


def _images(n: int = 2, side: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _perturb_bn(m: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g, dtype=torch.float64))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64))


def naive_tap(tap: TokenAwareAvgPool, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Loops over pixels and dilations: x~[p] = sum_s m_s[p] * (1/9) sum_{|di|,|dj|<=1} x[p + s (di, dj)] (zeros
    outside the grid; s = 0 is x[p] itself); m from the module's own predictor (softmax over the scales)."""
    B, N, D = x.shape
    h, w = grid
    fmap = x[:, tap.prefix:].transpose(1, 2).reshape(B, D, h, w)
    m = (tap.proj(fmap) / tap.temperature).softmax(dim=1)  # (B, S, h, w)
    out = torch.zeros_like(fmap)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                for s in range(tap.scales):
                    if s == 0:
                        pooled = fmap[b, :, i, j]
                    else:
                        pooled = torch.zeros(D, dtype=x.dtype)
                        for di in (-1, 0, 1):
                            for dj in (-1, 0, 1):
                                ii, jj = i + di * s, j + dj * s
                                if 0 <= ii < h and 0 <= jj < w:
                                    pooled = pooled + fmap[b, :, ii, jj]
                        pooled = pooled / 9
                    out[b, :, i, j] += m[b, s, i, j] * pooled
    return torch.cat([x[:, :tap.prefix], out.reshape(B, D, h * w).transpose(1, 2)], dim=1)


# ------------------------------------------------------------------------------------------------------- TAP


def test_tap_one_scale_is_the_identity():
    torch.manual_seed(0)
    tap = TokenAwareAvgPool(8, scales=1, prefix=1).double().train()
    x = torch.randn(3, 1 + 4 * 5, 8, dtype=torch.float64)
    assert torch.equal(tap(x, grid=(4, 5)), x)  # softmax over one scale = 1, scale 0 = the token itself


def test_tap_scales_1_is_the_plain_vit():
    torch.manual_seed(0)
    plain = ViT(**SMALL).double().eval()
    torch.manual_seed(0)
    tap1 = ViT(**SMALL, tap_scales=1).double().eval()
    assert plain.state_dict().keys() == tap1.state_dict().keys()
    tap1.load_state_dict(plain.state_dict())
    x = _images()
    with torch.no_grad():
        assert torch.equal(tap1(x), plain(x))


@pytest.mark.parametrize("train", [True, False])
def test_tap_three_scales_equals_naive_loops(train):
    torch.manual_seed(0)
    tap = TokenAwareAvgPool(6, scales=3, prefix=1).double()
    _perturb_bn(tap)
    tap.train(train)
    x = torch.randn(2, 1 + 5 * 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(tap(x, grid=(5, 6)), naive_tap(tap, x, (5, 6)), rtol=0, atol=1e-12)


def test_vit_with_tap_equals_reference_blocks():
    """x~ feeds only Attn(LN(x~)); the residual adds to the un-pooled x (official Block.forward)."""
    torch.manual_seed(0)
    m = ViT(**SMALL, tap_scales=3).double().eval()
    _perturb_bn(m)
    x = _images()
    grid = (4, 4)
    with torch.no_grad():
        t = m.pos(torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x)], dim=1), grid=grid)
        for block in m.stack.blocks:
            norm = block.attn.norm  # called through F.layer_norm here: the module carries the TAP hook
            xt = naive_tap(block.tap, t, grid)
            t = t + block.attn.fn(F.layer_norm(xt, (16,), norm.weight, norm.bias, norm.eps))
            t = block.ffn(t)
        ref = m.head(m.norm(t)[:, 0])
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-10)


def test_tap_parameters_and_other_size():
    base = ViT(**SMALL)
    m = ViT(**SMALL, tap_scales=4)
    per_block = 16 * 4 * 9 + 2 * 4 + 4 * 4 * 9  # conv dim->S, BN(S), conv S->S (official DilationPredictor)
    assert m.num_params() == base.num_params() + 2 * per_block
    assert m(torch.randn(2, 1, 20, 12)).shape == (2, 5)  # a non-square grid (5 x 3)


# ------------------------------------------------------------------------------------------------------- ADL


def test_adl_is_one_for_identical_rows_and_zero_for_a_permutation():
    N = 6
    row = torch.tensor([0.45, 0.4, 0.1, 0.03, 0.01, 0.01], dtype=torch.float64)  # two entries above 2/N
    same = row.expand(2, 1, N, N)  # (B, H, N, N), every row identical
    torch.testing.assert_close(attention_diversification_loss([same, same]), torch.tensor(1.0, dtype=torch.float64))
    perm = torch.eye(N, dtype=torch.float64)[torch.randperm(N)].expand(2, 3, N, N)  # one-hot on distinct tokens
    assert attention_diversification_loss([perm]).item() == 0.0  # mean row 1/N < 2/N: zeroed, cosine 0


def _naive_attention(mixer, h: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) per head, from the mixer's weights; h (n, D) -> (H, n, n)."""
    n = h.shape[0]
    H, Dh = mixer.heads, mixer.head_dim
    q = mixer.q(h).view(n, H, Dh).transpose(0, 1)
    k = mixer.kv(h).view(n, 2, H, Dh)[:, 0].transpose(0, 1)
    return torch.softmax(q @ k.transpose(1, 2) * mixer.scale, dim=-1)


def _naive_adl(attns: list[torch.Tensor], th: float) -> float:
    """Loops over layers, images and rows: cos(row_i, mean row) after zeroing entries <= th / N."""
    layers = []
    for a in attns:  # (B, H, N, N)
        B, _, N, _ = a.shape
        tau = th / N
        sims = []
        for b in range(B):
            A = a[b].mean(0)
            mean = [sum(A[i, j].item() for i in range(N)) / N for j in range(N)]
            mean = [v if v > tau else 0.0 for v in mean]
            for i in range(N):
                r = [A[i, j].item() if A[i, j].item() > tau else 0.0 for j in range(N)]
                dot = sum(x * y for x, y in zip(r, mean, strict=True))
                nr, nm = math.sqrt(sum(x * x for x in r)), math.sqrt(sum(y * y for y in mean))
                sims.append(dot / max(nr * nm, 1e-8) if nr > 0 and nm > 0 else 0.0)
        layers.append(sum(sims) / len(sims))
    return sum(layers) / len(layers)


def _sharp(m: ViT) -> ViT:
    """Larger q/k weights than the 0.02 init, so that attention rows are peaked (a near-uniform row has no entry
    above 2/N and ADL would be 0 with no gradient)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in m.stack.blocks:
            for lin in (block.attn.fn.q, block.attn.fn.kv):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=lin.weight.dtype) * 0.6)
    return m


def test_adl_on_a_forward_equals_naive_reference():
    torch.manual_seed(0)
    m = _sharp(ViT(**SMALL, adl_weight=0.5, adl_threshold=2.0).double()).train()
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for b in m.stack.blocks]
    m(_images())
    for h in hooks:
        h.remove()
    with torch.no_grad():
        attns = [torch.stack([_naive_attention(b.attn.fn, b.attn.norm(t[i])) for i in range(t.shape[0])])
                 for b, t in zip(m.stack.blocks, inputs, strict=True)]
    ref = _naive_adl(attns, 2.0)
    assert 0.05 < ref < 0.99  # a non-trivial value
    aux = formers.aux_losses(m)
    assert set(aux) == {"adl"}
    torch.testing.assert_close(aux["adl"].detach(), torch.tensor(0.5 * ref, dtype=torch.float64), rtol=0, atol=1e-10)
    m.eval()
    m(_images())
    assert formers.aux_losses(m) == {}  # a training loss: not computed in eval mode


def test_adl_is_differentiable_and_a_few_steps_reduce_it():
    torch.manual_seed(0)
    m = _sharp(ViT(**SMALL, adl_weight=1.0, tap_scales=2)).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = _images().float()
    values = []
    for _ in range(8):
        m(x)
        loss = formers.aux_losses(m)["adl"]
        opt.zero_grad()
        loss.backward()
        assert m.stack.blocks[0].attn.fn.q.weight.grad.abs().sum() > 0
        opt.step()
        values.append(loss.item())
    assert values[-1] < values[0] - 0.05, values


def test_bad_options_raise():
    with pytest.raises(FormersError):
        ViT(**SMALL, tap_scales=0)
    with pytest.raises(FormersError):
        ViT(**SMALL, adl_weight=1.0, block={"mixer": {"name": "performer"}})
    with pytest.raises(FormersError):
        ViT(**SMALL, adl_weight=1.0, stack="shared")


def test_registered_tiny_variant():
    m = formers.create_model("vit_tap_tiny")
    assert (m.tap_scales, m.adl_weight, m.adl_threshold) == (4, 1.0, 2.0)  # TAPADL_RVT main.py defaults
    m.train()(torch.randn(2, 1, 28, 28))
    assert formers.aux_losses(m)["adl"].requires_grad
