"""P58 "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing": the clipped softmax
reaches exact zeros (with zero gradient) from finite scores, and a closed attention gate makes a head a no-op."""

import torch

import formers
from formers.blocks import Block


def test_clipped_softmax_exact_zeros_and_zero_gradient_below_threshold():
    gamma, zeta = -0.025, 1.0
    m = formers.build("mixer", "clipped_softmax", dim=8, heads=2, gamma=gamma, zeta=zeta).double()
    s = torch.tensor([[[[4.0, 3.0, 0.5, -1.0, -2.0, 0.0, 2.5, -0.5]]]], dtype=torch.float64, requires_grad=True)
    w = m.probs(s, None)
    p = torch.softmax(s, -1).detach()
    below = p < -gamma / (zeta - gamma)
    assert below.any() and (~below).any() and (p > 0).all()  # plain softmax is never exactly zero
    assert (w[below] == 0).all() and (w[~below] > 0).all()
    torch.testing.assert_close(w[~below], (zeta - gamma) * p[~below] + gamma, atol=1e-15, rtol=0)
    assert w.sum() <= 1
    for j in range(s.shape[-1]):  # the Jacobian row of every clipped weight is exactly zero
        (g,) = torch.autograd.grad(w[..., j].sum(), s, retain_graph=True)
        assert (g == 0).all() if below[..., j] else g.abs().max() > 0


def test_clipped_softmax_gamma_scales_with_visible_length():
    """gamma = -alpha / T with T the number of keys a query sees: a uniform causal row i has T = i + 1."""
    alpha = 0.5
    m = formers.build("mixer", "clipped_softmax", dim=8, heads=2, alpha=alpha, causal=True).double()
    n = 5
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    w = m.probs(torch.zeros(1, 1, n, n, dtype=torch.float64), allowed)
    for i in range(n):
        t = i + 1
        expected = (1 + alpha / t) / t - alpha / t
        torch.testing.assert_close(w[0, 0, i, :t], torch.full((t,), expected, dtype=torch.float64))
        assert (w[0, 0, i, t:] == 0).all()


def test_clipped_softmax_with_gamma_0_zeta_1_is_softmax_attention():
    clipped = formers.build("mixer", "clipped_softmax", dim=8, heads=2, gamma=0.0, zeta=1.0, causal=True).double()
    plain = formers.build("mixer", "softmax", dim=8, heads=2, causal=True).double()
    plain.load_state_dict(clipped.state_dict())
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(clipped(x), plain(x), atol=1e-12, rtol=1e-12)


def test_closed_gate_makes_attention_an_exact_no_op_in_fp32():
    torch.manual_seed(0)
    block = Block(16, causal=True, spec={"mixer": {"name": "gated", "heads": 4}, "ffn": None})
    gated = block.attn.fn
    x = torch.randn(2, 9, 16) * 30  # large activations: the gate alone must silence the head
    with torch.no_grad():
        gated.gate_bias.fill_(-1e4)
    assert (gated(x) == 0).all()
    assert torch.equal(block(x), x)  # the residual passes through untouched


def test_open_gate_is_plain_attention_and_default_gate_is_a_quarter():
    gated = formers.build("mixer", "gated", dim=16, heads=4, causal=True)
    assert torch.allclose(torch.sigmoid(gated.gate_bias), torch.tensor(0.25))
    plain = formers.build("mixer", "softmax", dim=16, heads=4, causal=True)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate")})
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        gated.gate_bias.fill_(1e4)
    assert torch.equal(gated(x), plain(x))
