"""`python benchmarks/step_oracles.py`: how much of the LM training step each kind of work costs, measured by taking
it out (issue 10). It answers "what is the most a fused kernel for X could gain?" with a wall-clock number.

    python benchmarks/step_oracles.py [--reps 41] [--steps 1] [--threads N] [--out results/step_oracles.json]

Each *oracle* is formers' LM training step of `formers bench speed` (vocab 256, dim 256, depth 4, heads 4, seq 256,
batch 8, AdamW) with one kind of work removed outright, which computes the wrong model and is only a timing bound:

    gelu          GELU forward and backward (fc2 reads fc1's output as it is)
    gelu_bias     that and fc1's bias (its broadcast in the forward, its gradient's sum in the backward): the most a
                  fused bias + GELU kernel (forward, and backward with the bias-gradient sum) could save
    layernorm     every LayerNorm an identity: the most a fused or faster norm could save
    optimizer     no AdamW update (gradients still made and cleared): the most a faster optimizer could save
    fusible       gelu_bias, layernorm and optimizer together
    attention     causal attention replaced by its values (y = v): no attention kernel, forward or backward

In one process the unchanged step is timed against x-transformers at `attn_flash=True` (the peer of the issue's 1.1x
line), then against each oracle, each pair as its own interleaved A/B (with more sides in one rotation a side's time
depended on which side ran before it). Per oracle the result is the step's time without that work, the milliseconds
it saved and the speedup (paired medians), and the ratio formers would read against the peer if that work cost
nothing (the peer pair's ratio times that speedup).
glibc keeps freed memory in the heap for the run (`keep_freed_memory`; `--glibc-default` leaves it), so that page
faults, which depend on each side's allocation history, do not mix into the savings; the JSON records faults per
step of every side.
Before any timing every oracle is checked to have removed what it names (its replacement ran, the originals did
not), so that a change to formers' fast paths cannot turn an oracle into a silent no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from formers.bench.harness import check_names, meta, out_path, replace_section, save
from formers.bench.speed import BATCH, SEQ, VOCAB, TrainStep, formers_lm, interleaved, same_as_xt, xt_lm
from formers.registry import FormersError


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks in the heap for the rest of the process (`mallopt`: mmap threshold 1 GiB, trim
    threshold 2 GiB, as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do at start-up), so that no side's step
    page-faults and a removed op's saving is not mixed with another side's allocation history (in a first run
    without it the unchanged step faulted 1,216 times per step and the GELU-free one none). False where glibc's
    `mallopt` is not there (another C library); then nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


class _LinearNoGelu(torch.autograd.Function):
    """Stands in for `formers.nn.ffn._GeluLinearFn` (res + GELU(a) W^T + b) without the GELU: res + a W^T + b, with
    the same matmuls and the same saved tensors, so that only the activation's passes go."""

    calls = 0

    @staticmethod
    def forward(ctx, a, w, b, res, approximate):
        _LinearNoGelu.calls += 1
        a2 = a.reshape(-1, w.shape[1])
        if res is None:
            out = torch.addmm(b, a2, w.t()) if b is not None else a2.mm(w.t())
        else:
            r2 = res.reshape(-1, w.shape[0])
            out = torch.addmm(r2, a2, w.t()) if b is None else (r2 + b).addmm_(a2, w.t())
        ctx.save_for_backward(a, a2, w)
        ctx.has_b, ctx.has_res = b is not None, res is not None
        return out.view(*a.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        a, a2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, w.shape[0])
        return (dy2.mm(w).view(a.shape), dy2.t().mm(a2), dy2.sum(0) if ctx.has_b else None,
                dy if ctx.has_res else None, None)


class _NoAttention:
    """Stands in for `formers.nn.attention.BlockCausalAttention`: y = v."""

    calls = 0

    @staticmethod
    def apply(q, k, v, scale, block):
        _NoAttention.calls += 1
        return v


