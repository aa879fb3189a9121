"""P79 Primer: multi-dconv-head attention is softmax attention after a width-3 depthwise convolution of q, k, v;
with the identity tap it is exactly softmax attention, and it stays causal."""

import pytest
import torch

import formers


def pair(causal, **kw):
    mdha = formers.build("mixer", "mdha", dim=16, heads=4, causal=causal, **kw).double()
    plain = formers.build("mixer", "softmax", dim=16, heads=4, causal=causal, **kw).double()
    plain.load_state_dict({k: v for k, v in mdha.state_dict().items() if "conv" not in k})
    return mdha, plain


@pytest.mark.parametrize("causal", [False, True])
def test_identity_taps_equal_softmax_attention(causal):
    mdha, plain = pair(causal)
    with torch.no_grad():
        for w in (mdha.q_conv, mdha.kv_conv):
            w.zero_()
            w[0] = 1.0  # (1, 0, 0): the current position only
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    rope = formers.build("position", "rope", dim=16)
    torch.testing.assert_close(mdha(x), plain(x), atol=1e-12, rtol=1e-12)
    # padded queries differ (mdha zeroes padded inputs before its convolution); every real token agrees
    torch.testing.assert_close(mdha(x, mask=mask, positions=rope)[mask], plain(x, mask=mask, positions=rope)[mask],
                               atol=1e-12, rtol=1e-12)
    mdha_default, plain2 = pair(causal)  # the default taps (0.5, 1/6, 1/6) do change the output
    assert not torch.allclose(mdha_default(x), plain2(x))


def test_causal_taps_look_back_only():
    mdha, _ = pair(True)
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    assert torch.equal(mdha(x)[:, :6], mdha(x2)[:, :6])
    # the value at t depends on inputs t-1 and t-2 through the convolution even with one-hot attention on t
    x3 = x.clone()
    x3[:, 4] += 1.0
    y, y3 = mdha(x), mdha(x3)
    assert torch.equal(y[:, :4], y3[:, :4]) and not torch.allclose(y[:, 4:7], y3[:, 4:7])


def test_init_and_parameter_count():
    mdha, plain = pair(True)
    for w in (mdha.q_conv, mdha.kv_conv):
        torch.testing.assert_close(w[:, 0], torch.tensor([0.5, 1 / 6, 1 / 6], dtype=torch.float64))
    extra = sum(p.numel() for p in mdha.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 3 * 3 * 16  # three taps for each of q, k, v channels (heads * head_dim = 16)


def test_lm_generation_cached_equals_uncached():
    model = formers.create_model("lm", vocab=30, dim=32, depth=2, max_len=64,
                                 block={"mixer": {"name": "mdha", "heads": 4}}).eval()
    prompt = torch.randint(0, 30, (2, 4))
    assert torch.equal(model.generate(prompt, 12, greedy=True), model.generate(prompt, 12, greedy=True,
                                                                               use_cache=False))
