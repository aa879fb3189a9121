"""Channel mixers on real text: 6-layer byte-level LMs on Shakespeare that differ only in the FFN, equal steps and seed.

Configurations: GELU MLP (baseline), SwiGLU, squared ReLU (P79), Primer-EZ (squared ReLU + MDHA, P79), PolyReLU and
PolyNorm (P22), a sparse MoE with 8 experts top-2 whose active parameters equal the dense MLP's (each expert is half
as wide), ModuleFormer (P24: attention experts with stick-breaking heads + FFN experts, MI loss) and the
MemoryFormer FFN (P65). Each trains the `lm_shakespeare` recipe with depth 6; the table reports held-out bits per
byte, tokens/s (median of the logged rates) and total and active parameters.

    python benchmarks/channel_mixers.py [--steps 400] [--only gelu_mlp moe_8x2]

Resumable: finished configurations are kept in results/channel_mixers.json and not re-run; an interrupted one
resumes from its last checkpoint in results/tmp/channel_mixers/. Writes results/channel_mixers.json and
results/channel_mixers.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from formers.bench.sweep import lm_sweep

CONFIGS = {
    "gelu_mlp": ["model.block.ffn.name=mlp", "model.block.ffn.act=gelu"],
    "swiglu": ["model.block.ffn.name=glu", "model.block.ffn.act=silu"],
    "squared_relu": ["model.block.ffn.name=mlp", "model.block.ffn.act=squared_relu"],
    "primer": ["model.block.ffn.name=mlp", "model.block.ffn.act=squared_relu", "model.block.mixer.name=mdha"],
    "polyrelu": ["model.block.ffn.name=mlp", "model.block.ffn.act=polyrelu"],
    "polynorm": ["model.block.ffn.name=mlp", "model.block.ffn.act=polynorm"],
    "moe_8x2": ["model.block.ffn={name: moe, experts: 8, k: 2, act: gelu}"],
    # sized to the dense model's active parameters: 2 of 4 attention experts (2 heads of 32 each), 2 of 8 FFN experts
    "moduleformer": ["model.block.mixer={name: moduleformer, heads: 2, head_dim: 32, experts: 4, k: 2, "
                     "router_hidden: 64}",
                     "model.block.ffn={name: moduleformer_ffn, experts: 8, k: 2, act: gelu, router_hidden: 64}"],
    "memory_ffn": ["model.block.ffn={name: memory_ffn}"],
}


def common(steps: int, seed: int) -> list[str]:
    return ["model.depth=6", "model.dim=128", f"train.steps={steps}", f"train.seed={seed}", "train.eval_every=250",
            "train.ckpt_every=100", "train.log_every=10", "train.sample=false", "train.progress=false",
            "task.eval_limit=65536"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    for r in rows:
        axes[0].plot(r["curve_step"], r["curve_loss"], label=f"{r['config']} ({r['val_bpb']:.3f} bpb)")
        axes[1].scatter(r["tokens_per_s"], r["val_bpb"])
        axes[1].annotate(r["config"], (r["tokens_per_s"], r["val_bpb"]), fontsize=7)
    axes[0].set(xlabel="step", ylabel="train loss (nats)", title="6-layer byte LM on Shakespeare: channel mixers")
    axes[0].set_ylim(top=min(4.0, axes[0].get_ylim()[1]))
    axes[1].set(xlabel="training tokens/s (2 CPU cores)", ylabel="held-out bits per byte", title="quality vs speed")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default="results/channel_mixers.json")
    a = ap.parse_args()
    out = Path(a.out)
    rows = lm_sweep(CONFIGS, a.only, common(a.steps, a.seed), out, Path("results/tmp/channel_mixers"))
    plot(rows, out.with_suffix(".png"))
    print(f"{'config':<14} {'val bpb':>8} {'tok/s':>8} {'params':>9} {'active':>9} {'train s':>8}")
    for r in rows:
        print(f"{r['config']:<14} {r['val_bpb']:8.4f} {r['tokens_per_s']:8.0f} {r['params_total']:9d} "
              f"{r['params_active']:9d} {r['train_seconds']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
