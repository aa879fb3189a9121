import os

import pytest
import torch
import yaml

# Tests use tiny tensors: one intra-op thread is as fast and does not collapse when the cores are shared
# (OpenMP spin-waiting with 2 threads on a busy 2-core machine made tiny forwards 100x slower).
torch.set_num_threads(1)

TINY_LM = {
    "name": "tiny",
    "model": {"name": "lm", "dim": 32, "depth": 2, "block": {"mixer": {"name": "softmax", "heads": 4}}},
    "task": {"name": "lm_bytes", "corpus": "stdlib", "seq_len": 32, "eval_limit": 2048, "sample_tokens": 20},
    "train": {"steps": 20, "batch_size": 4, "lr": 3e-3, "eval_every": 10, "ckpt_every": 10, "progress": False,
              "schedule": {"name": "cosine", "warmup": 2}, "threads": 1},
}


@pytest.fixture
def tiny_recipe(tmp_path):
    """Path to a tiny LM recipe on the Python standard library (no data install needed)."""
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY_LM))
    return p


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_REAL_RESOLVE = None  # formers.train.distributed.resolve_device, kept while the CPU stands in for `auto`
_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")


def _auto_means_cpu(on: bool) -> None:
    """`train.device=auto` resolves to the CPU and started processes see no GPU (on), or both as torch has them."""
    global _REAL_RESOLVE
    from formers.train import distributed

    if _REAL_RESOLVE is None:
        _REAL_RESOLVE = distributed.resolve_device
    real = _REAL_RESOLVE
    distributed.resolve_device = ((lambda name, local_rank=0: real("cpu" if name == "auto" else name, local_rank))
                                  if on else real)
    if on:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif _VISIBLE is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = _VISIBLE


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """On a machine with a GPU, `train.device=auto` trains there in bf16 and changes the numbers this suite pins on
    the CPU (float rounding, resumes, equal runs). Every test but tests/test_cuda.py (the GPU's own checks) therefore
    gets the CPU for `auto`, and the processes it starts see no GPU. Set here, before any of the test's fixtures, so
    that module- and session-scoped fixtures that train (built on a module's first test) get it too; a function-scoped
    fixture would come after them. Nothing changes on a machine without a GPU."""
    if torch.cuda.is_available():
        _auto_means_cpu(item.path.name != "test_cuda.py")
