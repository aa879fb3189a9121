"""Data-parallel training (issue 9) on CPU with gloo, 2 processes of one thread, dropout 0.

The reference for every 2-process run is a single process on the same global batch (same data order: every rank
draws the global batch from the shared generator and keeps its slice), so losses and weights must agree up to
float summation order: per-step losses to 1e-5 relative, final weights to 1e-5 max-abs.
Four launches through `formers train --nproc 2` (torchrun): DDP, FSDP, FSDP resuming a 1-process checkpoint, and one
whose rank 1 is killed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import formers
from formers.train import distributed
from formers.train.checkpoint import list_checkpoints

RECIPE = {
    "name": "tiny_dist",
    "model": {"name": "lm", "dim": 32, "depth": 2, "dropout": 0.0, "block": {"mixer": {"name": "softmax", "heads": 4}}},
    "task": {"name": "lm_bytes", "corpus": "stdlib", "seq_len": 32, "held_out": ["textwrap"], "eval_limit": 1024},
    # global batch 8 in micro-batches accumulated twice per step (the 2-rank runs hold 4 rows per rank, no_sync on
    # the first micro-batch); checkpoints at 3 and 6
    "train": {"steps": 6, "batch_size": 8, "accum": 2, "lr": 3e-3, "log_every": 1, "eval_every": 100,
              "ckpt_every": 3, "progress": False, "sample": False, "threads": 1, "dist_timeout": 60,
              "schedule": {"name": "cosine", "warmup": 2}},
}
TOL = 1e-5


def _cli(*args, timeout=150):
    r = subprocess.run([sys.executable, "-m", "formers", "train", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _assert_same_run(a: Path, b: Path, steps=range(1, 7)):
    la, lb = dict(_losses(a)), dict(_losses(b))
    assert sorted(lb) == sorted(la) == list(range(1, 7)), "one log line per step, written once (rank 0 only)"
    for s in steps:
        assert abs(la[s] - lb[s]) <= TOL * abs(la[s]), (s, la[s], lb[s])
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= TOL, diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process reference, in this process, and the DDP and FSDP runs of the same recipe in 2 processes."""
    root = tmp_path_factory.mktemp("dist")
    recipe = root / "tiny_dist.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    formers.fit(recipe, out=root / "one")
    _cli(recipe, "--nproc", 2, "--out", root / "ddp")
    _cli(recipe, "--nproc", 2, "--out", root / "fsdp", "train.parallel=fsdp")
    return root


