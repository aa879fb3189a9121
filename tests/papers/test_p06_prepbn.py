"""P06 RepBN / PRepBN: the norms against naive formulas, the progressive schedule driven by the step hook, folding
into the following linear layers, and training inside an LM.

Facts: P06 "SLAB" and its official code xinghaochen/SLAB classification/models/prepbn.py (RepBN: BN(x) + alpha x,
alpha init 1; LinearNorm: lam = r0 * iter_left / step after `warm` LN-only steps; eval uses RepBN only).
"""

import json

import pytest
import torch

import formers
from formers.nn.batchnorm import PRepBN, RepBN, fold_repbn


def _naive_bn(x, mean, var, gamma, beta, alpha, eps):
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta + alpha * x


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN/LN affine parameters, running statistics and alpha, so that every term of the fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.01 + 0.001)
            if isinstance(m, RepBN):
                m.alpha.fill_(0.7)


def test_repbn_matches_naive_in_train_and_eval():
    torch.manual_seed(0)
    dim, eps = 6, 1e-5
    norm = RepBN(dim).double()
    assert norm.alpha.item() == 1.0  # P06 init
    _randomise(norm)
    x = torch.randn(3, 5, dim, dtype=torch.float64, requires_grad=True)
    bn = norm.bn
    gamma, beta, alpha = bn.weight.detach(), bn.bias.detach(), norm.alpha.detach()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    # training: statistics over batch and tokens (biased variance), running stats updated with the unbiased one
    flat = x.detach().reshape(-1, dim)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    y = norm(x)
    ref_fn = lambda t: _naive_bn(t, t.reshape(-1, dim).mean(0), t.reshape(-1, dim).var(0, unbiased=False),  # noqa: E731
                                 gamma, beta, alpha, eps)
    torch.testing.assert_close(y, ref_fn(x), atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref_fn(x) * w).sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    n = flat.shape[0]
    torch.testing.assert_close(bn.running_mean, 0.9 * rm0 + 0.1 * mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 * rv0 + 0.1 * var * n / (n - 1), atol=1e-12, rtol=1e-12)
    # eval: running statistics, each token on its own; equal to the affine map that fold uses
    norm.eval()
    y = norm(x)
    ref = _naive_bn(x, bn.running_mean, bn.running_var, gamma, beta, alpha, eps)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    a, c = norm.affine()
    torch.testing.assert_close(y, a * x + c, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(norm(x[:1, 2:3]), y[:1, 2:3], atol=1e-12, rtol=1e-12)  # per token in eval


def test_prepbn_schedule_follows_set_step():
    model = formers.create_model("lm", vocab=11, dim=8, depth=2, max_len=8,
                                 block={"norm": {"name": "prepbn", "step": 10, "warm": 4},
                                        "mixer": {"name": "softmax", "heads": 2}}).double()
    norms = [m for m in model.modules() if isinstance(m, PRepBN)]
    assert len(norms) == 5  # two per block and the final norm
    expected = {0: 1.0, 3: 1.0, 4: 1.0, 5: 0.9, 9: 0.5, 13: 0.1, 14: 0.0, 100: 0.0}
    for step, lam in expected.items():
        formers.set_step(model, step)
        assert all(n.lam == pytest.approx(lam, abs=1e-12) for n in norms), (step, [n.lam for n in norms])

    norm = norms[0]
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    ln = torch.nn.functional.layer_norm(x, (8,), norm.ln.weight, norm.ln.bias, norm.ln.eps)
    # warm-up: LayerNorm only, and the BN statistics are not touched
    formers.set_step(model, 2)
    torch.testing.assert_close(norm(x), ln, atol=1e-12, rtol=1e-12)
    assert norm.repbn.bn.num_batches_tracked.item() == 0
    # mixing: lam LN + (1 - lam) RepBN (RepBN in training mode: batch statistics)
    formers.set_step(model, 9)
    flat = x.reshape(-1, 8)
    rep = _naive_bn(x, flat.mean(0), flat.var(0, unbiased=False), norm.repbn.bn.weight, norm.repbn.bn.bias,
                    norm.repbn.alpha, norm.repbn.bn.eps)
    torch.testing.assert_close(norm(x), 0.5 * ln + 0.5 * rep, atol=1e-12, rtol=1e-12)
    # eval: RepBN only, whatever lam is
    norm.eval()
    assert norm.lam == 0.5
    bn = norm.repbn.bn
    ref = _naive_bn(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, norm.repbn.alpha, bn.eps)
    torch.testing.assert_close(norm(x), ref, atol=1e-12, rtol=1e-12)


def test_prepbn_rejects_bad_options():
    with pytest.raises(formers.FormersError, match="step > 0"):
        formers.build("norm", {"name": "prepbn", "step": 0}, dim=4)


@pytest.mark.parametrize("placement,norm,ffn", [("pre", "repbn", "mlp"), ("pre", "prepbn", "glu"),
                                                ("lns", "repbn", "mlp")])
def test_fold_matches_unfolded(placement, norm, ffn):
    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=19, dim=16, depth=2, max_len=12,
                                 block={"placement": placement, "norm": norm, "ffn": ffn,
                                        "mixer": {"name": "softmax", "heads": 4}})
    _randomise(model)
    idx = torch.randint(0, 19, (2, 12))
    with pytest.raises(formers.FormersError, match="eval"):
        fold_repbn(model)
    model.eval()
    with torch.no_grad():
        ref = model(idx)
        assert fold_repbn(model) is model
        out = model(idx)
    # every sublayer norm is gone, the readers gained the shift as a bias
    for block in model.stack.blocks:
        assert isinstance(block.attn.norm, torch.nn.Identity) and isinstance(block.ffn.norm, torch.nn.Identity)
        assert block.attn.fn.q.bias is not None and block.attn.fn.kv.bias is not None
    assert not any(isinstance(m, (RepBN, PRepBN)) for m in model.stack.modules())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - ref).abs().max() < 1e-5 < ref.abs().max()


