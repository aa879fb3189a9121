"""P24 ModuleFormer: the mixture of stick-breaking attention experts equals a naive per-token loop and, with one
expert, the `stickbreaking` mixer; the MI loss equals -H(p_bar) + mean H(p) and favours balanced, confident routing;
the mixer is causal and caches; pruning unused experts and adding dormant experts leave outputs unchanged; new
experts can be trained alone; a tiny lm of ModuleFormer blocks trains with both auxiliary losses reported."""

import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.nn.attention import KVCache
from formers.nn.moduleformer import add_experts, expert_usage, freeze_except_experts, prune_experts

D, H, DH = 12, 2, 3


def mixer(**kw):
    opts = {"dim": D, "heads": H, "head_dim": DH, "causal": True, "experts": 4, "k": 2, "router_hidden": 16, **kw}
    m = formers.build("mixer", "moduleformer", **opts).double()
    with torch.no_grad():  # larger than the default init so that routing and attention are far from uniform
        for p in m.parameters():
            p.normal_(0.0, 0.6)
    return m


def naive(m, x, mask=None, combine="softmax_raw"):
    """Loop over tokens, chosen experts and heads; stick-breaking products written out term by term."""
    B, N, _ = x.shape
    wk, wv = m.kv.weight[: H * DH], m.kv.weight[H * DH:]
    bk, bv = m.kv.bias[: H * DH], m.kv.bias[H * DH:]
    out = torch.zeros_like(x)
    for b in range(B):
        keys = [x[b, j] @ wk.T + bk for j in range(N)]
        vals = [x[b, j] @ wv.T + bv for j in range(N)]
        for t in range(N):
            p = torch.softmax(m.router(x[b, t]), -1)
            top = torch.topk(p, m.k).indices
            gates = p[top] if combine == "softmax_raw" else p[top] / p[top].sum()
            seen = [j for j in range(t + 1) if mask is None or bool(mask[b, j])]
            for e, g in zip(top.tolist(), gates):
                q = x[b, t] @ m.wq[e]
                heads = []
                for h in range(H):
                    sl = slice(h * DH, (h + 1) * DH)
                    beta = {j: torch.sigmoid(q[sl] @ keys[j][sl] / math.sqrt(DH)) for j in seen}
                    acc = torch.zeros(DH, dtype=x.dtype)
                    for j in seen:
                        a = beta[j]
                        for m_ in seen:
                            if m_ > j:
                                a = a * (1 - beta[m_])
                        acc = acc + a * vals[j][sl]
                    heads.append(acc)
                out[b, t] += g * (torch.cat(heads) @ m.wo[e])
    return out


@pytest.mark.parametrize("combine", ["softmax_raw", "softmax"])
def test_attention_experts_equal_naive_per_token_loop(combine):
    m = mixer(combine=combine)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    torch.testing.assert_close(m(x), naive(m, x, combine=combine), atol=1e-10, rtol=1e-10)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False  # right padding
    mask[1, :2] = False  # left padding: query 0 of row 1 sees no key at all and outputs 0
    y = m(x, mask=mask)
    torch.testing.assert_close(y, naive(m, x, mask, combine), atol=1e-10, rtol=1e-10)
    assert y[1, 0].abs().max() == 0


def test_one_expert_equals_stickbreaking_mixer():
    m = mixer(experts=1, k=1, kv_bias=False)
    sb = formers.build("mixer", "stickbreaking", dim=D, heads=H, head_dim=DH, causal=True).double()
    with torch.no_grad():
        sb.q.weight.copy_(m.wq[0].T)
        sb.kv.weight.copy_(m.kv.weight)
        sb.out.weight.copy_(m.wo[0].T)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    torch.testing.assert_close(m(x), sb(x), atol=1e-12, rtol=0)
    rope = formers.build("position", "rope", dim=D)
    torch.testing.assert_close(m(x, mask=mask, positions=rope), sb(x, mask=mask, positions=rope), atol=1e-12, rtol=0)


def entropy(p):
    return -(p * p.log()).sum(-1)


