"""formers vs x-transformers: training throughput of the same decoder-only LM on CPU.

Model: vocab 256, dim 256, depth 4, heads 4, seq 256, batch 8, AdamW; Pre-LN, bias-free LayerNorm, GELU MLP x4,
learned absolute positions. Both eager, same thread count, repetitions interleaved in one process (DESIGN §5).
x-transformers is measured at its defaults and with `attn_flash=True` (its SDPA path).

    python benchmarks/lm_train_peers.py [--reps 5] [--steps 5]

Writes results/lm_train_peers.json and results/lm_train_peers.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import formers
from formers.bench.harness import machine_peak_gflops

VOCAB, DIM, DEPTH, HEADS, SEQ, BATCH = 256, 256, 4, 4, 256, 8


def formers_model():
    return formers.create_model("lm", vocab=VOCAB, dim=DIM, depth=DEPTH, max_len=SEQ, position="learned",
                                block={"placement": "pre", "norm": {"name": "layernorm", "bias": False},
                                       "mixer": {"name": "softmax", "heads": HEADS},
                                       "ffn": {"name": "mlp", "act": "gelu", "mult": 4}})


def xt_model(flash: bool):
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=SEQ,
                              attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=HEADS, attn_flash=flash))


class Runner:
    def __init__(self, model):
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)

    def step(self):
        logits = self.model(self.x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), self.x[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def tokens_per_s(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * BATCH * SEQ / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="results/lm_train_peers.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = machine_peak_gflops()
    rows = []
    for label, flash in (("default", False), ("attn_flash", True)):
        ours, peer = Runner(formers_model()), Runner(xt_model(flash))
        for r in (ours, peer):  # warm-up
            r.tokens_per_s(2)
        ours_tps, peer_tps = [], []
        for _ in range(args.reps):  # interleaved so that machine noise hits both alike
            ours_tps.append(ours.tokens_per_s(args.steps))
            peer_tps.append(peer.tokens_per_s(args.steps))
        o, p = statistics.median(ours_tps), statistics.median(peer_tps)
        rows.append({"model": "lm", "peer": "x-transformers", "peer_setting": label,
                     "formers_params": ours.model.num_params(),
                     "peer_params": sum(q.numel() for q in peer.model.parameters()),
                     "formers_tokens_per_s": round(o, 1), "peer_tokens_per_s": round(p, 1),
                     "ratio": round(o / p, 3), "formers_runs": [round(v, 1) for v in ours_tps],
                     "peer_runs": [round(v, 1) for v in peer_tps]})
        print(f"x-transformers {label:<10} formers {o:8.0f} tok/s   peer {p:8.0f} tok/s   ratio {o / p:.3f}  "
              f"(params {rows[-1]['formers_params']:,} vs {rows[-1]['peer_params']:,})", flush=True)
    import x_transformers

    meta = {"machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "x_transformers": getattr(x_transformers, "__version__", "unknown"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "peak_mm_gflops": round(peak, 1),
            "config": {"vocab": VOCAB, "dim": DIM, "depth": DEPTH, "heads": HEADS, "seq": SEQ, "batch": BATCH}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(out)
    plot(rows, out.with_suffix(".png"), meta)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows, path: Path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    labels = [r["peer_setting"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["formers_tokens_per_s"] for r in rows], 0.4, label="formers")
    ax.bar([x + 0.2 for x in xs], [r["peer_tokens_per_s"] for r in rows], 0.4, label="x-transformers")
    for x, r in zip(xs, rows):
        ax.text(x, max(r["formers_tokens_per_s"], r["peer_tokens_per_s"]) * 1.02, f"x{r['ratio']:.2f}",
                ha="center")
    ax.set_xticks(list(xs), [f"x-transformers {s}" for s in labels])
    ax.set_ylabel("training tokens / s")
    ax.set_title(f"LM training step, CPU, {meta['threads']} threads, torch {meta['torch']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
