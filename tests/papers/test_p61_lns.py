"""P61 LayerNorm Scaling: the `lns` placement against a naive block, and its init-time effect on depth.

Facts: P61 "The Curse of Depth in Large Language Models"; official code lmsdss/LayerNorm-Scaling
(peft_pretraining/modeling_llama.py, norm_type 'LNS'): h = x + Attn(Norm(x) / sqrt(l)), y = h + MLP(Norm(h) / sqrt(l)),
l = layer_index + 1.
"""

import math

import numpy as np
import pytest
import torch

import formers


def _ln(norm: torch.nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
    """LayerNorm written out: biased variance over the last dim, then gain and bias."""
    mu = t.mean(-1, keepdim=True)
    var = (t - mu).pow(2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-unit gains and non-zero biases, so that a wrongly placed scale or a skipped norm would show."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.1)


def test_lns_scales_each_layer_by_inverse_sqrt_depth():
    torch.manual_seed(0)
    depth = 4
    model = formers.create_model("lm", vocab=17, dim=16, depth=depth, max_len=12,
                                 block={"placement": "lns", "mixer": {"name": "softmax", "heads": 2}}).double()
    _randomise_norms(model)
    idx = torch.randint(0, 17, (2, 9))
    # The naive model: embeddings + positions, then per layer l (1-based) the two scaled Pre-LN sublayers,
    # then the unscaled final norm and the head.
    x0 = model.embed(idx) + model.position.emb[:9]
    x = x0
    for i, block in enumerate(model.stack.blocks):
        s = 1.0 / math.sqrt(i + 1)
        h = x + block.attn.fn(_ln(block.attn.norm, x) * s)
        x = h + block.ffn.fn(_ln(block.ffn.norm, h) * s)
    ref = model.head(_ln(model.norm, x))
    torch.testing.assert_close(model(idx), ref, atol=1e-12, rtol=1e-12)
    # The same model with Pre-LN (identical weights) differs: the scale is really applied past layer 1.
    pre = formers.create_model("lm", vocab=17, dim=16, depth=depth, max_len=12,
                               block={"placement": "pre", "mixer": {"name": "softmax", "heads": 2}}).double()
    pre.load_state_dict(model.state_dict())
    assert (pre(idx) - model(idx)).abs().max() > 1e-3


def test_lns_block_gradient_matches_naive():
    torch.manual_seed(1)
    from formers.blocks import Block

    block = Block(8, causal=True, spec={"placement": "lns", "mixer": {"name": "softmax", "heads": 2}},
                  layer=5).double()
    _randomise_norms(block)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    s = 1 / math.sqrt(6)
    h = x + block.attn.fn(_ln(block.attn.norm, x) * s)
    ref = h + block.ffn.fn(_ln(block.ffn.norm, h) * s)
    y = block(x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


def test_layer_index_is_reserved():
    with pytest.raises(formers.FormersError, match="set by the enclosing model"):
        formers.create_model("lm", vocab=8, dim=8, depth=2, block={"placement": {"name": "lns", "layer": 3},
                                                                   "mixer": {"name": "softmax", "heads": 2}})


def _hidden_variances(model: torch.nn.Module, idx: torch.Tensor) -> np.ndarray:
    """Var(x_l) of the residual stream after every block l = 1..L."""
    out: list[float] = []
    hooks = [b.register_forward_hook(lambda m, i, o: out.append(o.var().item())) for b in model.stack.blocks]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return np.array(out)


def test_lns_damps_variance_growth_with_depth_at_init():
    """P61's claim at init: with normal (not depth-scaled) init, Pre-LN's residual-stream variance grows with depth
    roughly linearly (each sublayer adds a similar amount), LNS's increments shrink like 1/l, so its growth over 24
    layers is a fraction of Pre-LN's. Same weights in both models: only the 1/sqrt(l) scale differs."""
    torch.manual_seed(0)
    kw = dict(vocab=64, dim=32, depth=24, max_len=16, block={"mixer": {"name": "softmax", "heads": 4}})
    pre = formers.create_model("lm", **kw).double()
    lns = formers.create_model("lm", **{**kw, "block": {**kw["block"], "placement": "lns"}}).double()
    lns.load_state_dict(pre.state_dict())
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    v0 = (pre.embed(idx) + pre.position.emb[:16]).var().item()
    vp, vl = _hidden_variances(pre, idx), _hidden_variances(lns, idx)
    assert vp[0] == pytest.approx(vl[0], rel=1e-12)  # layer 1: scale 1, identical
    grow_p, grow_l = vp[-1] - v0, vl[-1] - v0
    assert grow_p > 0 and grow_l > 0
    assert grow_l < 0.3 * grow_p, (grow_l, grow_p)  # harmonic sum / L ~ 0.16 for L = 24 (seeds 0-3: 0.13-0.17)
    # layers 13-24 relative to layers 1-12: Pre-LN keeps growing at about its early rate, LNS slows down
    late_p = (vp[-1] - vp[11]) / (vp[11] - v0)
    late_l = (vl[-1] - vl[11]) / (vl[11] - v0)
    assert late_p > 0.5 and late_l < 0.5 * late_p, (late_p, late_l)
