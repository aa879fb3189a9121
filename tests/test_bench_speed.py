"""`formers bench speed` (issue 10): the peer models are the same models (weights mapped, logits equal), the FLOPs
formula, the interleaving, and the README section generated from the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from formers.bench import speed
from formers.bench.harness import out_path, section_is_current
from formers.registry import FormersError

ROOT = Path(__file__).resolve().parents[1]


def test_gpt2_weights_map_onto_the_gpt2_shaped_formers_lm():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = speed.hf_gpt2(96)
    with torch.no_grad():  # HF initialises biases and LayerNorms trivially: randomise so the map is exercised
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = speed.formers_lm(max_len=96, gpt2=True).eval()
    speed.gpt2_into_formers(hf, ours)
    assert speed.n_params(ours) == speed.n_params(hf)
    x = torch.randint(0, speed.VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=2e-5)
        a = ours.generate(x[:1, :8], 12, greedy=True)
        b = hf.generate(x[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), do_sample=False,
                        max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(a, b)


def test_formers_vit_weights_map_onto_hf_vit():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours, hf = speed.formers_vit(), speed.hf_vit()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    speed.vit_into_hf(ours, hf)
    assert speed.n_params(ours) == speed.n_params(hf) == 5_717_416
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=0, atol=1e-5)


def test_same_model_as_x_transformers_by_parameter_count():
    pytest.importorskip("x_transformers")
    assert speed.n_params(speed.formers_lm()) == speed.n_params(speed.xt_lm()) == 3_349_760


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():  # norms start at 1 and biases at 0: move every weight so that the whole map is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


@pytest.mark.parametrize("flash", [False, True])
def test_formers_weights_make_x_transformers_the_same_model(flash):
    pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    ours, peer = speed.formers_lm(), speed.xt_lm(flash=flash)
    _perturb(ours)
    assert speed.same_as_xt(ours, peer, "test") <= 1e-5
    x = torch.randint(0, speed.VOCAB, (2, speed.SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a second batch, at full length
        torch.testing.assert_close(ours.eval()(x), peer.eval()(x), rtol=0, atol=1e-5)
    # a wrong map is caught: swap one layer's k and v in the peer
    a = peer.attn_layers.layers[2][1]
    with torch.no_grad():
        k = a.to_k.weight.clone()
        a.to_k.weight.copy_(a.to_v.weight), a.to_v.weight.copy_(k)
        ours.eval(), peer.eval()
        with pytest.raises(FormersError, match="not compare the same model"):
            speed.check_equal(ours(x), peer(x), "swapped")


def _lm(**block):
    spec = {"placement": "pre", "norm": {"name": "layernorm", "bias": False}, "mixer": {"name": "softmax", "heads": 4},
            "ffn": {"name": "mlp", "act": "gelu", "mult": 4}}
    spec.update(block)
    return spec


MAPPED = {  # formers LM configs that x-transformers' Decoder can express
    "layernorm_gelu_headdim16": dict(block=_lm()),
    "rmsnorm_swiglu_nopos_tied": dict(position="none", tie_embeddings=True,
                                      block=_lm(norm="rmsnorm", mixer={"name": "softmax", "heads": 2},
                                                ffn={"name": "glu", "act": "silu", "mult": 4, "bias": True})),
    "rmsnorm_geglu": dict(block=_lm(norm="rmsnorm", ffn={"name": "glu", "act": "gelu", "mult": 2, "bias": True})),
    "squared_relu_no_bias": dict(block=_lm(ffn={"name": "mlp", "act": "squared_relu", "mult": 3, "bias": False})),
}


@pytest.mark.parametrize("name", list(MAPPED))
def test_recipe_models_map_onto_x_transformers_with_equal_logits(name):
    pytest.importorskip("x_transformers")
    import formers

    torch.manual_seed(0)
    ours = formers.create_model("lm", vocab=97, dim=64, depth=2, max_len=48, **MAPPED[name])
    _perturb(ours)
    peer, why = speed.xt_peer_of(ours)
    assert peer is not None, why
    assert speed.n_params(peer) == speed.n_params(ours)
    assert speed.same_as_xt(ours, peer, name, seq=48) <= 1e-5


NOT_MAPPED = {  # config -> what the reason must name
    "layernorm_with_bias": (dict(block=_lm(norm="layernorm")), "bias: false"),
    "rope": (dict(position="rope", block=_lm()), "positions"),
    "grouped_kv": (dict(block=_lm(mixer={"name": "softmax", "heads": 4, "kv_heads": 2})), "grouped kv heads"),
    "post_ln": (dict(block=_lm(placement="post")), "placement"),
    "relu_mlp": (dict(block=_lm(ffn={"name": "mlp", "act": "relu"})), "activation"),
    "glu_without_bias": (dict(block=_lm(ffn={"name": "glu", "act": "silu"})), "bias: true"),
    "primer_mdha": (dict(block=_lm(mixer={"name": "mdha", "heads": 4})), "mixer"),
    "dropout": (dict(dropout=0.1, block=_lm()), "dropout"),
    "looped_stack": (dict(stack={"name": "looped", "pre": 1, "loops": 3}, block=_lm()), "stack runs"),
    "layers_differ": (dict(block=_lm(), layers={1: {"mixer": {"name": "softmax", "heads": 2}}}), "layers differ"),
    "attention_scale": (dict(block=_lm(mixer={"name": "softmax", "heads": 4, "scale": 0.5})), "scale"),
    "layernorm_eps": (dict(block=_lm(norm={"name": "layernorm", "bias": False, "eps": 1e-2})), "eps"),
    "attention_dropout": (dict(block=_lm(mixer={"name": "softmax", "heads": 4, "dropout": 0.1})), "dropout"),
}


@pytest.mark.parametrize("name", list(NOT_MAPPED))
def test_models_without_an_x_transformers_counterpart_say_why(name):
    pytest.importorskip("x_transformers")
    import formers

    cfg, needle = NOT_MAPPED[name]
    peer, why = speed.xt_peer_of(formers.create_model("lm", vocab=97, dim=64, depth=2, max_len=48, **cfg))
    assert peer is None and needle in why


def test_recipe_row_times_x_transformers_on_the_same_model(tmp_path):
    pytest.importorskip("x_transformers")
    import yaml

    model = {"name": "lm", "dim": 32, "depth": 1, "max_len": 16, "position": "learned",
             **MAPPED["squared_relu_no_bias"]}
    (tmp_path / "mapped.yaml").write_text(yaml.safe_dump(
        {"model": model, "task": {"name": "lm_bytes", "seq_len": 16}, "train": {"batch_size": 2}}))
    logs: list[str] = []
    (r,) = speed.row_recipe(str(tmp_path / "mapped.yaml"), 3, 1, 100.0, logs.append)
    assert r["peer"] == "x-transformers" and r["logits_max_abs_diff"] <= 1e-5
    assert r["ratio"] == pytest.approx(r["formers_tokens_per_s"] / r["peer_tokens_per_s"], rel=1e-2)
    assert len(r["formers_runs"]) == len(r["peer_runs"]) == 3 and "ratio_ci90" in r
    model["block"] = _lm(norm="layernorm")
    (tmp_path / "bias.yaml").write_text(yaml.safe_dump(
        {"model": model, "task": {"name": "lm_bytes", "seq_len": 16}, "train": {"batch_size": 2}}))
    (r,) = speed.row_recipe(str(tmp_path / "bias.yaml"), 3, 1, 100.0, logs.append)
    assert r["peer"] is None and "bias" in r["no_peer_because"] and "peer_tokens_per_s" not in r
    assert any("no x-transformers row" in line for line in logs)


def test_recipe_row_times_formers_alone_when_the_logits_check_fails(tmp_path, monkeypatch):
    """A difference `xt_peer_of` does not know about shows in the logits check; the row then says so instead of
    aborting the whole benchmark."""
    pytest.importorskip("x_transformers")
    import yaml

    model = {"name": "lm", "dim": 32, "depth": 1, "max_len": 16, "position": "learned",
             **MAPPED["squared_relu_no_bias"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(
        {"model": model, "task": {"name": "lm_bytes", "seq_len": 16}, "train": {"batch_size": 2}}))

    def differs(*a, **k):
        raise FormersError("recipe: formers vs x-transformers logits: outputs differ by 1.0e-01")

    monkeypatch.setattr(speed, "same_as_xt", differs)
    (r,) = speed.row_recipe(str(tmp_path / "r.yaml"), 3, 1, 100.0, lambda s: None)
    assert r["peer"] is None and "differ" in r["no_peer_because"] and "peer_tokens_per_s" not in r


def test_flops_per_token_is_the_issue_formula():
    m = speed.formers_lm()
    D, V, L, N = speed.DIM, speed.VOCAB, speed.DEPTH, speed.SEQ
    matmul = L * (D * D + 2 * D * D + D * D + 4 * D * D + 4 * D * D) + V * D  # q, kv, out, fc1, fc2; head
    assert speed.lm_flops_per_token(m, L, N, D) == 6 * matmul + 6 * L * N * D


def test_interleaving_alternates_the_order_and_times_every_repetition():
    calls = []
    times = speed.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(v) for v in times.values()] == [4, 4] and all(t >= 0 for v in times.values() for t in v)


def test_check_equal_refuses_a_wrong_map():
    with pytest.raises(FormersError, match="weight map is wrong"):
        speed.check_equal(torch.zeros(3), torch.tensor([0.0, 1e-3, 0.0]), "x")


def test_unknown_row_is_a_clear_error():
    with pytest.raises(FormersError, match="unknown row 'lm_trian'"):
        speed.main(["--rows", "lm_trian"])


def test_readme_section_is_generated_from_the_committed_results(tmp_path):
    res = json.loads((ROOT / "results" / "peers_speed.json").read_text())
    assert section_is_current(ROOT / "README.md", speed.README_START, speed.README_END, speed.readme_section(res)), \
        "README is stale: run `formers bench speed` (it rewrites it)"
    for r in res["rows"]:
        assert r["formers_runs"] and len(r["formers_runs"]) == res["meta"]["reps"] >= 7
        assert abs(r["ratio"] - r[next(k for k in r if k.startswith("formers_") and k.endswith("_per_s"))]
                   / r[next(k for k in r if k.startswith("peer_") and k.endswith("_per_s"))]) < 2e-3
    speed.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_out_may_be_a_folder_and_a_bad_out_fails_before_any_timing(tmp_path, monkeypatch):
    name = "peers_speed.json"
    assert out_path(str(tmp_path), name, "bench speed") == tmp_path / name
    assert out_path(str(tmp_path / "new_folder"), name, "bench speed") == tmp_path / "new_folder" / name
    assert out_path(str(tmp_path / "r.json"), name, "bench speed") == tmp_path / "r.json"
    (tmp_path / "afile").write_text("x")
    timed = []
    monkeypatch.setattr(speed, "meta", lambda cmd, device=None: timed.append(cmd))  # would start the timing
    with pytest.raises(FormersError, match="must be a .json file or a folder"):
        speed.main(["--rows", "packed_encoder", "--out", str(tmp_path / "r.csv")])
    with pytest.raises(FormersError, match="is a file, not a folder"):
        speed.main(["--rows", "packed_encoder", "--out", str(tmp_path / "afile" / "r.json")])
    assert not timed


def test_a_folder_out_gets_the_json_and_png(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "row_packed", lambda reps, log, device: [
        {"row": "packed_encoder", "peer": "formers padded", "peer_setting": "key-padding mask", "params": 1,
         "formers_tokens_per_s": 2.0, "formers_runs": [2.0], "peer_tokens_per_s": 1.0, "peer_runs": [1.0],
         "ratio": 2.0}])
    monkeypatch.setattr(speed, "meta", lambda cmd, device=None: {"peak_mm_gflops": 1.0, "cpu": "test",
                                                                      "threads": 1, "torch": torch.__version__,
                                                                      "date": "2026-01-01"})
    assert speed.main(["--rows", "packed_encoder", "--reps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "peers_speed.json").read_text())
    assert res["rows"][0]["ratio"] == 2.0 and (tmp_path / "peers_speed.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp"))


def test_interleaving_counts_each_sides_page_faults():
    import mmap

    import numpy as np

    def fresh_pages():  # maps and touches 256 new pages on every call
        with mmap.mmap(-1, 256 * mmap.PAGESIZE) as m:
            a = np.frombuffer(m, dtype=np.uint8)
            a[:: mmap.PAGESIZE] = 1
            del a

    pf: dict = {}
    times = speed.interleaved({"formers": lambda: None, "peer": fresh_pages}, reps=5, faults=pf)
    s = speed._summary(times, 1.0, "calls_per_s", pf, per=2)
    assert all(256 <= n < 400 for n in pf["peer"]) and max(pf["formers"]) < 5
    assert 128 <= s["peer_page_faults"] < 200 and s["formers_page_faults"] < 3


def test_table_says_met_from_the_unrounded_ratio():
    row = {"row": "lm_train", "peer": "x-transformers", "peer_setting": "attn_flash", "formers_tokens_per_s": 1098.0,
           "peer_tokens_per_s": 1000.0, "ratio": 1.098}
    line = speed.table({"rows": [row]}).splitlines()[-1]
    assert "1.10x" in line and ">= 1.1x, not met" in line
    line = speed.table({"rows": [dict(row, ratio=1.1)]}).splitlines()[-1]
    assert ">= 1.1x, met" in line


def test_table_says_which_side_page_faulted():
    """A target cell names the side that took FAULT_NOTE or more page faults per call than the other; a smaller
    difference, or no fault counts, adds nothing."""
    row = {"row": "lm_train", "peer": "x-transformers", "peer_setting": "default", "formers_tokens_per_s": 1300.0,
           "peer_tokens_per_s": 1000.0, "ratio": 1.3}
    cell = speed._target_cell
    assert cell(row, 1.25) == ">= 1.25x, met"
    assert cell(dict(row, formers_page_faults=0, peer_page_faults=17640), 1.25) == \
        ">= 1.25x, met (the peer page-faulting)"
    assert cell(dict(row, formers_page_faults=2500, peer_page_faults=1784), 1.25) == ">= 1.25x, met"
    assert cell(dict(row, ratio=1.0, formers_page_faults=5000, peer_page_faults=0), 1.25) == \
        ">= 1.25x, not met (formers page-faulting)"
    line = speed.table({"rows": [dict(row, formers_page_faults=0, peer_page_faults=17640)]}).splitlines()[-1]
    assert "met (the peer page-faulting) |" in line and "| 0 / 17,640 |" in line


def test_ratio_interval_is_a_paired_bootstrap_of_the_ratio_of_medians():
    """The 90% interval: exact for a constant ratio; around the ratio of medians; close to a naive paired bootstrap
    written here (Python's random, statistics.median); narrower with more repetitions."""
    import random
    import statistics

    assert speed.ratio_ci([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]) == [2.0, 2.0]
    g = random.Random(1)
    ours = [1.0 + g.random() * 0.4 for _ in range(31)]
    peer = [t * 1.1 + g.random() * 0.3 for t in ours]
    lo, hi = speed.ratio_ci(ours, peer)
    point = statistics.median(peer) / statistics.median(ours)
    assert lo < point < hi and hi - lo > 0.02
    rs = []
    for _ in range(4000):
        i = [g.randrange(31) for _ in range(31)]
        rs.append(statistics.median(peer[j] for j in i) / statistics.median(ours[j] for j in i))
    rs.sort()
    assert abs(rs[int(0.05 * 3999)] - lo) < 0.02 and abs(rs[int(0.95 * 3999)] - hi) < 0.02
    many = [1.0 + g.random() * 0.4 for _ in range(401)]
    lo2, hi2 = speed.ratio_ci(many, [t * 1.1 + g.random() * 0.3 for t in many])
    assert hi2 - lo2 < (hi - lo) / 2


def test_table_shows_the_ratio_interval():
    row = {"row": "vit_forward", "peer": "HF ViT", "formers_images_per_s": 52.0, "peer_images_per_s": 50.0,
           "ratio": 1.04, "ratio_ci90": [0.97, 1.12]}
    assert "1.04x (0.97-1.12)" in speed.table({"rows": [row]}).splitlines()[-1]


def test_results_rows_keep_the_machine_and_date_that_measured_them(tmp_path):
    """A partial rerun (a sweep's `--only`, a resumed benchmark) rewrites the file's meta; each row keeps the
    provenance of the run that measured it."""
    from formers.bench.harness import load_rows, save

    path = tmp_path / "r.json"
    old = {"cpu": "AMD EPYC", "date": "2026-11-29T07:46:14+00:00", "command": "sweep.py", "threads": 2}
    path.write_text(json.dumps({"meta": old, "rows": [{"config": "a", "val": 1.0}]}))  # written before the stamps
    rows = load_rows(path)
    assert rows[0]["measured"]["cpu"] == "AMD EPYC"
    new = {"cpu": "Intel Xeon", "date": "2026-11-30T12:00:00+00:00", "command": "sweep.py --only b", "threads": 2}
    save(path, new, rows + [{"config": "b", "val": 2.0}])
    data = json.loads(path.read_text())
    assert data["meta"]["cpu"] == "Intel Xeon"
    assert [r["measured"]["cpu"] for r in data["rows"]] == ["AMD EPYC", "Intel Xeon"]
    assert [r["measured"]["date"][:10] for r in load_rows(path)] == ["2026-11-29", "2026-11-30"]
    # rows of a file without meta are of unknown provenance, not this run's
    path.write_text(json.dumps({"rows": [{"config": "c"}]}))
    save(path, new, load_rows(path))
    assert json.loads(path.read_text())["rows"][0]["measured"] == {"unknown": True}


VIT_NOT_MAPPED = {  # vit_tiny options -> what the reason must name
    "avg_pool": ({}, "class token"),
    "rope": ({"global_pool": "token", "pos_embed": "rope"}, "positions"),
    "drop_path": ({"global_pool": "token", "drop_path": 0.1}, "drop path"),
    "layer_scale": ({"global_pool": "token", "layer_scale": 1e-5}, "layer scale"),
    "attention_dropout": ({"global_pool": "token", "block": {"mixer": {"name": "softmax", "dropout": 0.1}}},
                          "dropout"),
}


def test_vit_recipes_map_onto_hf_vit_or_say_why():
    pytest.importorskip("transformers")
    import formers

    torch.manual_seed(0)
    ours = formers.create_model("vit_tiny", dim=64, depth=2, heads=4, global_pool="token").eval()
    _perturb(ours)
    peer, why = speed.hf_vit_peer_of(ours)
    assert peer is not None, why
    speed.vit_into_hf(ours, peer)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(pixel_values=x).logits, rtol=0, atol=1e-5)
    for opts, needle in VIT_NOT_MAPPED.values():
        peer, why = speed.hf_vit_peer_of(formers.create_model("vit_tiny", dim=64, depth=2, heads=4, **opts))
        assert peer is None and needle in why, (opts, why)
    peer, why = speed.hf_vit_peer_of(formers.create_model("cct_tiny"))
    assert peer is None and "CCT" in why


