"""P70 MoHD (Mixture of Hidden Dimensions) FFN: the grouped sparse forward against a naive per-token reference,
exactness against the dense `mlp` when every group is active, activated-parameter and router-load counts by hand,
the balance loss, and an `lm` that trains with it.

Only the abstract-level mechanism of P70 is known (see formers/nn/mohd.py): shared sub-dimension groups always on,
top-k routed specialised groups, activation scaling, group fusion. The reference below is written from the
docstring's equations, token by token, independently of the module's grouped dispatch.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.nn.ffn import MLP
from formers.nn.mohd import MixtureOfHiddenDimensions
from formers.registry import FormersError


def _naive(m: MixtureOfHiddenDimensions, x: torch.Tensor) -> torch.Tensor:
    """Per token: router scores, top-k groups, masked and scaled inputs, fusion, FFN, masked outputs."""
    G, s, S = m.groups, m.group_dim, m.shared
    W1, b1, W2, b2 = m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias
    fusion = m.fusion if m.fusion is not None else torch.eye(G, dtype=x.dtype)
    out = []
    for xt in x.reshape(-1, x.shape[-1]):
        active = list(range(G)) if m.force_all else list(range(S))
        gate = {g: 1.0 for g in active}
        if m.router is not None:
            p = torch.softmax(m.router.net.weight @ xt, dim=-1)  # (E,)
            for e in torch.argsort(p, descending=True)[: m.k].tolist():
                active.append(S + e)
                gate[S + e] = 1.0 + (p[e] - p[e].detach())
        xg = xt.view(G, s)
        fused = torch.stack([sum(fusion[g, j] * xg[j] for j in range(G)) for g in range(G)])  # (G, s)
        masked = torch.zeros_like(fused)
        for g in active:
            masked[g] = m.scale * gate[g] * fused[g]
        h = m.act(W1 @ masked.reshape(-1) + b1)
        y = W2 @ h + b2
        if m.sparse_out:
            keep = torch.zeros(G, dtype=torch.bool)
            keep[active] = True
            y = y * keep.repeat_interleave(s).to(y.dtype)
        out.append(y)
    return torch.stack(out).view_as(x)


def _perturb_fusion(m, std=0.3):
    with torch.no_grad():
        m.fusion.add_(torch.randn_like(m.fusion) * std)


@pytest.mark.parametrize("opts", [
    dict(force_all=True),
    dict(shared=1, k=3),  # k = groups - shared: the router picks every group
    dict(shared=1, k=3, fusion="none", scale="sqrt"),  # sqrt(G / G) = 1
    dict(shared=0, k=4),
])
def test_all_groups_active_equals_dense_mlp(opts):
    torch.manual_seed(0)
    m = MixtureOfHiddenDimensions(16, hidden=24, groups=4, **opts).double()
    mlp = MLP(16, hidden=24).double()
    mlp.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith(("fc1", "fc2"))})
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), mlp(x), atol=1e-10, rtol=0)
    assert m.last_load == [14] * 4


@pytest.mark.parametrize("opts", [
    dict(),  # defaults: G=8, S=3, k=1, scale G/a, fusion, sparse output
    dict(shared=2, k=3, scale="sqrt"),
    dict(shared=0, k=2, scale=1.7, sparse_out=False),
    dict(shared=2, k=2, fusion="none", scale=False),
])
def test_forward_and_gradients_match_naive_per_token(opts):
    torch.manual_seed(1)
    m = MixtureOfHiddenDimensions(16, hidden=20, groups=8, **opts).double()
    if m.fusion is not None:
        _perturb_fusion(m)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    got = m(x)
    want = _naive(m, x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # backward through the grouped dispatch equals backward through the per-token loops (router included)
    w = torch.randn_like(got)
    names, params = zip(*m.named_parameters())
    g_got = dict(zip(names, torch.autograd.grad((got * w).sum(), params)))
    g_want = dict(zip(names, torch.autograd.grad((_naive(m, x) * w).sum(), params)))
    for name in names:
        torch.testing.assert_close(g_got[name], g_want[name], atol=1e-12, rtol=0, msg=name)
    assert g_got["router.net.weight"].abs().sum() > 0  # the straight-through gate trains the router


def test_sparse_output_leaves_inactive_groups_zero_and_scale_values():
    torch.manual_seed(2)
    m = MixtureOfHiddenDimensions(24, groups=6, shared=2, k=1)
    assert m.scale == pytest.approx(6 / 3)
    assert MixtureOfHiddenDimensions(24, groups=6, shared=2, k=1, scale="sqrt").scale == pytest.approx(math.sqrt(2))
    y = m(torch.randn(4, 24)).view(4, 6, 4)
    nonzero_groups = (y.abs().sum(-1) > 0).sum(-1)
    assert nonzero_groups.tolist() == [3, 3, 3, 3]  # shared 2 + routed 1
    assert (y[:, :2].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("bias,fusion,sparse_out", [(False, "none", True), (True, "group", True),
                                                    (True, "group", False)])
def test_active_parameters_by_hand(bias, fusion, sparse_out):
    D, H, G, S, k = 32, 48, 8, 2, 3
    s, E, a = D // G, G - S, S + k
    m = MixtureOfHiddenDimensions(D, hidden=H, groups=G, shared=S, k=k, bias=bias, fusion=fusion,
                                  sparse_out=sparse_out)
    router = D * E
    total = D * H + H * D + router + (H + D if bias else 0) + (G * G if fusion == "group" else 0)
    assert m.total_parameters() == total == sum(p.numel() for p in m.parameters())
    fc1 = a * s * H + (H if bias else 0)
    fc2 = a * s * H + (a * s if bias else 0) if sparse_out else H * D + (D if bias else 0)
    assert m.active_parameters() == fc1 + fc2 + router + (a * G if fusion == "group" else 0)
    if not bias and fusion == "none":
        # the FFN matrices are active in exactly the (shared + k) / groups share
        assert (m.active_parameters() - router) * G == (m.total_parameters() - router) * a
    dense = MixtureOfHiddenDimensions(D, hidden=H, groups=G, force_all=True, bias=bias, fusion="none")
    assert dense.active_parameters() == dense.total_parameters() == sum(p.numel() for p in MLP(D, hidden=H,
                                                                                                bias=bias).parameters())


def test_router_load_and_balance_loss_by_hand():
    torch.manual_seed(3)
    G, S, k = 8, 3, 2
    m = MixtureOfHiddenDimensions(16, groups=G, shared=S, k=k, balance_weight=0.5)
    x = torch.randn(4, 9, 16)
    m(x)
    xt = x.reshape(-1, 16)
    logits = xt @ m.router.net.weight.t()  # (T, E)
    top = logits.topk(k, dim=-1).indices
    counts = [0] * G
    for row in top.tolist():
        for e in row:
            counts[S + e] += 1
    counts[:S] = [xt.shape[0]] * S
    assert m.last_load == counts
    assert sum(m.last_load[S:]) == k * xt.shape[0]
    # Switch balance loss over the specialised groups: E * sum_e f_e * P_e
    E, T = G - S, xt.shape[0]
    f = torch.tensor([counts[S + e] / (k * T) for e in range(E)])
    P = torch.softmax(logits, -1).mean(0)
    aux = formers.aux_losses(m)
    torch.testing.assert_close(aux["mohd_balance"], 0.5 * E * (f * P).sum())


def test_bad_options_raise():
    with pytest.raises(FormersError, match="divid"):
        MixtureOfHiddenDimensions(30, groups=8)
    with pytest.raises(FormersError, match="k <="):
        MixtureOfHiddenDimensions(32, groups=8, shared=6, k=3)
    with pytest.raises(FormersError, match="k=0"):
        MixtureOfHiddenDimensions(32, groups=8, shared=8, k=1)
    with pytest.raises(FormersError, match="scale"):
        MixtureOfHiddenDimensions(32, scale="half")
    with pytest.raises(FormersError, match="fusion"):
        MixtureOfHiddenDimensions(32, fusion="monarch")
    assert MixtureOfHiddenDimensions(32, groups=8, shared=8, k=0).router is None  # all shared: dense


def test_lm_with_mohd_trains():
    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=256, dim=32, depth=2, max_len=64, block={
        "mixer": {"name": "softmax", "heads": 4}, "ffn": {"name": "mohd", "groups": 8, "shared": 2, "k": 2}})
    text = torch.tensor(list(b"to be, or not to be, that is the question: " * 20))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.stack([text[i:i + 33] for i in range(0, 320, 20)])

    def loss_fn():
        return F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))

    with torch.no_grad():
        before = loss_fn().item()
    for _ in range(12):
        loss = loss_fn()
        aux = formers.aux_losses(model)
        assert set(aux) == {"mohd_balance"}
        (loss + sum(aux.values())).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = loss_fn().item()
    assert after < before - 0.5, (before, after)
    ffn = model.stack.blocks[0].ffn.fn
    assert isinstance(ffn, MixtureOfHiddenDimensions)
    assert sum(ffn.last_load) == (2 + 2) * 16 * 32
