"""train.compile=true (issue 10): torch.compile'd training equals eager training, and its run folder is an eager
run folder (checkpoints without `_orig_mod.` keys, loadable into an eager model).

The reference of every compiled run is the eager run of the same recipe (dropout 0, so no random draws inside the
model, whose compiled RNG would differ): per-step losses within 1e-5 relative, final weights within 1e-5. The
compiling tests are `slow`: a cold inductor compile of the tiny LM (forward and backward, through gcc) takes 30-90 s
on a busy 2-core machine, 15-40 s once inductor's on-disk cache holds the kernels, and even a compile that fails
at its C++ step takes over 10 s of tracing.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_LM
from safetensors.torch import load_file

import formers
from formers.train import distributed
from formers.train.checkpoint import list_checkpoints, load_checkpoint
from formers.train.trainer import TrainConfig, Trainer, build_model, build_optimizer, build_task

STEPS = 5


def _recipe(**train):
    cfg = copy.deepcopy(TINY_LM)
    cfg["model"]["dropout"] = 0.0
    cfg["task"]["eval_limit"] = 256
    cfg["train"].update({"steps": STEPS, "log_every": 1, "eval_every": 100, "ckpt_every": STEPS, "sample": False,
                         **train})
    return cfg


def _fit(cfg, out):
    trainer = Trainer(cfg, out)
    try:
        result = trainer.fit()
    finally:
        distributed.teardown(trainer.dist)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return trainer, result, losses


@pytest.mark.slow
def test_compiled_training_equals_eager_and_saves_eager_checkpoints(tmp_path):
    from torch._dynamo.utils import counters

    _, eager_result, eager_losses = _fit(_recipe(), tmp_path / "eager")
    counters.clear()
    # one inductor compile worker: a pool of them only competes for the cores of a busy machine (torch's own
    # config.patch: pytest's monkeypatch cannot restore torch's config attributes, it deletes them)
    with torch._inductor.config.patch(compile_threads=1):
        trainer, result, losses = _fit(_recipe(compile=True), tmp_path / "compiled")
    # the training step really ran through a compiled graph ...
    assert isinstance(trainer.step_net, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.step_net._orig_mod is trainer.model
    assert counters["stats"]["unique_graphs"] >= 1
    # ... and gives eager's losses, step by step, and eager's weights
    assert len(losses) == len(eager_losses) == STEPS
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    a, b = load_file(str(tmp_path / "eager" / "model.safetensors")), load_file(str(tmp_path / "compiled" /
                                                                                    "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    assert result["val_bpb"] == pytest.approx(eager_result["val_bpb"], rel=1e-5)

    # the checkpoint is the eager model's: same keys as the eager run's, no wrapper prefix
    ck = list_checkpoints(tmp_path / "compiled")[-1]
    keys = load_file(str(ck / "state.safetensors")).keys()
    assert not [k for k in keys if "_orig_mod" in k]
    assert keys == load_file(str(list_checkpoints(tmp_path / "eager")[-1] / "state.safetensors")).keys()
    # it loads, optimizer and all, into a freshly built eager model that then computes what the trained one does
    cfg = _recipe()
    task = build_task(cfg["task"])
    fresh = build_model(cfg["model"], task.model_defaults())
    load_checkpoint(ck, fresh, build_optimizer(fresh, TrainConfig.from_dict(cfg["train"])))
    x = torch.randint(0, 256, (2, 32))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trainer.model(x), rtol=0, atol=0)
    loaded = formers.load_run(tmp_path / "compiled")
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trainer.model(x), rtol=0, atol=0)


def test_compile_options_are_checked():
    assert TrainConfig.from_dict({}).compile is False
    assert TrainConfig.from_dict({"compile": True, "compile_mode": "max-autotune"}).compile_mode == "max-autotune"
    with pytest.raises(formers.FormersError, match="did you mean 'max-autotune'"):
        TrainConfig.from_dict({"compile": True, "compile_mode": "max-autotun"})
    with pytest.raises(formers.FormersError, match="train.compile: expected bool"):
        TrainConfig.from_dict({"compile": "fast"})
    with pytest.raises(formers.FormersError, match="did you mean 'compile'"):
        TrainConfig.from_dict({"compiled": True})


def test_eager_training_calls_the_model_itself(tmp_path):
    trainer = Trainer(_recipe(), tmp_path / "run")
    assert trainer.step_net is trainer.net is trainer.model


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compiled_two_rank_training_equals_eager_one_rank(parallel, tmp_path, monkeypatch):
    """torch.compile around DDP (graph cut at the gradient buckets) and around an FSDP2-sharded model (graph cut at
    every sharding unit, FSDP's hooks eager): 2 ranks of 2 rows, accumulating twice (no gradient sync on the first
    micro-batch), against 1 eager process of 4 rows."""
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    monkeypatch.setenv("TORCH_TRACE", str(tmp_path / "trace"))  # torch's structured compile log, one file a rank
    cfg = _recipe(batch_size=4, accum=2, dist_timeout=300)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    _, _, eager_losses = _fit(cfg, tmp_path / "eager")
    out = tmp_path / parallel
    r = subprocess.run([sys.executable, "-m", "formers", "train", str(recipe), "--nproc", "2", "--out", str(out),
                        "train.compile=true", f"train.parallel={parallel}"], capture_output=True, text=True,
                       timeout=300)  # a cold compile takes 30-90 s; a hang fails here
    assert r.returncode == 0, r.stderr[-3000:]
    # a fresh process: dynamo traced no functools cache (it warns about each one, once a process)
    assert "lru_cache" not in r.stderr, r.stderr[-3000:]
    # both ranks really compiled: their traces hold a dynamo graph and the code inductor generated for it
    traces = {p.name.split("_rank_")[1].split("_")[0]: p.read_text() for p in (tmp_path / "trace").iterdir()}
    assert sorted(traces) == ["0", "1"]
    assert all('"dynamo_output_graph"' in t and '"inductor_output_code"' in t for t in traces.values())
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == STEPS
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    a, b = load_file(str(tmp_path / "eager" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.slow
def test_a_compiler_failure_is_one_clear_error(tmp_path, monkeypatch):
    # a fresh inductor cache (a cached kernel needs no compiler) and a C++ compiler that does not exist
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()  # no graph compiled earlier in this process may be reused
    with torch._inductor.config.patch({"compile_threads": 1, "cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        with pytest.raises(formers.FormersError, match=r"train.compile=true: torch.compile failed: .*C\+\+ compiler"):
            _fit(_recipe(compile=True), tmp_path / "run")


@pytest.mark.slow
def test_compiled_training_at_block_causal_lengths_equals_eager(monkeypatch):
    """At 256 tokens eager CPU training runs formers' block-causal attention, compiled training SDPA (a first compiled
    call used to fail tracing the kernel, whose mask cache is written inside it): the same loss and gradients, the
    kernel not called and its mask cache empty until the eager step."""
    import torch.nn.functional as F

    from formers.nn import attention

    monkeypatch.setattr(attention, "_MASKS", {})  # as in a fresh process
    calls = []
    real = attention.BlockCausalAttention.apply
    monkeypatch.setattr(attention.BlockCausalAttention, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    lm = formers.create_model("lm", vocab=32, dim=16, depth=1, max_len=256,
                              block={"mixer": {"name": "softmax", "heads": 2}})
    x = torch.randint(0, 32, (1, 257))

    def grads(m):
        loss = F.cross_entropy(m(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1))
        return [loss, *torch.autograd.grad(loss, list(lm.parameters()))]

    with torch._inductor.config.patch(compile_threads=1):
        compiled = grads(torch.compile(lm))
    assert attention._MASKS == {} and calls == []
    eager = grads(lm)
    assert calls == [1]  # eager training did take the kernel (the C++ one, or the PyTorch body with its mask)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_compiled_forward_of_a_fresh_process_is_one_graph(monkeypatch):
    """The fast paths' checks keep a per-class cache; written while Dynamo traced the first forward of a process (the
    CLI's `train.compile=true`), it broke the graph at every module and PlainStack.forward ran eagerly. With the
    cache as a fresh process has it, tracing an LM (formers' own LayerNorm, a subclass not in it yet) gives one
    graph and no break, and leaves the cache as it was."""
    import torch._dynamo

    from formers.nn import hooks

    fresh = {c: c for c in hooks._INLINED}
    monkeypatch.setattr(hooks, "_OWNER", fresh)
    torch._dynamo.reset()
    lm = formers.create_model("lm", vocab=32, dim=16, depth=2, max_len=16).train()
    x = torch.randint(0, 32, (2, 16))
    e = torch._dynamo.explain(lambda t: lm(t).sum())(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [b.reason for b in e.break_reasons]
    assert hooks._OWNER == {c: c for c in hooks._INLINED}
    torch._dynamo.reset()
