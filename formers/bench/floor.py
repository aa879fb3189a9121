"""`python benchmarks/kernel_floor.py`: where the time goes (issue 10). The kernel floor of the two speed rows
that formers does not yet win by the issue's margin, and a profile of each side by kind of op.

    python benchmarks/kernel_floor.py [--reps 9] [--steps 4] [--threads N] [--out results/kernel_floor.json]

For the LM training step (the `formers bench speed` model: vocab 256, dim 256, depth 4, heads 4, seq 256, batch 8,
AdamW) and the ViT-Tiny forward (224x224, batch 8), the *kernel floor* is the time of only the kernels no
implementation of that model can skip, called directly on preallocated tensors: every matmul of the model (forward;
for training also the input and weight gradients), the patch convolution, and the fused attention kernel
(ATen's CPU flash attention, forward and, for training, backward: the floor of a library that calls SDPA; formers'
block-causal kernel for CPU training, `BlockCausalAttention`, does the attention in fewer milliseconds than it,
benchmarks/attention_blocks.py). Norms, activations, bias additions and gradients,
residual additions, layout copies, the loss and the optimizer are left out. The floor is timed interleaved with
formers and the peer (x-transformers `attn_flash=True`; HF ViT with `attn_implementation="sdpa"`) in one process,
so `peer / floor` is the most any library could gain over the peer with these kernels, and `formers / floor` is
how much of formers' time is not in them.

Then torch.profiler splits a few steps of each side by op kind (matmul, attention, everything else) so the rest can
be named. Profiling adds per-op overhead, more for the side with more ops: the wall-clock figures are the
interleaved medians, the profile only says where the time goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from formers.bench.harness import meta, minor_faults, out_path, replace_section, save
from formers.bench.speed import (
    BATCH,
    DEPTH,
    DIM,
    HEADS,
    SEQ,
    VOCAB,
    TrainStep,
    formers_lm,
    formers_vit,
    interleaved,
    same_as_xt,
    vit_sides,
    xt_lm,
)

MATMUL = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
          "aten::mkldnn_convolution", "aten::convolution")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
BLOCK_ATTENTION = ("BlockCausalAttention", "BlockCausalAttentionBackward")  # every op under them is attention


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every nn.Linear of a model, in module order."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


class LMFloor:
    """The LM training step's unavoidable kernels: for each linear (in -> out) over T tokens, the forward
    X W^T, the input gradient dY W and the weight gradient dY^T X (6 x in x out x T FLOPs), and per layer the causal
    flash-attention forward and backward over (B, H, N, Dh)."""

    def __init__(self, shapes: list[tuple[int, int]], tokens: int, layers: int, batch: int, heads: int, seq: int,
                 head_dim: int):
        self.shapes, self.layers = shapes, layers
        dims = {d for s in shapes for d in s}
        self.X = {d: torch.randn(tokens, d) for d in dims}
        self.Y = {d: torch.empty(tokens, d) for d in dims}
        self.DX = {d: torch.empty(tokens, d) for d in dims}
        self.W = [torch.randn(o, i) * 0.02 for i, o in shapes]
        self.DW = [torch.empty(o, i) for i, o in shapes]
        self.qkv = [torch.randn(batch, heads, seq, head_dim) for _ in range(3)]
        self.matmul_flops = sum(6 * i * o * tokens for i, o in shapes)

    def __call__(self):
        for (i, o), w, dw in zip(self.shapes, self.W, self.DW):
            torch.mm(self.X[i], w.t(), out=self.Y[o])
            torch.mm(self.Y[o], w, out=self.DX[i])
            torch.mm(self.Y[o].t(), self.X[i], out=dw)
        q, k, v = self.qkv
        for _ in range(self.layers):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(out, q, k, v, out, lse, 0.0, True)


class ViTFloor:
    """The ViT forward's unavoidable kernels: the patch convolution, every linear with its bias (addmm; 2 x in x out
    FLOPs per token) over the tokens it sees, and per layer the flash-attention forward. That is the floor of a
    forward that computes every token; formers' ViT computes only the class token's row of its last block (the
    logits need no more), so it can run below this floor."""

    def __init__(self, model, batch: int):
        n = (model.img_size // model.patch_size) ** 2 + 1  # patches + class token
        self.batch, self.layers = batch, model.depth
        tokens = batch * n
        self.img = torch.randn(batch, 3, model.img_size, model.img_size)
        conv = model.patch_embed.proj
        self.cw, self.cb, self.stride = conv.weight.detach().clone(), conv.bias.detach().clone(), conv.stride
        shapes = linear_shapes(model)
        self.head, self.body = shapes[-1], shapes[:-1]  # the classifier sees the class token only
        dims = {d for s in shapes for d in s}
        self.X = {d: torch.randn(tokens, d) for d in dims}
        self.Y = {d: torch.empty(tokens, d) for d in dims}
        self.W = [(torch.randn(o, i) * 0.02, torch.zeros(o)) for i, o in shapes]
        dh = model.dim // model.heads
        self.qkv = [torch.randn(batch, model.heads, n, dh) for _ in range(3)]
        self.matmul_flops = sum(2 * i * o * tokens for i, o in self.body) + 2 * self.head[0] * self.head[1] * batch

    def __call__(self):
        F.conv2d(self.img, self.cw, self.cb, stride=self.stride)
        for (i, o), (w, b) in zip(self.body, self.W):
            torch.addmm(b, self.X[i], w.t(), out=self.Y[o])
        i, o = self.head
        w, b = self.W[-1]
        torch.addmm(b, self.X[i][: self.batch], w.t())
        q, k, v = self.qkv
        for _ in range(self.layers):
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)


def profile_by_kind(fn, calls: int) -> dict[str, float]:
    """Self CPU milliseconds per call of `fn`, split into matmul, attention and the rest (the top rest ops named).
    Attention is the SDPA kernels and everything run inside formers' block-causal kernel (its matmuls too)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(calls):
            fn()
    kinds: dict[str, float] = defaultdict(float)
    rest: dict[str, float] = defaultdict(float)
    for e in p.events():
        ms = e.self_cpu_time_total / 1e3 / calls
        if e.key in ATTENTION or _inside(e, BLOCK_ATTENTION):
            kinds["attention"] += ms
        elif e.key in MATMUL:
            kinds["matmul"] += ms
        else:
            kinds["rest"] += ms
            rest[e.key] += ms
    top = sorted(rest.items(), key=lambda kv: -kv[1])[:8]
    return {**{k: round(v, 2) for k, v in kinds.items()}, "rest_top": {k: round(v, 2) for k, v in top}}


