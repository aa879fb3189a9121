"""P22 PolyCom: PolyNorm is invariant to positive rescaling of its input, PolyReLU contains ReLU and ReLU^2, both
match the official formulas (README `PolyNorm`, `dense_model/.../transformer.py` `poly`) and train inside an lm."""

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.registry import FormersError


def naive_norm(z, eps):
    return z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps)


def set_coefficients(act, a):
    """a = (a_0, a_1, ..., a_r) into the official layout: weight = (a_r, ..., a_1), bias = (a_0,)."""
    with torch.no_grad():
        act.weight.copy_(torch.as_tensor(a[1:]).flip(0))
        act.bias.fill_(float(a[0]))


def test_default_init_matches_official():
    for name in ("polyrelu", "polynorm"):
        act = formers.build("act", name)
        assert act.weight.shape == (3,) and act.bias.shape == (1,)
        torch.testing.assert_close(act.weight.detach(), torch.ones(3) / 3)
        assert act.bias.item() == 0.0
    assert formers.build("act", {"name": "polyrelu", "order": 2}).weight.shape == (2,)
    with pytest.raises(FormersError, match="order"):
        formers.build("act", {"name": "polynorm", "order": 0})


@pytest.mark.parametrize("c", [0.5, 2.0, 10.0, 1e3])
def test_polynorm_positive_scale_invariance(c):
    x = torch.randn(4, 6, 64, dtype=torch.float64)
    # N(c^i z) = z / sqrt(ms(z) + eps / c^(2i)): with eps = 1e-12 the shift is below 1e-10 relative for these c
    act = formers.build("act", {"name": "polynorm", "eps": 1e-12}).double()
    set_coefficients(act, torch.randn(4, dtype=torch.float64))
    torch.testing.assert_close(act(c * x), act(x), atol=1e-9, rtol=1e-9)
    # the paper's eps = 1e-6 keeps it to ~1e-5 (fact sheet claim (a))
    act_default = formers.build("act", "polynorm").double()
    torch.testing.assert_close(act_default(c * x), act_default(x), atol=1e-5, rtol=1e-5)


def test_polynorm_sign_flip_identity_and_relu_not_invariant():
    x = torch.randn(3, 32, dtype=torch.float64)
    act = formers.build("act", "polynorm").double()
    a = torch.randn(4, dtype=torch.float64)
    set_coefficients(act, a)
    # odd powers flip sign, even ones do not: PolyNorm(-x) = a_0 - a_1 N(x) + a_2 N(x^2) - a_3 N(x^3)
    n = [naive_norm(x**i, 1e-6) for i in (1, 2, 3)]
    torch.testing.assert_close(act(-x), a[0] - a[1] * n[0] + a[2] * n[1] - a[3] * n[2], atol=1e-12, rtol=1e-12)
    relu_poly = formers.build("act", "polyrelu").double()  # no normalisation: scale does change PolyReLU
    assert not torch.allclose(relu_poly(2 * x), relu_poly(x))


def test_polyrelu_reduces_to_relu_and_squared_relu_exactly():
    x = torch.randn(5, 40) * 3
    act = formers.build("act", "polyrelu")
    set_coefficients(act, (0.0, 1.0, 0.0, 0.0))
    assert torch.equal(act(x), F.relu(x))
    set_coefficients(act, (0.0, 0.0, 1.0, 0.0))
    assert torch.equal(act(x), F.relu(x) * F.relu(x))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_polyrelu_and_polynorm_match_naive_formula(order):
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    a = torch.randn(order + 1, dtype=torch.float64)
    relu_act = formers.build("act", {"name": "polyrelu", "order": order}).double()
    norm_act = formers.build("act", {"name": "polynorm", "order": order}).double()
    set_coefficients(relu_act, a)
    set_coefficients(norm_act, a)
    r = x.clamp(min=0)
    want_relu = a[0] + sum(a[i] * r**i for i in range(1, order + 1))
    want_norm = a[0] + sum(a[i] * naive_norm(x**i, 1e-6) for i in range(1, order + 1))
    torch.testing.assert_close(relu_act(x), want_relu, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(norm_act(x), want_norm, atol=1e-12, rtol=1e-12)


def test_official_order3_layout():
    """The README / dense_model form: weight[0] * f(x^3) + weight[1] * f(x^2) + weight[2] * f(x) + bias."""
    x = torch.randn(3, 16, dtype=torch.float64)
    for name, f in (("polynorm", lambda z: naive_norm(z, 1e-6)), ("polyrelu", lambda z: z)):
        act = formers.build("act", name).double()
        with torch.no_grad():
            act.weight.copy_(torch.randn(3, dtype=torch.float64))
            act.bias.copy_(torch.randn(1, dtype=torch.float64))
        w, b = act.weight.detach(), act.bias.detach()
        u = x.clamp(min=0) if name == "polyrelu" else x
        want = w[0] * f(u**3) + w[1] * f(u**2) + w[2] * f(u) + b
        torch.testing.assert_close(act(x), want, atol=1e-12, rtol=1e-12)


def test_coefficient_gradients_are_the_basis_sums():
    x = torch.randn(4, 20, dtype=torch.float64)
    g = torch.randn(4, 20, dtype=torch.float64)
    for name, basis in (("polyrelu", lambda i: x.clamp(min=0) ** i), ("polynorm", lambda i: naive_norm(x**i, 1e-6))):
        act = formers.build("act", name).double()
        (act(x) * g).sum().backward()
        # d/d a_i = sum(g * basis_i); weight holds (a_3, a_2, a_1), bias a_0
        want = torch.stack([(g * basis(i)).sum() for i in (3, 2, 1)])
        torch.testing.assert_close(act.weight.grad, want, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(act.bias.grad, g.sum().reshape(1), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("ffn", [{"name": "mlp", "act": "polynorm"},
                                 {"name": "glu", "act": {"name": "polyrelu", "order": 2}}])
def test_lm_with_polycom_trains(ffn):
    model = formers.create_model("lm", vocab=32, dim=32, depth=1, max_len=16,
                                 block={"mixer": {"name": "softmax", "heads": 4}, "ffn": ffn})
    act = model.stack.blocks[0].ffn.fn.act
    assert type(act).__name__ == ("PolyNorm" if ffn["name"] == "mlp" else "PolyReLU")
    assert act.order == (3 if ffn["name"] == "mlp" else 2)
    start = act.weight.detach().clone()
    tokens = torch.randint(0, 32, (4, 17))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))

    first = loss_fn().item()
    for _ in range(15):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.8 * first
    assert not torch.equal(act.weight.detach(), start)  # the coefficients are trained too
