"""Attention scaling: forward+backward time and peak memory of every token mixer against
`F.scaled_dot_product_attention(..., is_causal=True)`, N = 512 ... 16K, dim 256, 4 heads, batch 1.

    formers bench attention [--mixers linear sla] [--lengths 512 1024] [--force]
    python benchmarks/attention_scaling.py

Each point runs in a fresh subprocess; finished points are not re-run (resumable); a point that needs more than
~12 GiB is recorded as skipped. Writes results/attention_scaling.json and results/attention_scaling.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from formers.bench.harness import load_rows, meta, peak_memory_mib, run_point, save, time_calls

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
DIM, HEADS, BATCH = 256, 4, 1
REFERENCE = "sdpa"


def measure(mixer: str, n: int, seed: int = 0) -> dict[str, Any]:
    """One point, run inside the subprocess: build, measure memory once, then time forward+backward."""
    torch.manual_seed(seed)
    x = torch.randn(BATCH, n, DIM, requires_grad=True)
    g = torch.randn(BATCH, n, DIM)
    if mixer == REFERENCE:
        proj = torch.nn.Linear(DIM, 3 * DIM, bias=False)
        out = torch.nn.Linear(DIM, DIM, bias=False)

        def step():
            q, k, v = proj(x).view(BATCH, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh) each
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out(y.transpose(1, 2).reshape(BATCH, n, DIM)).backward(g)
        causal = True
    else:
        import formers

        entry = formers.get("mixer", mixer)
        causal = bool(entry.causal_ok)
        opts: dict[str, Any] = {"dim": DIM, "heads": HEADS, "causal": causal}
        if entry.max_len:
            opts["max_len"] = n
        module = formers.build("mixer", mixer, **opts)

        def step():
            module(x).backward(g)
    mem = peak_memory_mib(step)
    step()  # warm-up after the memory point
    seconds = time_calls(step, reps=3)
    return {"mixer": mixer, "n": n, "causal": causal, "seconds": seconds, "peak_mib": round(mem, 1)}


def run(mixers: list[str], lengths: list[int], out: Path, force: bool = False, timeout_s: float = 300.0) -> list:
    from tqdm.auto import tqdm

    rows = [] if force else load_rows(out)
    done = {(r["mixer"], r["n"]) for r in rows}
    m = meta(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    todo = [(mx, n) for mx in [REFERENCE, *mixers] for n in lengths if (mx, n) not in done]
    bar = tqdm(todo, unit="point")
    given_up: set[str] = {r["mixer"] for r in rows if "skipped" in r and "memory" in r["skipped"]}
    for mixer, n in bar:
        bar.set_description(f"{mixer} N={n}")
        if mixer in given_up:  # larger N of a mixer that already ran out of memory
            rec = {"mixer": mixer, "n": n, "skipped": "needs more than the memory limit at a shorter length"}
        else:
            rec = run_point("formers.bench.attention", "measure", {"mixer": mixer, "n": n}, timeout_s=timeout_s)
            rec.setdefault("mixer", mixer)
            rec.setdefault("n", n)
            if "skipped" in rec:
                given_up.add(mixer)
        rows = [r for r in rows if (r["mixer"], r["n"]) != (mixer, n)] + [rec]
        save(out, m, add_ratios(rows))
    rows = add_ratios(rows)
    save(out, m, rows)
    plot(rows, out.with_suffix(".png"))
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """speedup = reference seconds / mixer seconds at the same N; memory growth relative to N = 1024."""
    ref = {r["n"]: r["seconds"] for r in rows if r["mixer"] == REFERENCE and "seconds" in r}
    at_1k = {r["mixer"]: r["peak_mib"] for r in rows if r.get("n") == 1024 and "peak_mib" in r}
    for r in rows:
        if "seconds" in r and r["n"] in ref:
            r["speedup_vs_sdpa"] = round(ref[r["n"]] / r["seconds"], 3)
        if "peak_mib" in r and at_1k.get(r["mixer"]):
            r["memory_vs_1k"] = round(r["peak_mib"] / at_1k[r["mixer"]], 2)
    return sorted(rows, key=lambda r: (r["mixer"] != REFERENCE, r["mixer"], r["n"]))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=100)
    names = sorted({r["mixer"] for r in rows}, key=lambda s: (s != REFERENCE, s))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        pts = sorted((r["n"], r) for r in rows if r["mixer"] == name and "seconds" in r)
        if not pts:
            continue
        style = {"color": "black", "lw": 2.5} if name == REFERENCE else \
            {"color": cmap(i % 10), "lw": 1.2, "ls": ("-", "--", ":")[i // 10 % 3]}  # 30 distinct lines
        axes[0].plot([n for n, _ in pts], [r["seconds"] for _, r in pts], marker="o", ms=3, label=name, **style)
        axes[1].plot([n for n, _ in pts], [max(r["peak_mib"], 0.1) for _, r in pts], marker="o", ms=3, **style)
    for ax, ylabel in zip(axes, ["forward+backward seconds", "peak memory above baseline (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"token mixers, dim {DIM}, {HEADS} heads, batch {BATCH} (black: SDPA causal)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict[str, Any]], n: int) -> str:
    lines = [f"{'mixer':<16} {'causal':<7} {'seconds':>9} {'x SDPA':>7} {'peak MiB':>9} {'mem/1K':>7}"]
    for r in rows:
        if r["n"] != n:
            continue
        if "skipped" in r:
            lines.append(f"{r['mixer']:<16} {'':<7} skipped: {r['skipped']}")
        else:
            lines.append(f"{r['mixer']:<16} {str(r['causal']):<7} {r['seconds']:9.3f} "
                         f"{r.get('speedup_vs_sdpa', 0):7.2f} {r['peak_mib']:9.1f} {r.get('memory_vs_1k', 0):7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import formers

    ap = argparse.ArgumentParser(prog="formers bench attention", description=__doc__.splitlines()[0])
    ap.add_argument("--mixers", nargs="*", default=None, help="mixer names (default: every registered mixer)")
    ap.add_argument("--lengths", nargs="*", type=int, default=LENGTHS)
    ap.add_argument("--out", default="results/attention_scaling.json")
    ap.add_argument("--force", action="store_true", help="re-run finished points")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per point")
    a = ap.parse_args(argv)
    mixers = a.mixers if a.mixers is not None else [e.name for e in formers.entries("mixer")]
    for name in mixers:
        formers.get("mixer", name)  # unknown names fail now, with a suggestion
    rows = run(mixers, a.lengths, Path(a.out), force=a.force, timeout_s=a.timeout)
    print(table(rows, max(a.lengths)))
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
