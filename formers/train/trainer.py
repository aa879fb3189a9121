"""The trainer: any registered model on any registered task, from a recipe.

A run folder holds `config.yaml` (resolved), `metrics.jsonl`, `ckpt-<step>/` checkpoints (model, optimizer and RNG
state in safetensors + JSON, written atomically every `ckpt_every` steps), `model.safetensors` (final weights),
`loss.png` and `summary.md`. A run killed at any point and resumed with `--resume` ends with the same weights,
bit for bit, as an uninterrupted run on the same machine.

Under torchrun (`formers train RECIPE --nproc N`) the same loop runs data-parallel (formers/train/distributed.py):
`train.batch_size` is the global batch, every rank draws it from the shared data generator and trains on its
slice, rank 0 alone writes the run folder, the log and the progress bar, and checkpoints hold full tensors, so a
run saved by N processes resumes in any number of them (docs/distributed.md).

`train.compile=true` runs the training forward through `torch.compile` (inductor): the compiled wrapper is called
by the training step alone; checkpoints, final weights, evaluation and sampling use the eager model, so saved
state dicts carry no `_orig_mod.` prefix and an evaluation or generation never triggers a compile (docs/training.md).
"""

from __future__ import annotations

import contextlib
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
from formers.train import distributed
from formers.train.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from formers.train.optim import param_groups

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes (train.compile_mode)


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
    threads: int | None = None        # torch CPU threads; default: torch's own choice (1 per rank with --nproc)
    progress: bool = True             # show a progress bar
    sample: bool = True               # print a sample at the end when the task makes one
    device: str = "auto"              # auto | cpu | cuda (auto: a CUDA GPU when torch sees one)
    precision: str = "auto"           # auto | fp32 | bf16 | fp16 autocast (auto: bf16 on a GPU that runs it, else fp32)
    parallel: str = "ddp"             # with several processes: ddp (replicate) | fsdp (shard params, grads, optimizer)
    dist_timeout: float = 300.0       # seconds a rank waits for the others in a collective before failing
    compile: bool = False             # torch.compile the training forward (evaluation and sampling stay eager)
    compile_mode: str = "default"     # default | reduce-overhead | max-autotune (torch.compile's mode; with compile)
    channels_last: bool = False       # 4-D weights in NHWC order: faster convolutions (timm's --channels-last)

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
        for k, allowed in (("device", distributed.DEVICES), ("precision", distributed.PRECISIONS),
                           ("parallel", distributed.PARALLEL), ("compile_mode", COMPILE_MODES)):
            if getattr(tc, k) not in allowed:
                raise FormersError(f"train.{k}: unknown value '{getattr(tc, k)}'{_hint(getattr(tc, k), allowed)}; "
                                   f"use one of {', '.join(allowed)}")
        if tc.dist_timeout <= 0:
            raise FormersError(f"train.dist_timeout: must be > 0 seconds, got {tc.dist_timeout}")
        if tc.epochs is None and (tc.steps is None or tc.steps < 1):
            raise FormersError("train: give steps >= 1 or epochs")
        return tc


# options that say how to run, not what to train: a run may resume with them changed (on another machine, on more
# processes or none, compiled or not), and with more or fewer steps
HOW_TO_RUN = ("threads", "progress", "device", "precision", "parallel", "dist_timeout", "compile", "compile_mode",
              "channels_last")
EXECUTION_OPTIONS = ("steps", *HOW_TO_RUN)


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


def build_optimizer(model, tc: TrainConfig):
    return build("optimizer", tc.optimizer, path="train.optimizer", reserved=("params", "lr"),
                 params=param_groups(model, tc.weight_decay), lr=tc.lr)


def build_schedule(tc: TrainConfig):
    return build("schedule", tc.schedule, path="train.schedule")


