"""P29 Long Range Arena: the offline task generators and the runner.

Claims checked (../shared/papers/facts_P28_P54.md, P29): the ListOps labeller agrees with a recursive evaluation of
the generating tree; lengths lie in the requested range; labels are not degenerate; Pathfinder positives and
negatives carry the same markers and the same ink (a mean-intensity classifier is at chance) and their labels match
a connectivity check on the drawn paths; every task is a deterministic function of its seed.
"""

import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

import formers
from formers.data import listops as lo
from formers.data import pathfinder as pf


def reference_value(tree) -> int:
    """Recursive evaluation of a generated tree, with the official operator definitions (np.median + int)."""
    if not isinstance(tree, tuple):
        return tree
    op, children = tree
    args = [reference_value(c) for c in children]
    return {"[MIN": min(args), "[MAX": max(args), "[MED": int(np.median(args)), "[SM": sum(args) % 10}[op]


def test_listops_labels_match_recursive_reference():
    rng = random.Random(0)
    checked = 0
    while checked < 1000:
        tree, length = lo.generate_tree(rng, max_depth=6)
        toks = lo.tokens(tree)
        assert length == len(toks)  # operators, values and ']' (the official length)
        assert lo.evaluate_tokens(toks) == reference_value(tree)
        checked += isinstance(tree, tuple)


def test_listops_lengths_and_labels():
    ex = lo.generate(300, 100, 500, seed=1)
    lengths = [len(t) for t, _ in ex]
    assert all(100 < n < 500 for n in lengths)
    assert len({tuple(t) for t, _ in ex}) == 300  # de-duplicated
    counts = np.bincount([y for _, y in ex], minlength=10)
    assert (counts > 0).sum() >= 8 and counts.max() < 0.5 * len(ex)  # non-degenerate
    long = lo.generate(3, 500, 2000, seed=2)  # the paper's range
    assert all(500 < len(t) < 2000 for t, _ in long)
    ids = lo.encode(ex[0][0], 500)
    assert len(ids) == 500 and max(ids) < lo.VOCAB and ids[len(ex[0][0])] == 0 and min(ids[:len(ex[0][0])]) > 0


def _components(mask):
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3)))


def test_pathfinder_markers_mass_and_connectivity():
    from scipy import ndimage

    gen = pf.Pathfinder(size=32, contour_length=pf.LEVELS["easy"])
    rng = np.random.default_rng(0)
    means, labels = [], []
    for i in range(300):
        img, label, canvas, markers = gen.sample(rng, i % 2)
        assert img.shape == (32, 32) and img.dtype == np.uint8
        # two markers in every image, whatever the label: the only fully inked 2x2 blocks are the marker discs
        assert _components(img == 255)[1] == 2
        # connectivity of the drawn paths: bridge the gaps between paddles (1-pixel dilation of the 2x canvas) and
        # ask whether the two marker centres lie in one component
        lab, _ = _components(ndimage.binary_dilation(canvas, structure=np.ones((3, 3))))
        c = [lab[int(m[0]), int(m[1])] for m in markers]
        assert c[0] > 0 and c[1] > 0
        assert (c[0] == c[1]) == (label == 1)
        means.append(img.mean())
        labels.append(label)
    means, labels = np.array(means), np.array(labels)
    order = np.argsort(means)
    # best threshold classifier on mean intensity (either direction), fitted on the very data it scores
    cum = np.cumsum(labels[order])
    best = max(max((k - cum[k - 1]) + (labels.sum() - cum[k - 1]), cum[k - 1] + (len(labels) - k - (labels.sum()
               - cum[k - 1]))) for k in range(1, len(labels)))
    assert best / len(labels) < 0.62
    assert abs(means[labels == 1].mean() - means[labels == 0].mean()) < 0.1 * statistics.pstdev(means) + 1.0


def test_pathfinder_levels_change_contour_length():
    easy, hard = pf.Pathfinder(contour_length=6), pf.Pathfinder(contour_length=14)
    assert (easy.distractor_length, easy.distractors) == (2, 10)
    assert (hard.distractor_length, hard.distractors) == (4, 5)  # 20 // (14 // 3), the official count
    rng = np.random.default_rng(1)
    ink_easy = np.mean([easy.sample(rng)[2].sum() for _ in range(20)])
    ink_hard = np.mean([hard.sample(rng)[2].sum() for _ in range(20)])
    assert ink_hard > ink_easy  # longer targets


