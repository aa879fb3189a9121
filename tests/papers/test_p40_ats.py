"""P40 ATS (Adaptive Token Sampling) as a ViT option, against a brute-force quantile rule and a per-image reference.

Sources: official adaptivetokensampling/ATS, `libs/models/transformers/ats_block.py` (score_assignment_step,
inverse_transform_sampling, create_ys, get_unique_indices; ATSBlock), `vit.py` (n_ref_tokens = the input token
count) and `configs/ImageNet/DeiT_S.yaml` (ATS_BLOCKS 3..11, NUM_TOKENS 197, DROP_TOKENS True).

Note on the facts sheet's claim "K >= N keeps every token, so the output equals the base ViT": under the official
rule the least significant token always has normalised CDF 0 while the quantiles start at the first positive CDF
value, so it is never picked (test below); the plug-in claim is checked instead where it holds exactly (ATS in the
last block leaves the logits unchanged) and by the per-image reference (the base blocks run on the kept tokens).
"""

import pytest
import torch

import formers
from formers.models.vision.vit import ViT
from formers.models.vision.vit_options import ats_sample
from formers.registry import FormersError

SMALL = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, dim=16, heads=2)
GRID, N = (4, 4), 17  # 16 patches + the class token


def brute_force_select(scores: list[float], K: int) -> list[int]:
    """The quantile rule written out: sort ascending, CDF, min-max normalise, K-1 evenly spaced points from the
    smallest non-zero normalised CDF value to 1, the nearest CDF point for each (first on ties), unique. Returns the
    picked token indices in ascending significance."""
    K = max(K, 8)
    T = len(scores)
    order = sorted(range(T), key=lambda j: scores[j])
    cdf, acc = [], 0.0
    for j in order:
        acc += scores[j]
        cdf.append(acc)
    lo, hi = min(cdf), max(cdf)
    ncdf = [(c - lo) / (hi - lo) for c in cdf]
    start = min(c for c in ncdf if c != 0)
    q = K - 1
    chosen = set()
    for t in range(q):
        y = start + t * (1 - start) / (q - 1)
        chosen.add(min(range(T), key=lambda p: (abs(ncdf[p] - y), p)))
    return [order[p] for p in sorted(chosen)]


def _scores(B: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, T, generator=g, dtype=torch.float64) ** 3  # skewed, as attention-based significance
    s[1, :5] = 0.0  # tokens dropped by an earlier block score exactly 0
    s[2, 3::4] = 0.0
    return s / s.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("K", [3, 12, 40])
def test_selection_equals_brute_force_quantile_rule(K):
    s = _scores(5, 24, seed=K)
    index, keep = ats_sample(s, K)
    assert torch.all(index[:, 0] == 0) and torch.all(keep[:, 0])  # the class token always first and kept
    for b in range(5):
        ref = brute_force_select(s[b].tolist(), K)
        n = int(keep[b].sum())
        assert (index[b, 1:n] - 1).tolist() == ref
        assert n - 1 <= max(K, 8) - 1 and not keep[b, n:].any()


def test_filler_tokens_take_no_part_in_the_selection():
    """Each image gets the selection of its real tokens alone (the official code at batch size 1)."""
    s = _scores(5, 24, seed=9)
    valid = torch.rand(5, 24, generator=torch.Generator().manual_seed(4)) < 0.6
    valid[0] = True
    valid[4] = False
    valid[4, 7] = True  # a single real token is kept
    s = torch.where(valid, s, 0.0)
    index, keep = ats_sample(s / s.sum(dim=1, keepdim=True), 12, valid)
    for b in range(5):
        real = valid[b].nonzero()[:, 0].tolist()
        sub = s[b, real] / s[b, real].sum()
        ref = [real[j] for j in brute_force_select(sub.tolist(), 12)] if len(real) > 1 else real
        assert (index[b, 1:int(keep[b].sum())] - 1).tolist() == ref