def _build_parts(cfg: dict[str, Any], device: str | None = None):
    """(task, model, TrainConfig) of a validated recipe, the task's data not yet prepared; `device="meta"` builds
    the model without memory or initialisation, to check it."""
    tc = TrainConfig.from_dict(cfg["train"])
    torch.manual_seed(tc.seed)  # the initial weights depend on the seed alone
    task = build_task(cfg["task"])
    with torch.device(device) if device else contextlib.nullcontext():
        model = build_model(cfg["model"], task.model_defaults())
    return task, model, tc


def resolve(cfg: dict[str, Any]):
    """Validate a whole recipe and build its parts: (task, model, TrainConfig). Nothing is written."""
    task, model, tc = _build_parts(cfg)
    task.prepare()  # data last: a config typo is reported even when the data is not there yet
    return task, model, tc


# ------------------------------------------------------------------------------------------------------ running

def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_run_dir(d: Path, resume: bool, force: bool) -> bool:
    """Whether folder `d` already holds a run; refuses to overwrite one unless told to resume or force."""
    had_run = d.exists() and (any(d.glob("ckpt-*")) or (d / "metrics.jsonl").exists())
    if had_run and not (resume or force):
        raise FormersError(f"run folder {d} already holds a run; add --resume to continue it, --force to start "
                           "over, or --out NEW_DIR")
    return had_run


