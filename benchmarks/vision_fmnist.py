"""Vision backbones on Fashion-MNIST under one equal training budget (issue 6).

Every registered vision model whose name ends in `_tiny` (28x28, 1 channel, 10 classes), plus the context rows
`mlp_image` and `cnn_small`, trains for the same wall-clock budget (default 5 minutes, 2 threads) with the recipe
`vit/<model>_fmnist` when one is shipped (`vit/mlp_fmnist`, `vit/cnn_fmnist` for the baselines), else the ViT
recipe's data and optimizer settings with the model swapped. Each row reports test accuracy on the official 10k test
set, parameters, and inference images/s (batch 256, eval mode, `fuse()`d, median of timed passes, in this process).

The trainer has no wall-clock limit, so the budget is turned into a step count: a few timed optimizer steps of the
model on real batches give the seconds per step, and the run gets budget / that many steps (the cosine schedule
needs its length up front). Periodic and final evaluations are outside the budget; `train_seconds` shows what each
run really took.

    python benchmarks/vision_fmnist.py [--budget-s 300] [--threads 2] [--only vit_tiny mlp_image] [--out PATH]
                                       [--set train.lr=2e-3 ...]   (recipe overrides, kept in each row)

Resumable: finished models are kept in the JSON file and not re-run; an interrupted one resumes from its last
checkpoint in results/tmp/vision_fmnist/<model> with the step count planned for it.

On a shared 2-core machine the three phases can be separated so that only the timed ones need it idle:
    --plan-only            time every model's steps (idle machine) and keep the step counts, train nothing
    --train-threads 1      train the planned steps with one thread (accuracy depends on the step count only, so the
                           other core may do other work meanwhile; train_seconds then shows the slower wall time)
    --measure-only         re-time inference images/s of the finished rows (idle machine) and rewrite the JSON/PNG
To check a committed row on another machine, take its step count instead of re-timing (a faster or slower CPU would
otherwise plan a different run): --steps-from results/vision_fmnist.json --out /tmp/check.json --tmp /tmp/check
Writes results/vision_fmnist.json and results/vision_fmnist.png (test accuracy against inference throughput).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import formers
from formers.bench.harness import load_rows, meta, save
from formers.config import apply_overrides, builtin_recipes, load_recipe
from formers.data.sources import get_source
from formers.models.vision.base import VisionModel
from formers.train.trainer import build_model, build_task

CONTEXT = {"mlp_image": "vit/mlp_fmnist", "cnn_small": "vit/cnn_fmnist"}
TEMPLATE = "vit/vit_tiny_fmnist"  # data and optimizer settings for a tiny model without its own recipe


def tiny_models() -> list[str]:
    """Registered `_tiny` models that build as VisionModels (on the meta device: no memory, no time)."""
    names = []
    for e in formers.entries("model"):
        if not e.name.endswith("_tiny"):
            continue
        try:
            with torch.device("meta"):
                ok = isinstance(formers.create_model(e.name), VisionModel)
        except Exception as err:  # a broken model of another module must not stop the sweep
            print(f"skipping {e.name}: does not build ({type(err).__name__}: {err})")
            continue
        if ok:
            names.append(e.name)
    return names


def recipe_for(name: str) -> dict[str, Any]:
    """The model's shipped recipe, else the ViT template with the model swapped; train.progress off."""
    own = CONTEXT.get(name, f"vit/{name}_fmnist")
    cfg = load_recipe(own if own in builtin_recipes() else TEMPLATE)
    if cfg["model"].get("name") != name:
        cfg["model"] = {"name": name}
    cfg["name"] = name
    cfg["train"]["progress"] = False
    cfg["train"]["sample"] = False
    return cfg


