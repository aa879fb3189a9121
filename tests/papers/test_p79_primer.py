"""P79 Primer-EZ: squared ReLU is exact with derivative 2 relu(x), an `mlp` with it equals x-transformers'
`FeedForward(relu_squared=True)`, and the `primer` recipe is lm_shakespeare with exactly the two Primer-EZ changes
(mdha attention, squared ReLU). The mdha mixer's own tests are in test_p79_mdha.py."""

import pytest
import torch

import formers
from formers.config import builtin_recipes, load_recipe
from formers.nn.act import SquaredReLU
from formers.nn.softmax_variants import MultiDConvHeadAttention
from formers.train.trainer import build_model


def test_squared_relu_value_and_derivative():
    x = torch.cat([torch.randn(200, dtype=torch.float64) * 3, torch.zeros(3, dtype=torch.float64)])
    x.requires_grad_(True)
    act = formers.build("act", "squared_relu")
    y = act(x)
    assert torch.equal(y, torch.where(x > 0, x * x, torch.zeros_like(x)))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, 2 * x.detach().clamp(min=0))  # 2 relu(x), also 0 at x = 0
    assert isinstance(formers.build("act", "relu_squared"), SquaredReLU)  # the x-transformers spelling


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_matches_x_transformers_feedforward(bias):
    xt = pytest.importorskip("x_transformers.x_transformers")
    ref = xt.FeedForward(16, mult=4, relu_squared=True, no_bias=not bias).double().eval()
    ours = formers.build("ffn", {"name": "mlp", "act": "squared_relu", "mult": 4, "bias": bias}, dim=16).double()
    lin_in, lin_out = ref.ff[0][0], ref.ff[2]  # Sequential(Sequential(Linear, ReluSquared), Dropout, Linear)
    assert isinstance(lin_in, torch.nn.Linear) and isinstance(lin_out, torch.nn.Linear)
    with torch.no_grad():
        ours.fc1.weight.copy_(lin_in.weight)
        ours.fc2.weight.copy_(lin_out.weight)
        if bias:
            ours.fc1.bias.copy_(lin_in.bias)
            ours.fc2.bias.copy_(lin_out.bias)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_primer_recipe_is_lm_shakespeare_plus_two_changes():
    assert "primer" in builtin_recipes()
    cfg, base = load_recipe("primer"), load_recipe("lm_shakespeare")
    assert cfg["name"] == "primer"
    block, base_block = cfg["model"]["block"], base["model"]["block"]
    assert block["mixer"] == {**base_block["mixer"], "name": "mdha"}
    assert block["ffn"] == {**base_block["ffn"], "act": "squared_relu"}
    rest = {k: v for k, v in block.items() if k not in ("mixer", "ffn")}
    assert rest == {k: v for k, v in base_block.items() if k not in ("mixer", "ffn")}
    assert {k: v for k, v in cfg["model"].items() if k != "block"} == \
        {k: v for k, v in base["model"].items() if k != "block"}
    assert cfg["task"] == base["task"] and cfg["train"] == base["train"]


def test_primer_recipe_builds_mdha_and_squared_relu():
    model = build_model(load_recipe("primer")["model"], {"vocab": 256, "max_len": 128})
    blocks = model.stack.blocks
    assert len(blocks) == 4
    for b in blocks:
        assert isinstance(b.attn.fn, MultiDConvHeadAttention) and b.attn.fn.causal and b.attn.fn.heads == 4
        assert isinstance(b.ffn.fn.act, SquaredReLU)
    logits = model(torch.randint(0, 256, (1, 12)))
    assert logits.shape == (1, 12, 256) and torch.isfinite(logits).all()
