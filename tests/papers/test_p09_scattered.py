"""P09 ScatterFormer: scattered linear attention over variable-length windows of one packed sequence.

Claim checked: the segment-wise form (segment sums over the packed tokens, no padding) equals a per-window loop
over a padded batch, for ragged windows of 1..200 tokens (1e-10 in float64 here, 1e-5 in the fact sheet), values
and gradients; chunk boundaries may cut windows anywhere; cost is linear in the token count (FLOPs).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import formers
from formers.nn.position import RotaryPosition
from formers.registry import FormersError

DIM, HEADS = 16, 2


def scattered(**kw):
    return formers.build("mixer", {"name": "scattered", "heads": HEADS, **kw}, dim=DIM).double()


def per_window_reference(m, x, seqlens, mask=None):
    """Loop over windows: pad them into a batch, ReLU linear attention per window and head, then unpad."""
    H, Dh = m.heads, m.head_dim
    sizes = seqlens.diff().tolist()
    Lmax = max(sizes)
    out = torch.zeros(x.shape[1], DIM, dtype=x.dtype)
    for a, n in zip(seqlens[:-1].tolist(), sizes):
        if n == 0:
            continue
        xw = torch.zeros(Lmax, DIM, dtype=x.dtype)
        xw[:n] = x[0, a:a + n]
        real = torch.zeros(Lmax, dtype=torch.bool)
        real[:n] = True if mask is None else mask[0, a:a + n]
        q = (xw @ m.q.weight.T).view(Lmax, H, Dh)
        k, v = (xw @ m.kv.weight.T).view(Lmax, 2, H, Dh).unbind(1)
        y = torch.zeros(Lmax, H, Dh, dtype=x.dtype)
        for h in range(H):
            qr, kr = F.relu(q[:, h]), F.relu(k[:, h]) * real[:, None]  # padding: no key weight
            kv = kr.T @ v[:, h]  # (F, Dv): KV_w
            s = kr.sum(0)  # s_w
            y[:, h] = (qr @ kv) / (qr @ s + 1e-6)[:, None]
        out[a:a + n] = y[:n].reshape(n, H * Dh) @ m.out.weight.T
    return out[None]


def ragged(sizes):
    return torch.tensor([0] + sizes).cumsum(0)


SIZES = [1, 37, 200, 5, 0, 64, 2, 113]


def test_segment_sums_equal_the_padded_per_window_loop():
    torch.manual_seed(0)
    m = scattered(chunk_size=50)  # chunks cut windows at arbitrary places
    seqlens = ragged(SIZES)
    x = torch.randn(1, int(seqlens[-1]), DIM, dtype=torch.float64, requires_grad=True)
    y = m(x, seqlens=seqlens)
    x2 = x.detach().clone().requires_grad_(True)
    ref = per_window_reference(m, x2, seqlens)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    (gr,) = torch.autograd.grad((ref * g).sum(), x2)
    torch.testing.assert_close(gx, gr, atol=1e-10, rtol=1e-10)


def test_chunk_size_does_not_change_the_result():
    seqlens = ragged([3, 9, 1, 20])
    x = torch.randn(1, 33, DIM, dtype=torch.float64)
    torch.manual_seed(1)
    a = scattered(chunk_size=4)(x, seqlens=seqlens)
    torch.manual_seed(1)
    b = scattered(chunk_size=1000)(x, seqlens=seqlens)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_windows_do_not_see_each_other_and_masks_hold():
    m = scattered(chunk_size=8)
    seqlens = ragged([6, 10, 4])
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 6:16] = torch.randn(10, DIM, dtype=torch.float64)  # change the middle window only
    a, b = m(x, seqlens=seqlens), m(x2, seqlens=seqlens)
    assert torch.equal(a[0, :6], b[0, :6]) and torch.equal(a[0, 16:], b[0, 16:])
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 12:16] = False
    torch.testing.assert_close(m(x, seqlens=seqlens, mask=mask), per_window_reference(m, x, seqlens, mask),
                               atol=1e-10, rtol=1e-10)


def test_one_window_without_seqlens_and_rotary_positions_per_window():
    m = scattered()
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x), m(x, seqlens=torch.tensor([0, 12])), atol=1e-12, rtol=1e-12)
    rope = RotaryPosition(DIM)
    seqlens = ragged([5, 7])
    packed = m(x, seqlens=seqlens, positions=rope)
    alone = torch.cat([m(x[:, :5], positions=rope), m(x[:, 5:], positions=rope)], 1)  # each window from 0
    torch.testing.assert_close(packed, alone, atol=1e-12, rtol=1e-12)


def test_bad_seqlens_raise():
    m = scattered()
    x = torch.randn(1, 10, DIM, dtype=torch.float64)
    for bad in (torch.tensor([0, 4, 9]), torch.tensor([1, 10]), torch.tensor([0, 6, 4, 10]), torch.tensor([0.0, 10.0])):
        with pytest.raises(FormersError, match="seqlens"):
            m(x, seqlens=bad)
    with pytest.raises(FormersError, match="batch size 1"):
        m(torch.randn(2, 10, DIM, dtype=torch.float64), seqlens=torch.tensor([0, 10]))


def test_cost_is_linear_in_token_count():
    m = scattered()

    def flops(n_windows):
        seqlens = ragged([30] * n_windows)
        x = torch.randn(1, 30 * n_windows, DIM, dtype=torch.float64)
        with FlopCounterMode(display=False) as counter:
            m(x, seqlens=seqlens).sum().backward()
        return counter.get_total_flops()

    ratio = flops(40) / flops(20)
    assert 1.95 < ratio < 2.05, ratio


def test_in_an_encoder():
    model = formers.create_model("encoder", vocab=20, dim=32, depth=2, max_len=32,
                                 block={"mixer": {"name": "scattered", "heads": 4}})
    ids = torch.randint(0, 20, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = False
    out = model(ids, mask=mask)
    assert torch.isfinite(out).all()
    with pytest.raises(FormersError, match="bidirectional"):
        formers.create_model("lm", vocab=20, dim=32, depth=1, block={"mixer": {"name": "scattered"}})
