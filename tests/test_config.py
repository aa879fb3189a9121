"""Config errors: one line, exit status 2, naming the bad key and the closest valid one."""

import pytest

import formers
from formers import config as C
from formers.cli import main


@pytest.mark.parametrize("override,expected", [
    ("model.block.mixer.hedas=4", "model.block.mixer: unknown option 'hedas' for 'softmax' (did you mean 'heads'?)"),
    ("model.dim=abc", "model.dim: expected int, got 'abc' (str)"),
    ("model.block.mixr.heads=3", "model.block: unknown key 'mixr' (did you mean 'mixer'?)"),
    ("model.block.mixer.name=sofmax", "unknown mixer 'sofmax' (did you mean 'softmax'?)"),
    ("model.block.norm=layrnorm", "model.block.norm: unknown norm 'layrnorm' (did you mean 'layernorm'?)"),
    ("model.positon=rope", "model: unknown option 'positon' for 'lm' (did you mean 'position'?)"),
    ("train.stps=3", "train: unknown option 'stps' (did you mean 'steps'?)"),
    ("train.lr=fast", "train.lr: expected float, got 'fast' (str)"),
    ("task.corpus=shakespear", "no data source"),
    ("trian.steps=3", "unknown section 'trian' (did you mean 'train'?)"),
])
def test_cli_config_errors_exit_2_with_one_line(override, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if expected == "no data source":
        expected = "unknown data source 'shakespear' (did you mean 'shakespeare'?)"
    assert main(["train", "lm_shakespeare", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "runs").exists(), "a bad config must leave nothing behind"


def test_unknown_recipe_and_family(capsys):
    assert main(["train", "lm_shakspeare"]) == 2
    assert "did you mean 'lm_shakespeare'" in capsys.readouterr().err
    assert main(["list", "mixres"]) == 2
    assert "did you mean 'mixer'" in capsys.readouterr().err


def test_overrides_parse_yaml_values_and_expand_names():
    cfg = {"model": {"name": "lm", "block": {"mixer": "softmax"}}, "task": {}, "train": {}}
    out = C.apply_overrides(cfg, ["model.block.mixer.heads=8", "train.lr=1e-3", "model.layers.0-1.ffn.name=glu",
                                  "train.schedule={name: cosine, warmup: 5}"])
    assert out["model"]["block"]["mixer"] == {"name": "softmax", "heads": 8}
    assert out["train"]["lr"] == 1e-3 and isinstance(out["train"]["lr"], float)
    assert out["model"]["layers"] == {"0-1": {"ffn": {"name": "glu"}}}
    assert out["train"]["schedule"] == {"name": "cosine", "warmup": 5}
    assert cfg["model"]["block"]["mixer"] == "softmax"  # the input is not mutated
    with pytest.raises(formers.FormersError, match="KEY=VALUE"):
        C.apply_overrides(cfg, ["model.dim"])


def test_build_checks_types_and_names():
    with pytest.raises(formers.FormersError, match="expected int"):
        formers.build("mixer", "softmax", dim=16, heads="4")
    with pytest.raises(formers.FormersError, match="did you mean 'heads'"):
        formers.build("mixer", {"name": "softmax", "head": 4}, dim=16)
    m = formers.build("mixer", "mha", dim=16, heads=2)  # alias
    assert m.heads == 2
    assert formers.create_model("lm", vocab=10, dim=16, depth=1).vocab == 10


def test_recipe_from_path_and_bad_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: lm\n")
    with pytest.raises(formers.FormersError, match="invalid YAML"):
        C.load_recipe(p)
    p.write_text("model: {name: lm}\nextra: 1\n")
    with pytest.raises(formers.FormersError, match="unknown section 'extra'"):
        C.load_recipe(p)
    p.write_text("model: {name: lm}\n")
    assert C.load_recipe(p)["name"] == "r"
