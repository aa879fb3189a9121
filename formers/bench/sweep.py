"""Sweeps of small language models that differ in one choice, trained at equal steps and seed (benchmarks/).

`lm_sweep` trains one run per configuration through `formers.fit`, resumably: finished configurations are kept in
the JSON file and skipped, an interrupted one resumes from its last checkpoint in `tmp/<name>`. Each row holds the
held-out bits per byte, loss and gradient-norm curves, training time, tokens/s and total and active parameters.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

import formers
from formers.bench.harness import load_rows, meta, save


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token). Modules that compute only part of their weights per token (mixtures of experts)
    define `active_parameters()`; the outermost such module's count replaces its full count."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    seen: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in seen) or not hasattr(m, "active_parameters") or m is model:
            continue
        seen.add(name)
        inactive += sum(p.numel() for p in m.parameters()) - int(m.active_parameters())
    return total, total - inactive


def _median_rate(train: list[dict]) -> float:
    rates = [r["tokens_per_s"] for r in train[len(train) // 10:] if "tokens_per_s" in r]
    return statistics.median(rates) if rates else float("nan")


def lm_sweep(configs: dict[str, list[str]], names: list[str], common: list[str], out: Path, tmp: Path,
             recipe: str = "lm_shakespeare", extra: Callable[[Path, nn.Module], dict[str, Any]] | None = None
             ) -> list[dict]:
    """Train `recipe` with `common + configs[name]` overrides for each name; returns all rows (old and new)."""
    rows = load_rows(out)
    done = {r["config"] for r in rows}
    m = meta(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    for name in names:
        if name in done:
            continue
        run_dir = tmp / name
        print(f"== {name}", flush=True)
        resume = (run_dir / "config.yaml").exists()
        result = formers.fit(recipe, common + configs[name], out=run_dir, resume=resume, force=not resume)
        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in logs if "loss" in r]
        losses = [r["loss"] for r in train]
        model = formers.load_run(run_dir)
        total, active = count_parameters(model)
        row = {"config": name, "overrides": configs[name],
               "steps": train[-1]["step"] if train else 0, "val_bpb": round(result["val_bpb"], 4),
               "final_loss": round(losses[-1], 4),
               "max_grad_norm": round(max(r["grad_norm"] for r in train), 3),
               "loss_spikes": sum(1 for a, b in zip(losses, losses[1:]) if b > a + 0.5),
               "tokens_per_s": round(_median_rate(train), 1), "train_seconds": round(result["train_seconds"], 1),
               "params_total": total, "params_active": active,
               "curve_step": [r["step"] for r in train], "curve_loss": [round(v, 4) for v in losses],
               "curve_grad_norm": [round(r["grad_norm"], 4) for r in train]}
        if extra is not None:
            row.update(extra(run_dir, model))
        rows.append(row)
        save(out, m, rows)
    return rows


__all__ = ["count_parameters", "lm_sweep"]
