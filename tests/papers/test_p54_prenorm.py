"""P54 Pre-RMSNorm / Pre-CRMSNorm: the converters are exact re-parameterisations of Pre-LN models.

Input gradients: the converted models read token-embedding outputs of a different width (d-1 after compression),
so gradients w.r.t. the embeddings are not comparable. Instead a continuous perturbation delta (B, N, d) is added
to the token-embedding output of every model through a forward hook: the original adds delta, Pre-RMSNorm adds its
recentred version C delta, Pre-CRMSNorm adds (C delta)[..., :d-1]. The three models then compute the same function
of delta (the Pre-LN stream is read only through LN, which ignores the mean), so d(loss)/d(delta) must agree.
"""

import copy

import pytest
import torch
import yaml

import formers
from formers.compress import convert_run, to_precrmsnorm, to_prermsnorm
from formers.nn.norm import CRMSNorm, LayerNorm, RMSNorm
from formers.registry import FormersError
from tests.conftest import TINY_LM


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial LN gains/biases and linear biases, so that folding them is actually exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
        if getattr(model, "cls_token", None) is not None:
            model.cls_token.normal_(0, 0.5)
        if hasattr(model.position, "emb"):
            model.position.emb.normal_(0.3, 0.2)  # a mean offset that recentring must remove
    return model


def _with_delta(model, idx, delta, mapping, mask=None):
    """Forward with `mapping(delta)` added to the token-embedding output."""
    handle = model.embed.register_forward_hook(lambda mod, inp, out: out + mapping(delta))
    try:
        return model(idx, mask=mask) if mask is not None else model(idx)
    finally:
        handle.remove()


def _centre(t):
    return t - t.mean(-1, keepdim=True)


MAPS = {"orig": lambda t: t, "rms": _centre, "crms": lambda t: _centre(t)[..., :-1]}


def _check_equivalent(model, idx, mask=None):
    before = copy.deepcopy(model.state_dict())
    models = {"orig": model, "rms": to_prermsnorm(model), "crms": to_precrmsnorm(model)}
    for k, v in before.items():  # the input model is untouched
        assert torch.equal(model.state_dict()[k], v), k
    d = model.dim
    assert models["crms"].dim == d - 1
    assert not any(isinstance(m, torch.nn.LayerNorm) for k in ("rms", "crms") for m in models[k].modules())
    assert sum(isinstance(m, RMSNorm) for m in models["rms"].modules()) == 2 * model.depth + 1
    assert sum(isinstance(m, CRMSNorm) for m in models["crms"].modules()) == 2 * model.depth + 1
    g = torch.Generator().manual_seed(1)
    delta0 = torch.randn(*idx.shape, d, dtype=torch.float64, generator=g) * 0.3
    outs, grads = {}, {}
    for key, m in models.items():
        delta = delta0.clone().requires_grad_(True)
        y = _with_delta(m, idx, delta, MAPS[key], mask)
        w = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        (y * w).sum().backward()
        outs[key], grads[key] = y.detach(), delta.grad
    scale, gscale = outs["orig"].abs().max(), grads["orig"].abs().max()
    assert gscale > 1e-6  # the gradient is not trivially zero
    for key in ("rms", "crms"):
        assert (outs[key] - outs["orig"]).abs().max() <= 1e-10 * scale, key
        assert (grads[key] - grads["orig"]).abs().max() <= 1e-10 * gscale, key
    return models


