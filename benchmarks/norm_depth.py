"""Normalisation placement and depth on real text: 12-layer byte-level LMs on Shakespeare, equal steps and seeds.

Configurations: Pre-LN, Post-LN, Peri-LN (P77), LayerNorm scaling (P61), Pre-RMSNorm and Pre-CRMSNorm (P54),
and GTrXL gating (P48). Each trains the `lm_shakespeare` recipe with depth 12 and the config's block; the table
reports held-out bits per byte, the largest gradient norm and loss spikes, and the per-layer activation variance at
the end (on a fixed held-out batch).

    python benchmarks/norm_depth.py [--steps 300] [--only pre peri]

Resumable: finished configurations are kept in results/norm_depth.json and not re-run; an interrupted one resumes
from its last checkpoint in results/tmp/norm_depth/. Writes results/norm_depth.json and results/norm_depth.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import formers
from formers.bench.sweep import lm_sweep

CONFIGS = {
    "pre": {"placement": "pre", "norm": "layernorm"},
    "post": {"placement": "post", "norm": "layernorm"},
    "peri": {"placement": "peri", "norm": "layernorm"},
    "lns": {"placement": "lns", "norm": "layernorm"},
    "pre_rmsnorm": {"placement": "pre", "norm": "rmsnorm"},
    "pre_crmsnorm": {"placement": "pre", "norm": "crmsnorm"},
    "gru_gate": {"placement": "pre", "norm": "layernorm", "residual": "gru_gate"},
}


def overrides(block: dict) -> list[str]:
    return [f"model.block.{k}={v}" for k, v in block.items()]


def common(steps: int, seed: int) -> list[str]:
    return ["model.depth=12", "model.dim=128", f"train.steps={steps}", f"train.seed={seed}", "train.eval_every=100",
            "train.ckpt_every=100", "train.log_every=10", "train.sample=false", "train.progress=false",
            "task.eval_limit=32768"]


@torch.no_grad()
def layer_variance(run_dir: Path, model: torch.nn.Module) -> dict:
    """Variance of the residual stream after each block on a fixed held-out batch."""
    task = formers.get("task", "lm_bytes").obj(corpus="shakespeare", seq_len=128)
    x = task.val_data[: 8 * 128].view(8, 128)
    out = []
    hooks = [b.register_forward_hook(lambda m, i, o: out.append(float(o.double().var())))
             for b in model.stack.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return {"layer_variance": [round(v, 5) for v in out]}


def run(names: list[str], steps: int, seed: int, out: Path) -> list[dict]:
    configs = {name: overrides(block) for name, block in CONFIGS.items()}
    rows = lm_sweep(configs, names, common(steps, seed), out, Path("results/tmp/norm_depth"), extra=layer_variance)
    plot(rows, out.with_suffix(".png"))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), dpi=100)
    for r in rows:
        axes[0].plot(r["curve_step"], r["curve_loss"], label=f"{r['config']} ({r['val_bpb']:.3f} bpb)")
        axes[1].plot(r["curve_step"], r["curve_grad_norm"], label=r["config"])
        axes[2].plot(range(1, len(r["layer_variance"]) + 1), r["layer_variance"], "o-", ms=3, label=r["config"])
    axes[0].set(xlabel="step", ylabel="train loss (nats)", title="12-layer byte LM on Shakespeare")
    axes[1].set(xlabel="step", ylabel="gradient norm (before clipping)", yscale="log", title="gradient norm")
    axes[2].set(xlabel="layer", ylabel="Var(x_l) after training", yscale="log", title="residual-stream variance")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default="results/norm_depth.json")
    a = ap.parse_args()
    rows = run(a.only, a.steps, a.seed, Path(a.out))
    print(f"{'config':<14} {'val bpb':>8} {'final loss':>10} {'max |g|':>8} {'spikes':>6} {'Var(x_12)':>10}")
    for r in rows:
        print(f"{r['config']:<14} {r['val_bpb']:8.4f} {r['final_loss']:10.4f} {r['max_grad_norm']:8.3f} "
              f"{r['loss_spikes']:6d} {r['layer_variance'][-1]:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
