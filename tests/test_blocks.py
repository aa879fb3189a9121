"""Placements against their formulas, per-layer overrides, and a short training run for every placement."""

import json

import pytest
import torch

import formers
from formers.blocks import Block, layer_specs, parse_layers
from formers.registry import entries


def test_placements_match_formulas():
    dim = 8
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    for name in ("pre", "post", "peri", "sandwich"):
        block = Block(dim, causal=True, spec={"placement": name, "ffn": "none", "norm": "rmsnorm",
                                              "mixer": {"name": "softmax", "heads": 2}}).double()
        with torch.no_grad():
            for p in block.parameters():  # non-trivial norm gains so that a swapped norm would show
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        wrap = block.attn
        f = wrap.fn
        rms = lambda n, t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight  # noqa: E731
        if name == "pre":
            ref = x + f(rms(wrap.norm, x))
        elif name == "post":
            ref = rms(wrap.norm, x + f(x))
        else:
            ref = x + rms(wrap.norm_out, f(rms(wrap.norm_in, x)))
        torch.testing.assert_close(block(x), ref, atol=1e-12, rtol=1e-12)


def test_final_norm_follows_placement():
    assert not isinstance(formers.create_model("lm", dim=16, depth=1, block={"placement": "post"}).norm,
                          formers.get("norm", "layernorm").obj)
    assert isinstance(formers.create_model("lm", dim=16, depth=1, block={"placement": "peri"}).norm,
                      formers.get("norm", "layernorm").obj)


def test_layer_overrides():
    model = formers.create_model("lm", vocab=20, dim=32, depth=4,
                                 block={"mixer": {"name": "softmax", "heads": 4}, "norm": "rmsnorm"},
                                 layers={"0-1": {"mixer": {"heads": 2}}, "3": {"ffn": {"name": "glu"}}})
    heads = [b.attn.fn.heads for b in model.stack.blocks]
    assert heads == [2, 2, 4, 4]
    assert type(model.stack.blocks[3].ffn.fn).__name__ == "GLU"
    assert type(model.stack.blocks[2].ffn.fn).__name__ == "MLP"
    assert all(type(b.attn.norm).__name__ == "RMSNorm" for b in model.stack.blocks)


def test_layer_override_errors():
    with pytest.raises(formers.FormersError, match="outside 0..3"):
        parse_layers({"2-4": {}}, 4)
    with pytest.raises(formers.FormersError, match="bad layer key"):
        parse_layers({"a": {}}, 4)
    specs = layer_specs({"mixer": "softmax"}, {"1": {"mixer": {"name": "softmax", "kv_heads": 1}}}, 2)
    assert specs[1]["mixer"] == {"name": "softmax", "kv_heads": 1}


@pytest.mark.parametrize("placement", sorted({e.name for e in entries("placement")}))
def test_every_placement_trains(placement, tmp_path):
    torch.manual_seed(0)
    result = formers.fit({
        "name": f"p_{placement}",
        "model": {"name": "lm", "dim": 48, "depth": 2, "block": {"placement": placement}},
        "task": {"name": "lm_bytes", "corpus": "stdlib", "seq_len": 48, "eval_limit": 512},
        "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "eval_every": 1000, "ckpt_every": 1000,
                  "progress": False, "sample": False, "schedule": {"name": "constant", "warmup": 3}, "log_every": 5},
    }, out=tmp_path / placement)
    rows = [json.loads(line) for line in open(f"{result['run_dir']}/metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