def test_mi_loss_is_minus_marginal_entropy_plus_mean_entropy_and_prefers_balanced_confident_routing():
    E = 4
    m = formers.build("mixer", "moduleformer", dim=E, heads=1, causal=True, experts=E, k=1, router="linear",
                      aux_weight=0.5).double()
    x = 6.0 * torch.eye(E, dtype=torch.float64).repeat(2, 1)[None]  # (1, 8, 4): token t is one-hot on t mod 4
    cases = {"balanced": torch.eye(E), "collapsed": torch.zeros(E, E).index_fill_(0, torch.tensor([0]), 1.0),
             "uniform": torch.zeros(E, E)}
    mi = {}
    for name, w in cases.items():
        with torch.no_grad():
            m.router.net.weight.copy_(w)
        m(x)
        got = formers.aux_losses(m)["att_mi"] / 0.5
        p = torch.softmax(x[0] @ w.double().T, -1)  # (8, 4)
        want = -entropy(p.mean(0)) + entropy(p).mean()
        torch.testing.assert_close(got, want, atol=1e-8, rtol=0)
        mi[name] = want.item()
    assert mi["balanced"] < -1.2 and abs(mi["uniform"]) < 1e-12 and mi["collapsed"] > -0.1


def test_ffn_experts_use_official_defaults_and_report_mi():
    f = formers.build("ffn", "moduleformer_ffn", dim=8).double()
    assert (f.num_experts, f.k, f.combine, f.aux, f.capacity_factor, f.eval_capacity_factor) == \
        (32, 2, "softmax_raw", "mi", None, None)
    assert f.experts.b1 is None and isinstance(f.router.net, torch.nn.Sequential)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    f(x)
    p = torch.softmax(f.router(x.reshape(-1, 8)), -1)
    want = 0.01 * (-entropy(p.mean(0)) + entropy(p).mean())
    # formers.nn.moe computes the routing probabilities in float32 even for float64 inputs
    torch.testing.assert_close(formers.aux_losses(f)["moe_mi"].double(), want, atol=1e-8, rtol=0)


def test_causal_and_cached_decoding_equals_full_forward():
    m = mixer().eval()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 3, D, dtype=torch.float64)
    torch.testing.assert_close(m(x)[:, :6], m(x2)[:, :6], atol=1e-12, rtol=0)
    for positions in (None, formers.build("position", "rope", dim=D)):
        cache = KVCache()
        parts = [m(x[:, a:b], cache=cache, positions=positions) for a, b in ((0, 4), (4, 5), (5, 8), (8, 9))]
        torch.testing.assert_close(torch.cat(parts, 1), m(x, positions=positions), atol=1e-12, rtol=0)


def _unused_then_prune(module, x, combine, tol):
    y = module(x)
    used = [e for e, c in enumerate(module.last_load) if c > 0]
    assert len(used) < module.num_experts - 1
    logits = module.router(x.reshape(-1, x.shape[-1]))
    keep = list(reversed(used))  # a new order, to check that ids are remapped consistently
    mass = (logits.logsumexp(-1) - logits[:, keep].logsumexp(-1)).exp().view(*x.shape[:-1], 1)
    prune_experts(module, keep)
    assert module.num_experts == len(keep)
    if combine == "softmax":
        torch.testing.assert_close(module(x), y, atol=tol, rtol=0)
    else:  # raw gates: every gate of a token grows by the mass the pruned experts held
        torch.testing.assert_close(module(x), y * mass, atol=tol, rtol=0)
        assert (mass > 1 + 1e-6).all()


@pytest.mark.parametrize("combine", ["softmax", "softmax_raw"])
def test_pruning_experts_unused_on_a_batch_keeps_its_outputs(combine):
    x = torch.randn(1, 3, D, dtype=torch.float64)
    _unused_then_prune(mixer(experts=16, k=2, combine=combine).eval(), x, combine, 1e-12)
    f = formers.build("ffn", "moduleformer_ffn", dim=D, experts=16, combine=combine).double().eval()
    _unused_then_prune(f, x, combine, 1e-6)  # formers.nn.moe.route computes the gates in float32
    prune_experts(f, [0])  # fewer experts than k: k is clipped
    assert f.k == 1 and f(x).shape == x.shape
    with pytest.raises(formers.FormersError, match="distinct"):
        prune_experts(f, [0, 0])


