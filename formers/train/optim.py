"""Optimizers and learning-rate schedules (families `optimizer`, `schedule`).

Parameters are split in two groups: matrices get weight decay; norms, biases, embeddings and other vectors do not
(the GPT-2 / nanoGPT convention).

Adam and AdamW take torch's fused kernel (`fused=True`: one pass over each parameter and its two moments instead of
about ten, and one call for all of them) where every parameter is a plain floating-point tensor on the CPU (`fusable`);
otherwise torch's default implementation. The update is the same algorithm up to float rounding (tests/test_train.py
checks it against Adam and AdamW written out from their update rules). On the benchmark LM (3.3M parameters, 2-core
Xeon) a step of the optimizer took 2.2 ms fused and 6.7 ms with torch's CPU default (a loop over the parameters).
On a GPU torch's default (foreach) stays: the fused CUDA kernel of some torch releases that formers allows rejects a
gradient whose strides differ from its parameter's in size-1 dimensions (depthwise convolutions, DLinear's weights),
and no GPU here measured its gain. A run resumed from a checkpoint keeps the kernel choice saved with it (torch's
`load_state_dict` restores each param group's `fused` flag).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from formers.nn.hooks import torch_at_least
from formers.registry import FormersError, register

_FUSED_CPU = torch_at_least(2, 4)  # torch's fused Adam/AdamW runs on a CPU from 2.4


def _listed(params) -> list:
    """`params` as torch.optim takes it (tensors, (name, tensor) pairs, or param-group dicts whose "params" is a
    tensor or any iterable), with every iterable made a list, so that looking at it does not use it up."""
    out = []
    for g in params:
        if isinstance(g, dict):
            ps = g["params"]
            g = {**g, "params": [ps] if isinstance(ps, torch.Tensor) else list(ps)}
        out.append(g)
    return out


def fusable(params) -> bool:
    """Whether the trainer gives these parameters (as `_listed` returns them) torch's fused Adam/AdamW kernel:
    torch >= 2.4 and every one a floating-point plain tensor (no subclass, such as FSDP's DTensor) on the CPU."""
    tensors = [t[1] if isinstance(t, tuple) else t
               for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    return (_FUSED_CPU and bool(tensors)
            and all(type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point() and t.device.type == "cpu"
                    for t in tensors))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_embedding = isinstance(module, nn.Embedding) or "pos" in mod_name.split(".")[-1] \
                or name in ("emb", "cls_token")
            (no_decay if p.dim() < 2 or is_embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@register("optimizer", "adamw", paper="baseline")
def adamw(params, lr: float, betas: tuple = (0.9, 0.95), eps: float = 1e-8):
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay."""
    params = _listed(params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, fused=fusable(params) or None)


@register("optimizer", "adam", paper="baseline")
def adam(params, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
    """Adam (Kingma & Ba); weight decay, if any, is the coupled L2 form."""
    params = _listed(params)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, fused=fusable(params) or None)


@register("optimizer", "sgd", paper="baseline")
def sgd(params, lr: float, momentum: float = 0.9, nesterov: bool = False):
    """SGD with (Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)


class Schedule:
    """lr multiplier at `step` of `total`, with linear warmup over the first `warmup` steps."""

    def __init__(self, warmup: int = 0):
        self.warmup = warmup

    def __call__(self, step: int, total: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        return self.after_warmup(step, total)

    def after_warmup(self, step: int, total: int) -> float:
        return 1.0


@register("schedule", "constant", paper="baseline")
class Constant(Schedule):
    """Constant lr after warmup."""

    def __init__(self, warmup: int = 0):
        super().__init__(warmup)


@register("schedule", "cosine", paper="baseline")
class Cosine(Schedule):
    """Cosine decay (Loshchilov & Hutter, SGDR) from 1 to `min_ratio` over the steps after warmup."""

    def __init__(self, warmup: int = 100, min_ratio: float = 0.1):
        super().__init__(warmup)
        self.min_ratio = min_ratio

    def after_warmup(self, step, total):
        t = (step - self.warmup) / max(1, total - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@register("schedule", "rsqrt", paper="baseline")
class RSqrt(Schedule):
    """Inverse square root (Vaswani et al.): sqrt(warmup / step) after warmup."""

    def __init__(self, warmup: int = 100):
        super().__init__(warmup)

    def after_warmup(self, step, total):
        return math.sqrt(max(1, self.warmup) / max(1, step + 1))


@register("schedule", "step_decay", paper="baseline")
class StepDecay(Schedule):
    """Multiply the lr by `gamma` every `every` steps after warmup, the first time after `hold` + 1 periods:
    multiplier gamma ** max(0, (step - warmup) // every - hold). Informer's "type1" schedule (lr halved after every
    epoch from the second on: epochs 1 and 2 at lr, epoch 3 at lr / 2, ...) is every = one epoch, gamma 0.5,
    hold 1."""

    def __init__(self, warmup: int = 0, every: int = 1000, gamma: float = 0.5, hold: int = 0):
        super().__init__(warmup)
        if every < 1 or hold < 0:
            raise FormersError(f"schedule step_decay: need every >= 1 and hold >= 0, got every={every}, hold={hold}")
        self.every, self.gamma, self.hold = every, gamma, hold

    def after_warmup(self, step, total):
        return self.gamma ** max(0, (step - self.warmup) // self.every - self.hold)