@contextlib.contextmanager
def _swapped(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _no_gelu():
    import formers.nn.ffn as ffn

    return _swapped(ffn, "_GeluLinearFn", _LinearNoGelu)


def _no_attention():
    import formers.nn.attention as attention

    return _swapped(attention, "BlockCausalAttention", _NoAttention)


def _drop_fc1_bias(model: nn.Module) -> int:
    from formers.nn.ffn import MLP

    n = 0
    for m in model.modules():
        if type(m) is MLP and m.fc1.bias is not None:
            m.fc1.bias = None
            n += 1
    return n


def _drop_layernorms(model: nn.Module) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, nn.Identity())
                n += 1
    return n


@dataclass
class Oracle:
    name: str
    removes: str
    gelu: bool = False  # GELU forward and backward out (the fused GELU + fc2 node without its GELU)
    fc1_bias: bool = False
    layernorm: bool = False
    optimizer: bool = False
    attention: bool = False


ORACLES = {
    "gelu": Oracle("gelu", "GELU forward and backward", gelu=True),
    "gelu_bias": Oracle("gelu_bias", "GELU forward and backward, and fc1's bias (add and gradient sum)", gelu=True,
                        fc1_bias=True),
    "layernorm": Oracle("layernorm", "every LayerNorm (forward and backward)", layernorm=True),
    "optimizer": Oracle("optimizer", "the AdamW update", optimizer=True),
    "fusible": Oracle("fusible", "gelu_bias, layernorm and optimizer together", gelu=True, fc1_bias=True,
                      layernorm=True, optimizer=True),
    "attention": Oracle("attention", "the causal attention kernel (y = v), forward and backward", attention=True),
}


class OracleStep:
    """One training step of `model` (a copy of the base LM's weights) with `oracle`'s work taken out."""

    def __init__(self, oracle: Oracle, model: nn.Module, batch: int, seq: int, vocab: int):
        self.oracle = oracle
        self.removed = {}
        if oracle.fc1_bias:
            self.removed["fc1 biases"] = _drop_fc1_bias(model)
        if oracle.layernorm:
            self.removed["LayerNorms"] = _drop_layernorms(model)
        self.step = TrainStep(model, batch, seq, vocab)

    def __call__(self):
        with contextlib.ExitStack() as stack:
            if self.oracle.gelu:
                stack.enter_context(_no_gelu())
            if self.oracle.attention:
                stack.enter_context(_no_attention())
            s = self.step
            s.loss().backward()
            if not self.oracle.optimizer:
                s.opt.step()
            s.opt.zero_grad(set_to_none=True)

    def check(self, layers: int) -> None:
        """Run one step and make sure the oracle removed what it names, else raise FormersError: the stand-ins ran
        once per layer, the modules it drops were there, and the profiler saw none of the removed ops."""
        from torch.profiler import ProfilerActivity, profile

        o = self.oracle
        _LinearNoGelu.calls = _NoAttention.calls = 0
        with profile(activities=[ProfilerActivity.CPU]) as p:
            self()
        names = {e.key for e in p.key_averages()}
        gone = {"gelu": ("aten::gelu", "aten::gelu_backward"), "layernorm": ("aten::native_layer_norm",),
                "optimizer": ("Optimizer.step#AdamW.step",), "attention": ("BlockCausalAttention",)}
        bad = []
        for kind, ops in gone.items():
            if getattr(o, kind):
                bad += [op for op in ops if op in names]
        if o.gelu and _LinearNoGelu.calls != layers:
            bad.append(f"the GELU-free feed-forward ran {_LinearNoGelu.calls} times, not {layers}")
        if o.attention and _NoAttention.calls != layers:
            bad.append(f"the attention stand-in ran {_NoAttention.calls} times, not {layers}")
        for what, n in self.removed.items():
            if n == 0:
                bad.append(f"no {what} to remove")
        if bad:
            raise FormersError(f"oracle '{o.name}' did not remove what it names ({'; '.join(bad)}): formers' "
                               "training path changed; update formers/bench/oracles.py")


