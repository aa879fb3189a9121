"""P06 SLAB: the simplified linear attention (SLA) half of the paper (PRepBN belongs to the norms).

Claims checked: SLA's linear order Q'(K'^T V) equals its quadratic order (Q'K'^T)V (claim b; 1e-10 in float64
here, 1e-5 in the fact sheet); the module is the paper's equation with its defaults (ReLU kernel, K + P with a
zero-initialised P, 1e-6 in the normaliser, a 5-tap depthwise conv over V whose Dh channels are shared by all
heads); its cost is linear in N (claim d, counted in FLOPs rather than timed on a shared CPU).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import formers


def sla(causal=False, dim=32, heads=4, max_len=512, **kw):
    return formers.build("mixer", {"name": "sla", "heads": heads, **kw}, dim=dim, causal=causal, max_len=max_len)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_order_equals_quadratic_order(causal):
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    torch.manual_seed(0)
    lin = sla(causal, order="linear", chunk_size=16).double()
    torch.manual_seed(0)
    quad = sla(causal, order="quadratic").double()
    with torch.no_grad():
        lin.pos.normal_()
        quad.pos.copy_(lin.pos)
    torch.testing.assert_close(lin(x), quad(x), atol=1e-10, rtol=1e-10)


def test_paper_equation_and_defaults():
    m = sla().double()
    assert m.kernel_size == 5 and m.eps == 1e-6 and m.order == "auto"
    assert m.pos.shape == (512, 32) and (m.pos == 0).all()  # P over the full width, zeros at init
    assert m.dwc.weight.shape == (8, 1, 5)  # depthwise over Dh = 8 channels, one conv for all heads
    with torch.no_grad():
        m.pos.normal_()
    B, N, H, Dh = 2, 24, 4, 8
    x = torch.randn(B, N, 32, dtype=torch.float64)
    q = (x @ m.q.weight.T).view(B, N, H, Dh).transpose(1, 2)
    k, v = (x @ m.kv.weight.T).view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)
    k = k + m.pos[:N].view(N, H, Dh).transpose(0, 1)  # K + P
    qr, kr = F.relu(q), F.relu(k)
    o = (qr @ kr.transpose(-1, -2)) @ v / (qr @ kr.sum(2, keepdim=True).transpose(-1, -2) + 1e-6)
    dwc = F.conv1d(v.reshape(B * H, N, Dh).transpose(1, 2), m.dwc.weight, padding=2, groups=Dh)  # (B*H, Dh, N)
    o = o + dwc.transpose(1, 2).reshape(B, H, N, Dh)
    ref = o.transpose(1, 2).reshape(B, N, 32) @ m.out.weight.T
    torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=1e-10)


def flops(m, n):
    x = torch.randn(1, n, 32)
    with FlopCounterMode(display=False) as counter:
        m(x).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("causal", [False, True])
def test_cost_is_linear_in_length(causal):
    lin = sla(causal, max_len=4096)  # auto: the linear order at these lengths
    ratio = flops(lin, 2048) / flops(lin, 1024)
    assert 1.9 < ratio < 2.1, ratio
    quad = sla(causal, max_len=4096, order="quadratic")
    assert flops(quad, 2048) / flops(quad, 1024) > 3.0  # the quadratic order, for contrast
