"""Sparse MoE core (formers/nn/moe.py) against references written here: a dense MLP for one expert, routing losses
computed with Python loops, a pure-Python capacity counter for both priorities, a naive per-token MoE loop (with and
without dropping, every combine mode), causality of token-priority dropping in an LM, gradients, aux-loss summing and
config errors."""

import math

import pytest
import torch
from torch import nn

import formers
from formers.blocks import AddResidual, PreNorm
from formers.nn.ffn import MLP
from formers.nn.moe import MoE, balance_loss, capacity, capacity_keep, mi_loss, route, z_loss
from formers.registry import FormersError


def moe(dim=6, **kw):
    """A float64 MoE whose weights are random at a scale that makes routing and experts far from trivial."""
    m = MoE(dim, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.5)
    return m


# ------------------------------------------------------------------------------------------- references (naive)


def naive_expert(m, e, x):
    """Expert e on one token x (D,), written out: act(x W1 + b1) W2 + b2."""
    ex = m.experts
    h = ex.act(x @ ex.w1[e] + ex.b1[e])
    return h @ ex.w2[e] + ex.b2[e]


def naive_topk(logits_row, k, combine):
    """One token: softmax, top-k (best first), combine weights."""
    p = torch.softmax(logits_row, dim=-1)
    idx = sorted(range(len(p)), key=lambda e: -float(p[e]))[:k]
    if combine == "softmax":
        total = sum(float(p[e]) for e in idx)
        gates = [float(p[e]) / total for e in idx]
    elif combine == "softmax_raw":
        gates = [float(p[e]) for e in idx]
    else:
        gates = [1.0] * k
    return idx, gates


def python_keep(index, experts, cap, priority, tokens=None):
    """Capacity with explicit per-expert counters: each expert keeps the first `cap` assignments that reach it,
    visiting tokens in the order `tokens` (default 0..T-1; each token's slots best first) or, for 'rank', every
    first choice before any second."""
    T, k = len(index), len(index[0])
    tokens = list(range(T)) if tokens is None else tokens
    order = [(t, s) for t in tokens for s in range(k)] if priority == "token" else \
        [(t, s) for s in range(k) for t in tokens]
    count = [0] * experts
    keep = [[False] * k for _ in range(T)]
    for t, s in order:
        e = index[t][s]
        if count[e] < cap:
            keep[t][s] = True
        count[e] += 1
    return keep


@torch.no_grad()
def naive_moe(m, x, cap=None, priority="token", mask=None):
    """y_t = sum over kept slots of gate * expert(x_t), one token at a time; also returns the keep table and the
    chosen experts. `mask` (B, N): only its True tokens visit the experts."""
    xt = x.reshape(-1, x.shape[-1])
    logits = xt @ m.router.net.weight.t()
    routed = [naive_topk(logits[t], m.k, m.combine) for t in range(xt.shape[0])]
    index = [r[0] for r in routed]
    B, N = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, xt.shape[0])
    arrival = [b * N + n for n in range(N) for b in range(B)  # position-major: every sequence's token n, then n+1
               if mask is None or bool(mask[b, n])]
    keep = python_keep(index, m.num_experts, cap if cap is not None else 10 ** 9, priority, arrival)
    out = torch.zeros_like(xt)
    for t, (idx, gates) in enumerate(routed):
        for s, (e, g) in enumerate(zip(idx, gates)):
            if keep[t][s]:
                out[t] += g * naive_expert(m, e, xt[t])
    return out.view(x.shape), keep, index


# router arithmetic runs in the model's dtype (float64 here), so every combine mode is exact to float64 rounding
GATE_TOL = {c: {"atol": 1e-12, "rtol": 1e-12} for c in ("softmax", "softmax_raw", "unit")}

# --------------------------------------------------------------------------------------------------------- tests


def test_one_expert_top1_equals_dense_mlp():
    dim, hidden = 6, 10
    mlp = MLP(dim, hidden=hidden).double()
    m = MoE(dim, experts=1, k=1, hidden=hidden, capacity_factor=None, eval_capacity_factor=None).double()
    with torch.no_grad():
        m.experts.w1.copy_(mlp.fc1.weight.t().unsqueeze(0))  # (1, D, H)
        m.experts.b1.copy_(mlp.fc1.bias.unsqueeze(0))
        m.experts.w2.copy_(mlp.fc2.weight.t().unsqueeze(0))  # (1, H, D)
        m.experts.b2.copy_(mlp.fc2.bias.unsqueeze(0))
    x = torch.randn(3, 5, dim, dtype=torch.float64)
    for mode in (m.train, m.eval):
        mode()
        torch.testing.assert_close(m(x), mlp(x), atol=1e-12, rtol=1e-12)
    assert m.last_dropped == 0