def _inside(e, names: tuple[str, ...]) -> bool:
    """Whether a profiler event is one of `names` or runs under one."""
    while e is not None:
        if e.name in names:
            return True
        e = e.cpu_parent
    return False


def fault_cost_us(mib: int = 64) -> float:
    """Microseconds per minor page fault on this machine: touch one byte of every page of fresh anonymous memory
    (the kernel zeroes and maps each page; on a VM this can cost more than a small matmul per 4 KiB)."""
    import mmap

    import numpy as np

    costs = []
    for _ in range(3):
        with mmap.mmap(-1, mib << 20) as m:
            a = np.frombuffer(m, dtype=np.uint8)
            f0, t = minor_faults(), time.perf_counter()
            a[:: mmap.PAGESIZE] = 1
            dt, n = time.perf_counter() - t, minor_faults() - f0
            del a
        costs.append(dt / max(n, 1) * 1e6)
    return round(statistics.median(costs), 2)


def _row(name: str, sides: dict, reps: int, work: float, unit: str, floor_flops: float, per: int = 1) -> dict:
    """Interleaved medians of the floor, formers and the peer, each call doing `per` units (training steps): times,
    runs and page faults are reported per unit."""
    pf: dict[str, list[int]] = {}
    times = interleaved(sides, reps, faults=pf, desc=name)
    ms = {k: statistics.median(v) * 1e3 / per for k, v in times.items()}
    return {"row": name, "unit": unit,
            "page_faults_per_call": {k: round(statistics.median(v) / per, 1) for k, v in pf.items()},
            **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
            **{f"{k}_{unit}": round(work / v * 1e3, 2) for k, v in ms.items()},
            **{f"{k}_runs_ms": [round(t * 1e3 / per, 2) for t in v] for k, v in times.items()},
            "floor_matmul_gflop": round(floor_flops / 1e9, 3),
            "peer_over_floor": round(ms["peer"] / ms["floor"], 3),
            "formers_over_floor": round(ms["formers"] / ms["floor"], 3),
            "ratio": round(ms["peer"] / ms["formers"], 3)}