@pytest.mark.parametrize("name,opts", [
    ("lra_listops", {"n_train": 40, "n_val": 10, "n_test": 10}),
    ("lra_pathfinder", {"n_train": 20, "n_val": 6, "n_test": 6}),
])
def test_generated_tasks_are_deterministic(tmp_path, monkeypatch, name, opts):
    from formers.train.trainer import build_task

    def arrays(sub, seed):
        monkeypatch.setenv("FORMERS_DATA", str(tmp_path / sub))
        t = build_task({"name": name, "seed": seed, **opts})
        t.prepare()
        return {k: v.clone() for k, v in t.arrays().items()}

    a, b, c = arrays("one", 0), arrays("two", 0), arrays("three", 1)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["train_x"], c["train_x"])
    again = arrays("one", 0)  # read back from the cache file
    for k in a:
        assert torch.equal(a[k], again[k]), k


def test_text_and_retrieval_tasks_split_by_document():
    from formers.tasks import lra

    pytest.importorskip("scipy")
    try:
        docs = lra.kernel_docs()
    except formers.FormersError as err:
        pytest.fail(f"linux-doc-6.1 is part of the setup (.ci/run installs it): {err}")
    assert len(docs) == lra.TEXT_CLASSES
    splits = {s: [rel for sub in docs.values() for rel in sub if lra.doc_split(rel) == s] for s in lra.SPLITS}
    assert not set(splits["train"]) & set(splits["test"])
    assert 0.05 < len(splits["test"]) / sum(map(len, splits.values())) < 0.15
    w = lra.windows(b"x" * 2500, 1024)
    assert [len(c) for c in w] == [1024, 1024, 452]


def test_dual_encoder_is_two_shared_towers():
    m = formers.create_model("dual_encoder", vocab=20, dim=16, depth=1, max_len=12, num_classes=2, pool="mean",
                             block={"mixer": {"name": "softmax", "heads": 2}}).double().eval()
    x = torch.randint(1, 20, (3, 2, 12))
    mask = torch.ones(3, 2, 12, dtype=torch.bool)
    mask[0, 1, 7:] = False
    enc = formers.models.encoder.Encoder.forward_head  # the tower's pooled vector, by the base class
    feats = formers.models.encoder.Encoder.forward_features
    pooled = [enc(m, feats(m, x[:, i], mask=mask[:, i]), pre_logits=True, mask=mask[:, i]) for i in range(2)]
    x1, x2 = pooled
    h = torch.relu(m.interaction[0](torch.cat([x1, x2, x1 * x2, x1 - x2], -1)))
    torch.testing.assert_close(m(x, mask=mask), m.head(h))
    # the concatenated form (B, 2N) is the same pair
    torch.testing.assert_close(m(x.reshape(3, 24), mask=mask.reshape(3, 24)), m(x, mask=mask))
    with pytest.raises(formers.FormersError, match="batch, 2"):
        m(torch.randint(1, 20, (3, 3, 12)))