def test_the_least_significant_token_is_never_kept():
    """Official quirk: even with a dense grid of quantiles (K >> N) every token but the least significant is kept."""
    s = torch.rand(3, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    s = s / s.sum(dim=1, keepdim=True)  # every CDF step far wider than the quantile spacing
    index, keep = ats_sample(s, 10**5)
    for b in range(3):
        kept = set((index[b, 1:int(keep[b].sum())] - 1).tolist())
        assert kept == set(range(16)) - {int(s[b].argmin())}


def _naive_attention(mixer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the mixer's weights, h (n, D) -> probs (H, n, n), values (n, H*Dh), output (n, D)."""
    n = h.shape[0]
    H, Dh = mixer.heads, mixer.head_dim
    q = mixer.q(h).view(n, H, Dh).transpose(0, 1)
    k, v = mixer.kv(h).view(n, 2, H, Dh).unbind(1)
    a = torch.softmax(q @ k.transpose(0, 1).transpose(1, 2) * mixer.scale, dim=-1)  # (H, n, n)
    out = mixer.out((a @ v.transpose(0, 1)).transpose(0, 1).reshape(n, H * Dh))
    return a, v.reshape(n, H * Dh), out


def reference(m: ViT, img: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """One image through the model's blocks on an explicit token list: at an ATS block, plain attention over the
    current tokens, significance sum_h A[cls, j] * ||v_j||, the brute-force rule, then the FFN on the kept rows."""
    x = m.pos(torch.cat([m.cls_token[0], m.patch_embed(img[None])[0]])[None], grid=GRID)[0]  # (n, D)
    n_ref, counts = x.shape[0], []
    for i, block in enumerate(m.stack.blocks):
        if i in m.ats:
            a, v, out = _naive_attention(block.attn.fn, block.attn.norm(x))
            s = (a[:, 0].sum(0) * v.norm(dim=-1))[1:]
            kept = [0] + [j + 1 for j in brute_force_select((s / s.sum()).tolist(), m.ats[i] or n_ref)]
            counts.append(len(kept))
            x = block.ffn((x + out)[kept][None])[0]
        else:
            x = block(x[None])[0]
    return m.head(m.norm(x)[0]), counts


def _model(depth: int, blocks: list[int], tokens=8, sharp: bool = False) -> ViT:
    """With `sharp`, larger q/k weights than the 0.02 init: peaked class-token attention, hence skewed
    significance (as in a trained model), where quantiles collide and the kept counts differ between images."""
    torch.manual_seed(0)
    m = ViT(**SMALL, depth=depth, ats_blocks=blocks, ats_tokens=tokens).double().eval()
    if sharp:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for block in m.stack.blocks:
                for lin in (block.attn.fn.q, block.attn.fn.kv):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=lin.weight.dtype) * 0.5)
    return m


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("tokens,sharp", [(8, False), (8, True), (None, True)])
def test_batched_model_equals_per_image_reference(tokens, sharp):
    m = _model(4, [1, 2], tokens, sharp)
    x = _images(6)
    with torch.no_grad():
        y = m(x)
        for b in range(6):
            ref, counts = reference(m, x[b])
            torch.testing.assert_close(y[b], ref, rtol=0, atol=1e-10)
            assert [int(c[b]) for c in m.last_kept] == counts


def test_kept_counts_vary_across_images():
    m = _model(3, [1], 8, sharp=True)
    with torch.no_grad():
        m(_images(8))
    counts = m.last_kept[0]
    assert counts.shape == (8,) and len(set(counts.tolist())) > 1
    assert int(counts.min()) >= 2 and int(counts.max()) <= 8 < N


def test_dropped_rows_do_not_reach_later_attention():
    m = _model(3, [1], 8, sharp=True)
    x = _images(6, seed=2)
    with torch.no_grad():
        y0 = m(x)
        counts = m.last_kept[0].tolist()
    assert min(counts) < max(counts)  # some images carry filler rows after the sampling block

    def noise_rows(rows):
        def hook(module, args):
            t = args[0].clone()
            g = torch.Generator().manual_seed(3)
            for b, r in enumerate(rows):
                t[b, r] += 100 * torch.randn(t[b, r].shape, generator=g, dtype=t.dtype)
            return (t,)
        return hook

    fillers = [slice(c, None) for c in counts]
    h = m.stack.blocks[2].register_forward_pre_hook(noise_rows(fillers))
    with torch.no_grad():
        torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-12)
    h.remove()
    h = m.stack.blocks[2].register_forward_pre_hook(noise_rows([slice(1, 2)] * 6))  # a kept token instead
    with torch.no_grad():
        assert (m(x) - y0).abs().amax(dim=1).min() > 1e-6
    h.remove()


def test_sampling_in_the_last_block_leaves_the_logits_unchanged():
    """The sampling block attends over all tokens and keeps the class token, so ATS in the last block of a
    'token'-pooled ViT changes nothing the head sees (the plug-in property, exactly)."""
    m = _model(3, [2], 8)
    torch.manual_seed(0)
    plain = ViT(**SMALL, depth=3).double().eval()
    plain.load_state_dict(m.state_dict())
    x = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=1e-10)
    assert int(m.last_kept[0].max()) < N


def test_training_backward_and_grad_checkpointing():
    m = _model(3, [1], 8).train()
    x = _images(3)
    y0 = m(x)
    y0.square().sum().backward()
    g0 = m.stack.blocks[0].attn.fn.q.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    y1 = m(x)
    y1.square().sum().backward()
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.stack.blocks[0].attn.fn.q.weight.grad, g0, rtol=0, atol=1e-12)


def test_deit_small_ats_config_adds_no_parameters():
    with torch.device("meta"):
        m = formers.create_model("vit_small_patch16_224_ats")
    assert m.num_params() == 22_050_664  # timm's exact DeiT-S / vit_small_patch16_224 count: ATS is parameter-free
    assert list(m.ats) == list(range(3, 12))  # official DeiT_S.yaml ATS_BLOCKS


def test_bad_options_raise():
    with pytest.raises(FormersError):
        ViT(**SMALL, depth=2, ats_blocks=[1], class_token=False, global_pool="avg")
    with pytest.raises(FormersError):
        ViT(**SMALL, depth=2, ats_blocks=[1], pos_embed="rope")
    with pytest.raises(FormersError):
        ViT(**SMALL, depth=2, ats_blocks=[2])
    with pytest.raises(FormersError):
        ViT(**SMALL, depth=2, ats_blocks=[0, 1], ats_tokens=[8])
    with pytest.raises(FormersError):
        ViT(**SMALL, depth=2, ats_blocks=[1], tap_scales=2)
