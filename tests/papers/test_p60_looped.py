"""P60 AlgoFormer looped stack: equal to a plain stack of unrolled copies (values and gradients), input injection
as Y_{t+1} = L(Y_t + x0), shared weights, parameters independent of the loop count, pre->post when the loop block
is the identity, causal, and cached generation equal to recomputation."""

import copy

import pytest
import torch
from torch import nn

import formers
from formers.blocks import PlainStack
from formers.registry import FormersError


def looped_lm(pre=1, loops=3, post=1, inject=False, **kw):
    stack = {"name": "looped", "pre": pre, "loops": loops, "post": post, "inject": inject}
    return formers.create_model("lm", vocab=13, dim=8, depth=pre + 1 + post, max_len=32, stack=stack,
                                block={"mixer": {"name": "softmax", "heads": 2}}, **kw).double()


def unrolled(stack):
    """A plain stack of independent copies: pre blocks, `loops` copies of the loop block, post blocks."""
    blocks = list(stack.pre) + [copy.deepcopy(stack.loop) for _ in range(stack.loops)] + list(stack.post)
    return PlainStack(len(blocks), lambda i: blocks[i])


def test_equals_unrolled_plain_stack_values_and_gradients():
    model = looped_lm(pre=1, loops=3, post=1)
    stack = model.stack
    ref = unrolled(stack)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    y, y_ref = stack(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (y_ref * w).sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-12, rtol=1e-12)
    # the shared block's gradient is the sum of the gradients of its unrolled copies
    copies = list(ref.blocks)[1:4]
    for (name, p), *cs in zip(stack.loop.named_parameters(), *(c.parameters() for c in copies)):
        torch.testing.assert_close(p.grad, sum(c.grad for c in cs), atol=1e-12, rtol=1e-12, msg=name)


def test_input_injection_adds_the_loop_input_before_every_later_loop():
    stack = looped_lm(pre=1, loops=3, post=0, inject=True).stack
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    x0 = stack.pre[0](x)
    h = stack.loop(x0)  # Y_1 = L(0 + x0)
    for _ in range(2):
        h = stack.loop(h + x0)  # Y_{t+1} = L(Y_t + x0)
    torch.testing.assert_close(stack(x), h, atol=1e-12, rtol=1e-12)
    no_inject = looped_lm(pre=1, loops=3, post=0).stack
    no_inject.load_state_dict(stack.state_dict())
    assert not torch.allclose(no_inject(x), h)


def test_parameters_shared_and_independent_of_loops():
    counts = {loops: looped_lm(loops=loops).num_params() for loops in (1, 2, 5)}
    assert len(set(counts.values())) == 1
    model = looped_lm(loops=4)
    assert model.stack.num_applications == 1 + 4 + 1 and len(model.new_cache()) == 6
    names = [n for n, _ in model.named_parameters() if n.startswith("stack.loop.")]
    assert names and all(n.count("stack.loop.") == 1 for n in names)
    ptrs = [p.data_ptr() for p in model.stack.parameters()]
    assert len(ptrs) == len(set(ptrs))  # one stored tensor per shared weight, applied 4 times


def test_identity_loop_block_reduces_to_pre_then_post():
    stack = looped_lm(pre=1, loops=3, post=1).stack
    with torch.no_grad():  # Pre-LN block with zero output projections is x -> x
        stack.loop.attn.fn.out.weight.zero_()
        for m in stack.loop.ffn.fn.modules():
            if isinstance(m, nn.Linear) and m.out_features == 8:
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(stack(x), stack.post[0](stack.pre[0](x)), atol=0, rtol=0)


def test_causal_and_cached_decoding_equals_full_pass():
    """Each application has its own cache slot; with injection the new tokens' x0 is re-added at every loop."""
    model = looped_lm(pre=1, loops=2, post=1, inject=True).eval()
    ids = torch.randint(0, 13, (2, 9))
    full = model(ids)
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 1) % 13
    assert torch.equal(model(ids2)[:, :6], full[:, :6])  # no leakage from the future
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10)
    a = model.generate(ids[:, :3], 4, greedy=True)
    b = model.generate(ids[:, :3], 4, greedy=True, use_cache=False)
    assert torch.equal(a, b)


def test_bad_options_raise():
    with pytest.raises(FormersError, match="depth"):
        formers.create_model("lm", vocab=13, dim=8, depth=2, stack={"name": "looped", "pre": 1, "post": 1})
    with pytest.raises(FormersError, match="loops"):
        formers.create_model("lm", vocab=13, dim=8, depth=1, stack={"name": "looped", "loops": 0})
