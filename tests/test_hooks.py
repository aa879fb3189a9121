"""The auxiliary-loss and step hooks of DESIGN §2, end to end through the trainer."""

import json

import pytest
import torch
from torch import nn

import formers
from formers.nn import aux_losses, report_aux, set_step
from formers.registry import _REGISTRY, register

STEPS_SEEN: list[int] = []


@pytest.fixture
def probe_ffn():
    @register("ffn", "_probe", paper="baseline")
    class ProbeFFN(nn.Module):
        """Test-only FFN: identity-plus-linear that reports 0.5 * mean(y^2) as an auxiliary loss."""

        def __init__(self, dim: int):
            super().__init__()
            self.lin = nn.Linear(dim, dim)

        def set_step(self, step):
            STEPS_SEEN.append(step)

        def forward(self, x):
            y = self.lin(x)
            report_aux(self, "probe", 0.5 * y.pow(2).mean())
            return y

    STEPS_SEEN.clear()
    yield
    del _REGISTRY["ffn"]["_probe"]


def test_aux_losses_sum_by_name_and_clear():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    model = nn.Sequential(a, b)
    report_aux(a, "bal", torch.tensor(1.5))
    report_aux(b, "bal", torch.tensor(2.0))
    report_aux(b, "z", torch.tensor(3.0))
    out = aux_losses(model)
    assert out["bal"].item() == 3.5 and out["z"].item() == 3.0
    assert aux_losses(model) == {}


def test_trainer_adds_aux_losses_and_calls_set_step(probe_ffn, tiny_recipe, tmp_path):
    formers.fit(tiny_recipe, ["model.block.ffn=_probe", "model.depth=2", "train.steps=6", "train.log_every=1",
                              "train.sample=false"], out=tmp_path / "r")
    # two blocks, each told every step 0..5 exactly once, in order
    assert STEPS_SEEN == [s for s in range(6) for _ in range(2)]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_probe"] > 0 for r in rows if "loss" in r)


def test_set_step_reaches_nested_modules(probe_ffn):
    model = formers.create_model("lm", vocab=10, dim=8, depth=3, block={"ffn": "_probe", "mixer": {"heads": 2}})
    set_step(model, 7)
    assert STEPS_SEEN == [7, 7, 7]


def test_epochs_set_the_step_count(tmp_path):
    result = formers.fit({
        "name": "ep", "model": {"name": "encoder", "dim": 16, "depth": 1},
        "task": {"name": "majority", "n_train": 100, "n_val": 20},
        "train": {"epochs": 2, "batch_size": 8, "progress": False, "eval_every": 1000},
    }, out=tmp_path / "ep")
    assert result["step"] == 25  # ceil(2 * 100 / 8)
