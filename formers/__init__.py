"""formers: the Transformer systems of 81 papers as one registry of components, models, tasks and recipes.

    import formers
    model = formers.create_model("lm", vocab=256, dim=256, depth=4)
    attn = formers.build("mixer", "softmax", dim=256, heads=4, causal=True)
    result = formers.fit("lm_shakespeare", ["train.steps=100"])
    model = formers.load_run(result["run_dir"])
"""

from __future__ import annotations

from typing import Any

from formers.registry import FormersError, build, entries, get, register

__version__ = "0.1.0"


def create_model(name: str, **options: Any):
    """Build a registered model by name: `formers.create_model("lm", vocab=256, dim=128, depth=2)`."""
    return build("model", name, path="model", **options)


def fit(recipe, overrides=None, out=None, resume=False, force=False):
    """Train a recipe (built-in name, YAML path or dict) with dotted overrides; returns the final metrics and
    `run_dir`. Same as `formers train` on the command line; see `formers.train.trainer.train`."""
    from formers.train.trainer import train as _train

    return _train(recipe, overrides, out=out, resume=resume, force=force)


def load_run(run_dir, checkpoint=None):
    """Rebuild a trained model from a run folder; see `formers.train.trainer.load_run`."""
    from formers.train.trainer import load_run as _load_run

    return _load_run(run_dir, checkpoint)


def aux_losses(model):
    from formers.nn.hooks import aux_losses as _aux

    return _aux(model)


def set_step(model, step):
    from formers.nn.hooks import set_step as _set_step

    return _set_step(model, step)


__all__ = ["FormersError", "build", "create_model", "entries", "get", "load_run", "register", "fit",
           "aux_losses", "set_step", "__version__"]