def check_same_recipe(saved: Path, cfg: dict[str, Any]) -> None:
    """--resume: the recipe must be the one the run folder's config.yaml recorded, but for how the run is run."""
    if not saved.exists():
        return
    old = C.parse_sections(saved.read_text(), str(saved))
    a, b = dict(old), dict(cfg)
    a["train"] = {k: v for k, v in a.get("train", {}).items() if k not in EXECUTION_OPTIONS}
    b["train"] = {k: v for k, v in b.get("train", {}).items() if k not in EXECUTION_OPTIONS}
    if a != b:
        raise FormersError(f"--resume: the recipe differs from {saved} (only train.steps and how it runs: "
                           f"{', '.join(HOW_TO_RUN)} may change); resume with the same recipe and overrides")


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
        self.dist = distributed.setup(tc)  # device, precision, threads; the process group under torchrun
        if tc.channels_last:  # same values, NHWC storage: oneDNN/cuDNN convolutions skip their layout reorders
            self.model.to(memory_format=torch.channels_last)
        if tc.epochs is not None:
            per_step = tc.batch_size * tc.accum
            self.total = max(1, math.ceil(tc.epochs * self.task.train_size() / per_step))
        else:
            self.total = tc.steps
        # what the training step calls: a DDP wrapper, the model sharded in place by FSDP, or the model itself
        self.net = distributed.wrap(self.model, self.dist)
        # ... and with train.compile, torch.compile's wrapper around that (the training forward only)
        self.step_net = compile_for_training(self.net, tc, self.dist)
        self.scaler = distributed.grad_scaler(self.dist)
        self.optimizer = build_optimizer(self.model, tc)
        self.schedule = build_schedule(tc)

    # -- run folder
    def _prepare_dir(self) -> int:
        d = self.run_dir
        had_run = check_run_dir(d, self.resume, self.force)
        if had_run and self.force and not self.resume:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        clean_partial(d)
        saved = d / "config.yaml"
        if self.resume:
            check_same_recipe(saved, self.cfg)
        _atomic_text(saved, C.dump(self.cfg))
        return 0

    def _rng_state(self, data_gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Every rank holds the same RNG streams (same seed, same draws), so rank 0's state is the run's."""
        state = {"torch": torch.get_rng_state()}
        if data_gen is not None:
            state["data"] = data_gen.get_state()
        if self.dist.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def _checkpoint_meta(self, best, bad) -> dict[str, Any]:
        meta = {"best": best, "bad": bad, "total": self.total, "world_size": self.dist.world,
                "parallel": self.dist.parallel, "train_seconds": self._seconds()}
        if self.scaler is not None:
            meta["grad_scaler"] = self.scaler.state_dict()
        return meta

    def _seconds(self) -> float:
        """Training time of the run so far: the checkpointed time of earlier sessions plus this one's."""
        return self._prior_seconds + time.perf_counter() - self._started

    def fit(self) -> dict[str, Any]:
        tc, model, task, dist = self.tc, self.model, self.task, self.dist
        if dist.main:
            self._prepare_dir()
        distributed.barrier(dist)  # the folder is ready (an old run --force'd away) before any rank reads it
        # one seed for every rank: random draws inside the model (dropout, noise, redrawn features) are the same on
        # every rank, so replicas and shards never disagree, and rank 0's RNG state is the whole run's
        torch.manual_seed(tc.seed)
        data_gen = torch.Generator().manual_seed(tc.seed)
        metrics_path = self.run_dir / "metrics.jsonl"
        start, best, bad = 0, None, 0
        self._prior_seconds, self._started = 0.0, time.perf_counter()
        ckpts = list_checkpoints(self.run_dir) if self.resume else []
        if ckpts:
            meta, rng = load_checkpoint(ckpts[-1], model, self.optimizer)
            start, best, bad = meta["step"], meta.get("best"), meta.get("bad", 0)
            self._prior_seconds = float(meta.get("train_seconds", 0.0))  # a resumed run's time counts all sessions
            torch.set_rng_state(rng["torch"])
            data_gen.set_state(rng["data"])
            if "cuda" in rng and dist.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], dist.device)
            if self.scaler is not None and "grad_scaler" in meta:
                self.scaler.load_state_dict(meta["grad_scaler"])
            if dist.main:
                kept = [r for r in _read_metrics(metrics_path) if r.get("step", 0) <= start and not r.get("final")]
                _atomic_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
                print(f"resuming {self.run_dir} from step {start}"
                      + (f" ({meta['world_size']} processes saved it, {dist.world} continue)"
                         if meta.get("world_size", 1) != dist.world else ""))
        elif dist.main:
            if self.resume:
                print(f"--resume: no checkpoint in {self.run_dir} (train.ckpt_every sets how often they are saved); "
                      "training from step 0")
            if metrics_path.exists():
                metrics_path.unlink()

        model.train()
        if tc.compile and dist.main and start < self.total:
            print("train.compile: the first step compiles the model, which may take minutes on a CPU")
        log = open(metrics_path if dist.main else os.devnull, "a")  # rank 0 alone writes the log
        bar = _progress(self.total, start, tc.progress and dist.main)
        t0, tokens, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
        stopped_early = False
        done = start
        try:
            for step in range(start, self.total):
                set_step(model, step)
                lr = tc.lr * self.schedule(step, self.total)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                step_loss = 0.0
                for i in range(tc.accum):
                    # the global batch from the shared generator; this rank keeps its rows
                    batch = distributed.local_rows(task.train_batch(tc.batch_size, data_gen), dist, tc.batch_size)
                    with distributed.grad_sync(self.net, dist, last=i == tc.accum - 1):  # no_sync until the last
                        with distributed.autocast(dist), compiling(tc):
                            loss = task.loss(self.step_net, batch)
                            aux = aux_losses(model)
                            total_loss = loss + sum(aux.values()) if aux else loss
                        total_loss = total_loss / tc.accum
                        (self.scaler.scale(total_loss) if self.scaler else total_loss).backward()
                    tokens += task.count(batch) * dist.world
                    step_loss += loss.item()
                    n_acc += 1
                if not math.isfinite(step_loss):  # this rank's rows; no communication
                    raise FormersError(f"loss became {step_loss} at step {step}; lower train.lr or enable grad_clip")
                loss_acc += step_loss
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if done % tc.log_every == 0 or done == self.total:  # every rank: the collectives below
                    # the global batch's loss: the mean over the ranks of each one's mean over its rows
                    loss_acc = distributed.mean_over_ranks(loss_acc, dist)
                    if distributed.is_sharded(grad_norm):
                        grad_norm = grad_norm.full_tensor()
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
                    ev = self._evaluate(limit=getattr(task, "eval_limit", None))  # rank 0's, on every rank
                    log.write(json.dumps({"step": done, **ev}) + "\n")
                    log.flush()
                    if tc.patience is not None:  # the same decision on every rank: the same `ev`
                        best, bad, stopped_early = self._early_stop(ev, best, bad)
                if done % tc.ckpt_every == 0 or stopped_early:
                    save_checkpoint(self.run_dir, done, model, self.optimizer, self._rng_state(data_gen),
                                    self._checkpoint_meta(best, bad), write=dist.main)
                bar.update(1)
                if stopped_early:
                    bar.write(f"early stop at step {done}: {task.metric} did not improve for {tc.patience} evals")
                    break
        except Exception as e:
            if tc.compile and isinstance(e, torch._dynamo.exc.BackendCompilerFailed):
                raise FormersError(f"train.compile=true: torch.compile failed: {str(e).strip().splitlines()[0]}; "
                                   "fix that (on a CPU inductor needs a C++ compiler: gcc, or CXX=...) or set "
                                   "train.compile=false") from e
            raise
        finally:
            bar.close()
            log.close()

        distributed.barrier(dist)  # rank 0 has written everything the others may read below
        if tc.patience is not None and (self.run_dir / "best.safetensors").exists():
            load_weights(model, self.run_dir / "best.safetensors")
        save_weights(model, self.run_dir / "model.safetensors", write=dist.main)
        final = self._evaluate()
        result = {"step": done, "final": True, **final, "train_seconds": self._seconds()}
        sample = None
        if tc.sample and self._evaluates():
            with distributed.bridge_device(model, dist):
                sample = task.sample(model)
        if dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(result) + "\n")
            if sample is not None:
                _atomic_text(self.run_dir / "sample.txt", sample)
            plot_metrics(metrics_path, self.run_dir / "loss.png", task.metric)
            self._summary(result, sample)
        result["sample"] = sample
        # The ranks leave together. Without this barrier, a rank could drop its process group just after its last
        # broadcast, while a gloo worker thread is still freeing that broadcast's tensors. Freeing a tensor made in
        # Python needs the GIL, and torch 2.13's ~ProcessGroupGloo joins that thread while holding the GIL: the
        # rank hangs after training (seen 2 times in 26 two-rank compiled runs, as a 600 s CI timeout). While a
        # rank waits here, its GIL is free: the worker thread finishes, and a barrier frees no Python tensors.
        distributed.barrier(dist)
        return result

    def _evaluates(self) -> bool:
        """Whether this rank runs the task's evaluation (and sampling): every rank of a sharded model (each forward
        needs them all), rank 0 alone of a replicated one."""
        return self.dist.main or self.dist.parallel == "fsdp"

    def _evaluate(self, **kw) -> dict[str, float]:
        """Rank 0's evaluation, on every rank (all of them must call it), so that they all branch alike. When rank
        0 evaluates alone, its RNG state comes along: an evaluation may draw random numbers (random features, LSH
        rotations), and every rank must keep the same random streams as rank 0."""
        dist = self.dist
        ev = rng = None
        if self._evaluates():
            with distributed.bridge_device(self.model, dist), distributed.autocast(dist):
                ev = self.task.evaluate(self.model, **kw)
        if dist.parallel != "ddp":
            return distributed.broadcast_object(ev, dist)
        if dist.main:
            rng = self._rng_state()
        ev, rng = distributed.broadcast_object((ev, rng), dist)
        if not dist.main:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], dist.device)
        return ev

    def _early_stop(self, ev, best, bad):
        value = ev.get(self.task.metric)
        if value is None:
            return best, bad, False
        better = best is None or (value < best if self.task.mode == "min" else value > best)
        if better:
            save_weights(self.model, self.run_dir / "best.safetensors", write=self.dist.main)
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


