"""Performer (FAVOR+), an LRA baseline (P29 "Long Range Arena") and T2T-ViT's token layer (P59).

Claims checked: positive orthogonal random features estimate softmax attention, with an error that falls as the
number of features m grows (16, 64, 256, 1024; mean over seeds); the blocks are orthogonal; the stabilisation
keeps float32 finite where the plain formula overflows; redraws are deterministic in (seed, step), so a resumed
run draws exactly what an uninterrupted one does.
"""

import math

import pytest
import torch

import formers
from formers.nn import set_step


def build(features=256, causal=False, dim=16, heads=1, **kw):
    return formers.build("mixer", {"name": "performer", "heads": heads, "features": features, **kw},
                         dim=dim, causal=causal)


def exact_softmax(m, x, causal):
    """softmax(q k^T / sqrt(d)) v through the same projections, one head; also the projected values."""
    d = m.head_dim
    q = x @ m.q.weight.T
    k, v = (x @ m.kv.weight.T).split(d, -1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v @ m.out.weight.T, v @ m.out.weight.T


@pytest.mark.parametrize("causal", [False, True])
def test_error_against_softmax_falls_with_more_features(causal):
    x = torch.randn(1, 64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for m in (16, 64, 256, 1024):
        errs = []
        for seed in range(16):
            torch.manual_seed(0)  # the same projections for every m and seed; `seed` picks the features
            mix = build(m, causal, seed=seed).double()
            exact, values = exact_softmax(mix, x, causal)
            # relative to the values: the exact output (a weighted mean of values) can be small
            errs.append(((mix(x) - exact).norm() / values.norm()).item())
        errors.append(sum(errs) / len(errs))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.4 * errors[0], errors


def test_features_are_orthogonal_blocks_with_gaussian_norms():
    prf = build(40, dim=16).prf  # head dim 16: blocks of 16, 16 and 8 rows
    w = prf.proj.double()
    for a in range(0, 40, 16):
        blk = w[a:a + 16]
        gram = blk @ blk.T
        torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-5,
                                   rtol=0)
    assert w.norm(dim=1).std() > 0  # lengths are drawn (chi-distributed), not all equal


def test_stable_in_float32_where_the_plain_formula_underflows():
    """Huge queries: exp(w.q - |q|^2/2) is 0 for every feature in float32 (0/0 attention); the row-max shift
    keeps the mixer finite and equal to the plain formula evaluated in float64."""
    torch.manual_seed(0)
    m = build(64, causal=True, dim=32, heads=2)
    with torch.no_grad():
        m.q.weight.mul_(20)
    x = torch.randn(1, 20, 32)
    q = (x @ m.q.weight.T).view(1, 20, 2, 16).transpose(1, 2) * 16 ** -0.25  # (1, 2, 20, 16)
    assert ((q @ m.prf.proj.T - (q ** 2).sum(-1, keepdim=True) / 2).exp().sum(-1) == 0).any()
    y = m(x)
    assert torch.isfinite(y).all()
    m = m.double()
    x = x.double()
    q = (x @ m.q.weight.T).view(1, 20, 2, 16).transpose(1, 2)
    k, v = ((x @ m.kv.weight.T).view(1, 20, 2, 2, 16).permute(2, 0, 3, 1, 4))
    phi = lambda t: torch.exp(t * 0.5 @ m.prf.proj.T - ((t * 0.5) ** 2).sum(-1, keepdim=True) / 2)  # noqa: E731
    a = (phi(q) @ phi(k).transpose(-1, -2)).tril()  # (1, 2, 20, 20), plain float64 formula
    ref = ((a @ v) / a.sum(-1, keepdim=True)).transpose(1, 2).reshape(1, 20, 32) @ m.out.weight.T
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_redraw_is_deterministic_and_resumable():
    torch.manual_seed(0)
    a = build(32, redraw_every=10)
    torch.manual_seed(0)
    b = build(32, redraw_every=10)
    start = a.prf.proj.clone()
    snapshot = None
    for step in range(26):
        set_step(a, step)
        if step == 9:
            assert torch.equal(a.prf.proj, start)  # no redraw before step 10
        if step == 13:
            snapshot = {k: t.clone() for k, t in a.state_dict().items()}
    assert not torch.equal(a.prf.proj, start) and int(a.prf.drawn_at) == 20
    b.load_state_dict(snapshot)  # a run resumed from the step-13 checkpoint
    for step in range(14, 26):
        set_step(b, step)
    assert torch.equal(a.prf.proj, b.prf.proj)
    torch.manual_seed(0)
    c = build(32, redraw_every=10)
    set_step(c, 25)  # straight to step 25: the draw depends only on (seed, salt, 20)
    assert torch.equal(c.prf.proj, a.prf.proj)
    torch.manual_seed(0)
    d = build(32, redraw_every=10, seed=1)
    set_step(d, 25)
    assert not torch.equal(d.prf.proj, a.prf.proj)
    frozen = build(32, redraw_every=0)
    before = frozen.prf.proj.clone()
    set_step(frozen, 1000)
    assert torch.equal(frozen.prf.proj, before)


def test_layers_get_different_features_and_the_trainer_hook_reaches_them():
    model = formers.create_model("lm", vocab=20, dim=32, depth=2, max_len=32,
                                 block={"mixer": {"name": "performer", "heads": 4, "redraw_every": 5}})
    prfs = [m for m in model.modules() if type(m).__name__ == "PositiveRandomFeatures"]
    assert len(prfs) == 2 and not torch.equal(prfs[0].proj, prfs[1].proj)
    before = [p.proj.clone() for p in prfs]
    set_step(model, 5)
    assert all(not torch.equal(p.proj, b) for p, b in zip(prfs, before))
