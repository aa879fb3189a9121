"""Generated from the registry: every token mixer inside `encoder` and (when it can be causal) inside `lm`.

Each must train 20 steps with falling loss, leak nothing from the future when causal, ignore padded keys, and
generate the same tokens with and without its cache. A new mixer is covered the moment it is registered.
"""

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.registry import entries

MIXERS = entries("mixer")
CAUSAL = [e.name for e in MIXERS if e.causal_ok]
BIDIRECTIONAL = [e.name for e in MIXERS if e.extra.get("bidirectional_ok", True) and e.causal_ok is not None]
ALL_NAMED = [e.name for e in MIXERS]

TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog; " * 40))


def lm(name, **kw):
    return formers.create_model("lm", vocab=256, dim=32, depth=2, max_len=64,
                                block={"mixer": {"name": name, "heads": 4}}, **kw)


def encoder(name, **kw):
    return formers.create_model("encoder", vocab=16, dim=32, depth=2, max_len=64, pool="mean", num_classes=4,
                                block={"mixer": {"name": name, "heads": 4}}, **kw)


def test_every_mixer_declares_causality():
    for e in MIXERS:
        assert e.causal_ok in (True, False), f"mixer '{e.name}' must register causal_ok"
        assert e.paper == "baseline" or e.paper.startswith("P"), e.name


def _train_20_steps(model, batch, loss_fn):
    """Loss on a fixed held-out batch before and after 20 AdamW steps on fresh batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    held = batch(256, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = loss_fn(model, held).item()
    for _ in range(20):
        loss_fn(model, batch(16, g)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = loss_fn(model, held).item()
    return before, after


@pytest.mark.parametrize("name", CAUSAL)
def test_lm_trains(name):
    torch.manual_seed(0)

    def batch(n, g):
        starts = torch.randint(0, len(TEXT) - 49, (n,), generator=g)
        return TEXT[starts[:, None] + torch.arange(49)]

    def loss_fn(model, w):
        return F.cross_entropy(model(w[:, :-1]).reshape(-1, 256), w[:, 1:].reshape(-1))

    before, after = _train_20_steps(lm(name), batch, loss_fn)
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_encoder_trains(name):
    torch.manual_seed(0)
    task = formers.get("task", "majority").obj(seq_len=32, symbols=4)

    def batch(n, g):
        return task.train_batch(n, g)

    def loss_fn(model, b):
        return F.cross_entropy(model(b["x"]), b["y"])

    before, after = _train_20_steps(encoder(name), batch, loss_fn)
    assert after < before - 0.03, (before, after)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_mixer_leaks_nothing(name):
    torch.manual_seed(0)
    model = lm(name).double().eval()
    ids = torch.randint(0, 256, (2, 40))
    ids2 = ids.clone()
    ids2[:, 25:] = torch.randint(0, 256, (2, 15))
    a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :25], b[:, :25], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_padding_is_ignored(name):
    torch.manual_seed(0)
    model = encoder(name).double().eval()
    ids = torch.randint(0, 16, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, 36:] = False
    ids2 = ids.clone()
    ids2[0, 30:] = (ids2[0, 30:] + 3) % 16
    ids2[1, 36:] = (ids2[1, 36:] + 5) % 16
    a = model.forward_features(ids, mask=mask)
    b = model.forward_features(ids2, mask=mask)
    torch.testing.assert_close(a[0, :30], b[0, :30], atol=1e-12, rtol=0)
    torch.testing.assert_close(a[1, :36], b[1, :36], atol=1e-12, rtol=0)
    torch.testing.assert_close(model(ids, mask=mask), model(ids2, mask=mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", CAUSAL)
def test_cached_generation_equals_recomputation(name):
    torch.manual_seed(0)
    model = lm(name).double().eval()
    prompt = torch.randint(0, 256, (2, 7))
    if not getattr(formers.get("mixer", name).obj, "supports_cache", True):
        with pytest.raises(formers.FormersError):  # no incremental form: it must refuse a cache, not misuse it
            model(prompt, cache=model.new_cache())
        return
    a = model.generate(prompt, 16, greedy=True, use_cache=True)
    b = model.generate(prompt, 16, greedy=True, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL_NAMED)
def test_show_and_build_with_defaults(name, capsys):
    from formers.cli import main

    assert main(["show", "mixer", name]) == 0
    out = capsys.readouterr().out
    assert "paper:" in out and "options:" in out


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_alibi_either_runs_or_is_refused_when_the_model_is_built(name):
    """ALiBi adds a bias to attention scores. A mixer without per-key scores declares `takes_bias = False` and the
    model refuses the combination at build time, naming the mixer; every other mixer runs with it (no error left
    for the first forward)."""
    from formers.registry import FormersError

    try:
        model = encoder(name, position="alibi").eval()
    except FormersError as e:
        assert "model.position" in str(e) and name in str(e)
        return
    ids = torch.randint(0, 16, (2, 24))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