@pytest.mark.parametrize("init", ["copy", "random"])
def test_added_experts_leave_outputs_and_mi_loss_unchanged(init):
    x = torch.randn(2, 6, D, dtype=torch.float64)
    for module, aux in ((mixer(), "att_mi"), (formers.build("ffn", "moduleformer_ffn", dim=D, experts=4).double(),
                                              "moe_mi")):
        y, loss = module(x), formers.aux_losses(module)[aux]
        add_experts(module, 3, init=init)
        assert module.num_experts == 7 and module.router(x[0]).shape == (6, 7)
        torch.testing.assert_close(module(x), y, atol=1e-12, rtol=0)
        torch.testing.assert_close(formers.aux_losses(module)[aux], loss, atol=1e-12, rtol=0)
        assert module.last_load[4:] == [0, 0, 0]


TEXT_A = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 30))
TEXT_B = torch.tensor(list(b"0123456789+-*/=0123456789 9876543210 " * 30))


def _lm(experts=4):
    return formers.create_model("lm", vocab=256, dim=32, depth=2, max_len=64, block={
        "mixer": {"name": "moduleformer", "heads": 4, "experts": experts},
        "ffn": {"name": "moduleformer_ffn", "experts": experts}})


def _batch(text, n, g):
    starts = torch.randint(0, len(text) - 33, (n,), generator=g)
    return text[starts[:, None] + torch.arange(33)]


def _lm_loss(model, w):
    return F.cross_entropy(model(w[:, :-1]).reshape(-1, 256), w[:, 1:].reshape(-1))


def test_tiny_lm_trains_with_both_aux_losses():
    model = _lm()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    held = _batch(TEXT_A, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = _lm_loss(model, held).item()
    for _ in range(15):
        loss = _lm_loss(model, _batch(TEXT_A, 8, g))
        aux = formers.aux_losses(model)
        assert set(aux) == {"att_mi", "moe_mi"}
        (loss + sum(aux.values())).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = _lm_loss(model, held).item()
    assert after < before - 0.3, (before, after)
    usage = expert_usage(model, held[:, :-1])
    assert len(usage) == 4 and all(sum(c) == 16 * 32 * 2 for c in usage.values())


def test_training_only_added_experts_learns_new_text_and_keeps_the_rest():
    model = _lm()
    modules = [m for m in model.modules() if hasattr(m, "num_experts") and hasattr(m, "router")]
    assert len(modules) == 4
    model.requires_grad_(False)
    for m in modules:
        add_experts(m, 2, init="random", router_bias=0.0)  # finite bias: the router can send tokens to them
        freeze_except_experts(m, [4, 5])
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    held = _batch(TEXT_B, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = _lm_loss(model, held).item()
    for _ in range(15):
        _lm_loss(model, _batch(TEXT_B, 8, g)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = _lm_loss(model, held).item()
    assert after < before - 0.3, (before, after)
    for n, p in model.named_parameters():
        stacked = p.dim() >= 1 and p.shape[0] == 6 and (n.endswith(("wq", "wo", "w1", "w2")) or "router" in n)
        if stacked:
            assert torch.equal(p[:4], old[n][:4]), n
            assert not torch.equal(p[4:], old[n][4:]), n
        else:
            assert torch.equal(p, old[n]), n


def test_refusals():
    with pytest.raises(formers.FormersError, match="causal"):
        formers.create_model("encoder", vocab=30, dim=32, depth=1, max_len=64,
                             block={"mixer": {"name": "moduleformer", "heads": 4}})
    m = mixer()
    x = torch.randn(1, 4, D, dtype=torch.float64)
    with pytest.raises(formers.FormersError, match="cross-attention"):
        m(x, context=x)
    with pytest.raises(formers.FormersError, match="shape"):
        m(x, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(formers.FormersError, match="moe"):
        add_experts(formers.build("mixer", "softmax", dim=D, heads=H), 1)
