"""Causal attention for CPU training (issue 10): formers' `BlockCausalAttention` against SDPA's CPU flash kernel,
with its C++ kernel (formers/csrc, where it builds) and with its PyTorch body (`FORMERS_CPU_KERNELS=0`).

    python benchmarks/attention_blocks.py [--reps 21] [--out results/attention_blocks.json]

For each shape (batch, heads, length, head dim) one forward + backward of causal attention is timed as the model
runs it: q, k, v are views of one fused QKV projection output (B, N, 3 H Dh), the output is merged back to
(B, N, H Dh), and the gradient reaches the QKV output. The sides alternate in every repetition (the order flips
each time) in one process; the JSON keeps the median time of each and the median of the paired ratios SDPA / side.
All sides are first checked equal (outputs and gradients, 1e-4). Training takes the block path
(formers/nn/attention.py) with the C++ kernel from `CAUSAL_KERNEL_FROM` = 128 tokens, where it was 1.33-1.42x SDPA
in three runs, and with the PyTorch body from 256 (`CAUSAL_BLOCKS_LEN`): below that the body alone was not clearly
faster than SDPA (0.78-1.09x at 128-192 tokens in three runs); both up to 768. Each shape runs with the block size
training takes there (`causal_block`), or `--block`. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from formers.bench.harness import meta, out_path, save
from formers.nn import cpu_kernels
from formers.nn.attention import BlockCausalAttention, causal_block

SHAPES = [(8, 4, 128, 64), (8, 4, 192, 64), (8, 4, 256, 64), (8, 4, 384, 64), (4, 4, 512, 64), (2, 4, 768, 64),
          (2, 4, 1024, 64), (8, 8, 256, 32), (8, 2, 256, 128)]


def sides(B: int, H: int, N: int, D: int, block: int):
    """The two attention implementations as closures over one fused-QKV tensor, and a check that they agree."""
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    g = torch.randn(B, N, H * D)

    def make(side: str):
        def run(keep: bool = False):
            qkv.grad = None
            q, k, v = (t.transpose(1, 2) for t in qkv.view(B, N, 3 * H, D).split([H, H, H], dim=2))
            if side == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # the C++ kernel, or the PyTorch body with it turned off (read by the forward, kept for the backward)
                old = os.environ.get("FORMERS_CPU_KERNELS")
                os.environ["FORMERS_CPU_KERNELS"] = "0" if side == "blocks" else "1"
                try:
                    y = BlockCausalAttention.apply(q, k, v, D ** -0.5, block)
                finally:
                    if old is None:
                        os.environ.pop("FORMERS_CPU_KERNELS")
                    else:
                        os.environ["FORMERS_CPU_KERNELS"] = old
            y = y.transpose(1, 2).reshape(B, N, H * D)
            y.backward(g)
            return (y.detach(), qkv.grad.clone()) if keep else None
        return run

    fns = {"sdpa": make("sdpa"), "blocks": make("blocks")}
    if cpu_kernels.causal_attention() is not None:
        fns["kernel"] = make("kernel")
    y1, g1 = fns["sdpa"](keep=True)
    err = 0.0
    for name, f in fns.items():
        y2, g2 = f(keep=True)
        err = max(err, (y1 - y2).abs().max().item(), (g1 - g2).abs().max().item())
        if err > 1e-4:
            raise AssertionError(f"block-causal attention ({name}) differs from SDPA by {err:.2e} at {(B, H, N, D)}")
    return fns, err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--block", type=int, default=None, help="query rows per block (default: what training takes)")
    ap.add_argument("--out", default="results")
    a = ap.parse_args(argv)
    path = out_path(a.out, "attention_blocks.json", "attention_blocks")
    rows = []
    for B, H, N, D in SHAPES:
        block = a.block or causal_block(N)
        fns, err = sides(B, H, N, D, block)
        for f in fns.values():
            f()
        t: dict[str, list[float]] = {n: [] for n in fns}
        for r in range(a.reps):
            for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                s = time.perf_counter()
                fns[n]()
                t[n].append(time.perf_counter() - s)
        row = {"batch": B, "heads": H, "seq": N, "head_dim": D, "block": block, "max_abs_diff": err}
        line = f"B={B} H={H} N={N:5d} Dh={D:4d}: SDPA {statistics.median(t['sdpa']) * 1e3:7.2f} ms"
        for n in fns:
            row[f"{n}_ms"] = round(statistics.median(t[n]) * 1e3, 3)
            if n != "sdpa":  # the median of the paired ratios SDPA / this side
                row[f"{n}_speedup"] = round(statistics.median(a_ / b_ for a_, b_ in zip(t["sdpa"], t[n])), 3)
                line += f"  {n} {row[f'{n}_ms']:7.2f} ms x{row[f'{n}_speedup']:.2f}"
        rows.append(row)
        print(line, flush=True)
    save(path, meta("python benchmarks/attention_blocks.py " + " ".join(argv or sys.argv[1:])), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