def compile_for_training(net: torch.nn.Module, tc: TrainConfig, dist: distributed.Dist) -> torch.nn.Module:
    """The module the training step calls: `net` itself, or with `train.compile` torch.compile's wrapper around it,
    a new object, so that `net` and the model inside it stay eager for checkpoints (no `_orig_mod.` keys),
    evaluation and sampling, which would otherwise compile again for eval mode and every new length.

    The wrapper goes around the distributed wrapper. DDP: as torch recommends, dynamo's DDPOptimizer cuts the graph
    at the gradient buckets, so their all-reduce still overlaps the backward. FSDP2: its hooks are marked
    `torch._dynamo.disable` (torch/distributed/fsdp/_fully_shard/_fsdp_common.py), so the graph is cut at every
    sharding unit (each block) and the gathers and reduce-scatters run eagerly between compiled blocks: per-block
    compilation without compiling the blocks in place."""
    if not tc.compile:
        return net
    return torch.compile(net, mode=None if tc.compile_mode == "default" else tc.compile_mode)


def compiling(tc: TrainConfig):
    """Around each compiled training forward: integers held by modules (`PRepBN.t`, the step that `set_step` hands
    out) become symbolic once they change, instead of one recompile per value until torch's recompile limit
    (8; the model would then run eagerly). Nothing without `train.compile`."""
    if not tc.compile:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)


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