def test_fold_leaves_other_placements_alone():
    model = formers.create_model("encoder", vocab=19, dim=16, depth=1, max_len=8,
                                 block={"placement": "peri", "norm": "repbn",
                                        "mixer": {"name": "softmax", "heads": 4}}).eval()
    _randomise(model)
    idx = torch.randint(0, 19, (2, 8))
    with torch.no_grad():
        ref = model(idx)
        fold_repbn(model)
        torch.testing.assert_close(model(idx), ref, atol=0, rtol=0)
    assert isinstance(model.stack.blocks[0].attn.norm_in, RepBN)


def test_prepbn_trains_in_lm_driven_by_trainer(tmp_path, monkeypatch):
    seen: list[int] = []
    original = PRepBN.set_step

    def spy(self, step):
        seen.append(step)
        original(self, step)

    monkeypatch.setattr(PRepBN, "set_step", spy)
    result = formers.fit({
        "name": "prepbn",
        "model": {"name": "lm", "dim": 32, "depth": 2, "block": {"norm": {"name": "prepbn", "step": 5, "warm": 2},
                                                                  "mixer": {"name": "softmax", "heads": 4}}},
        "task": {"name": "lm_bytes", "corpus": "stdlib", "seq_len": 32, "eval_limit": 64},
        "train": {"steps": 10, "batch_size": 8, "lr": 3e-3, "eval_every": 1000, "ckpt_every": 1000, "threads": 1,
                  "progress": False, "sample": False, "schedule": {"name": "constant", "warmup": 1}, "log_every": 1},
    }, out=tmp_path)
    assert sorted(set(seen)) == list(range(10))  # the trainer's hook reached the norms at every step
    rows = [json.loads(line) for line in open(f"{result['run_dir']}/metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3, losses
