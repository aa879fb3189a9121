"""P65 MemoryFormer: the memory layer against a naive float64 reference (hash by hand, the paper's chunk weight
p = exp(sum|z|) / prod(e^z + e^-z) computed directly), its FLOPs against a counted nn.Linear, sign-flip hashing,
finite-difference gradients through p_k, and that memory layers / the MemoryBlock FFN learn."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import formers
from formers.nn.memory import MemoryFFN, MemoryLinear
from formers.registry import FormersError


def _away_from_zero(*shape, margin=0.05, dtype=torch.float64):
    """Gaussian entries with |x| >= margin, so that a small perturbation never flips a sign."""
    x = torch.randn(*shape, dtype=dtype)
    return torch.where(x.abs() < margin, torch.sign(x + 1e-12) * margin + x, x)


def _naive(layer: MemoryLinear, x: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and chunks: bits as a string, the weight by the paper's / the code's formula as written."""
    tau, tables = layer.code_len, layer.tables.detach().reshape(layer.num_tables, 2 ** layer.code_len, -1)
    out = []
    for row in x.reshape(-1, layer.in_features).tolist():
        y = torch.zeros(layer.out_features, dtype=torch.float64)
        for k in range(layer.num_tables):
            z = row[k * tau:(k + 1) * tau]
            h = int("".join("1" if v >= 0 else "0" for v in z), 2)
            if layer.score == "paper":
                p = math.exp(sum(abs(v) for v in z)) / math.prod(math.exp(v) + math.exp(-v) for v in z)
            else:
                p = sum(abs(v) for v in z) / math.prod(1 + math.exp(-2 * abs(v)) for v in z)
            y += p * tables[k, h]
        if layer.bias is not None:
            y += layer.bias.detach()
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("score", ["paper", "code"])
def test_output_matches_naive_reference_float64(score):
    layer = MemoryLinear(24, 5, code_len=6, score=score).double()
    x = torch.randn(2, 3, 24, dtype=torch.float64) * 1.5
    x[0, 0, 3] = 0.0  # an exact zero hashes to bit 1, as in the official torch path (>=)
    assert torch.allclose(layer(x), _naive(layer, x), atol=1e-10, rtol=0)


def test_paper_weight_is_the_softmax_probability_of_the_chosen_code():
    # p = exp(<z, sign z>) / sum_c exp(<z, c>) over all 2^tau codes c in {-1, 1}^tau
    layer = MemoryLinear(5, 1, code_len=5).double()
    z = torch.randn(5, dtype=torch.float64)
    codes = torch.tensor([[1.0 if (c >> (4 - i)) & 1 else -1.0 for i in range(5)] for c in range(32)],
                         dtype=torch.float64)
    probs = torch.softmax(codes @ z, dim=0)
    h = layer.codes(z).item()
    assert torch.allclose(layer.chunk_weights(z)[0], probs[h], atol=1e-12, rtol=0)
    assert probs[h] == probs.max()  # the hash picks the most probable code


def test_indices_in_range_and_flip_exactly_one_bit():
    tau = 8
    layer = MemoryLinear(64, 16, code_len=tau)
    x = torch.randn(50, 64)
    h = layer.codes(x)
    assert h.shape == (50, 8) and h.dtype == torch.long
    assert int(h.min()) >= 0 and int(h.max()) < 2 ** tau
    assert len(torch.unique(h)) > 100  # the hash actually spreads over the table
    for k, i in [(0, 0), (3, 5), (7, 7)]:
        x2 = x.clone()
        x2[:, k * tau + i] = -x2[:, k * tau + i]
        h2 = layer.codes(x2)
        others = [j for j in range(8) if j != k]
        assert torch.equal(h2[:, others], h[:, others])
        assert torch.all((h2[:, k] ^ h[:, k]) == 2 ** (tau - 1 - i))


@pytest.mark.parametrize("d_in,d_out,tau", [(512, 512, 8), (256, 1024, 8), (128, 128, 4)])
def test_flops_about_tau_times_fewer_than_linear(d_in, d_out, tau):
    x = torch.randn(3, d_in)
    linear = nn.Linear(d_in, d_out)
    with FlopCounterMode(display=False) as counter:
        linear(x)
    linear_macs = counter.get_total_flops() // 2 // x.shape[0]  # the counter reports 2 FLOPs per multiply-add
    assert linear_macs == d_in * d_out
    layer = formers.build("linear", "memory_linear", in_features=d_in, out_features=d_out, code_len=tau)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 0  # no dense matmul hides in the forward
    k = d_in // tau
    assert layer.flops() == k * d_out + d_in
    ratio = linear_macs / layer.flops()
    assert 0.85 * tau < ratio < tau


