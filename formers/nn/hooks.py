"""The two cross-cutting hooks of DESIGN §2.

- Auxiliary losses (MoE balance, attention diversification, ...): a module calls `report_aux(self, name, value)`
  during forward; the trainer calls `aux_losses(model)`, which sums and clears them. No ad-hoc return tuples.
- Step-dependent components (PRepBN's schedule, feature redraw, noise annealing) define `set_step(step)`; the
  trainer calls `set_step(model, step)` before every optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

_AUX_ATTR = "_formers_aux"


def report_aux(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Record an auxiliary loss term on `module` (already weighted); overwritten by the next forward."""
    store = module.__dict__.setdefault(_AUX_ATTR, {})
    store[name] = value


def aux_losses(model: nn.Module, clear: bool = True) -> dict[str, torch.Tensor]:
    """All auxiliary losses reported since the last call, summed by name across modules."""
    out: dict[str, torch.Tensor] = {}
    for m in model.modules():
        store = m.__dict__.get(_AUX_ATTR)
        if not store:
            continue
        for k, v in store.items():
            out[k] = out[k] + v if k in out else v
        if clear:
            store.clear()
    return out


def set_step(model: nn.Module, step: int) -> None:
    """Tell every step-dependent submodule the current optimizer step."""
    for m in model.modules():
        if m is not model and hasattr(m, "set_step"):
            m.set_step(step)
    if hasattr(type(model), "set_step"):
        model.set_step(step)