def test_image_recipe_row_times_a_training_step_against_hf_vit(tmp_path):
    pytest.importorskip("transformers")
    import yaml

    (tmp_path / "vit.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "vit_tiny", "dim": 32, "depth": 1, "heads": 2, "global_pool": "token"},
         "task": {"name": "image_classification", "dataset": "fashion_mnist"}, "train": {"batch_size": 4}}))
    (r,) = speed.row_recipe(str(tmp_path / "vit.yaml"), 3, 1, 100.0, lambda s: None)
    assert r["peer"] == "HF ViT" and r["logits_max_abs_diff"] <= 1e-5 and r["image_size"] == 28
    assert len(r["formers_runs"]) == len(r["peer_runs"]) == 3 and r["formers_images_per_s"] > 0
    assert "| HF ViT |" in speed.table({"rows": [r]})


def test_a_missing_recipe_fails_before_any_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "meta", lambda *a, **k: pytest.fail("timing started"))
    with pytest.raises(FormersError, match="does not exist"):
        speed.main(["--rows", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o.json")])


def test_device_option_fails_clearly_before_any_timing(monkeypatch):
    monkeypatch.setattr(speed, "meta", lambda *a, **k: pytest.fail("timing started"))
    with pytest.raises(FormersError, match="unknown device 'gpu0'"):
        speed.main(["--rows", "packed_encoder", "--device", "gpu0"])
    if not torch.cuda.is_available():
        with pytest.raises(FormersError, match="torch sees no CUDA GPU"):
            speed.main(["--rows", "packed_encoder", "--device", "cuda"])
    assert speed.resolve_device("cpu") == torch.device("cpu")


def test_interleaved_times_include_the_sync(monkeypatch):
    """On a GPU the side's queued work must count for that side: `sync` runs inside the timed window, once per call
    (plus once after the warm-up)."""
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    calls = []

    def sync():
        calls.append("sync")
        clock[0] += 1.0  # the queued kernels finish only here

    times = speed.interleaved({"a": lambda: None, "b": lambda: None}, reps=3, warmup=1, sync=sync)
    assert times == {"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]}
    assert len(calls) == 1 + 6


def test_readme_section_names_the_gpu_when_there_is_one():
    res = {"meta": {"command": "formers bench speed --device cuda", "cpu": "Xeon", "threads": 16, "torch": "2.11",
                    "date": "2026-11-30T00:00:00", "peak_mm_gflops": 5e4, "reps": 7, "device": "NVIDIA H200"},
           "rows": []}
    assert "on NVIDIA H200 (Xeon, 16 threads)" in speed.readme_section(res)
    del res["meta"]["device"]
    assert "on Xeon, 16 threads" in speed.readme_section(res)


def test_a_gpu_run_never_writes_the_cpu_results_or_the_readme(tmp_path, monkeypatch):
    """`--device cuda --out FOLDER` writes peers_speed_cuda.json there, and the README's table (the CPU's) is not
    touched even when the folder is results/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(f"x\n{speed.README_START}\nCPU table\n{speed.README_END}\n")
    monkeypatch.setattr(speed, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(speed, "row_packed", lambda reps, log, device: [
        {"row": "packed_encoder", "peer": "formers padded", "peer_setting": "key-padding mask", "params": 1,
         "formers_tokens_per_s": 2.0, "formers_runs": [2.0], "peer_tokens_per_s": 1.0, "peer_runs": [1.0],
         "ratio": 2.0}])
    monkeypatch.setattr(speed, "meta", lambda cmd, device=None: {"peak_mm_gflops": 1.0, "cpu": "test", "threads": 1,
                                                                  "torch": torch.__version__, "date": "2026-01-01",
                                                                  "device": "GPU"})
    assert speed.main(["--rows", "packed_encoder", "--reps", "1", "--device", "cuda", "--out", "results"]) == 0
    assert (tmp_path / "results" / "peers_speed_cuda.json").exists()
    assert not (tmp_path / "results" / "peers_speed.json").exists()
    assert "CPU table" in (tmp_path / "README.md").read_text()
