"""P77 Peri-LN: at init the residual stream's variance grows about linearly with depth and does not depend on the
weight scale, while Pre-LN's growth is set by the weight scale.

Claim from P77 "Peri-LN: Revisiting Layer Normalization in the Transformer Architecture": x_{l+1} = x_l +
Norm_out(F(Norm_in(x_l))); with unit gains every sublayer adds an update of unit variance, so Var(x_l) ~ Var(x_0) + c*l
whatever the weights, whereas Pre-LN adds F(Norm(x)), whose size scales with the weights (~ std^4 for two linears).
"""

import functools

import numpy as np
import torch

from formers.blocks import Block

DEPTH, DIM = 24, 64



@functools.cache  # each (placement, std) is computed once across tests
def _variances(placement: str, std: float) -> tuple[np.ndarray, np.ndarray]:
    """Var(x_l) and Var(x_l - x_0), l = 0..DEPTH, of a fixed input through DEPTH blocks whose linear weights are
    N(0, std^2), biases 0, norm gains 1 (LayerNorm). Same seed for every call: only the placement and the scale
    differ. Var(x_l - x_0) is the variance the blocks added, free of the input's own."""
    torch.manual_seed(0)
    blocks = [Block(DIM, causal=True, spec={"placement": placement, "mixer": {"name": "softmax", "heads": 4}},
                    layer=i).double() for i in range(DEPTH)]
    for block in blocks:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.LayerNorm):
                assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())  # unit gains, as the claim says
    x0 = torch.randn(2, 32, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, var, added = x0, [x0.var().item()], [0.0]
    with torch.no_grad():
        for block in blocks:
            x = block(x)
            var.append(x.var().item())
            added.append((x - x0).var().item())
    return np.array(var), np.array(added)


def _line(v: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and R^2 of v against the layer index."""
    layer = np.arange(len(v), dtype=np.float64)
    slope, icpt = np.polyfit(layer, v, 1)
    resid = v - (slope * layer + icpt)
    return slope, 1.0 - (resid ** 2).sum() / ((v - v.mean()) ** 2).sum()


STDS = (0.02, 0.04, 0.08)  # the GPT-2 init std, scaled by 2 and 4


def test_periln_variance_grows_linearly_independent_of_weight_scale():
    peri = {s: _variances("peri", s)[0] for s in STDS}
    slopes = []
    for s, v in peri.items():
        slope, r2 = _line(v)
        assert r2 > 0.97, (s, r2)
        # two sublayers per block, each adding a (per-token) unit-variance update: slope about 2 per layer
        assert 1.2 < slope < 2.5, (s, slope)
        slopes.append(slope)
    assert max(slopes) / min(slopes) < 1.25, slopes  # the weight scale barely matters
    final = [peri[s][-1] for s in STDS]
    assert max(final) / min(final) < 1.25, final


def test_preln_variance_growth_follows_weight_scale():
    growth = [_variances("pre", s)[1][-1] for s in STDS]  # Var(x_L - x_0)
    assert all(g > 0 for g in growth), growth
    # each doubling of the std multiplies the update variance by ~16 (two stacked linears); demand a clear factor 4
    assert growth[1] > 4 * growth[0] and growth[2] > 4 * growth[1], growth
    # Pre-LN's added variance follows the scale (x16 or more from std x4) while Peri-LN's stays put
    peri = [_variances("peri", s)[1][-1] for s in (STDS[0], STDS[2])]
    assert growth[2] / growth[0] > 16 and 0.8 < peri[1] / peri[0] < 1.25, (growth, peri)
