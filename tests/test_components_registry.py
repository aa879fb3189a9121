"""Generated from the registry: every norm, residual, stack, channel mixer and activation trains inside `lm` (loss
falls on a held-out batch), and every causal configuration leaks nothing from the future. New components are covered
when they register."""

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.registry import entries

TEXT = torch.tensor(list(b"to be, or not to be, that is the question: " * 40))
STACK_OPTIONS = {"looped": ({"name": "looped", "pre": 1, "loops": 2, "post": 1}, 3)}  # depth = pre + 1 + post


def _cases():
    for e in entries("norm"):
        yield f"norm-{e.name}", {"block": {"norm": e.name}}
    for e in entries("residual"):
        yield f"residual-{e.name}", {"block": {"residual": e.name}}
    for e in entries("ffn"):
        yield f"ffn-{e.name}", {"block": {"ffn": e.name}}
    for e in entries("act"):
        yield f"act-{e.name}", {"block": {"ffn": {"name": "mlp", "act": e.name}}}
    for e in entries("stack"):
        spec, depth = STACK_OPTIONS.get(e.name, (e.name, 2))
        yield f"stack-{e.name}", {"stack": spec, "depth": depth}


CASES = dict(_cases())


def _model(opts):
    opts = {"vocab": 256, "dim": 32, "depth": 2, "max_len": 64, **opts}
    block = {"mixer": {"name": "softmax", "heads": 4}, **opts.pop("block", {})}
    return formers.create_model("lm", block=block, **opts)


def _batch(n, g):
    starts = torch.randint(0, len(TEXT) - 33, (n,), generator=g)
    return TEXT[starts[:, None] + torch.arange(33)]


def _loss(model, w):
    return F.cross_entropy(model(w[:, :-1]).reshape(-1, 256), w[:, 1:].reshape(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_component_trains_in_lm(case):
    torch.manual_seed(0)
    model = _model(CASES[case])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    held = _batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = _loss(model, held).item()
    for step in range(15):
        formers.set_step(model, step)
        _loss(model, _batch(16, g)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = _loss(model, held).item()
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("case", list(CASES))
def test_component_is_causal_in_eval(case):
    torch.manual_seed(0)
    model = _model(CASES[case]).double().eval()  # batch-statistics norms mix tokens in training mode, by design
    ids = torch.randint(0, 256, (2, 30))
    ids2 = ids.clone()
    ids2[:, 20:] = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(model(ids)[:, :20], model(ids2)[:, :20], atol=1e-12, rtol=0)
