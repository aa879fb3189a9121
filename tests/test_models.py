"""The uniform model API, checked for every registered model (generated from the registry)."""

import pytest
import torch

import formers
from formers.registry import entries

SMALL = {"vocab": 16, "dim": 32, "depth": 2, "max_len": 24}


@pytest.mark.parametrize("name", [e.name for e in entries("model") if "vocab" in e.options()])
def test_uniform_method_set(name):
    """Every sequence model (token ids in); vision models have their own generated tests."""
    model = formers.create_model(name, **SMALL).double()
    ids = torch.randint(0, 16, (2, 10))
    out = model(ids)
    feats = model.forward_features(ids)
    torch.testing.assert_close(model.forward_head(feats), out)
    assert model.forward_head(feats, pre_logits=True).shape[-1] == 32
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) < model.num_params()
    model.reset_classifier(5)
    assert model(ids).shape[-1] == 5

    # gradient checkpointing changes memory, not results
    model.train()
    model.zero_grad()
    model(ids).sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.set_grad_checkpointing(True)
    model.zero_grad()
    model(ids).sum().backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-12, rtol=1e-12)


def test_encoder_pooling_and_token_level():
    mean = formers.create_model("encoder", **SMALL, pool="mean", num_classes=3).double()
    ids = torch.randint(0, 16, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    feats = mean.forward_features(ids, mask=mask)
    pooled = mean.forward_head(feats, pre_logits=True, mask=mask)
    torch.testing.assert_close(pooled[0], feats[0, :5].mean(0))
    # padded tokens do not change a masked sequence's prediction
    ids2 = ids.clone()
    ids2[0, 5:] = (ids2[0, 5:] + 1) % 16
    torch.testing.assert_close(mean(ids, mask=mask)[0], mean(ids2, mask=mask)[0])
    tok = formers.create_model("encoder", **SMALL, level="token", num_classes=4)
    assert tok(ids).shape == (2, 8, 4)
    cls = formers.create_model("encoder", **SMALL, pool="cls", num_classes=3)
    assert cls(ids).shape == (2, 3) and cls.forward_features(ids).shape == (2, 9, 32)


def test_encoder_is_bidirectional():
    enc = formers.create_model("encoder", **SMALL).double()
    ids = torch.randint(0, 16, (1, 10))
    ids2 = ids.clone()
    ids2[0, -1] = (ids2[0, -1] + 1) % 16
    a, b = enc.forward_features(ids), enc.forward_features(ids2)
    assert not torch.allclose(a[:, 1], b[:, 1])  # early positions see the last token


def test_sampling_filters():
    from formers.models.lm import sample
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample(logits, greedy=True).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # top_p=0.6: softmax = [.032, .087, .237, .644] -> only token 3 is needed to reach 0.6
    draws = {sample(logits, top_p=0.6, generator=g).item() for _ in range(100)}
    assert draws == {3}
    draws = {sample(logits, top_p=0.8, generator=g).item() for _ in range(300)}
    assert draws == {2, 3}
