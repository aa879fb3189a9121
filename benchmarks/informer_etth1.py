"""Informer (P73) on ETTh1 against the published table and two baselines (issue 8).

Rows: multivariate (M) horizons 24, 48, 168 and univariate (S) horizon 24, one seed, with the recipes
`forecast/informer_etth1_<m|s>_<horizon>` (the official per-horizon settings of zhouhaoyi/Informer2020
scripts/ETTh1.sh). Baselines on the same windows: `repeat_last` (no training) and `dlinear` (Zeng et al. 2023),
trained in the same loop with DLinear's lr 5e-3 on the Informer row's input window (DLinear's paper uses 336 steps;
a like-for-like input is the point here). `--models informer_full` adds Informer-dagger.

The training loop is the official one (exp/exp_informer.py `train`, `test`), not the trainer's: Adam, epochs of
floor(windows / 32) batches over a fresh permutation each epoch (drop_last), lradj type1 (adjust_learning_rate runs
after epoch e with lr * 0.5 ** (e - 1): epochs 1 and 2 at lr, then halving), validation MSE after every epoch,
early stopping with patience 3, and the test scored with the best-validation weights. The test MSE/MAE are on the
scaled data, means over windows, steps and channels: `test_mse` over the windows the official test loader sees
(drop_last=True skips the last n mod 32), `test_mse_all` over every window.

Resumable: one JSON row per model, features, horizon, seed and epoch, written when the epoch ends; the state
(weights, optimizer, RNG, early-stopping counters) is saved every `--ckpt-every` steps and at every epoch end in
results/tmp/informer_etth1/<run>/, so a killed run continues where it stopped. Finished runs are skipped.

    python benchmarks/informer_etth1.py [--only m_24 m_48 m_168 s_24] [--models informer dlinear repeat_last]
        [--seed 0] [--threads 2] [--device cpu] [--smoke]

Writes results/informer_etth1.json, results/informer_etth1.md (ours / published / baselines) and
results/informer_etth1.png (one test window's forecast). `--smoke` runs a tiny model for a few steps per epoch
into results/tmp/informer_etth1_smoke/ (a plumbing check, not a result).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from formers.bench.harness import load_rows, meta, save
from formers.config import load_recipe
from formers.train.trainer import build_model, build_task

ROWS = {"m_24": ("M", 24), "m_48": ("M", 48), "m_168": ("M", 168), "s_24": ("S", 24)}
# Informer paper Tables 1-2 (ETTh1; MSE, MAE), via shared/papers/facts_P55_P81.md, P73. informer_full = dagger.
PUBLISHED = {
    "informer": {"m_24": (0.577, 0.549), "m_48": (0.685, 0.625), "m_168": (0.931, 0.752), "s_24": (0.098, 0.247)},
    "informer_full": {"m_24": (0.620, 0.577), "m_48": (0.692, 0.671), "m_168": (0.947, 0.797),
                      "s_24": (0.092, 0.246)},
}
DLINEAR_LR = 5e-3  # cure-lab/LTSF-Linear scripts/EXP-LongForecasting/DLinear/univariate/etth1.sh
SMOKE = {"d_model": 16, "heads": 2, "d_ff": 32}


def recipe(model: str, key: str, smoke: bool) -> dict[str, Any]:
    """The run's config: the Informer recipe of the row, with the model swapped for the baselines."""
    own = "informer_full" if model == "informer_full" else "informer"
    cfg = copy.deepcopy(load_recipe(f"forecast/{own}_etth1_{key}"))
    if model in ("dlinear", "repeat_last"):
        cfg["model"] = {"name": model}
        if model == "dlinear":
            cfg["train"]["lr"] = DLINEAR_LR
    elif smoke:
        cfg["model"].update(SMOKE)
    return cfg