def test_routing_losses_equal_hand_computation():
    T, E, k = 7, 4, 2
    x = torch.randn(T, 5, dtype=torch.float64)
    for aux in ("switch", "mi"):
        m = moe(dim=5, experts=E, k=k, aux=aux, balance_weight=0.3, z_weight=0.07, capacity_factor=None)
        out = m(x)
        assert out.shape == x.shape
        logits = (x @ m.router.net.weight.t()).tolist()
        probs, index = [], []
        for row in logits:
            z = [math.exp(v) for v in row]
            probs.append([v / sum(z) for v in z])
            index.append(sorted(range(E), key=lambda e: -row[e])[:k])
        # Switch balance: E * sum_e f_e P_e, f_e over all T*k assignments, P_e the mean probability
        f = [sum(1 for t in range(T) for e2 in index[t] if e2 == e) / (T * k) for e in range(E)]
        P = [sum(probs[t][e] for t in range(T)) / T for e in range(E)]
        bal = E * sum(f[e] * P[e] for e in range(E))
        zl = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / T
        mean = P
        h_mean = -sum(q * math.log(q) for q in mean)
        h_tok = sum(-sum(q * math.log(q) for q in row) for row in probs) / T
        mi = -h_mean + h_tok
        probs_t, index_t = torch.tensor(probs, dtype=torch.float64), torch.tensor(index)
        assert balance_loss(probs_t, index_t).item() == pytest.approx(bal, rel=1e-12)
        # z_loss and the MoE's router probabilities are computed in float32 (logits.float()), even for float64
        assert z_loss(torch.tensor(logits, dtype=torch.float64)).item() == pytest.approx(zl, rel=1e-6)
        assert mi_loss(probs_t).item() == pytest.approx(mi, abs=1e-7)
        reported = formers.aux_losses(m)
        want = {"moe_z": 0.07 * zl, **({"moe_balance": 0.3 * bal} if aux == "switch" else {"moe_mi": 0.3 * mi})}
        assert set(reported) == set(want)
        for name, v in want.items():
            assert reported[name].item() == pytest.approx(v, abs=1e-7, rel=1e-6)


def test_balance_loss_is_one_at_perfect_balance():
    E = 4
    probs = torch.full((8, E), 1.0 / E, dtype=torch.float64)
    index = torch.arange(8).remainder(E).unsqueeze(-1)
    assert balance_loss(probs, index).item() == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("priority", ["token", "rank"])
def test_capacity_keep_matches_python_counters(priority):
    gen = torch.Generator().manual_seed(1)
    for T, E, k, cap in [(20, 4, 2, 3), (17, 5, 3, 4), (9, 3, 1, 2), (12, 6, 2, 1)]:
        index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        got = capacity_keep(index, E, cap, priority)
        want = python_keep(index.tolist(), E, cap, priority)
        assert got.tolist() == want
        assert not all(all(row) for row in want)  # capacity is tight: something is dropped
    assert capacity(10, 4, 2, 1.25) == math.ceil(1.25 * 10 * 2 / 4)
    assert capacity(10, 4, 2, None) == 20 and capacity(10, 4, 2, 0) == 20


def test_priorities_differ_where_the_paper_orders_differ():
    # token 0 picks (e0, e1), token 1 picks (e1, e0); expert capacity 1
    index = torch.tensor([[0, 1], [1, 0]])
    assert capacity_keep(index, 2, 1, "token").tolist() == [[True, True], [False, False]]
    assert capacity_keep(index, 2, 1, "rank").tolist() == [[True, False], [True, False]]


@pytest.mark.parametrize("combine", ["softmax", "softmax_raw", "unit"])
def test_forward_equals_naive_loop_without_dropping(combine):
    m = moe(experts=5, k=2, combine=combine, capacity_factor=None, eval_capacity_factor=None)
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    y = m(x)
    ref, keep, _ = naive_moe(m, x)
    assert all(all(row) for row in keep) and m.last_dropped == 0
    torch.testing.assert_close(y, ref, **GATE_TOL[combine])