def test_crmsnorm_equals_rmsnorm_on_zero_mean_vector():
    d = 9
    x = torch.randn(4, 5, d, dtype=torch.float64) * 3
    x = x - x.mean(-1, keepdim=True)
    z = x[..., :-1].clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    y_c = CRMSNorm(d - 1, eps=1e-3).double()(z)
    y_r = RMSNorm(d, eps=1e-3).double()(xf)
    naive = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-3)  # RMSNorm written out on the full vector
    torch.testing.assert_close(y_c, naive[..., :-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(y_r, naive, rtol=0, atol=1e-12)
    # gradients: z feeds x_d = -sum(z) too, so dL/dz = dL/dx[:d-1] - dL/dx[d-1] for L = w . y_full
    w = torch.randn(4, 5, d, dtype=torch.float64)
    full_c = torch.cat([y_c, -y_c.sum(-1, keepdim=True)], -1)  # the implicit output coordinate
    torch.testing.assert_close(full_c, naive, rtol=0, atol=1e-12)
    (full_c * w).sum().backward()
    (y_r * w).sum().backward()
    torch.testing.assert_close(z.grad, xf.grad[..., :-1] - xf.grad[..., -1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("position", "ffn"), [("learned", "mlp"), ("sinusoidal", "glu"), ("rope", "mlp")])
def test_lm_conversions_exact(position, ffn):
    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=40, dim=16, depth=2, max_len=32, position=position,
                                 block={"mixer": {"name": "softmax", "heads": 4}, "ffn": {"name": ffn}},
                                 tie_embeddings=ffn == "glu").double()
    _randomise(model)
    idx = torch.randint(0, 40, (2, 12))
    crms = _check_equivalent(model, idx)["crms"]
    a = crms.generate(idx[:, :4], 6, greedy=True)  # the KV cache still matches recomputation after compression
    assert torch.equal(a, crms.generate(idx[:, :4], 6, greedy=True, use_cache=False))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_encoder_conversions_exact(pool):
    torch.manual_seed(0)
    model = formers.create_model("encoder", vocab=30, dim=16, depth=2, max_len=16, pool=pool, num_classes=3,
                                 block={"mixer": {"name": "softmax", "heads": 2, "kv_heads": 1},
                                        "norm": {"name": "layernorm", "eps": 1e-3}}).double()
    _randomise(model)
    idx = torch.randint(0, 30, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    _check_equivalent(model, idx, mask)


@pytest.mark.parametrize("block", [{"placement": "post"}, {"placement": "peri"}, {"norm": "rmsnorm"},
                                   {"mixer": {"name": "linear", "heads": 4}}])
def test_unsupported_structures_raise(block):
    model = formers.create_model("lm", vocab=20, dim=16, depth=1, max_len=16, block=block)
    with pytest.raises(FormersError, match="supported"):
        to_prermsnorm(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    recipe = copy.deepcopy(TINY_LM)
    recipe["model"]["max_len"] = 128  # room for 100 generated tokens with learned positions
    recipe["train"].update(steps=50, eval_every=50, ckpt_every=50)
    torch.manual_seed(0)
    result = formers.fit(recipe, out=tmp_path_factory.mktemp("p54") / "run")
    return result["run_dir"]


def test_trained_lm_precrmsnorm_fp32_and_greedy(trained):
    model = formers.load_run(trained)
    assert isinstance(model.norm, LayerNorm)
    idx = torch.randint(0, 256, (2, 32))
    y = model(idx)
    y_c = to_precrmsnorm(model)(idx)
    assert (y_c - y).abs().max() <= 1e-5 * y.abs().max()
    ref, conv = model.double(), to_precrmsnorm(model.double())
    prompt = idx[:1, :8]
    out_ref = ref.generate(prompt, 100, greedy=True)
    out_conv = conv.generate(prompt, 100, greedy=True)
    assert torch.equal(out_ref, out_conv)


def test_convert_run_round_trip(tmp_path, trained):
    """A trained run (LayerNorm with bias: the final norm's bias becomes a head bias) converts to a run folder
    that `load_run` rebuilds, with the same logits."""
    model = formers.load_run(trained)
    run = trained
    idx = torch.randint(0, 256, (2, 16))
    for kind in ("prermsnorm", "precrmsnorm"):
        out = convert_run(run, tmp_path / kind, kind)
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg["model"]["block"]["norm"]["name"] == kind[3:]
        assert cfg["model"]["head_bias"] is True
        loaded = formers.load_run(out)
        assert loaded.dim == model.dim - (kind == "precrmsnorm")
        y = model(idx)
        assert (loaded(idx) - y).abs().max() <= 1e-5 * y.abs().max()
    with pytest.raises(FormersError, match="already exists"):
        convert_run(run, tmp_path / "prermsnorm", "prermsnorm")