def build_sides(names: list[str], *, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB,
                peer: bool = True, **model_over) -> dict[str, Callable[[], Any]]:
    """{"formers": base step, "peer": x-transformers attn_flash step (same weights, logits checked equal),
    name: oracle step, ...}, every model starting from the base's weights; each oracle checked by `OracleStep.check`."""
    torch.manual_seed(0)
    base = formers_lm(max_len=seq, vocab=vocab, **model_over)
    sides: dict[str, Callable[[], Any]] = {}
    if peer:
        kw = {k: model_over[k] for k in ("dim", "depth") if k in model_over}
        p = xt_lm(max_len=seq, flash=True, vocab=vocab, **kw)
        same_as_xt(base, p, "step_oracles lm")
        sides["peer"] = TrainStep(p, batch, seq, vocab)
    from formers.nn.ffn import MLP

    layers = sum(isinstance(m, MLP) for m in base.modules())
    check_names(names, ORACLES, "step_oracles", "oracle")
    for n in names:
        m = formers_lm(max_len=seq, vocab=vocab, **model_over)
        m.load_state_dict(base.state_dict())
        s = OracleStep(ORACLES[n], m, batch, seq, vocab)
        s.check(layers)
        sides[n] = s
    sides["formers"] = TrainStep(base, batch, seq, vocab)
    return sides


def _pair(a: Callable[[], Any], b: Callable[[], Any], reps: int, steps: int, desc: str) -> tuple[list, list, list]:
    """Two sides alone, interleaved (the order flipping every repetition, so neither always follows the other):
    (ms per step of a, of b, page faults per step of a and b as a pair of medians)."""
    pf: dict[str, list[int]] = {}
    t = interleaved({"a": lambda: [a() for _ in range(steps)], "b": lambda: [b() for _ in range(steps)]}, reps,
                    faults=pf, desc=desc)
    ms = {n: [x * 1e3 / steps for x in v] for n, v in t.items()}
    return ms["a"], ms["b"], [round(statistics.median(pf[n]) / steps, 1) for n in ("a", "b")]


def measure(names: list[str], reps: int, steps: int, log) -> list[dict]:
    """The unchanged step against the peer, then against each oracle, each pair timed on its own (a side's time
    depends on what runs between its calls, so every comparison is a plain two-side A/B). `ratio_vs_peer` of an
    oracle is the peer pair's ratio times the oracle's speedup over the unchanged step."""
    sides = build_sides(names)
    base = sides["formers"]
    f_ms, p_ms, faults = _pair(base, sides["peer"], reps, steps, "formers vs peer")
    r0 = statistics.median([p / f for p, f in zip(p_ms, f_ms)])
    rows = [{"row": "formers", "removes": "nothing", "ms": round(statistics.median(f_ms), 2),
             "peer_ms": round(statistics.median(p_ms), 2), "ratio_vs_peer": round(r0, 3),
             "runs_ms": [round(t, 2) for t in f_ms], "peer_runs_ms": [round(t, 2) for t in p_ms],
             "page_faults_per_step": faults[0], "peer_page_faults_per_step": faults[1]}]
    log(f"formers step {rows[0]['ms']:.1f} ms, x-transformers attn_flash {rows[0]['peer_ms']:.1f} ms: "
        f"x{r0:.3f}  (page faults per step {faults[0]:,.0f} / {faults[1]:,.0f})")
    for n in names:
        b_ms, o_ms, faults = _pair(base, sides[n], reps, steps, f"without {n}")
        saved = statistics.median([b - o for b, o in zip(b_ms, o_ms)])
        speedup = statistics.median([b / o for b, o in zip(b_ms, o_ms)])
        r = {"row": n, "removes": ORACLES[n].removes, "ms": round(statistics.median(o_ms), 2),
             "base_ms": round(statistics.median(b_ms), 2), "saved_ms": round(saved, 2),
             "saved_fraction": round(saved / statistics.median(b_ms), 4), "speedup": round(speedup, 3),
             "ratio_vs_peer": round(r0 * speedup, 3), "runs_ms": [round(t, 2) for t in o_ms],
             "base_runs_ms": [round(t, 2) for t in b_ms], "page_faults_per_step": faults[1],
             "base_page_faults_per_step": faults[0]}
        rows.append(r)
        log(f"without {r['removes']:<66} {r['ms']:7.1f} ms (unchanged {r['base_ms']:.1f})  saves "
            f"{r['saved_ms']:5.1f} ms ({100 * r['saved_fraction']:4.1f}%)  vs peer x{r['ratio_vs_peer']:.3f}  "
            f"faults {faults[1]:,.0f} / {faults[0]:,.0f}")
    return rows


