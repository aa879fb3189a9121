"""P24 ModuleFormer: stick-breaking attention weights equal a naive double loop, rows sum to <= 1, and the nearest
keys take their share first."""

import pytest
import torch

import formers


def naive_weights(s):
    """s (N, N) scores -> A (N, N): A_ij = sigmoid(s_ij) prod_{j<m<=i} (1 - sigmoid(s_im)), j <= i."""
    n = s.shape[0]
    a = torch.zeros(n, n, dtype=s.dtype)
    for i in range(n):
        for j in range(i + 1):
            w = torch.sigmoid(s[i, j])
            for m in range(j + 1, i + 1):
                w = w * (1 - torch.sigmoid(s[i, m]))
            a[i, j] = w
    return a


def weights(s):
    m = formers.build("mixer", "stickbreaking", dim=8, heads=2, causal=True)
    n = s.shape[-1]
    return m.probs(s[None, None], torch.ones(n, n, dtype=torch.bool).tril()[None, None])[0, 0]


def test_weights_equal_naive_double_loop_and_rows_sum_at_most_one():
    s = torch.randn(9, 9, dtype=torch.float64) * 3
    a = weights(s)
    torch.testing.assert_close(a, naive_weights(s), atol=1e-12, rtol=1e-12)
    assert (a.triu(1) == 0).all() and (a >= 0).all()
    assert (a.sum(-1) <= 1).all()
    # the stick left over after row i is the product of all (1 - beta_ij), j <= i
    rest = torch.stack([torch.prod(1 - torch.sigmoid(s[i, : i + 1])) for i in range(9)])
    torch.testing.assert_close(a.sum(-1), 1 - rest, atol=1e-12, rtol=1e-12)


def test_nearest_key_takes_the_stick_first():
    s = torch.full((6, 6), 40.0, dtype=torch.float64)  # every beta ~ 1: the diagonal (current token) takes it all
    torch.testing.assert_close(weights(s), torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    s = torch.full((6, 6), -40.0, dtype=torch.float64)  # every beta ~ 0: nothing is taken
    assert weights(s).abs().max() < 1e-15


def test_lm_generation_cached_equals_uncached_and_encoder_is_refused():
    model = formers.create_model("lm", vocab=30, dim=32, depth=2, max_len=64,
                                 block={"mixer": {"name": "stickbreaking", "heads": 4}}).eval()
    prompt = torch.randint(0, 30, (2, 4))
    assert torch.equal(model.generate(prompt, 12, greedy=True), model.generate(prompt, 12, greedy=True,
                                                                               use_cache=False))
    with pytest.raises(formers.FormersError, match="causal"):
        formers.create_model("encoder", vocab=30, dim=32, depth=1, max_len=64,
                             block={"mixer": {"name": "stickbreaking", "heads": 4}})
