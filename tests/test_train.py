"""Trainer: SIGKILL + resume is bit-exact, checkpoints are atomic and validated, early stopping, classification."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import formers
from formers.nn.hooks import torch_at_least
from formers.train.checkpoint import list_checkpoints, save_weights
from formers.train.trainer import TrainConfig

KILL_OVERRIDES = ["train.steps=200", "train.ckpt_every=20", "train.eval_every=80", "train.sample=false",
                  "train.threads=1", "model.dropout=0.1"]


def _train_cmd(recipe, out, *extra):
    return [sys.executable, "-m", "formers", "train", str(recipe), *KILL_OVERRIDES, "--out", str(out), *extra]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tiny_recipe, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_recipe, ref), check=True, capture_output=True)

    proc = subprocess.Popen(_train_cmd(tiny_recipe, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    step_killed = json.loads((list_checkpoints(killed)[-1] / "meta.json").read_text())["step"]
    assert step_killed < 200

    r = subprocess.run(_train_cmd(tiny_recipe, killed, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed metrics log continues the killed one without duplicates
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 200


def test_run_folder_contents_and_refusal_to_overwrite(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    result = formers.fit(tiny_recipe, out=out)
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "loss.png", "summary.md", "sample.txt"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < result["val_bpb"] < 8
    with pytest.raises(formers.FormersError, match="--resume"):
        formers.fit(tiny_recipe, out=out)
    model = formers.load_run(out)
    ev = formers.get("task", "lm_bytes").obj(corpus="stdlib", seq_len=32).evaluate(model)
    assert ev["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-6)


def test_corrupt_checkpoint_and_weights_give_clear_errors(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    formers.fit(tiny_recipe, ["train.sample=false"], out=out)
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(formers.FormersError, match="missing or corrupt"):
        formers.load_run(out)
    ck = list_checkpoints(out)[-1]
    (ck / "state.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(formers.FormersError, match="corrupt"):
        formers.fit(tiny_recipe, ["train.steps=30"], out=out, resume=True)


def test_resume_without_a_checkpoint_says_it_starts_over(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    formers.fit(tiny_recipe, ["train.sample=false"], out=out)
    assert list_checkpoints(out)
    for ck in list_checkpoints(out):
        for f in ck.iterdir():
            f.unlink()
        ck.rmdir()
    capsys.readouterr()
    formers.fit(tiny_recipe, ["train.sample=false"], out=out, resume=True)
    assert "no checkpoint in" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1].get("final") and not any(r.get("final") for r in rows[:-1])  # the old run's log is gone


def test_a_resumed_runs_training_time_counts_every_session(tiny_recipe, tmp_path, monkeypatch):
    """The first session runs on a clock that moves 100 s per reading, so its checkpointed time is far larger than
    anything the short second session can take on the real clock: a resumed run that counted only its own session
    would report seconds, not hundreds."""
    import types

    from formers.train import trainer

    ticks = iter(range(0, 10 ** 6, 100))
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    out = tmp_path / "run"
    first = formers.fit(tiny_recipe, ["train.sample=false"], out=out)
    saved = json.loads((list_checkpoints(out)[-1] / "meta.json").read_text())["train_seconds"]
    assert 100 <= saved <= first["train_seconds"]
    monkeypatch.undo()
    t = time.perf_counter()
    again = formers.fit(tiny_recipe, ["train.sample=false", "train.steps=30"], out=out, resume=True)
    wall = time.perf_counter() - t
    assert saved < again["train_seconds"] <= saved + wall
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["train_seconds"] == pytest.approx(again["train_seconds"])


def test_weights_that_do_not_fit_are_refused(tmp_path):
    small = formers.create_model("lm", vocab=20, dim=16, depth=1)
    save_weights(small, tmp_path / "w.safetensors")
    big = formers.create_model("lm", vocab=20, dim=16, depth=2)
    from formers.train.checkpoint import load_weights
    with pytest.raises(formers.FormersError, match="do not fit"):
        load_weights(big, tmp_path / "w.safetensors")


def test_tied_embeddings_save_and_load(tmp_path):
    m = formers.create_model("lm", vocab=20, dim=16, depth=1, tie_embeddings=True)
    assert m.head.weight is m.embed.weight
    save_weights(m, tmp_path / "w.safetensors")
    m2 = formers.create_model("lm", vocab=20, dim=16, depth=1, tie_embeddings=True)
    from formers.train.checkpoint import load_weights
    load_weights(m2, tmp_path / "w.safetensors")
    ids = torch.randint(0, 20, (1, 5))
    assert torch.equal(m(ids), m2(ids))


def test_encoder_learns_majority_with_early_stopping(tmp_path):
    result = formers.fit({
        "name": "maj",
        "model": {"name": "encoder", "dim": 32, "depth": 1, "pool": "mean", "position": "none"},
        "task": {"name": "majority", "seq_len": 24, "symbols": 4},
        "train": {"steps": 400, "batch_size": 32, "lr": 3e-3, "eval_every": 25, "patience": 3,
                  "progress": False, "schedule": "constant", "threads": 1},
    }, out=tmp_path / "maj")
    assert result["val_acc"] > 0.6  # chance is about 0.3
    assert (tmp_path / "maj" / "best.safetensors").exists()


def test_early_stopping_scores_the_last_step(tmp_path):
    """With patience, the last step's weights compete for the best checkpoint (the final evaluation loads it)."""
    formers.fit({
        "name": "last",
        "model": {"name": "encoder", "dim": 16, "depth": 1, "pool": "mean", "position": "none"},
        "task": {"name": "majority", "seq_len": 12, "symbols": 3, "n_train": 200, "n_val": 50},
        "train": {"steps": 20, "batch_size": 8, "eval_every": 10, "patience": 5, "progress": False, "threads": 1},
    }, out=tmp_path / "last")
    logs = [json.loads(line) for line in (tmp_path / "last" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in logs if "val_acc" in r and not r.get("final")]
    assert evals == [10, 20]


def test_schedules_and_optimizer_groups():
    from formers.train.optim import param_groups
    cos = formers.build("schedule", {"name": "cosine", "warmup": 10, "min_ratio": 0.1})
    assert cos(0, 100) == pytest.approx(0.1) and cos(9, 100) == pytest.approx(1.0)
    assert cos(100, 100) == pytest.approx(0.1) and cos(55, 100) == pytest.approx(0.55)
    rs = formers.build("schedule", {"name": "rsqrt", "warmup": 4})
    assert rs(15, 100) == pytest.approx(0.5)
    sd = formers.build("schedule", {"name": "step_decay", "every": 10, "gamma": 0.5})
    assert sd(25, 100) == pytest.approx(0.25)
    held = formers.build("schedule", {"name": "step_decay", "every": 10, "gamma": 0.5, "hold": 1})
    assert [held(s, 100) for s in (0, 9, 10, 19, 20, 35)] == [1, 1, 1, 1, 0.5, 0.25]
    m = formers.create_model("lm", vocab=20, dim=16, depth=1)
    decay, no_decay = param_groups(m, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is m.embed.weight for p in no_decay["params"])
    assert any(p is m.position.emb for p in no_decay["params"])
    assert all(not any(p is q for q in decay["params"]) for p in no_decay["params"])


def test_train_config_validation():
    with pytest.raises(formers.FormersError, match="train.batch_size: must be >= 1"):
        TrainConfig.from_dict({"batch_size": 0})
    with pytest.raises(formers.FormersError, match="train.grad_clip: expected float or null"):
        TrainConfig.from_dict({"grad_clip": "big"})


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_fused_optimizer_is_adam_as_written(name):
    """The trainer's Adam/AdamW take torch's fused kernel on a CPU; 5 steps of it equal a plain Adam/AdamW written
    here from the paper's update (bias-corrected moments; AdamW's decay decoupled, Adam's added to the gradient),
    with the trainer's two param groups (decay / no decay), in float64."""
    from formers.registry import build
    from formers.train.optim import fusable, param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).double()
    ref = [p.detach().clone() for p in model.parameters()]
    groups = param_groups(model, weight_decay=0.1)
    assert fusable(groups) == torch_at_least(2, 4)
    lr, b1, b2, eps = 1e-2, 0.9, 0.95, 1e-8
    opt = build("optimizer", {"name": name, "betas": [b1, b2]}, path="train.optimizer", params=groups, lr=lr)
    assert opt.defaults.get("fused") == (True if fusable(groups) else None)
    decay = {id(p) for p in groups[0]["params"]}
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    for t in range(1, 6):
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g, q) in enumerate(zip(ref, grads, model.parameters())):
            wd = 0.1 if id(q) in decay else 0.0
            if name == "adamw":
                p.mul_(1 - lr * wd)
            else:
                g = g + wd * p
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            p.sub_(lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps))
    for p, q in zip(ref, model.parameters()):
        torch.testing.assert_close(q.detach(), p, rtol=1e-12, atol=1e-12)