README_START, README_END = "<!-- oracles:start -->", "<!-- oracles:end -->"


def readme_section(res: dict) -> str:
    """The README's table of step oracles (between the oracle markers), from results/step_oracles.json."""
    m = res["meta"]
    base = res["rows"][0]
    lines = [f"Measured by `{m['command']}` on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
             f"{m['date'][:10]} (paired medians of {m['reps']} interleaved repetitions, each row its own A/B against "
             f"the unchanged step): formers' step "
             f"{base['ms']:.0f} ms, x-transformers `attn_flash=True` {base['peer_ms']:.0f} ms, "
             f"x{base['ratio_vs_peer']:.2f}.",
             "",
             "| the step without | step | saves | formers vs peer without it |",
             "|---|---:|---:|---:|"]
    for r in res["rows"][1:]:
        lines.append(f"| {r['removes']} | {r['ms']:.0f} ms | {r['saved_ms']:.1f} ms "
                     f"({100 * r['saved_fraction']:.1f}%) | {r['ratio_vs_peer']:.2f}x |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    names = [r["row"] for r in rows]
    vals = [r["ratio_vs_peer"] for r in rows]
    ax.barh(names[::-1], vals[::-1], color=["#888" if n == "formers" else "#4a7" for n in names[::-1]])
    ax.axvline(1.1, color="r", ls="--", lw=1, label="issue 10 target (1.1x)")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("x-transformers attn_flash step time / formers step time (with that work removed)")
    ax.set_xlim(0.9, max(vals + [1.15]) + 0.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("LM training step: what removing each kind of work would give", fontsize=10)
    fig.tight_layout()
    fd_tmp = path.with_suffix(".tmp.png")
    fig.savefig(fd_tmp, dpi=110)
    plt.close(fig)
    fd_tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/step_oracles.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--oracles", nargs="*", default=list(ORACLES), help=f"default: {' '.join(ORACLES)}")
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--steps", type=int, default=1,
                    help="training steps per call (1: the sides alternate every step, which read steadier here)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/step_oracles.json")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's malloc thresholds as they are (page faults then vary between sides)")
    a = ap.parse_args(argv)
    check_names(a.oracles, ORACLES, "step_oracles", "oracle")
    if a.reps < 1 or a.steps < 1:
        raise FormersError("step_oracles: --reps and --steps must be >= 1")
    out = out_path(a.out, "step_oracles.json", "step_oracles")  # before any timing
    if a.threads:
        torch.set_num_threads(a.threads)
    m = meta(" ".join(["python benchmarks/step_oracles.py", *(sys.argv[1:] if argv is None else argv)]))
    m.update(reps=a.reps, steps=a.steps, peer="x-transformers attn_flash=True",
             freed_memory_kept=False if a.glibc_default else keep_freed_memory())
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows = measure(a.oracles, a.reps, a.steps, log)
    res = {"meta": m, "rows": rows}
    save(out, m, rows)
    plot(res, out.with_suffix(".png"))
    if out == Path("results/step_oracles.json") and Path("README.md").exists():
        if replace_section(Path("README.md"), README_START, README_END, readme_section(res)):
            log("updated the step-oracle table in README.md")
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