def scores(model: torch.nn.Module, task, split: str, device: str, batch_size: int = 32,
           limit: int | None = None) -> dict[str, float]:
    """MSE/MAE over all windows and over the official loader's windows (drop_last: the first n - n mod 32)."""
    model.eval()
    n = task.num_windows(split) if limit is None else min(limit, task.num_windows(split))
    kept = n - n % batch_size
    sums = {"se": 0.0, "ae": 0.0, "se_kept": 0.0, "ae_kept": 0.0}
    per_window = 0
    with torch.no_grad():
        for i in range(0, n, 256):
            idx = torch.arange(i, min(i + 256, n))
            batch = {k: v.to(device) for k, v in task.windows(split, idx).items()}
            err = (task.predict(model, batch).double() - batch["y"].double()).flatten(1)  # (b, pred_len * c_out)
            per_window = err.shape[1]
            keep = (idx < kept).to(device)
            sums["se"] += float(err.square().sum())
            sums["ae"] += float(err.abs().sum())
            sums["se_kept"] += float(err.square().sum(1)[keep].sum())
            sums["ae_kept"] += float(err.abs().sum(1)[keep].sum())
    model.train()
    all_n, kept_n = max(n * per_window, 1), max(kept * per_window, 1)
    return {f"{split}_mse": sums["se_kept"] / kept_n, f"{split}_mae": sums["ae_kept"] / kept_n,
            f"{split}_mse_all": sums["se"] / all_n, f"{split}_mae_all": sums["ae"] / all_n}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng(device: str) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_rng(state: dict[str, Any], device: str) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def run_one(model_name: str, key: str, seed: int, args, rows: list[dict], emit) -> None:
    """Train (or, for repeat_last, just score) one model on one row, appending epoch rows and a final row."""
    features, horizon = ROWS[key]
    base = {"model": model_name, "features": features, "horizon": horizon, "seed": seed}
    if any(r.get("final") and all(r.get(k) == v for k, v in base.items()) for r in rows):
        print(f"{model_name} {key} seed {seed}: done, skipped")
        return
    cfg = recipe(model_name, key, args.smoke)
    tc = cfg["train"]
    task = build_task(cfg["task"])
    task.prepare()
    limit = 64 if args.smoke else None
    deviation = "smoke: tiny model, few steps" if args.smoke else (
        f"baseline: lr {DLINEAR_LR}, the Informer row's input window" if model_name == "dlinear" else None)
    if model_name == "repeat_last":
        model = build_model(cfg["model"], task.model_defaults()).to(args.device)
        res = {**scores(model, task, "val", args.device, limit=limit), **scores(model, task, "test", args.device,
                                                                                 limit=limit)}
        emit({**base, "epoch": 0, **res})
        emit({**base, "final": True, "best_epoch": 0, "params": 0, "deviation": deviation,
              **{k: v for k, v in res.items() if k.startswith("test")}})
        return

    folder = Path(args.tmp) / f"{model_name}_{key}_seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(cfg["model"], task.model_defaults()).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=tc["lr"], betas=tuple(tc["optimizer"].get("betas", (0.9, 0.999))))
    bs, epochs, patience = tc["batch_size"], 2 if args.smoke else args.epochs, tc["patience"]
    n_train = task.num_windows("train")
    per_epoch = n_train // bs if not args.smoke else 3
    st = {"epoch": 0, "step": 0, "best": None, "bad": 0, "best_epoch": 0, "loss_sum": 0.0, "seconds": 0.0,
          "stopped": False}
    state_path = folder / "state.pt"
    if state_path.exists():
        saved = torch.load(state_path, weights_only=True)  # tensors, numbers and dicts only: no pickled code
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        _set_rng(saved["rng"], args.device)
        st = saved["progress"]
        print(f"{model_name} {key}: resuming at epoch {st['epoch'] + 1}, step {st['step']}")

    def checkpoint() -> None:
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng(args.device),
                      "progress": st}, state_path)

    model.train()
    while st["epoch"] < epochs and not st["stopped"]:
        e = st["epoch"]  # 0-based; adjust_learning_rate(e) ran after epoch e (1-based): lr * 0.5 ** (e - 1)
        lr = tc["lr"] * 0.5 ** max(0, e - 1)
        for g in opt.param_groups:
            g["lr"] = lr
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1000 + e))
        t0 = time.perf_counter()
        for i in range(st["step"], per_epoch):
            batch = {k: v.to(args.device) for k, v in task.windows("train", perm[i * bs:(i + 1) * bs]).items()}
            loss = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            st["loss_sum"] += loss.item()
            st["step"] = i + 1
            if st["step"] % args.ckpt_every == 0 and st["step"] < per_epoch:
                st["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint()
        st["seconds"] += time.perf_counter() - t0
        res = {**scores(model, task, "val", args.device, limit=limit),
               **scores(model, task, "test", args.device, limit=limit)}
        better = st["best"] is None or res["val_mse"] < st["best"]
        if better:
            _atomic_save(model.state_dict(), folder / "best.pt")
            st.update(best=res["val_mse"], bad=0, best_epoch=e + 1)
        else:
            st["bad"] += 1
            st["stopped"] = st["bad"] >= patience
        emit({**base, "epoch": e + 1, "lr": lr, "steps": per_epoch, "train_loss": st["loss_sum"] / per_epoch,
              **res, "epoch_seconds": st["seconds"], "early_stop": st["stopped"], "deviation": deviation})
        st.update(epoch=e + 1, step=0, loss_sum=0.0, seconds=0.0)
        checkpoint()
    model.load_state_dict(torch.load(folder / "best.pt", weights_only=True))
    res = scores(model, task, "test", args.device, limit=limit)
    params = sum(p.numel() for p in model.parameters())
    emit({**base, "final": True, "best_epoch": st["best_epoch"], "params": params, "deviation": deviation, **res})


def markdown(rows: list[dict]) -> str:
    finals = {(r["model"], r["features"], r["horizon"]): r for r in rows if r.get("final")}
    lines = ["# Informer on ETTh1 (issue 8)", "",
             "Test MSE / MAE on the scaled data (means over windows, steps and channels; the official test loader's "
             "windows). Ours: best-validation epoch, seed 0. Published: Informer paper Tables 1-2 (Informer† = full "
             "attention).", "",
             "| features | horizon | Informer (ours) | Informer (paper) | ours / paper MSE | Informer† (ours) | "
             "Informer† (paper) | repeat-last | DLinear |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(r):
        return f"{r['test_mse']:.3f} / {r['test_mae']:.3f}" if r else "-"

    for key, (features, horizon) in ROWS.items():
        got = {m: finals.get((m, features, horizon)) for m in ("informer", "informer_full", "repeat_last", "dlinear")}
        ours, pub = got["informer"], PUBLISHED["informer"][key]
        ratio = f"{ours['test_mse'] / pub[0]:.2f}x" if ours else "-"
        pub_d = PUBLISHED["informer_full"][key]
        lines.append(f"| {features} | {horizon} | {cell(ours)} | {pub[0]:.3f} / {pub[1]:.3f} | {ratio} | "
                     f"{cell(got['informer_full'])} | {pub_d[0]:.3f} / {pub_d[1]:.3f} | {cell(got['repeat_last'])} | "
                     f"{cell(got['dlinear'])} |")
    devs = sorted({f"{r['model']} {r['features']}-{r['horizon']}: {r['deviation']}" for r in finals.values()
                   if r.get("deviation")})
    lines += ["", "Deviations from the official settings: " + ("; ".join(devs) if devs else "none") + ".",
              "Known differences in every row: the attention q/k/v projections have no bias (the mixers' contract); "
              "epoch permutations come from a per-epoch seeded generator.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], args, png: Path) -> None:
    """One test window (the first) of the first finished row: OT input, truth and every model's forecast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = [r for r in rows if r.get("final")]
    key = next((k for k, (f, h) in ROWS.items() if any(r["features"] == f and r["horizon"] == h for r in finals)),
               None)
    if key is None:
        return
    features, horizon = ROWS[key]
    task = None
    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=100)
    for r in finals:
        if (r["features"], r["horizon"]) != (features, horizon):
            continue
        cfg = recipe(r["model"], key, args.smoke)
        task = task or build_task(cfg["task"])
        task.prepare()
        model = build_model(cfg["model"], task.model_defaults())
        best = Path(args.tmp) / f"{r['model']}_{key}_seed{r['seed']}" / "best.pt"
        if best.exists():
            model.load_state_dict(torch.load(best, weights_only=True))
        model.eval()
        batch = task.windows("test", torch.tensor([0]))
        with torch.no_grad():
            pred = task.predict(model, batch)[0, :, -1]
        ax.plot(range(task.seq_len, task.seq_len + horizon), pred, label=f"{r['model']} (MSE {r['test_mse']:.3f})")
    batch = task.windows("test", torch.tensor([0]))
    ax.plot(range(task.seq_len), batch["x_enc"][0, :, -1], color="0.4", label="input")
    ax.plot(range(task.seq_len, task.seq_len + horizon), batch["y"][0, :, -1], color="k", label="truth")
    ax.set_xlabel("hour of the window")
    ax.set_ylabel("OT (scaled)")
    ax.set_title(f"ETTh1 {features}, horizon {horizon}: first test window")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS), help="rows (default: all four)")
    ap.add_argument("--models", nargs="*", default=["informer", "repeat_last", "dlinear"],
                    choices=["informer", "informer_full", "repeat_last", "dlinear"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6, help="official: 6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--ckpt-every", type=int, default=50, help="steps between mid-epoch checkpoints")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 steps per epoch, 2 epochs, 64 eval windows")
    ap.add_argument("--out", default=None, help="JSON (default results/informer_etth1.json)")
    ap.add_argument("--tmp", default=None, help="run states (default results/tmp/informer_etth1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path("results/tmp/informer_etth1_smoke") if args.smoke else Path("results")
    out = Path(args.out) if args.out else root / "informer_etth1.json"
    args.tmp = args.tmp or str(Path("results/tmp/informer_etth1_smoke" if args.smoke else "results/tmp/informer_etth1"))
    rows = load_rows(out)
    info = meta(" ".join(["python", *sys.argv]))

    def emit(row: dict) -> None:
        keys = ("model", "features", "horizon", "seed", "epoch", "final")
        rows[:] = [r for r in rows if any(r.get(k) != row.get(k) for k in keys)] + [row]
        save(out, info, rows)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "deviation"}
        print(shown, flush=True)

    for key in args.only:
        for model in args.models:
            run_one(model, key, args.seed, args, rows, emit)
    out.with_suffix(".md").write_text(markdown(rows))
    plot(rows, args, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
