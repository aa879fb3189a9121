"""CLI smoke runs: every command once, in process (and `python -m formers` once in a subprocess)."""

import subprocess
import sys

from formers.cli import main


def test_list_show_data(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("mixer:", "softmax", "placement:", "peri", "P77", "lm_shakespeare"):
        assert word in out
    assert main(["list", "mixers"]) == 0
    assert "softmax" in capsys.readouterr().out
    assert main(["show", "mixer", "softmax"]) == 0
    out = capsys.readouterr().out
    assert "heads" in out and "kv_heads" in out and "causal: yes" in out and "paper: baseline" in out
    assert main(["data", "list"]) == 0
    assert "shakespeare" in capsys.readouterr().out
    assert main(["data", "fetch", "stdlib"]) == 0
    assert main(["data", "fetch", "shakspeare"]) == 2


def test_train_eval_generate(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "--out", str(out), "train.steps=12"]) == 0  # overrides after options
    text = capsys.readouterr().out
    assert "val_bpb=" in text and "sample:" in text
    assert main(["eval", str(out)]) == 0
    assert '"val_bpb"' in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "def ", "--tokens", "10", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["convert", str(out), "--to", "precrmsnorm", "--out", str(tmp_path / "crms")]) == 0
    assert "converted" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "crms")]) == 0
    assert '"val_bpb"' in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    # meaningless sampling settings: one line each, before any token is generated
    for args, msg in ((["--tokens", "0"], "--tokens must be >= 1"), (["--top-k", "0"], "top_k must be >= 1"),
                      (["--temperature", "-1"], "temperature must be >= 0")):
        assert main(["generate", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    # a run folder whose config.yaml is not a mapping, or not YAML
    for text, msg in (("garbage\n", "config.yaml: expected a mapping"), ("model: [1\n", "invalid YAML at line 2"),
                      ("model: lm\n", "config.yaml: task: needs a 'name'")):
        (out / "config.yaml").write_text(text)
        assert main(["eval", str(out)]) == 2
        assert msg in capsys.readouterr().err


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "formers", "list", "norm"], capture_output=True, text=True)
    assert r.returncode == 0 and "rmsnorm" in r.stdout
