"""Norms against their formulas written out here (float64)."""

import torch

import formers


def test_rmsnorm_matches_formula():
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 3 + 1
    norm = formers.build("norm", "rmsnorm", dim=16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, dtype=torch.float64) + 0.5)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref, atol=1e-12, rtol=1e-12)


def test_crmsnorm_is_rmsnorm_of_the_zero_mean_vector():
    full = torch.randn(4, 9, dtype=torch.float64)
    full = full - full.mean(-1, keepdim=True)  # zero-mean 9-vectors, stored compressed as their first 8 entries
    rms = formers.build("norm", "rmsnorm", dim=9).double()
    crms = formers.build("norm", "crmsnorm", dim=8).double()
    torch.testing.assert_close(crms(full[:, :8]), rms(full)[:, :8], atol=1e-12, rtol=1e-12)