def test_fused_optimizer_only_where_torch_has_it():
    """The fused kernel is the CPU's: a meta parameter, an integer tensor or a tensor subclass (FSDP's sharded
    DTensor is one) keeps torch's default implementation."""
    from formers.train.optim import fusable

    class Sub(torch.Tensor):
        pass

    cpu = torch.nn.Parameter(torch.zeros(3))
    assert fusable([cpu]) == torch_at_least(2, 4)
    assert fusable([("w", cpu)]) == torch_at_least(2, 4)  # named parameters
    assert not fusable([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    assert not fusable([cpu, torch.zeros(3, dtype=torch.long)])
    assert not fusable([])
    assert not fusable([{"params": [cpu]}, {"params": [torch.zeros(3).as_subclass(Sub)]}])


def test_optimizer_takes_every_form_of_params_torch_takes():
    """What torch.optim accepts, the builders accept, and no parameter is lost to the look at them: a generator
    inside a param group, (name, parameter) pairs, a lone 0-d parameter as a group's params, a plain generator."""
    from formers.registry import build

    model = torch.nn.Linear(3, 2)
    scalar = torch.nn.Parameter(torch.tensor(1.0))
    forms = {"generator in a group": (lambda: [{"params": (p for p in model.parameters())}], 2),
             "named": (model.named_parameters, 2), "0-d group": (lambda: [{"params": scalar}], 1),
             "generator": (model.parameters, 2)}
    for form, (make, n) in forms.items():
        for name in ("adamw", "adam"):
            opt = build("optimizer", name, path="train.optimizer", params=make(), lr=1e-3)
            assert sum(len(g["params"]) for g in opt.param_groups) == n, (form, name)
            assert opt.defaults["fused"] == (True if torch_at_least(2, 4) else None), (form, name)