@pytest.mark.parametrize("score", ["paper", "code"])
def test_gradient_reaches_input_through_p_and_matches_finite_differences(score):
    layer = MemoryLinear(12, 3, code_len=4, score=score).double()
    x = _away_from_zero(2, 12).requires_grad_()
    w = torch.randn(2, 3, dtype=torch.float64)
    (layer(x) * w).sum().backward()
    assert x.grad.abs().min() > 0
    # central differences with a step far below the margin: no sign flips, so only p_k moves
    eps, num = 1e-6, torch.zeros_like(x)
    with torch.no_grad():
        for j in range(x.numel()):
            d = torch.zeros_like(x).view(-1)
            d[j] = eps
            d = d.view_as(x)
            assert torch.equal(layer.codes(x + d), layer.codes(x - d))
            num.view(-1)[j] = ((layer(x + d) - layer(x - d)) * w).sum() / (2 * eps)
    assert torch.allclose(x.grad, num, atol=1e-8, rtol=1e-6)
    # the tables get p_k * dL/dy at the rows that were hit, nothing elsewhere
    rows = (layer.codes(x) + layer.table_offsets).flatten().unique()
    hit = torch.zeros(layer.tables.shape[0], dtype=torch.bool)
    hit[rows] = True
    assert layer.tables.grad[~hit].abs().max() == 0 and layer.tables.grad[hit].abs().min() > 0


def test_bad_shapes_raise():
    with pytest.raises(FormersError, match="multiple of code_len"):
        MemoryLinear(10, 4, code_len=4)
    with pytest.raises(FormersError, match="score"):
        MemoryLinear(8, 4, score="cosine")
    with pytest.raises(FormersError, match="last dim"):
        MemoryLinear(8, 4, code_len=4)(torch.randn(2, 12))
    with pytest.raises(FormersError, match="multiple of code_len"):
        MemoryFFN(30, code_len=4)


def test_memory_linear_fits_a_random_linear_map():
    d_in, d_out = 16, 8
    target = torch.randn(d_in, d_out) / d_in ** 0.5
    x = torch.randn(512, d_in)
    y = x @ target
    layer = MemoryLinear(d_in, d_out, code_len=4)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    first = F.mse_loss(layer(x), y).item()
    for _ in range(300):
        loss = F.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the best function of the signs alone, sum_k W_k sign(z_k) E|z|, explains 2/pi of the variance of a linear map
    # of Gaussians; the weights p_k add magnitude information, and the fit lands near 0.25 of the start
    assert loss.item() < 0.5 * first


def test_memory_ffn_extra_bit_widths():
    ffn = formers.build("ffn", "memory_ffn", dim=32, code_len=4)
    first, second = ffn.layers
    assert (first.in_features, first.out_features, first.code_len, first.num_tables) == (32, 8 * 6, 4, 8)
    assert (second.in_features, second.out_features, second.code_len, second.num_tables) == (48, 32, 6, 8)
    assert isinstance(ffn.norm, nn.LayerNorm) and ffn.norm.normalized_shape == (48,)
    assert ffn.flops() == first.flops() + second.flops() == 8 * 48 + 32 + 8 * 32 + 48
    table = formers.build("ffn", {"name": "memory_ffn", "expand": "extra_table"}, dim=32, code_len=4)
    assert (table.layers[0].out_features, table.layers[1].num_tables, table.layers[1].code_len) == (64, 16, 4)


def test_lm_with_memory_ffn_learns():
    model = formers.create_model("lm", vocab=64, dim=32, depth=2, max_len=16,
                                 block={"mixer": {"name": "softmax", "heads": 4},
                                        "ffn": {"name": "memory_ffn", "code_len": 4}})
    mems = [m for m in model.modules() if isinstance(m, MemoryLinear)]
    assert len(mems) == 4
    with torch.no_grad():  # the model init reached the tables (N(0, 0.02)) and zeroed the biases
        assert all(float(m.bias.abs().max()) == 0 and 0.015 < float(m.tables.std()) < 0.025 for m in mems)
    ids = torch.randint(0, 64, (4, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(m.tables.grad.abs().sum() > 0 for m in mems)
    assert losses[-1] < losses[0] - 0.1