@pytest.mark.parametrize("priority", ["token", "rank"])
@pytest.mark.parametrize("combine", ["softmax", "softmax_raw", "unit"])
def test_forward_with_dropping_equals_naive_loop_and_dropped_tokens_are_zero(priority, combine):
    m = moe(experts=4, k=2, combine=combine, priority=priority, capacity_factor=0.5, eval_capacity_factor=0.25)
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    for mode, factor in ((m.train, 0.5), (m.eval, 0.25)):
        mode()
        y = m(x)
        cap = math.ceil(factor * 24 * 2 / 4)
        ref, keep, index = naive_moe(m, x, cap, priority)
        torch.testing.assert_close(y, ref, **GATE_TOL[combine])
        assert m.last_dropped == sum(not v for row in keep for v in row) > 0
        assert m.last_load == [sum(1 for t, row in enumerate(keep) for s, v in enumerate(row)
                                   if v and index[t][s] == e) for e in range(4)]
        assert max(m.last_load) <= cap
        gone = [t for t, row in enumerate(keep) if not any(row)]
        assert gone, "capacity this tight must drop some token entirely"
        flat = y.reshape(-1, 6)
        for t in gone:
            assert torch.equal(flat[t], torch.zeros(6, dtype=torch.float64))
        kept = [t for t, row in enumerate(keep) if any(row)]
        assert all(flat[t].abs().sum() > 0 for t in kept)


def test_fully_dropped_token_passes_through_the_residual():
    dim = 6
    m = moe(dim, experts=4, k=1, capacity_factor=0.25)
    block = PreNorm(dim, m, lambda: nn.LayerNorm(dim).double(), AddResidual(dim))
    x = torch.randn(1, 16, dim, dtype=torch.float64)
    y = block(x)
    _, keep, _ = naive_moe(m, block.norm(x), cap=capacity(16, 4, 1, 0.25), priority="token")
    gone = [t for t, row in enumerate(keep) if not any(row)]
    assert gone and len(gone) < 16
    for t in range(16):
        same = torch.equal(y[0, t], x[0, t])
        assert same == (t in gone)


def moe_lm(priority="token", factor=1.0):
    ffn = {"name": "moe", "experts": 4, "k": 2, "capacity_factor": factor, "eval_capacity_factor": factor,
           "priority": priority}
    model = formers.create_model("lm", vocab=11, dim=16, depth=2, max_len=32,
                                 block={"mixer": {"name": "softmax", "heads": 2}, "ffn": ffn}).double()
    with torch.no_grad():  # decisive, uneven routing so that capacity really binds
        for mod in model.modules():
            if isinstance(mod, MoE):
                mod.router.net.weight.normal_(std=1.0)
    return model


@pytest.mark.parametrize("train", [False, True])
def test_token_priority_keeps_an_lm_causal(train):
    model = moe_lm("token").train(train)
    ids = torch.randint(0, 11, (1, 16))
    y = model(ids)
    assert sum(mod.last_dropped for mod in model.modules() if isinstance(mod, MoE)) > 0
    for t in (3, 9, 14):
        other = ids.clone()
        other[0, t + 1:] = torch.randint(0, 11, (15 - t,))
        y2 = model(other)
        torch.testing.assert_close(y2[0, :t + 1], y[0, :t + 1], atol=0, rtol=0)
        assert not torch.allclose(y2[0, t + 1:], y[0, t + 1:])


@pytest.mark.parametrize("train", [False, True])
def test_token_priority_keeps_a_batch_causal(train):
    """Capacity is shared by the whole batch: changing sequence 0's later tokens must not change any sequence's
    earlier outputs (in batch-major order sequence 0's tail would take the slots of sequence 1's head)."""
    model = moe_lm("token", factor=0.5).train(train)
    ids = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(0))
    y = model(ids)
    assert sum(mod.last_dropped for mod in model.modules() if isinstance(mod, MoE)) > 0
    changed = False
    for seed in range(6):
        other = ids.clone()
        other[0, 8:] = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(seed))
        y2 = model(other)
        torch.testing.assert_close(y2[:, :8], y[:, :8], atol=0, rtol=0)
        changed |= not torch.allclose(y2[1:, 8:], y[1:, 8:])  # later positions do share capacity
    assert changed


