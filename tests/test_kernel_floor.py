"""The kernel floor of benchmarks/kernel_floor.py (issue 10): it runs exactly the model's matmuls (the FLOPs of the
MFU formula's weight term, counted independently from the model's parameters) plus the attention kernels, and
nothing else."""

from __future__ import annotations

import pytest
import torch

from formers.bench import floor, speed
from formers.bench.harness import section_is_current
from formers.registry import FormersError


def test_lm_floor_does_the_training_steps_weight_matmuls():
    m = speed.formers_lm()
    D, L, N, T = speed.DIM, speed.DEPTH, speed.SEQ, speed.BATCH * speed.SEQ
    f = floor.LMFloor(floor.linear_shapes(m), T, L, speed.BATCH, speed.HEADS, N, D // speed.HEADS)
    weights = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and n.endswith("weight")
                  and "embed" not in n and "position" not in n)
    assert f.matmul_flops == 6 * weights * T
    assert f.matmul_flops == (speed.lm_flops_per_token(m, L, N, D) - 6 * L * N * D) * T  # the MFU formula


def test_vit_floor_does_the_forwards_matmuls():
    m = speed.formers_vit()
    f = floor.ViTFloor(m, 2)
    tokens = 2 * (197)
    body = sum(p.numel() for n, p in m.named_parameters() if n.startswith("stack") and p.dim() == 2)
    assert f.matmul_flops == 2 * body * tokens + 2 * m.head.weight.numel() * 2


def test_floor_calls_only_matmul_attention_and_conv_kernels():
    m = speed.formers_vit()
    f = floor.ViTFloor(m, 1)
    with torch.no_grad():
        prof = floor.profile_by_kind(f, 1)
    assert prof["matmul"] > 0 and prof["attention"] > 0
    assert prof["rest"] < 0.2 * (prof["matmul"] + prof["attention"]), prof["rest_top"]


def test_bad_out_is_refused_before_timing(monkeypatch):
    monkeypatch.setattr(floor, "meta", lambda cmd: pytest.fail("timed before checking --out"))
    with pytest.raises(FormersError, match="must be a .json file"):
        floor.main(["--out", "results/floor.csv"])


def test_readme_table_is_generated_from_the_committed_results():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = json.loads((root / "results" / "kernel_floor.json").read_text())
    assert section_is_current(root / "README.md", floor.README_START, floor.README_END, floor.readme_section(res)), \
        "README is stale: run `python benchmarks/kernel_floor.py` (it rewrites it)"
    for r in res["rows"]:
        assert len(r["formers_runs_ms"]) == len(r["peer_runs_ms"]) == res["meta"]["reps"] >= 7
        assert abs(r["ratio"] - r["peer_ms"] / r["formers_ms"]) < 2e-3


def test_row_reports_each_sides_page_faults_and_times_per_unit():
    import mmap

    import numpy as np

    pages = 512

    def touch_fresh():  # maps and touches `pages` new pages on every call
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            a = np.frombuffer(m, dtype=np.uint8)
            a[:: mmap.PAGESIZE] = 1
            del a

    r = floor._row("t", {"floor": lambda: None, "formers": lambda: None, "peer": touch_fresh}, reps=3, work=1.0,
                   unit="calls_per_s", floor_flops=0, per=2)
    assert pages / 2 <= r["page_faults_per_call"]["peer"] < pages * 1.5 / 2
    assert r["page_faults_per_call"]["formers"] < 5 and r["page_faults_per_call"]["floor"] < 5
    assert len(r["peer_runs_ms"]) == 3 and r["peer_ms"] == pytest.approx(sorted(r["peer_runs_ms"])[1], abs=0.01)
    assert floor.fault_cost_us(mib=8) > 0
