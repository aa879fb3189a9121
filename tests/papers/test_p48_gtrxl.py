"""P48 GTrXL: the GRU-type gate equals the paper's equations (values and gradients), the ReLU reordering, the
b_g -> large identity limit, and Transformer-XL segment memory equal to one concatenated causal pass."""

import pytest
import torch

import formers
from formers.blocks import Block
from formers.registry import FormersError

D = 6


def naive_gate(x, y, Wr, Wz, Wg, Ur, Uz, Ug, bg, relu=True):
    """P48 eq.: r, z, h-hat, g for each token vector separately (explicit loop)."""
    out = torch.empty_like(x)
    for idx in torch.cartesian_prod(torch.arange(x.shape[0]), torch.arange(x.shape[1])):
        b, n = idx.tolist()
        xv, yv = x[b, n], y[b, n]
        if relu:
            yv = torch.clamp(yv, min=0)
        r = torch.sigmoid(Wr @ yv + Ur @ xv)
        z = torch.sigmoid(Wz @ yv + Uz @ xv - bg)
        h = torch.tanh(Wg @ yv + Ug @ (r * xv))
        out[b, n] = (1 - z) * xv + z * h
    return out


def gate_matrices(g):
    Wr, Wz, Wg = g.w.weight.split(D, dim=0)
    Ur, Uz = g.u.weight.split(D, dim=0)
    return Wr, Wz, Wg, Ur, Uz, g.u_g.weight


@pytest.mark.parametrize("relu", [True, False])
def test_gate_equals_paper_equations_values_and_gradients(relu):
    g = formers.build("residual", {"name": "gru_gate", "relu": relu}, dim=D).double()
    for p in g.parameters():  # larger than default init so every term matters
        torch.nn.init.normal_(p, std=0.7)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    out = g(x, y)
    ref = naive_gate(x, y, *gate_matrices(g), 2.0, relu=relu)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(out)
    gx, gy, gW = torch.autograd.grad((out * w).sum(), (x, y, g.w.weight))
    rx, ry, rW = torch.autograd.grad((ref * w).sum(), (x, y, g.w.weight))
    for a, b in ((gx, rx), (gy, ry), (gW, rW)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_relu_reordering_ignores_negative_sublayer_output():
    g = formers.build("residual", "gru_gate", dim=D).double()
    x = torch.randn(1, 4, D, dtype=torch.float64)
    y = -torch.rand(1, 4, D, dtype=torch.float64)
    assert torch.equal(g(x, y), g(x, torch.zeros_like(y)))
    g.relu = False
    assert not torch.allclose(g(x, y), g(x, torch.zeros_like(y)))


def test_zero_weights_give_the_paper_init_value():
    """W = U = 0: r = 1/2, z = sigmoid(-b_g), h = 0, so g = (1 - sigmoid(-b_g)) x (~0.88 x for b_g = 2)."""
    g = formers.build("residual", "gru_gate", dim=D).double()
    for p in g.parameters():
        torch.nn.init.zeros_(p)
    x, y = torch.randn(2, 3, D, dtype=torch.float64), torch.randn(2, 3, D, dtype=torch.float64)
    z = torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64))
    torch.testing.assert_close(g(x, y), (1 - z) * x, atol=1e-15, rtol=1e-15)


def test_huge_gate_bias_makes_the_gtrxl_block_an_exact_identity():
    spec = {"placement": "pre", "residual": {"name": "gru_gate", "bias": 1e4}, "mixer": {"name": "softmax", "heads": 2}}
    block = Block(8, True, spec).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=1.0)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    assert torch.equal(block(x), x)
    # the same block with the default b_g = 2 does change its input
    block2 = Block(8, True, {**spec, "residual": "gru_gate"}).double()
    assert not torch.allclose(block2(x), x)


def gtrxl_lm(position="rope", mem_len=16, depth=2, **kw):
    block = {"placement": "pre", "residual": "gru_gate", "mixer": {"name": "softmax", "heads": 2}}
    return formers.create_model("lm", vocab=11, dim=8, depth=depth, max_len=32, position=position, block=block,
                                mem_len=mem_len, **kw).double().eval()


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_segment_memory_equals_one_concatenated_causal_pass(position):
    model = gtrxl_lm(position, mem_len=16)
    ids = torch.randint(0, 11, (2, 12))
    full = model(ids)
    l1, mem = model.forward_segment(ids[:, :5])
    l2, mem = model.forward_segment(ids[:, 5:9], mem)
    l3, mem = model.forward_segment(ids[:, 9:], mem)
    torch.testing.assert_close(torch.cat([l1, l2, l3], 1), full, atol=1e-10, rtol=1e-10)
    assert all(c.k.shape[2] == 12 and c.length == 12 for c in mem)


def test_memory_is_detached_truncated_and_not_modified():
    model = gtrxl_lm("rope", mem_len=3)
    model.train()
    ids = torch.randint(0, 11, (2, 9))
    _, mem = model.forward_segment(ids[:, :5])
    assert all(c.k.shape[2] == 3 and c.length == 3 and not c.k.requires_grad and not c.v.requires_grad
               for c in mem)
    before = [(c.k.clone(), c.length) for c in mem]
    a, _ = model.forward_segment(ids[:, 5:], mem)
    b, _ = model.forward_segment(ids[:, 5:], mem)  # the same memory again: unchanged by the first call
    assert torch.equal(a, b)
    assert all(torch.equal(c.k, k) and c.length == n for c, (k, n) in zip(mem, before))
    # gradients reach the weights through the current segment only
    a.sum().backward()
    assert all(p.grad is not None for p in model.stack.parameters())


def test_truncated_memory_keeps_exact_relative_distances():
    """With one layer the memory keys depend only on their own tokens, so segment 2 with memory of the last 3
    tokens must equal a fresh pass over (last 3 tokens of segment 1, segment 2): rotary keys are re-rotated."""
    model = gtrxl_lm("rope", mem_len=3, depth=1)
    ids = torch.randint(0, 11, (2, 9))
    _, mem = model.forward_segment(ids[:, :6])
    l2, _ = model.forward_segment(ids[:, 6:], mem)
    ref = model(ids[:, 3:])[:, 3:]
    torch.testing.assert_close(l2, ref, atol=1e-10, rtol=1e-10)
    # and the memory really was truncated: seeing all of segment 1 gives other logits
    assert not torch.allclose(l2, model(ids)[:, 6:], atol=1e-6)


def test_segment_memory_needs_mem_len_and_matching_layers():
    with pytest.raises(FormersError, match="mem_len"):
        gtrxl_lm(mem_len=0).forward_segment(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(FormersError, match="mem_len"):
        gtrxl_lm(mem_len=-1)
    model = gtrxl_lm()
    _, mem = model.forward_segment(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(FormersError, match="layers"):
        model.forward_segment(torch.zeros(1, 3, dtype=torch.long), mem[:1])
