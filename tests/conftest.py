import pytest
import torch
import yaml

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
