"""The step oracles of benchmarks/step_oracles.py (issue 10): each one computes the model without exactly the work it
names (checked against the model built without it), and one that no longer removes anything fails before timing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from formers.bench import oracles, speed
from formers.bench.harness import section_is_current
from formers.nn.ffn import MLP
from formers.registry import FormersError

SMALL = dict(batch=1, seq=256, vocab=32, peer=False, dim=32, depth=2)  # 256 tokens: the block-causal kernel's range


def _reference(base: nn.Module, *, act: bool = True, fc1_bias: bool = True, norms: bool = True) -> nn.Module:
    """The base LM rebuilt by hand without GELU, fc1's bias or its LayerNorms (module edits, no oracle code)."""
    m = copy.deepcopy(base)
    for mod in list(m.modules()):
        if isinstance(mod, MLP):
            if not act:
                mod.act = nn.Identity()
            if not fc1_bias:
                mod.fc1.bias = None
        for name, child in list(mod.named_children()):
            if not norms and isinstance(child, nn.LayerNorm):
                setattr(mod, name, nn.Identity())
    return m


@pytest.fixture(scope="module")
def sides():
    return oracles.build_sides(list(oracles.ORACLES), **SMALL)


@pytest.mark.parametrize("name,edits", [("gelu", dict(act=False)), ("gelu_bias", dict(act=False, fc1_bias=False)),
                                        ("layernorm", dict(norms=False)),
                                        ("fusible", dict(act=False, fc1_bias=False, norms=False))])
def test_oracle_is_the_model_without_that_work(sides, name, edits):
    base = sides["formers"].model
    ref = _reference(base, **edits)
    x = sides["formers"].x
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(ref(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1))
        full = torch.nn.functional.cross_entropy(base(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1))
    s = oracles.OracleStep(oracles.ORACLES[name], copy.deepcopy(base), 1, 256, 32)  # not stepped: base's weights
    s.step.x = x
    if s.oracle.gelu:
        with oracles._no_gelu():
            got = s.step.loss().detach()
    else:
        got = s.step.loss().detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - full).abs() > 1e-4  # and it is not the full model


def test_optimizer_oracle_makes_gradients_but_moves_no_weight():
    s = oracles.build_sides(["optimizer"], **SMALL)
    before = {k: v.clone() for k, v in s["optimizer"].step.model.state_dict().items()}
    s["optimizer"]()
    assert all(torch.equal(before[k], v) for k, v in s["optimizer"].step.model.state_dict().items())
    b0 = {k: v.clone() for k, v in s["formers"].model.state_dict().items()}
    s["formers"]()
    assert any(not torch.equal(b0[k], v) for k, v in s["formers"].model.state_dict().items())


def test_attention_oracle_leaves_queries_and_keys_without_gradient():
    s = oracles.build_sides(["attention"], **SMALL)
    for name, step in (("attention", s["attention"].step), ("formers", s["formers"])):
        step.opt.zero_grad(set_to_none=True)
        if name == "attention":
            with oracles._no_attention():
                step.loss().backward()
        else:
            step.loss().backward()
        q = step.model.stack.blocks[0].attn.fn.q.weight.grad
        if name == "attention":
            assert q is None or not q.any()  # y = v: no path from the queries to the loss
        else:
            assert q is not None and q.abs().sum() > 0


def test_an_oracle_that_removes_nothing_fails_before_timing(monkeypatch):
    monkeypatch.setattr(MLP, "_gelu_linear", lambda self: False)  # the fused GELU node no longer used
    with pytest.raises(FormersError, match="oracle 'gelu' did not remove"):
        oracles.build_sides(["gelu"], **SMALL)
    with pytest.raises(FormersError, match="oracle 'attention' did not remove"):  # 64 tokens: SDPA, not the kernel
        oracles.build_sides(["attention"], **{**SMALL, "seq": 64})


def test_bad_arguments_are_refused_before_timing(monkeypatch):
    monkeypatch.setattr(oracles, "meta", lambda cmd: pytest.fail("timed before checking the arguments"))
    with pytest.raises(FormersError, match="must be a .json file"):
        oracles.main(["--out", "results/oracles.csv"])
    with pytest.raises(FormersError, match="unknown oracle 'gleu'"):
        oracles.main(["--oracles", "gleu"])


def test_the_benchmark_lm_is_the_speed_rows_model():
    s = oracles.build_sides([], batch=1, seq=speed.SEQ, vocab=speed.VOCAB, peer=False)
    m = s["formers"].model
    assert speed.n_params(m) == speed.n_params(speed.formers_lm())


def test_readme_table_is_generated_from_the_committed_results():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = json.loads((root / "results" / "step_oracles.json").read_text())
    body = oracles.readme_section(res)
    assert section_is_current(root / "README.md", oracles.README_START, oracles.README_END, body), \
        "README is stale: run `python benchmarks/step_oracles.py` (it rewrites it)"
    base, *rows = res["rows"]
    assert len(base["runs_ms"]) == len(base["peer_runs_ms"]) == res["meta"]["reps"] >= 7
    for r in rows:  # each oracle's figures follow from its own paired runs
        b, o = r["base_runs_ms"], r["runs_ms"]
        assert len(b) == len(o) == res["meta"]["reps"]
        diffs = sorted(x - y for x, y in zip(b, o))
        assert r["saved_ms"] == pytest.approx(diffs[len(diffs) // 2], abs=0.02)
        assert r["ratio_vs_peer"] == pytest.approx(base["ratio_vs_peer"] * r["speedup"], abs=2e-3)
