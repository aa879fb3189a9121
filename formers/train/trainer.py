"""The trainer: any registered model on any registered task, from a recipe.

A run folder holds `config.yaml` (resolved), `metrics.jsonl`, `ckpt-<step>/` checkpoints (model, optimizer and RNG
state in safetensors + JSON, written atomically every `ckpt_every` steps), `model.safetensors` (final weights),
`loss.png` and `summary.md`. A run killed at any point and resumed with `--resume` ends with the same weights,
bit for bit, as an uninterrupted run on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from formers import config as C
from formers.nn.hooks import aux_losses, set_step
from formers.registry import FormersError, _hint, build, check_type, get, split_spec
from formers.train.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from formers.train.optim import param_groups


@dataclass
class TrainConfig:
    """The `train` section of a recipe."""

    steps: int | None = 1000          # optimizer steps (or give `epochs`)
    epochs: float | None = None       # passes over the task's training examples; overrides steps
    batch_size: int = 16
    optimizer: Any = "adamw"          # adamw | adam | sgd, or {name: adamw, betas: [0.9, 0.95]}
    lr: float = 3e-4
    weight_decay: float = 0.1         # on matrices only; never on norms, biases, embeddings
    schedule: Any = "cosine"          # cosine | constant | rsqrt | step_decay, or {name: cosine, warmup: 100}
    grad_clip: float | None = 1.0     # max global grad norm; null disables
    accum: int = 1                    # gradient accumulation micro-batches per step
    eval_every: int = 200             # steps between (quick) validation evals
    patience: int | None = None       # early stopping: evals without improvement before stopping
    ckpt_every: int = 200             # steps between checkpoints
    log_every: int = 10
    seed: int = 0
    threads: int | None = None        # torch CPU threads; default: torch's own choice
    progress: bool = True             # show a progress bar
    sample: bool = True               # print a sample at the end when the task makes one

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name: f for f in fields(cls)}
        for k, v in d.items():
            if k not in names:
                raise FormersError(f"train: unknown option '{k}'{_hint(k, names)}; options: {', '.join(names)}")
            check_type(f"train.{k}", v, names[k].type, cls)
        tc = cls(**d)
        for k in ("batch_size", "accum", "eval_every", "ckpt_every", "log_every"):
            if getattr(tc, k) < 1:
                raise FormersError(f"train.{k}: must be >= 1, got {getattr(tc, k)}")
        return tc


# ----------------------------------------------------------------------------------------------------- building

def build_task(task_cfg: dict[str, Any]):
    return build("task", task_cfg, path="task")


def build_model(model_cfg: dict[str, Any], defaults: dict[str, Any] | None = None):
    """Build the model of a recipe; data-implied options (vocab, max_len, num_classes) fill in unset keys."""
    name, opts = split_spec(model_cfg, "model")
    entry = get("model", name, "model")
    accepted = entry.options()
    for k, v in (defaults or {}).items():
        if k in accepted and k not in opts:
            opts[k] = v
    return build("model", {"name": name, **opts}, path="model")


def resolve(cfg: dict[str, Any]):
    """Validate a whole recipe and build its parts: (task, model, TrainConfig). Nothing is written."""
    tc = TrainConfig.from_dict(cfg["train"])
    torch.manual_seed(tc.seed)  # the initial weights depend on the seed alone
    task = build_task(cfg["task"])
    model = build_model(cfg["model"], task.model_defaults())
    task.prepare()  # data last: a config typo is reported even when the data is not there yet
    return task, model, tc


# ------------------------------------------------------------------------------------------------------ running

def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a kill
    return out


class Trainer:
    """Runs one recipe into one run folder."""

    def __init__(self, cfg: dict[str, Any], run_dir: str | Path, *, resume: bool = False, force: bool = False):
        self.cfg = cfg
        self.task, self.model, self.tc = resolve(cfg)
        self.run_dir = Path(run_dir)
        self.resume, self.force = resume, force
        tc = self.tc
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.epochs is not None:
            per_step = tc.batch_size * tc.accum
            self.total = max(1, math.ceil(tc.epochs * self.task.train_size() / per_step))
        elif tc.steps is not None and tc.steps >= 1:
            self.total = tc.steps
        else:
            raise FormersError("train: give steps >= 1 or epochs")
        self.optimizer = build("optimizer", tc.optimizer, path="train.optimizer", reserved=("params", "lr"),
                               params=param_groups(self.model, tc.weight_decay), lr=tc.lr)
        self.schedule = build("schedule", tc.schedule, path="train.schedule")

    # -- run folder
    def _prepare_dir(self) -> int:
        d = self.run_dir
        had_run = d.exists() and (any(d.glob("ckpt-*")) or (d / "metrics.jsonl").exists())
        if had_run and not (self.resume or self.force):
            raise FormersError(f"run folder {d} already holds a run; add --resume to continue it, --force to start "
                               "over, or --out NEW_DIR")
        if had_run and self.force and not self.resume:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        clean_partial(d)
        saved = d / "config.yaml"
        if self.resume and saved.exists():
            old = C.yaml.safe_load(saved.read_text())
            a, b = dict(old), dict(self.cfg)
            a["train"] = {k: v for k, v in a.get("train", {}).items() if k != "steps"}
            b["train"] = {k: v for k, v in b.get("train", {}).items() if k != "steps"}
            if a != b:
                raise FormersError(f"--resume: the recipe differs from {saved} (only train.steps may change); "
                                   "resume with the same recipe and overrides")
        _atomic_text(saved, C.dump(self.cfg))
        return 0

    def _rng_state(self, data_gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"torch": torch.get_rng_state(), "data": data_gen.get_state()}

    def fit(self) -> dict[str, Any]:
        tc, model, task = self.tc, self.model, self.task
        self._prepare_dir()
        torch.manual_seed(tc.seed)
        data_gen = torch.Generator().manual_seed(tc.seed)
        metrics_path = self.run_dir / "metrics.jsonl"
        start, best, bad = 0, None, 0
        ckpts = list_checkpoints(self.run_dir) if self.resume else []
        if ckpts:
            meta, rng = load_checkpoint(ckpts[-1], model, self.optimizer)
            start, best, bad = meta["step"], meta.get("best"), meta.get("bad", 0)
            torch.set_rng_state(rng["torch"])
            data_gen.set_state(rng["data"])
            kept = [r for r in _read_metrics(metrics_path) if r.get("step", 0) <= start and not r.get("final")]
            _atomic_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            print(f"resuming {self.run_dir} from step {start}")
        elif metrics_path.exists():
            metrics_path.unlink()

        model.train()
        log = open(metrics_path, "a")
        bar = _progress(self.total, start, tc.progress)
        t0, tokens, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
        started = time.perf_counter()
        stopped_early = False
        done = start
        try:
            for step in range(start, self.total):
                set_step(model, step)
                lr = tc.lr * self.schedule(step, self.total)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                for _ in range(tc.accum):
                    batch = task.train_batch(tc.batch_size, data_gen)
                    loss = task.loss(model, batch)
                    aux = aux_losses(model)
                    total_loss = loss + sum(aux.values()) if aux else loss
                    (total_loss / tc.accum).backward()
                    tokens += task.count(batch)
                    loss_acc += loss.item()
                    n_acc += 1
                if not math.isfinite(loss_acc):
                    raise FormersError(f"loss became {loss_acc} at step {step}; lower train.lr or enable grad_clip")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if done % tc.log_every == 0 or done == self.total:
                    dt = time.perf_counter() - t0
                    rec = {"step": done, "loss": loss_acc / n_acc, "lr": lr, "tokens_per_s": tokens / max(dt, 1e-9),
                           "grad_norm": float(grad_norm)}
                    rec.update({f"aux_{k}": float(v.detach()) for k, v in aux.items()} if aux else {})
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    t0, tokens, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
                # the last step is scored by the final evaluation, except with early stopping, where it must also
                # compete for the best checkpoint that the final evaluation then loads
                if done % tc.eval_every == 0 and (done != self.total or tc.patience is not None):
                    ev = task.evaluate(model, limit=getattr(task, "eval_limit", None))
                    log.write(json.dumps({"step": done, **ev}) + "\n")
                    log.flush()
                    if tc.patience is not None:
                        best, bad, stop = self._early_stop(ev, best, bad)
                        if stop:
                            stopped_early = True
                if done % tc.ckpt_every == 0 or stopped_early:
                    save_checkpoint(self.run_dir, done, model, self.optimizer, self._rng_state(data_gen),
                                    {"best": best, "bad": bad, "total": self.total})
                bar.update(1)
                if stopped_early:
                    bar.write(f"early stop at step {done}: {task.metric} did not improve for {tc.patience} evals")
                    break
        finally:
            bar.close()
            log.close()

        if tc.patience is not None and (self.run_dir / "best.safetensors").exists():
            load_weights(model, self.run_dir / "best.safetensors")
        save_weights(model, self.run_dir / "model.safetensors")
        final = task.evaluate(model)
        result = {"step": done, "final": True, **final,
                  "train_seconds": time.perf_counter() - started}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(result) + "\n")
        sample = task.sample(model) if tc.sample else None
        if sample is not None:
            _atomic_text(self.run_dir / "sample.txt", sample)
        plot_metrics(metrics_path, self.run_dir / "loss.png", task.metric)
        self._summary(result, sample)
        result["sample"] = sample
        return result

    def _early_stop(self, ev, best, bad):
        value = ev.get(self.task.metric)
        if value is None:
            return best, bad, False
        better = best is None or (value < best if self.task.mode == "min" else value > best)
        if better:
            save_weights(self.model, self.run_dir / "best.safetensors")
            return value, 0, False
        return best, bad + 1, bad + 1 >= self.tc.patience

    def _summary(self, result, sample):
        lines = [f"# Run `{self.cfg.get('name', self.run_dir.name)}`", "",
                 f"- model: `{self.cfg['model'].get('name')}`, {self.model.num_params():,} parameters",
                 f"- task: `{self.cfg['task'].get('name')}`", f"- steps: {result['step']} of {self.total}",
                 f"- training time: {result['train_seconds']:.0f} s", "", "## Final metrics", ""]
        lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in result.items()
                  if k not in ("final", "step", "train_seconds")]
        lines += ["", "![loss](loss.png)", ""]
        if sample:
            lines += ["## Sample", "", "```", sample, "```", ""]
        lines += ["## Config", "", "```yaml", C.dump(self.cfg).rstrip(), "```", ""]
        _atomic_text(self.run_dir / "summary.md", "\n".join(lines))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5)


def plot_metrics(metrics_path: Path, out: Path, metric: str) -> None:
    """Training loss (and the validation metric on a second axis) against step, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r[metric]) for r in rows if metric in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats)")
    ax.grid(alpha=0.3)
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:orange", label=metric)
        ax2.set_ylabel(metric)
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(out.parent.name)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)


