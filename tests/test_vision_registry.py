"""Checks generated from the registry for every vision model (timm's habit): a model is covered the moment it
registers in the `model` family.

Vision models are the entries whose factory returns a `VisionModel`: a class or return annotation that says so,
else decided by building the entry on the meta device with its defaults. Names ending in `_tiny` (28x28
Fashion-MNIST variants) get the full contract: forward + backward on 2 images, a finite gradient for every
parameter, gradient checkpointing equal to the plain run, `fuse()` equal in eval, another input size,
`reset_classifier`, `forward_head(pre_logits=True)`, and FormersError on bad input. Every other vision model must
build on the meta device with a positive parameter count.
"""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from torch import nn

import formers
from formers.models.vision.base import VisionModel
from formers.registry import FormersError


def _declared_vision(obj) -> bool | None:
    """Whether a registered class or factory says (by its class or return annotation) that it builds a
    VisionModel; None when it does not say."""
    try:
        cls = obj if inspect.isclass(obj) else typing.get_type_hints(obj).get("return")
    except Exception:
        return None
    return issubclass(cls, VisionModel) if inspect.isclass(cls) else None


def _vision_entries() -> tuple[list[str], list[str]]:
    tiny, full = [], []
    for e in formers.entries("model"):
        is_vision = _declared_vision(e.obj)
        if is_vision is None:  # undeclared: build it on the meta device (free) and look
            try:
                with torch.device("meta"):
                    is_vision = isinstance(formers.create_model(e.name), VisionModel)
            except Exception:
                # a vision module's entry that cannot build is kept, so that its test fails and names the error
                is_vision = (getattr(e.obj, "__module__", "") or "").startswith("formers.models.vision")
        if is_vision:
            (tiny if e.name.endswith("_tiny") else full).append(e.name)
    return tiny, full


TINY, FULL = _vision_entries()


def _build(name: str, **overrides) -> VisionModel:
    """The model with its defaults, plus `overrides` for the options its factory takes."""
    opts = formers.get("model", name).options()
    torch.manual_seed(0)
    return formers.create_model(name, **{k: v for k, v in overrides.items() if k in opts})


def _images(m: VisionModel, side: int | None = None, n: int = 2) -> torch.Tensor:
    side = side or m.img_size
    return torch.randn(n, m.in_chans, side, side, generator=torch.Generator().manual_seed(1))


def test_some_tiny_vision_model_is_registered():
    assert "vit_tiny" in TINY


@pytest.mark.parametrize("name", FULL)
def test_full_size_builds_on_meta(name):
    with torch.device("meta"):
        m = formers.create_model(name)
    assert isinstance(m, VisionModel)
    assert m.num_params() > 0
    assert formers.get("model", name).paper  # every model names its paper ('baseline' for ViT)


@pytest.mark.parametrize("name", TINY)
def test_tiny_defaults(name):
    params = inspect.signature(formers.get("model", name).obj).parameters
    defaults = {k: params[k].default for k in ("num_classes", "in_chans", "img_size") if k in params}
    assert defaults == {"num_classes": 10, "in_chans": 1, "img_size": 28}
    with torch.device("meta"):
        m = formers.create_model(name)
    assert (m.num_classes, m.in_chans, m.img_size) == (10, 1, 28)
    assert m.num_features > 0
    assert m.num_params() < 5e6


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_every_parameter_gets_a_gradient(name):
    m = _build(name).train()
    y = m(_images(m))
    assert y.shape == (2, m.num_classes)
    assert torch.isfinite(y).all()
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    bad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_grad_checkpointing_same_output_and_gradients(name):
    m = _build(name, drop_path=0.0).train()
    x = _images(m)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks, if any, in both runs
        y = m(x)
        y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    y0, g0 = run()
    m.set_grad_checkpointing(True)
    y1, g1 = run()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}")


def _perturb_batchnorm(m: nn.Module) -> None:
    """Random BN statistics and affine parameters, so that folding them is really tested."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", TINY)
def test_tiny_fuse_gives_the_same_output(name):
    m = _build(name)
    _perturb_batchnorm(m)
    m.eval()
    x = _images(m)
    with torch.no_grad():
        y = m(x)
        fused = m.fuse()
        assert isinstance(fused, nn.Module)
        fused.eval()
        torch.testing.assert_close(fused(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_tiny_other_size_head_and_classifier(name):
    m = _build(name).eval()
    x = _images(m)
    with torch.no_grad():
        if m.other_size is not None:
            assert m.other_size != m.img_size
            y = m(_images(m, m.other_size))
            assert y.shape == (2, m.num_classes) and torch.isfinite(y).all()
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        assert feats.shape == (2, m.num_features)
        m.reset_classifier(5)
        assert m(x).shape == (2, 5)


@pytest.mark.parametrize("name", TINY)
def test_tiny_bad_input_raises(name):
    m = _build(name)
    with pytest.raises(FormersError):
        m(torch.randn(2, m.in_chans + 1, m.img_size, m.img_size))
    with pytest.raises(FormersError):
        m(torch.randn(m.in_chans, m.img_size, m.img_size))