def lm_row(reps: int, steps: int, log) -> dict:
    torch.manual_seed(0)
    ours, peer = formers_lm(), xt_lm(flash=True)
    same_as_xt(ours, peer, "kernel_floor lm")  # the same model as `formers bench speed`: weights copied, logits equal
    floor = LMFloor(linear_shapes(ours), BATCH * SEQ, DEPTH, BATCH, HEADS, SEQ, DIM // HEADS)
    so, sp = TrainStep(ours, BATCH, SEQ, VOCAB), TrainStep(peer, BATCH, SEQ, VOCAB)

    def k(f):
        return lambda: [f() for _ in range(steps)]

    r = _row("lm_train_step", {"floor": k(floor), "formers": k(so), "peer": k(sp)}, reps, BATCH * SEQ,
             "tokens_per_s", floor.matmul_flops, per=steps)
    r["peer"] = "x-transformers attn_flash=True"
    r["profile_ms_per_step"] = {"formers": profile_by_kind(so, 3), "peer": profile_by_kind(sp, 3)}
    log(_line(r))
    return r


def vit_row(reps: int, log) -> dict:
    sides, batch, _, _ = vit_sides()  # the same models as `formers bench speed`, logits checked equal
    floor = ViTFloor(formers_vit(), batch)  # shapes only: the floor runs on its own random tensors
    with torch.no_grad():
        r = _row("vit_forward", {"floor": floor, **sides}, reps, batch, "images_per_s", floor.matmul_flops)
        r["peer"] = "HF ViT sdpa"
        r["profile_ms_per_forward"] = {k: profile_by_kind(f, 3) for k, f in sides.items()}
    log(_line(r))
    return r


def _line(r: dict) -> str:
    return (f"{r['row']:<14} floor {r['floor_ms']:7.1f} ms  formers {r['formers_ms']:7.1f} ms "
            f"({r['formers_over_floor']:.2f}x floor)  peer {r['peer_ms']:7.1f} ms ({r['peer_over_floor']:.2f}x "
            f"floor)  formers vs peer x{r['ratio']:.2f}  page faults per call: formers "
            f"{r['page_faults_per_call']['formers']:,.0f}, peer {r['page_faults_per_call']['peer']:,.0f}")


README_START, README_END = "<!-- floor:start -->", "<!-- floor:end -->"


def readme_section(res: dict) -> str:
    """The README's kernel-floor table (between the floor markers), from results/kernel_floor.json."""
    m = res["meta"]
    us = m.get("page_fault_us")
    lines = [f"Measured by `{m['command']}` on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
             f"{m['date'][:10]} (medians of {m['reps']} interleaved repetitions; profile in ms of self CPU time; "
             f"a minor page fault costs {us} us here; the LM row's times and faults are per training step):",
             "",
             "| row | kernel floor | formers | peer | peer / floor | formers / floor | formers vs peer | "
             "formers: matmul / attention / rest | peer: matmul / attention / rest | page faults per call, formers / "
             "peer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        prof = r.get("profile_ms_per_step") or r["profile_ms_per_forward"]
        cell = {s: " / ".join(f"{prof[s].get(k, 0):.0f}" for k in ("matmul", "attention", "rest"))
                for s in ("formers", "peer")}
        lines.append(f"| {r['row']} vs {r['peer']} | {r['floor_ms']:.0f} ms | {r['formers_ms']:.0f} ms | "
                     f"{r['peer_ms']:.0f} ms | {r['peer_over_floor']:.2f}x | {r['formers_over_floor']:.2f}x | "
                     f"{r['ratio']:.2f}x | {cell['formers']} | {cell['peer']} | {_faults(r, us)} |")
    return "\n".join(lines)


def _faults(r: dict, us: float | None) -> str:
    pf = r.get("page_faults_per_call")
    if not pf:
        return ""
    cells = []
    for side in ("formers", "peer"):
        n = pf[side]
        cells.append(f"{n:,.0f}" + (f" (~{n * us / 1e3:.0f} ms)" if us else ""))
    return " / ".join(cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/kernel_floor.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/kernel_floor.json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = out_path(a.out, "kernel_floor.json", "kernel_floor")  # before any timing
    m = meta("python benchmarks/kernel_floor.py " + " ".join(sys.argv[1:] if argv is None else argv))
    m.update(reps=a.reps, steps=a.steps, page_fault_us=fault_cost_us())
    log = lambda s: print(s, flush=True)  # noqa: E731
    res = {"meta": m, "rows": [lm_row(a.reps, a.steps, log), vit_row(a.reps, log)]}
    save(out, m, res["rows"])
    if out == Path("results/kernel_floor.json") and Path("README.md").exists():
        if replace_section(Path("README.md"), README_START, README_END, readme_section(res)):
            log("updated the kernel-floor table in README.md")
    for r in res["rows"]:
        prof = r.get("profile_ms_per_step") or r["profile_ms_per_forward"]
        for side in ("formers", "peer"):
            p = prof[side]
            top = ", ".join(f"{k.replace('aten::', '')} {v:.1f}" for k, v in list(p["rest_top"].items())[:6])
            log(f"  {r['row']} {side:<7} profile ms: matmul {p.get('matmul', 0):.1f}, attention "
                f"{p.get('attention', 0):.1f}, rest {p.get('rest', 0):.1f} ({top})")
    log(f"wrote {out}")
    return 0