def train(recipe: str | dict, overrides: list[str] | None = None, out: str | Path | None = None,
          resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Train a recipe (built-in name, path or dict) with dotted overrides; returns the final metrics."""
    cfg = C.validate_sections(dict(recipe)) if isinstance(recipe, dict) else C.load_recipe(recipe)
    cfg = C.apply_overrides(cfg, overrides or [])
    run_dir = Path(out) if out else Path("runs") / cfg["name"]
    result = Trainer(cfg, run_dir, resume=resume, force=force).fit()
    result["run_dir"] = str(run_dir)
    return result


def load_run(run_dir: str | Path, checkpoint: str | None = None):
    """Rebuild a trained model from its run folder (final weights, else the latest checkpoint); eval mode."""
    d = Path(run_dir)
    if not (d / "config.yaml").exists():
        raise FormersError(f"{d} is not a run folder (no config.yaml); give the folder `formers train` wrote")
    cfg = C.validate_sections(C.yaml.safe_load((d / "config.yaml").read_text()))
    task = build_task(cfg["task"])
    model = build_model(cfg["model"], task.model_defaults())
    if (d / "model.safetensors").exists():
        load_weights(model, d / "model.safetensors")
    elif list_checkpoints(d):
        load_checkpoint(list_checkpoints(d)[-1], model)
    else:
        raise FormersError(f"{d} holds no weights yet (no model.safetensors, no ckpt-*); train it first")
    model.eval()
    model.run_config = cfg
    return model


__all__ = ["TrainConfig", "Trainer", "train", "load_run", "resolve"]