def test_lra_runner_end_to_end(tmp_path, monkeypatch):
    """`formers bench lra` on a tiny ListOps: a row with accuracy, majority, published number; resumable."""
    from formers.bench import lra as bench

    monkeypatch.setenv("FORMERS_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    real = bench.recipe

    def tiny(task, mixer, mode, seed=0):
        cfg = real(task, mixer, mode, seed)
        cfg["task"].update({"n_train": 64, "n_val": 16, "n_test": 16, "min_len": 10, "max_len": 40})
        cfg["train"].update({"steps": 4, "batch_size": 8, "progress": False})
        cfg["train"]["schedule"]["warmup"] = 1
        return cfg

    monkeypatch.setattr(bench, "recipe", tiny)
    (tmp_path / "README.md").write_text("# x\n<!-- lra-lite:start -->\nold\n<!-- lra-lite:end -->\ntail\n")
    assert bench.main(["--tasks", "listops", "--mixers", "softmax", "linear", "--no-speed"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and "| linear |" in readme and readme.endswith("<!-- lra-lite:end -->\ntail\n")
    rows = {r["mixer"]: r for r in bench.load_rows(tmp_path / "results/lra/lite/results.json")}
    assert set(rows) == {"softmax", "linear"}
    assert rows["softmax"]["published"] == 36.37 and rows["linear"]["published"] == 16.13
    assert 0 <= rows["softmax"]["test_acc"] <= 1
    # the majority baseline, recomputed from the task's labels
    from collections import Counter

    from formers.train.trainer import build_task

    task = build_task(tiny("listops", "softmax", "lite")["task"])
    top = Counter(task.split("train")[1].tolist()).most_common(1)[0][0]
    test_y = task.split("test")[1].tolist()
    assert rows["softmax"]["majority"] == pytest.approx(sum(y == top for y in test_y) / len(test_y), abs=1e-4)
    table = (tmp_path / "results/lra/lite/table.md").read_text()
    assert "| softmax |" in table and "36.4" in table
    # finished pairs are not re-run
    monkeypatch.setattr(bench, "run_pair", lambda *a, **k: pytest.fail("re-ran a finished pair"))
    assert bench.main(["--tasks", "listops", "--mixers", "softmax", "--no-speed"]) == 0
    # a run of one pair rewrites table.md with every recorded pair, not only its own
    table = (tmp_path / "results/lra/lite/table.md").read_text()
    assert "| softmax |" in table and "| linear |" in table and "16.1" in table


def test_lra_out_folder_keeps_its_own_checkpoints(tmp_path, monkeypatch):
    """With --out the checkpoints live under OUT/tmp: a run into a fresh folder trains its pairs anew instead of
    resuming (and instantly finishing) the default folder's runs."""
    from formers.bench import lra as bench

    monkeypatch.chdir(tmp_path)
    seen = []

    def fake(task, mixer, mode, tmp, seed=0, progress=True):
        seen.append(Path(tmp))
        return {"task": task, "mixer": mixer, "test_acc": 0.5, "majority": 0.1, "fail": False, "published": 1.0,
                "pair_seconds": 0.0}

    monkeypatch.setattr(bench, "run_pair", fake)
    monkeypatch.setattr(bench, "plot", lambda *a, **k: None)
    assert bench.main(["--tasks", "listops", "--mixers", "softmax", "--no-speed"]) == 0
    assert bench.main(["--tasks", "listops", "--mixers", "softmax", "--no-speed", "--out", "elsewhere"]) == 0
    assert seen == [Path("results/tmp/lra/lite"), Path("elsewhere/tmp")]


def test_lra_pair_folder_of_another_recipe_starts_over(tmp_path, monkeypatch):
    """A run folder left by another lite setting is not resumed (the trainer would refuse the changed recipe); a
    folder of the same recipe resumes to the same result."""
    from formers.bench import lra as bench

    monkeypatch.setenv("FORMERS_DATA", str(tmp_path / "data"))
    real = bench.recipe
    lr = {"v": 1e-3}

    def tiny(task, mixer, mode, seed=0):
        cfg = real(task, mixer, mode, seed)
        cfg["task"].update({"n_train": 64, "n_val": 16, "n_test": 16, "min_len": 10, "max_len": 40})
        cfg["train"].update({"steps": 4, "batch_size": 8, "lr": lr["v"]})
        cfg["train"]["schedule"]["warmup"] = 1
        return cfg

    monkeypatch.setattr(bench, "recipe", tiny)
    first = bench.run_pair("listops", "softmax", "lite", tmp_path / "runs", progress=False)
    again = bench.run_pair("listops", "softmax", "lite", tmp_path / "runs", progress=False)  # resumes: finished
    assert again["test_acc"] == first["test_acc"] and again["test_loss"] == first["test_loss"]
    lr["v"] = 3e-2
    other = bench.run_pair("listops", "softmax", "lite", tmp_path / "runs", progress=False)
    saved = (tmp_path / "runs" / "listops-softmax" / "config.yaml").read_text()
    assert "0.03" in saved and other["test_loss"] != first["test_loss"]


def test_results_rows_from_two_processes_are_merged_not_dropped(tmp_path):
    """Two LRA runners on disjoint tasks each start from the rows they read; a save must merge with what the other
    wrote since (the lock + re-read in save_row), and replacing a pair keeps one row for it."""
    import multiprocessing as mp

    from formers.bench.harness import load_rows, save_row

    res = tmp_path / "results.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_rows, args=(str(res), task)) for task in ("listops", "image")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = load_rows(res)
    assert sorted((r["task"], r["mixer"]) for r in rows) == sorted(
        (t, f"m{i}") for t in ("listops", "image") for i in range(10))
    save_row(res, {}, {"task": "image", "mixer": "m3", "test_acc": 0.5}, ("task", "mixer"))
    rows = load_rows(res)
    assert len(rows) == 20 and [r["test_acc"] for r in rows if (r["task"], r["mixer"]) == ("image", "m3")] == [0.5]


def _write_rows(path: str, task: str) -> None:
    from pathlib import Path

    from formers.bench.harness import save_row

    for i in range(10):
        save_row(Path(path), {}, {"task": task, "mixer": f"m{i}", "test_acc": 0.1}, ("task", "mixer"))


def test_readme_table_is_generated_from_the_committed_results():
    """README's Long Range Arena table is the one the runner writes from results/lra/lite/results.json."""
    from formers.bench import lra as bench

    root = Path(__file__).resolve().parents[2]
    rows = bench.load_rows(root / "results/lra/lite/results.json")
    start, end = bench.readme_markers("lite")
    section = f"{start}\n{bench.readme_section(rows, 'lite', list(bench.TASKS), list(bench.MIXERS))}\n{end}"
    assert section in (root / "README.md").read_text(), \
        "README is stale: run `formers bench lra --mode lite --no-speed` (it rewrites the table)"
