"""P21 TLEG learngene stack: layer weights theta_A + (l-1)/(L-1) theta_B are exactly affine in depth, stored
parameters do not grow with L, outputs and gradients equal a plain stack whose weights are materialised in the test,
and expand_to_depth builds independent descendants of any depth."""

import copy

import pytest
import torch

import formers
from formers.blocks import PlainStack
from formers.registry import FormersError
from formers.stacks import LearngeneStack


def tleg_lm(depth=4, **kw):
    return formers.create_model("lm", vocab=13, dim=8, depth=depth, max_len=32, stack="learngene",
                                block={"mixer": {"name": "softmax", "heads": 2}}, **kw).double()


def randomise_b(stack):
    with torch.no_grad():
        for p in stack.theta_b.values():
            p.normal_(std=0.3)


def materialised(stack, depth):
    """Independent blocks whose weights are written from the paper's formula here, in the test."""
    blocks = []
    for layer in range(1, depth + 1):
        f = (layer - 1) / (depth - 1) if depth > 1 else 0.0
        block = copy.deepcopy(stack.template)
        with torch.no_grad():
            for name, p in block.named_parameters():
                p.copy_(dict(stack.template.named_parameters())[name] + f * stack.theta_b[name.replace(".", "-")])
        blocks.append(block)
    return PlainStack(depth, lambda i: blocks[i])


def test_layer_weights_are_affine_in_depth():
    stack = tleg_lm(depth=5).stack
    randomise_b(stack)
    layers = [stack.layer_parameters(i) for i in range(5)]
    for name, a in stack.template.named_parameters():
        b = stack.theta_b[name.replace(".", "-")]
        torch.testing.assert_close(layers[0][name], a, atol=0, rtol=0)
        torch.testing.assert_close(layers[-1][name], a + b, atol=1e-15, rtol=1e-15)
        for i in range(1, 5):  # constant step theta_B / (L - 1)
            torch.testing.assert_close(layers[i][name] - layers[i - 1][name], b / 4, atol=1e-14, rtol=1e-12)


def test_stored_parameters_do_not_grow_with_depth():
    counts = {d: tleg_lm(depth=d).num_params() for d in (1, 3, 8)}
    assert len(set(counts.values())) == 1
    stack = tleg_lm(depth=8).stack
    one_block = sum(p.numel() for p in stack.template.parameters())
    assert sum(p.numel() for p in stack.parameters()) == 2 * one_block
    plain = formers.create_model("lm", vocab=13, dim=8, depth=8, max_len=32,
                                 block={"mixer": {"name": "softmax", "heads": 2}})
    assert sum(p.numel() for p in plain.stack.parameters()) == 8 * one_block


def test_outputs_and_gradients_equal_materialised_stack():
    stack = tleg_lm(depth=4).stack
    randomise_b(stack)
    ref = materialised(stack, 4)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    y, y_ref = stack(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (y_ref * w).sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-12, rtol=1e-12)
    # chain rule through theta_l = A + f_l B: dA = sum_l d theta_l, dB = sum_l f_l d theta_l
    fs = [i / 3 for i in range(4)]
    per_layer = [dict(b.named_parameters()) for b in ref.blocks]
    for name, a in stack.template.named_parameters():
        torch.testing.assert_close(a.grad, sum(pl[name].grad for pl in per_layer), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(stack.theta_b[name.replace(".", "-")].grad,
                                   sum(f * pl[name].grad for f, pl in zip(fs, per_layer)), atol=1e-12, rtol=1e-10)


def test_fresh_stack_is_weight_shared_and_checkpointing_keeps_gradients():
    model = tleg_lm(depth=3)
    assert all((p == 0).all() for p in model.stack.theta_b.values())  # B = 0: every layer starts as theta_A
    randomise_b(model.stack)
    ids = torch.randint(0, 13, (2, 7))
    model(ids).square().sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(ids).square().sum().backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("new_depth", [2, 6])
def test_expand_to_depth_gives_independent_layers_from_the_learngene(new_depth):
    stack = tleg_lm(depth=4).stack
    randomise_b(stack)
    child = stack.expand_to_depth(new_depth)
    assert isinstance(child, PlainStack) and child.num_applications == new_depth
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(child(x), materialised(stack, new_depth)(x), atol=1e-12, rtol=1e-12)
    ptrs = [p.data_ptr() for p in child.parameters()] + [p.data_ptr() for p in stack.parameters()]
    assert len(ptrs) == len(set(ptrs))  # descendants are trained freely: no storage shared with the learngene
    assert not any(p.requires_grad is False for p in child.parameters())


def test_cached_generation_equals_recomputation():
    model = tleg_lm(depth=3).eval()
    randomise_b(model.stack)
    ids = torch.randint(0, 13, (2, 3))
    assert torch.equal(model.generate(ids, 4, greedy=True), model.generate(ids, 4, greedy=True, use_cache=False))


def test_structure_changing_layer_override_raises():
    with pytest.raises(FormersError, match="layer 2"):
        tleg_lm(depth=3, layers={"2": {"mixer": {"name": "softmax", "heads": 2, "bias": True}}})
    with pytest.raises(FormersError, match="depth"):
        LearngeneStack(4, lambda i: torch.nn.Linear(2, 2)).expand_to_depth(0)