def seconds_per_step(cfg: dict[str, Any], task, budget_s: float) -> float:
    """Median time of an optimizer step (batch from the task, forward, aux losses, backward, AdamW), after two
    warm-up steps; times at least 3 steps and at most ~5% of the budget (20 steps)."""
    torch.manual_seed(0)
    model = build_model(cfg["model"], task.model_defaults())
    if cfg["train"].get("channels_last"):  # time the step the trainer will run
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    bs = cfg["train"]["batch_size"]

    def step():
        loss = task.loss(model, task.train_batch(bs, g))
        aux = formers.aux_losses(model)
        (loss + sum(aux.values()) if aux else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    times: list[float] = []
    while len(times) < 3 or (len(times) < 20 and sum(times) < 0.05 * budget_s):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plan(name: str, cfg: dict[str, Any], task, budget_s: float, plan_file: Path,
         fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Steps for the budget (kept in plan_file so that a resumed run uses the same count and schedule); `fixed`, a
    committed row of this model, gives its step count instead of timing this machine."""
    if plan_file.exists():
        return json.loads(plan_file.read_text())
    if fixed is not None:
        p = {"model": name, "budget_s": fixed["budget_s"], "seconds_per_step": fixed["seconds_per_step"],
             "steps": int(fixed["steps"]), "steps_from": "committed row"}
    else:
        sps = seconds_per_step(cfg, task, budget_s)
        p = {"model": name, "budget_s": budget_s, "seconds_per_step": sps, "steps": max(2, int(budget_s / sps))}
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(p))
    return p


def schedule_for(cfg: dict[str, Any], steps: int) -> None:
    """Scale the recipe's warmup and eval/checkpoint intervals to the planned step count."""
    tr = cfg["train"]
    old = tr.get("steps") or steps
    sched = tr.get("schedule")
    if isinstance(sched, dict) and "warmup" in sched:
        sched["warmup"] = max(1, round(sched["warmup"] * steps / old)) if steps > 1 else 0
    tr["steps"] = steps
    tr["eval_every"] = max(1, steps // 4)
    tr["ckpt_every"] = max(1, steps // 10)
    tr["log_every"] = max(1, min(tr.get("log_every", 10), steps // 20 or 1))


@torch.inference_mode()
def images_per_s(model: torch.nn.Module, in_chans: int, side: int, batch: int = 256, reps: int = 5) -> float:
    """Inference throughput: median of `reps` timed forward passes of `batch` random images after one warm-up."""
    model.eval()
    x = torch.randn(batch, in_chans, side, side)
    model(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def run_one(name: str, budget_s: float, threads: int, tmp: Path, train_threads: int | None = None,
            plan_only: bool = False, overrides: list[str] | None = None,
            fixed: dict[str, Any] | None = None) -> dict[str, Any] | None:
    torch.set_num_threads(threads)
    cfg = apply_overrides(recipe_for(name), list(overrides or []))
    task = build_task(copy.deepcopy(cfg["task"]))
    task.prepare()
    run_dir = tmp / name
    p = plan(name, cfg, task, budget_s, tmp / f"{name}.plan.json", fixed)
    if plan_only:
        print(f"planned {name}: {p['steps']} steps ({p['seconds_per_step']:.3f} s/step)", flush=True)
        return None
    train_threads = train_threads or threads
    cfg["train"]["threads"] = train_threads
    torch.set_num_threads(train_threads)
    schedule_for(cfg, p["steps"])
    resume = (run_dir / "config.yaml").exists()
    print(f"== {name}: {p['steps']} steps ({p['seconds_per_step']:.3f} s/step, budget {budget_s:.0f} s)"
          f"{' (resuming)' if resume else ''}", flush=True)
    result = formers.fit(cfg, out=run_dir, resume=resume, force=not resume)
    model = formers.load_run(run_dir)
    test = task.evaluate(model, split="test")
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    defaults = task.model_defaults()
    entry = formers.get("model", name)
    torch.set_num_threads(threads)
    return {
        "model": name, "paper": entry.paper, "kind": "context" if name in CONTEXT else "backbone",
        "params": model.num_params(), "test_acc": round(test["test_acc"], 4), "test_loss": round(test["test_loss"], 4),
        "val_acc": round(result["val_acc"], 4), "images_per_s": round(images_per_s(model.fuse(), defaults["in_chans"],
                                                                                  defaults["img_size"]), 1),
        "train_images_per_s": round(statistics.median(r["tokens_per_s"] for r in train), 1) if train else None,
        "steps": p["steps"], "epochs": round(p["steps"] * cfg["train"]["batch_size"] / task.train_size(), 2),
        "budget_s": budget_s, "seconds_per_step": round(p["seconds_per_step"], 4),
        "train_seconds": round(result["train_seconds"], 1), "threads": threads, "train_threads": train_threads,
        "final_loss": round(train[-1]["loss"], 4) if train else None,
        "overrides": list(overrides or []) or None,
        "curve_step": [r["step"] for r in train], "curve_loss": [round(r["loss"], 4) for r in train],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
    for r in rows:
        context = r["kind"] == "context"
        ax.scatter(r["images_per_s"], 100 * r["test_acc"], s=40, marker="s" if context else "o",
                   color="tab:gray" if context else "tab:blue")
        ax.annotate(f"{r['model']} ({r['params'] / 1e6:.2f}M)", (r["images_per_s"], 100 * r["test_acc"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    budget = rows[0]["budget_s"] if rows else 0
    each = f"{budget / 60:.3g} min" if budget >= 60 else f"{budget:.0f} s"
    ax.set(xscale="log", xlabel="inference images/s (batch 256, eval, this CPU)", ylabel="test accuracy (%)",
           title=f"Fashion-MNIST, {each} of training each (grey squares: MLP / CNN context)")
    ax.margins(x=0.2, y=0.1)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=300.0, help="training seconds per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: every _tiny model + context)")
    ap.add_argument("--train-threads", type=int, default=None,
                    help="threads while training the planned steps (default --threads)")
    ap.add_argument("--plan-only", action="store_true", help="only time the steps and keep the plans")
    ap.add_argument("--measure-only", action="store_true", help="only re-time inference of the finished rows")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every model of this call, e.g. train.lr=2e-3 (kept in the row); "
                         "the planned step count is the model's, so change nothing that alters a step's cost")
    ap.add_argument("--out", default="results/vision_fmnist.json")
    ap.add_argument("--tmp", default=None, help="run folders (default results/tmp/vision_fmnist)")
    ap.add_argument("--steps-from", default=None, metavar="JSON",
                    help="take each model's step count from the rows of this results file (e.g. the committed "
                         "results/vision_fmnist.json) instead of timing this machine: reproduces a row's run")
    a = ap.parse_args(argv)
    out = Path(a.out)
    tmp = Path(a.tmp) if a.tmp else Path("results/tmp/vision_fmnist")
    names = a.only if a.only is not None else tiny_models() + list(CONTEXT)
    for n in names:
        formers.get("model", n)  # a typo fails before anything trains
        apply_overrides(recipe_for(n), list(a.overrides))  # and so does a bad override
    src = get_source("fashion_mnist")
    if not src.ready():
        src.fetch()  # from the local Debian package; no network
    torch.set_num_threads(a.threads)
    fixed: dict[str, dict[str, Any]] = {}
    if a.steps_from:
        if not Path(a.steps_from).exists():
            raise SystemExit(f"--steps-from: no file {a.steps_from}; give a results JSON such as "
                             f"results/vision_fmnist.json")
        fixed = {r["model"]: r for r in load_rows(Path(a.steps_from))}
        missing = [n for n in names if n not in fixed]
        if missing:
            raise SystemExit(f"--steps-from {a.steps_from} has no row for {', '.join(missing)}; leave them out "
                             f"(--only) or drop --steps-from")
        if Path(a.steps_from).resolve() == out.resolve():
            raise SystemExit("--steps-from names the output file, whose finished rows are skipped; write the "
                             "reproduction elsewhere with --out /tmp/check.json --tmp /tmp/check")
    rows = load_rows(out)
    done = {r["model"] for r in rows}
    m = meta(" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    failed = []
    if a.measure_only:
        for r in rows:
            if r["model"] not in names:
                continue
            model = formers.load_run(tmp / r["model"])
            r["images_per_s"] = round(images_per_s(model.fuse(), model.in_chans, model.img_size), 1)
            r["threads"] = a.threads
            r.pop("measured", None)  # re-measured here: save stamps it with this run's machine and date
            print(f"{r['model']}: {r['images_per_s']:.0f} images/s", flush=True)
        names = []
        save(out, m, rows)
    for name in names:
        if name in done and not a.plan_only:
            continue
        try:
            row = run_one(name, a.budget_s, a.threads, tmp, a.train_threads, a.plan_only, a.overrides,
                          fixed.get(name))
            if row is None:
                continue
            rows.append(row)
        except Exception:  # one broken model must not lose the others' rows
            traceback.print_exc()
            failed.append(name)
            continue
        save(out, m, rows)
        plot(rows, out.with_suffix(".png"))
    if rows:
        plot(rows, out.with_suffix(".png"))
    print(f"{'model':<18} {'paper':<9} {'params':>9} {'steps':>6} {'epochs':>6} {'test acc':>8} {'img/s':>9}")
    for r in sorted(rows, key=lambda r: -r["test_acc"]):
        print(f"{r['model']:<18} {r['paper']:<9} {r['params']:>9,} {r['steps']:>6} {r['epochs']:>6.2f} "
              f"{100 * r['test_acc']:>7.2f}% {r['images_per_s']:>9.0f}")
    if failed:
        print(f"failed (not recorded; rerun to retry): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