def test_rank_priority_is_not_causal():
    """The same check fails for GShard's rank priority: a later token's first choice evicts an earlier second
    choice (this is why the docstring calls it non-causal, and what shows the causality test can fail)."""
    model = moe_lm("rank", factor=0.5).eval()
    ids = torch.randint(0, 11, (1, 16))
    y = model(ids)
    leaked = False
    for seed in range(8):
        other = ids.clone()
        other[0, 8:] = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(seed))
        leaked |= not torch.equal(model(other)[0, :8], y[0, :8])
    assert leaked


def test_gradients_reach_router_and_experts():
    m = moe(experts=4, k=2, capacity_factor=None, aux="none", z_weight=0.0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    (m(x) * torch.randn(2, 5, 6, dtype=torch.float64)).sum().backward()  # output only: router through the gates
    assert m.router.net.weight.grad is not None and m.router.net.weight.grad.abs().sum() > 0
    for p in (m.experts.w1, m.experts.w2, m.experts.b1, m.experts.b2):
        assert p.grad is not None and p.grad.abs().sum() > 0
    m.zero_grad()
    m1 = moe(experts=4, k=1, capacity_factor=None)  # k = 1, renormalised gate = 1: only the aux losses train it
    m1(x)
    sum(formers.aux_losses(m1).values()).backward()
    assert m1.router.net.weight.grad.abs().sum() > 0


def test_aux_losses_add_up_when_called_twice():
    m = moe(experts=4, k=2, balance_weight=0.5, z_weight=0.1, capacity_factor=None)
    x1, x2 = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    m(x1)
    a1 = formers.aux_losses(m)
    m(x2)
    a2 = formers.aux_losses(m)
    assert formers.aux_losses(m) == {}  # reading clears
    m(x1)
    m(x2)
    both = formers.aux_losses(m)
    assert set(both) == {"moe_balance", "moe_z"}
    for name in both:
        torch.testing.assert_close(both[name], a1[name] + a2[name], atol=1e-14, rtol=1e-14)
        assert a1[name] != a2[name]


def test_frozen_router_and_no_aux_under_no_grad_in_eval():
    m = moe(experts=4, k=2, train_router=False).eval()
    assert not m.router.net.weight.requires_grad
    with torch.no_grad():
        m(torch.randn(1, 4, 6, dtype=torch.float64))
    assert formers.aux_losses(m) == {}


def test_config_errors():
    with pytest.raises(FormersError, match="k"):
        MoE(8, experts=2, k=3)
    with pytest.raises(FormersError, match="k"):
        MoE(8, experts=2, k=0)
    with pytest.raises(FormersError, match="priority"):
        MoE(8, priority="random")
    with pytest.raises(FormersError, match="combine"):
        MoE(8, combine="sigmoid")
    with pytest.raises(FormersError, match="aux"):
        MoE(8, aux="load")
    with pytest.raises(FormersError, match="experts"):
        MoE(8, experts=0)
    with pytest.raises(FormersError, match="router"):
        MoE(8, router="conv")
    with pytest.raises(FormersError, match="k must be"):
        route(torch.randn(3, 2), k=3)
    with pytest.raises(FormersError, match="priority"):
        capacity_keep(torch.zeros(3, 1, dtype=torch.long), 2, 1, "expert")
    with pytest.raises(FormersError, match="moe"):
        formers.create_model("lm", vocab=11, dim=8, depth=1, block={"ffn": {"name": "moe", "experts": 2, "k": 4}})


def test_without_eval_capacity_cached_generation_equals_recomputation():
    """The docstring's advice: capacity scales with the tokens per call, so only eval_capacity_factor=None makes
    cached decoding (one token per call) agree with full forwards, even with decisive, uneven routing."""
    ffn = {"name": "moe", "experts": 4, "k": 2, "capacity_factor": 0.5, "eval_capacity_factor": None}
    model = formers.create_model("lm", vocab=11, dim=16, depth=2, max_len=40,
                                 block={"mixer": {"name": "softmax", "heads": 2}, "ffn": ffn}).double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, MoE):
                mod.router.net.weight.normal_(std=1.0)
        ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
        out = model.generate(ids, 16, greedy=True)
        seq = ids
        for _ in range(16):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("train", [False, True])