def _load_cfg(recipe: str | dict, overrides: list[str] | None, out: str | Path | None) -> tuple[dict, Path]:
    """The recipe (built-in name, path or dict) with its overrides applied, and the run folder."""
    cfg = C.validate_sections(dict(recipe)) if isinstance(recipe, dict) else C.load_recipe(recipe)
    cfg = C.apply_overrides(cfg, overrides or [])
    return cfg, Path(out) if out else Path("runs") / cfg["name"]


def train(recipe: str | dict, overrides: list[str] | None = None, out: str | Path | None = None,
          resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Train a recipe (built-in name, path or dict) with dotted overrides; returns the final metrics."""
    cfg, run_dir = _load_cfg(recipe, overrides, out)
    trainer = Trainer(cfg, run_dir, resume=resume, force=force)
    try:
        result = trainer.fit()
    finally:
        distributed.teardown(trainer.dist)
    result["run_dir"] = str(run_dir)
    return result


def check_launch(recipe: str | dict, overrides: list[str] | None, nproc: int, out: str | Path | None = None,
                 resume: bool = False, force: bool = False) -> None:
    """What `--nproc N` checks before it starts N processes, so that a mistake costs one line here rather than N
    tracebacks: the recipe as `train` validates it (the task and the model built, the model on the meta device,
    without data; the optimizer and schedule specs), the request (batch, GPUs, precision), the run folder and,
    with --resume, that the recipe is the run's."""
    cfg, run_dir = _load_cfg(recipe, overrides, out)
    _, model, tc = _build_parts(cfg, device="meta")
    build_optimizer(model, tc)
    build_schedule(tc)
    distributed.check_request(tc.device, tc.precision, nproc, tc.batch_size)
    check_run_dir(run_dir, resume, force)
    if resume:
        check_same_recipe(run_dir / "config.yaml", cfg)


def load_run(run_dir: str | Path, checkpoint: str | None = None):
    """Rebuild a trained model from its run folder (final weights, else the latest checkpoint); eval mode."""
    d = Path(run_dir)
    if not (d / "config.yaml").exists():
        raise FormersError(f"{d} is not a run folder (no config.yaml); give the folder `formers train` wrote")
    path = d / "config.yaml"
    cfg = C.parse_sections(path.read_text(), str(path))
    try:  # a config.yaml edited by hand (or from another formers version): every error names the file
        cfg = C.validate_sections(cfg)
        task = build_task(cfg["task"])
        model = build_model(cfg["model"], task.model_defaults())
    except FormersError as e:
        raise FormersError(f"{path}: {e}") from None
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
