"""The image_classification task, its data sources and augmentations, the MLP/CNN baselines and the vit/ recipes."""

import gzip
import struct

import numpy as np
import pytest
import torch

import formers
from formers.cli import main
from formers.config import builtin_recipes, load_recipe
from formers.data import sources
from formers.registry import FormersError
from formers.tasks.images import random_crop, random_flip


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written by hand from the format's definition (big-endian header, uint8 payload)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_idx_parsing_from_a_handmade_gzip_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    for name, arr, offset in (("img.gz", images, 16), ("lab.gz", labels, 8)):
        raw = _idx_bytes(arr)
        (tmp_path / name).write_bytes(gzip.compress(raw))
        got = sources.read_idx_gz(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
        # the offsets the Fashion-MNIST files are usually read with: 16 for images, 8 for labels
        np.testing.assert_array_equal(np.frombuffer(raw, np.uint8, offset=offset), arr.ravel())
    with pytest.raises(FormersError, match="not an IDX file"):
        sources.parse_idx(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(FormersError, match="size mismatch"):
        sources.parse_idx(_idx_bytes(images)[:-1])


def test_missing_fashion_mnist_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FORMERS_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "debian_files", lambda package: [])
    assert not sources.get_source("fashion_mnist").ready()
    with pytest.raises(FormersError, match="apt-get install dataset-fashion-mnist"):
        sources.get_source("fashion_mnist").fetch()
    task = formers.build("task", "image_classification", dataset="fashion_mnist")
    with pytest.raises(FormersError, match=r"formers data fetch fashion_mnist .*apt-get install dataset-fashion-mnist"):
        task.prepare()
    assert main(["data", "fetch", "fashion_mnist"]) == 2  # one line, exit status 2, no traceback
    monkeypatch.setattr(sources, "_sklearn_ready", lambda: False)
    with pytest.raises(FormersError, match="pip install scikit-learn"):
        sources.load_images("digits")
    with pytest.raises(FormersError, match="holds images"):
        sources.load_documents("digits")


def test_data_list_shows_the_image_sources(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "fashion_mnist" in out and "digits" in out


@pytest.fixture(scope="module")
def digits():
    task = formers.build("task", "image_classification", dataset="digits")
    task.prepare()
    return task


def test_digits_splits_batches_and_normalisation(digits):
    from sklearn.datasets import load_digits

    assert [len(digits.split(s)[1]) for s in ("train", "val", "test")] == [1797 - 2 * 297, 297, 297]
    assert digits.model_defaults() == {"num_classes": 10, "in_chans": 1, "img_size": 8}
    # the splits partition the data set: pixel sums per class add up to sklearn's
    ref = load_digits()
    total = sum(digits.split(s)[0].double().sum() for s in ("train", "val", "test"))
    assert total == ref.images.sum()
    assert sorted(torch.cat([digits.split(s)[1] for s in ("train", "val", "test")]).tolist()) == sorted(ref.target)

    b = digits.train_batch(16, torch.Generator().manual_seed(0))
    assert b["x"].shape == (16, 1, 8, 8) and b["x"].dtype == torch.float32
    assert b["y"].shape == (16,) and b["y"].dtype == torch.long and 0 <= b["y"].min() and b["y"].max() < 10
    assert digits.count(b) == 16

    x = digits.images("train", torch.arange(digits.train_size())).double()
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-5
    # raw pixels 0..16 map to [0, 1] before normalising
    assert torch.allclose(x.min(), torch.tensor(-digits.mean / digits.std, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.max(), torch.tensor((1 - digits.mean) / digits.std, dtype=torch.float64), atol=1e-5)

    other = formers.build("task", "image_classification", dataset="digits", seed=1)
    assert torch.equal(other.split("test")[0], digits.split("test")[0])  # the test split does not move with seed
    assert not torch.equal(other.split("val")[0], digits.split("val")[0])


def _naive_crops(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop of a zero-padded (C, H, W) image, by explicit loops."""
    C, H, W = img.shape
    big = torch.zeros(C, H + 2 * pad, W + 2 * pad, dtype=img.dtype)
    big[:, pad:pad + H, pad:pad + W] = img
    return [big[:, i:i + H, j:j + W] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


def test_random_crop_and_flip_against_naive_references():
    x = torch.randn(12, 2, 6, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop(x, 0, g), x)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    offsets = []
    for a, b in zip(x, out):
        hits = [k for k, c in enumerate(_naive_crops(a, 2)) if torch.equal(c, b)]
        assert hits, "a crop that is no crop of the padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 3  # offsets are drawn per image
    flipped = random_flip(x, g)
    kinds = []
    for a, b in zip(x, flipped):
        assert torch.equal(b, a) or torch.equal(b, a.flip(-1))
        kinds.append(torch.equal(b, a))
    assert 0 < sum(kinds) < len(kinds)
    # a fixed generator gives the same augmented batch twice
    assert torch.equal(random_crop(x, 3, torch.Generator().manual_seed(5)),
                       random_crop(x, 3, torch.Generator().manual_seed(5)))


def test_task_augmentation_pads_with_black_and_is_seeded():
    task = formers.build("task", "image_classification", dataset="digits", augment="standard", flip=True)
    a = task.train_batch(16, torch.Generator().manual_seed(3))
    b = task.train_batch(16, torch.Generator().manual_seed(3))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    # every augmented image is a (possibly mirrored) crop of a zero-padded training image, raw pixels in [0, 1]
    raw = task.split("train")[0].double() / 16
    cands = torch.stack([c for img in raw for c in _naive_crops(img, 1)])  # (n * 9, 1, 8, 8)
    cands = torch.cat([cands, cands.flip(-1)]).flatten(1)
    got = (a["x"].double() * task.std + task.mean).flatten(1)
    assert torch.cdist(got, cands).min(1).values.max() < 1e-5
    plain = formers.build("task", "image_classification", dataset="digits")
    idx = torch.randint(plain.train_size(), (16,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.train_batch(16, torch.Generator().manual_seed(3))["x"], plain.images("train", idx))


def test_bad_task_options():
    with pytest.raises(FormersError, match="did you mean 'digits'"):
        formers.build("task", "image_classification", dataset="digit")
    with pytest.raises(FormersError, match="did you mean 'standard'"):
        formers.build("task", "image_classification", augment="standar")
    with pytest.raises(FormersError, match="val_size"):
        formers.build("task", "image_classification", dataset="digits", val_size=1600).prepare()


def test_baseline_parameter_counts_and_shapes():
    # counts from the layer shapes: weights + biases of each Linear / Conv, BN weight + bias
    mlp = formers.create_model("mlp_image")
    assert mlp.num_params() == (784 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    cnn = formers.create_model("cnn_small")
    convs = (1 * 32 * 9 + 32 + 2 * 32) + (32 * 64 * 9 + 64 + 2 * 64)
    assert cnn.num_params() == convs + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
    x = torch.randn(2, 1, 28, 28)
    for m in (mlp, cnn):
        assert m(x).shape == (2, 10)
        assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, m.num_features)
        assert m.other_size is None
        with pytest.raises(FormersError, match="img_size"):
            m(torch.randn(2, 1, 32, 32))
    small = formers.create_model("cnn_small", img_size=8, in_chans=3, num_classes=4)
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_cnn_small_learns_digits_through_fit(tmp_path):
    recipe = {
        "name": "cnn_digits",
        "model": {"name": "cnn_small"},
        "task": {"name": "image_classification", "dataset": "digits", "augment": "standard"},
        "train": {"steps": 60, "batch_size": 32, "optimizer": {"name": "adamw", "betas": [0.9, 0.999]}, "lr": 3e-3,
                  "weight_decay": 0.0, "schedule": {"name": "cosine", "warmup": 5}, "eval_every": 30,
                  "ckpt_every": 30, "progress": False, "sample": False, "threads": 1},
    }
    result = formers.fit(recipe, out=tmp_path / "run")
    assert result["val_acc"] > 0.6, result  # chance is 0.1
    model = formers.load_run(tmp_path / "run")
    task = formers.build("task", "image_classification", dataset="digits")
    assert task.evaluate(model, split="test")["test_acc"] > 0.6


def test_vit_recipes_resolve():
    names = builtin_recipes()
    for r in ("vit/vit_tiny_fmnist", "vit/mlp_fmnist", "vit/cnn_fmnist"):
        assert r in names
        cfg = load_recipe(r)
        assert cfg["name"] == r and cfg["task"]["name"] == "image_classification"
        assert cfg["train"]["batch_size"] == 128
    for r in (n for n in names if n.startswith("vit/")):  # every shipped vision recipe names a registered model
        cfg = load_recipe(r)
        assert formers.get("model", cfg["model"]["name"]).name == cfg["model"]["name"]
        # the same data, augmentation and evaluation for every model; the loss's label smoothing is a per-model
        # training choice like the learning rate (the scores never use it)
        task = {k: v for k, v in cfg["task"].items() if k != "label_smoothing"}
        assert task == {"name": "image_classification", "dataset": "fashion_mnist", "augment": "none",
                        "eval_limit": 2000}
    tiny = [e.name for e in formers.entries("model") if e.name.endswith("_tiny")]
    assert len(tiny) >= 12 and all(f"vit/{n}_fmnist" in names for n in tiny)  # a recipe for every tiny variant
    with pytest.raises(FormersError, match="unknown recipe"):
        load_recipe("vit/no_such_recipe")


def test_channels_last_training_equals_the_default_layout(tmp_path):
    """train.channels_last stores 4-D weights in NHWC order and changes nothing else: per-step losses and final
    weights equal the default layout's (float rounding), and the saved run loads into a plain model."""
    import json
    import re

    from formers.train.trainer import Trainer

    runs = {}
    for cl in (False, True):
        cfg = {"model": {"name": "cnn_small"}, "task": {"name": "image_classification", "dataset": "digits"},
               "train": {"steps": 4, "batch_size": 8, "lr": 3e-3, "eval_every": 100, "ckpt_every": 2,
                         "log_every": 1, "progress": False, "sample": False, "channels_last": cl}}
        trainer = Trainer(cfg, tmp_path / str(cl))
        convs = [p for p in trainer.model.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) == cl
        assert all(p.is_contiguous() for p in convs) != cl
        trainer.fit()
        losses = [r["loss"] for r in map(json.loads, (tmp_path / str(cl) / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r]
        runs[cl] = (losses, trainer.model)
    assert len(runs[True][0]) == 4
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-5, atol=1e-6)
    # a conv bias right before a BatchNorm gets a ~0 gradient that Adam scales up to full steps, so its value is
    # rounding noise: compare the other weights, and the trained functions, which that bias does not change
    for (name, a), b in zip(runs[False][1].state_dict().items(), runs[True][1].state_dict().values()):
        if not re.fullmatch(r"stages\.\d+\.0\.bias", name):  # Conv2d biases, each followed by a BatchNorm2d
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(runs[True][1].eval()(x), runs[False][1].eval()(x), rtol=1e-4, atol=1e-5)
    loaded = formers.load_run(tmp_path / "True")
    torch.testing.assert_close(loaded.eval()(x), runs[True][1].eval()(x), rtol=1e-5, atol=1e-6)