def test_ddp_two_ranks_of_4_equal_one_rank_of_8(runs):
    _assert_same_run(runs / "one", runs / "ddp")
    # the checkpoint does not depend on the number of processes: same tensors, same shapes, same keys
    a, b = (load_file(str(list_checkpoints(runs / r)[0] / "state.safetensors")) for r in ("one", "ddp"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert torch.equal(a["rng.data"], b["rng.data"])  # the data generator advanced exactly as in one process
    meta = json.loads((list_checkpoints(runs / "ddp")[0] / "meta.json").read_text())
    assert (meta["world_size"], meta["parallel"]) == (2, "ddp")


def test_fsdp_two_ranks_of_4_equal_one_rank_of_8(runs):
    _assert_same_run(runs / "one", runs / "fsdp")
    assert json.loads((list_checkpoints(runs / "fsdp")[0] / "meta.json").read_text())["parallel"] == "fsdp"
    # sharded optimizer state is gathered into full tensors: the checkpoint looks like a 1-process one
    a, b = (load_file(str(list_checkpoints(runs / r)[-1] / "state.safetensors")) for r in ("one", "fsdp"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for k in a:
        if k.startswith(("model.", "optim.")):
            assert (a[k] - b[k]).abs().max() <= TOL, k


def _cut_to_step_3(src: Path, dst: Path) -> None:
    """A copy of a finished run as if it had been killed right after its step-3 checkpoint."""
    shutil.copytree(src, dst)
    for p in list_checkpoints(dst)[1:]:
        shutil.rmtree(p)
    (dst / "model.safetensors").unlink()


def test_two_rank_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
    cut = tmp_path / "cut"
    _cut_to_step_3(runs / "fsdp", cut)
    formers.fit(runs / "tiny_dist.yaml", out=cut, resume=True)
    _assert_same_run(runs / "fsdp", cut, steps=range(4, 7))
    _assert_same_run(runs / "one", cut, steps=range(4, 7))


def test_one_process_checkpoint_resumes_in_two_fsdp_ranks(runs, tmp_path):
    cut = tmp_path / "cut"
    _cut_to_step_3(runs / "one", cut)
    r = _cli(runs / "tiny_dist.yaml", "--nproc", 2, "--out", cut, "--resume", "train.parallel=fsdp")
    assert "1 processes saved it, 2 continue" in r.stdout
    _assert_same_run(runs / "one", cut, steps=range(4, 7))


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out += [int(p.name), *_children(int(p.name))]
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(kv.split("=", 1) for kv in (Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                                                .split("\0")) if "=" in kv)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env and "LOCAL_RANK" in env else None


def test_killing_one_rank_fails_the_launcher_with_a_clear_message(runs, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "formers", "train", str(runs / "tiny_dist.yaml"), "--nproc", "2",
                             "--out", str(out), "train.steps=100000", "train.ckpt_every=100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None and not (
                (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        victims = [p for p in _children(proc.pid) if _rank_of(p) == 1]
        assert victims, "no rank-1 worker found"
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # a hang fails here
    finally:
        if proc.poll() is None:
            for p in reversed([proc.pid, *_children(proc.pid)]):
                os.kill(p, signal.SIGKILL)
    assert proc.returncode != 0
    assert "error: distributed training failed: rank 1 was killed by SIGKILL" in err, err[-2000:]


# ------------------------------------------------------------------------------------- in-process, no processes


def test_every_rank_slices_the_same_global_batch():
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(8, 5, generator=g), "y": torch.arange(8), "scalar": torch.tensor(2.0)}
    parts = [distributed.local_rows(batch, distributed.Dist(rank=r, world=4), 8) for r in range(4)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert torch.equal(torch.cat([p["y"] for p in parts]), batch["y"])
    assert all(p["scalar"] is batch["scalar"] for p in parts)  # no rows (0-dim): left whole
    # a tensor that does not hold one row per example cannot be sliced: an error naming it, not a silent copy
    with pytest.raises(formers.FormersError, match=r"batch\['mask'\] has shape \(5, 5\), not 8 rows first"):
        distributed.local_rows({**batch, "mask": torch.ones(5, 5)}, distributed.Dist(rank=1, world=4), 8)
    assert distributed.local_rows(batch, distributed.Dist(), 8) is batch  # one process: the whole batch


def test_bridge_device_hooks_exist_only_inside_the_context():
    m = formers.create_model("lm", vocab=20, dim=16, depth=1)
    ids = torch.randint(0, 20, (2, 5))
    ref = m(ids)
    gpu = distributed.Dist(device=torch.device("cuda", 0))  # hooks only; the model stays on the CPU here
    with distributed.bridge_device(m, gpu):
        assert len(m._forward_pre_hooks) == len(m._forward_hooks) == 1
        assert torch.equal(m(ids), ref)
    assert not m._forward_pre_hooks and not m._forward_hooks  # training steps run without them
    with distributed.bridge_device(m, distributed.Dist()):
        assert not m._forward_pre_hooks  # nothing to bridge on the CPU


def test_device_and_precision_requests_that_cannot_be_met(tmp_path):
    recipe = dict(RECIPE, train=dict(RECIPE["train"], steps=1))
    if not torch.cuda.is_available():
        with pytest.raises(formers.FormersError, match="sees no CUDA GPU"):
            formers.fit(recipe, ["train.device=cuda"], out=tmp_path / "a")
    for prec in ("bf16", "fp16"):
        with pytest.raises(formers.FormersError, match=f"precision={prec} runs fast only on a CUDA GPU"):
            formers.fit(recipe, ["train.precision=" + prec, "train.device=cpu"], out=tmp_path / "b")
    for bad, msg in (("train.parallel=zero3", "train.parallel: unknown value"),
                     ("train.device=tpu", "train.device: unknown value"),
                     ("train.precision=fp8", "train.precision: unknown value")):
        with pytest.raises(formers.FormersError, match=msg):
            formers.fit(recipe, [bad], out=tmp_path / "c")
    assert distributed.resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_nproc_checks_before_starting_processes(tmp_path, capsys, monkeypatch):
    from formers.cli import main

    def no_launch(argv, nproc):
        raise AssertionError(f"launched {nproc} processes for {argv}")

    monkeypatch.setattr(distributed, "launch", no_launch)  # a refusal is proven by never launching
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    x = str(tmp_path / "x")
    for extra, msg in (
        (["--nproc", "3"], "must divide evenly over 3 processes"),
        (["--nproc", "2", "model.block.mixer.name=softmx"], "unknown mixer 'softmx' (did you mean 'softmax'?)"),
        (["--nproc", "2", "model.block.mixer.heads=5"], "divisible"),
        (["--nproc=2", "train.optimizer=adamx"], "train.optimizer: unknown optimizer 'adamx'"),
        (["--nproc", "2", "train.schedule.decay=3"], "train.schedule: unknown option 'decay' for 'cosine'"),
        (["--nproc", "2", "train.steps=0"], "give steps >= 1 or epochs"),
    ):
        assert main(["train", str(recipe), *extra, "--out", x]) == 2, extra
        assert msg in capsys.readouterr().err, extra
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "metrics.jsonl").write_text("")
    assert main(["train", str(recipe), "--nproc", "2", "--out", str(tmp_path / "y")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "y" / "config.yaml").write_text(yaml.safe_dump(dict(RECIPE, name="other")))
    assert main(["train", str(recipe), "--nproc", "2", "--out", str(tmp_path / "y"), "--resume"]) == 2
    assert "--resume: the recipe differs from" in capsys.readouterr().err


def test_nproc_forwards_the_command_line_it_was_given(tmp_path, monkeypatch):
    from formers.cli import main

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda argv, nproc: launched.append((argv, nproc)) or 0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = str(tmp_path / "z")
    assert main(["train", str(recipe), "train.lr=0.01", "--nproc", "2", "--out", out, "--force", "train.seed=1"]) == 0
    assert launched == [(["train", str(recipe), "train.lr=0.01", "--out", out, "--force", "train.seed=1"], 2)]