def test_padding_is_not_routed_and_takes_no_capacity(train):
    """With a key-padding mask, only real tokens visit the experts, in position-major order, against a capacity
    computed from the real tokens; padding outputs 0, and what the padding holds changes nothing."""
    m = moe(experts=4, k=2, capacity_factor=0.5, eval_capacity_factor=0.5).train(train)
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:], mask[2, 3:] = False, False
    real = int(mask.sum())
    cap = math.ceil(0.5 * real * 2 / 4)
    y = m(x, mask=mask)
    ref, keep, _ = naive_moe(m, x, cap, "token", mask=mask)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert m.last_dropped == real * 2 - sum(v for row in keep for v in row) > 0
    assert torch.equal(y[~mask], torch.zeros(3 * 8 - real, 6, dtype=torch.float64))
    x2 = x.clone()
    x2[~mask] = torch.randn(3 * 8 - real, 6, dtype=torch.float64) * 5
    torch.testing.assert_close(m(x2, mask=mask), y, rtol=0, atol=0)


def test_auxiliary_losses_see_only_real_tokens():
    from formers.nn.hooks import aux_losses, clear_aux

    m = moe(experts=4, k=2, z_weight=0.01).train()
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    clear_aux(m)
    m(x, mask=mask)
    padded = aux_losses(m)
    clear_aux(m)
    m(x[mask][None])  # the same real tokens as one unpadded sequence: the losses are means over tokens
    alone = aux_losses(m)
    assert padded.keys() == alone.keys() == {"moe_balance", "moe_z"}
    for k in padded:
        torch.testing.assert_close(padded[k], alone[k], rtol=1e-12, atol=1e-12)


def test_encoder_with_binding_capacity_packed_equals_padded():
    """The packed forward (P37) and the padded one with a key-padding mask route the same real tokens in the same
    order against the same capacity, so they agree even where capacity drops tokens."""
    ffn = {"name": "moe", "experts": 4, "k": 2, "capacity_factor": 0.5, "eval_capacity_factor": 0.5}
    model = formers.create_model("encoder", vocab=11, dim=16, depth=2, max_len=32, pool="mean", num_classes=3,
                                 level="token", block={"mixer": {"name": "softmax", "heads": 2}, "ffn": ffn})
    model = model.double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, MoE):
                mod.router.net.weight.normal_(std=1.0)
        ids = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(3, 12, dtype=torch.bool)
        mask[0, 7:], mask[1, 10:] = False, False
        padded = model(ids, mask=mask)
        assert sum(mod.last_dropped for mod in model.modules() if isinstance(mod, MoE)) > 0
        packed = model(ids, mask=mask, packed=True)
    torch.testing.assert_close(packed[mask], padded[mask], rtol=1e-10, atol=1e-10)


def test_mask_edge_cases():
    m = moe(experts=4, k=2, capacity_factor=0.5, eval_capacity_factor=0.5, z_weight=0.01).train()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    from formers.nn.hooks import aux_losses, clear_aux

    clear_aux(m)  # all padding: nothing routed, no auxiliary loss (it would be a mean over no tokens: NaN)
    assert torch.equal(m(x, mask=torch.zeros(2, 5, dtype=torch.bool)), torch.zeros_like(x))
    assert aux_losses(m) == {} and m.last_dropped == 0
    with pytest.raises(FormersError, match="padding mask must be"):  # a mask that describes other tokens
        m(x, mask=torch.ones(2, 4, dtype=torch.bool))
    # decoding with a cache: the key mask covers cached + new tokens, and the new ones are its last columns
    m.eval()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(m(x[:, :2], mask=mask[:, :8]), m(x[:, :2], mask=mask[:, 6:]), rtol=0, atol=0)


def test_chunked_prefill_with_padding_ignores_what_the_padding_holds():
    """A cached LM fed in two chunks with a (B, past + N) key mask: row 0's padding ids change nothing in row 1
    (with the mask ignored, the padding takes capacity and row 1's logits move by ~5e-2)."""
    torch.manual_seed(0)
    ffn = {"name": "moe", "experts": 4, "k": 1, "eval_capacity_factor": 1.0}
    model = formers.create_model("lm", vocab=50, dim=32, depth=1, max_len=32,
                                 block={"mixer": {"name": "softmax", "heads": 2}, "ffn": ffn}).eval()
    idx = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 6:] = False

    def run(ids):
        with torch.no_grad():
            cache = model.new_cache()
            model(ids[:, :4], cache=cache, mask=mask[:, :4])
            return model(ids[:, 4:], cache=cache, mask=mask)[1]

    ref = run(idx)
    for seed in range(20):  # different padding ids route differently; none may reach row 1
        other = idx.clone()
        other[0, 6:] = torch.randint(0, 50, (2,), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(run(other), ref, rtol=0, atol=0)
