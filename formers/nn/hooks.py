"""The two cross-cutting hooks of DESIGN §2.

- Auxiliary losses (MoE balance, attention diversification, ...): a module calls `report_aux(self, name, value)`
  during forward; the trainer calls `aux_losses(model)`, which sums and clears them. No ad-hoc return tuples.
- Step-dependent components (PRepBN's schedule, feature redraw, noise annealing) define `set_step(step)`; the
  trainer calls `set_step(model, step)` before every optimizer step.

Also `hook_free`, `forward_unpatched` and `idle_dropout`: whether a fused fast path may skip a submodule's forward
(no PyTorch module hooks, no forward replaced on the instance, a dropout that is the identity).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# module -> {name: tensor}; kept outside the modules so that copy.deepcopy and pickling of a model never meet
# tensors that still hold an autograd graph
_AUX: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def report_aux(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Record an auxiliary loss term on `module` (already weighted). A module called several times in one forward
    pass (a weight-shared layer) adds up its terms; models drop stale terms at the start of each forward."""
    store = _AUX.setdefault(module, {})
    store[name] = store[name] + value if name in store else value


def clear_aux(model: nn.Module) -> None:
    """Forget every auxiliary loss reported under `model` (called by models at the start of a forward pass)."""
    if not any(_AUX.values()):  # nothing reported anywhere: skip the walk over the modules (every decoded token)
        return
    for m in model.modules():
        store = _AUX.get(m)
        if store:
            store.clear()


def aux_losses(model: nn.Module, clear: bool = True) -> dict[str, torch.Tensor]:
    """All auxiliary losses reported since the last call, summed by name across modules."""
    out: dict[str, torch.Tensor] = {}
    for m in model.modules():
        store = _AUX.get(m)
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


def _global_hooks() -> bool:
    """Whether a module hook is registered for every module (`torch.nn.modules.module.register_module_*_hook`)."""
    glob = torch.nn.modules.module
    return bool(glob._global_forward_hooks or glob._global_forward_pre_hooks or glob._global_backward_hooks
                or glob._global_backward_pre_hooks)


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the installed torch is at least major.minor (for features that came in a given release)."""
    return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (major, minor)


def _hooked(m: nn.Module) -> bool:
    """Whether a hook of any kind is registered on this module itself."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def hook_free(*mods: nn.Module) -> bool:
    """No hooks of any kind on these modules, nor global ones: a fast path that skips their forward may run."""
    return not _global_hooks() and not any(_hooked(m) for m in mods)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for types autocast does not know, e.g. meta): a fast
    path that computes in its inputs' dtype must not run under it."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


try:
    from torch._C._functorch import peek_interpreter_stack as _functorch_stack
except ImportError:  # pragma: no cover - older torch
    _functorch_stack = None


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running: custom autograd Functions without
    functorch rules must not be used under one."""
    return _functorch_stack is not None and _functorch_stack() is not None


def vmapped(t: torch.Tensor) -> bool:
    """Whether t is being vmapped: under a torch.func transform, or a batched gradient of the older vmap that
    `autograd.grad(..., is_grads_batched=True)` and `jacobian(vectorize=True)` run the backward under (out= ops
    have no batching rule there)."""
    if functorch_active():
        return True
    legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return legacy is not None and legacy(t)


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (`torch.autograd.forward_ad.dual_level`): custom autograd Functions
    without a `jvp` must not be used inside one."""
    from torch.autograd import forward_ad

    return getattr(forward_ad, "_current_level", -1) >= 0


def plain_tree(root: nn.Module, evaluating: bool = False, global_checked: bool = False) -> bool:
    """`hook_free` and `forward_unpatched` for a module and everything under it, in one walk over `_modules` (what
    `PreNorm.add_into` asks on every call in inference; `nn.Module.modules()` builds names and a memo set); with
    `evaluating` also every module in evaluation mode. `global_checked`: the caller has seen no global hooks."""
    if not global_checked and _global_hooks():
        return False
    todo = [root]
    while todo:
        m = todo.pop()
        if m is None:  # an empty slot in `_modules`
            continue
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks  # `_hooked`,
                or "forward" in m.__dict__ or (evaluating and m.training)  # inline: this runs once per block
                or _class_forward_replaced(m)):
            return False
        todo += m._modules.values()
    return True


# The torch modules whose forward formers' fast paths compute inline from their weights, with that forward as torch
# defines it. A class-level replacement (a quantization or logging wrapper patching nn.Linear.forward, say) turns
# those paths off; one made before formers was imported is caught by its name (`_TORCH_AS_DEFINED`).
_INLINED = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.GELU, nn.Dropout, nn.Identity)
_TORCH_FORWARD = {c: vars(c).get("forward") for c in _INLINED}
_TORCH_AS_DEFINED = all(getattr(f, "__qualname__", None) == f"{c.__name__}.forward"
                        and getattr(f, "__module__", "").startswith("torch.nn.") for c, f in _TORCH_FORWARD.items())
_PATCHED = object()


def torch_forward(cls: type) -> object:
    """nn.Linear.forward (etc.) as torch defines it, to compare `type(m).forward` with; a sentinel nothing equals
    where the class's forward was replaced before formers was imported."""
    return _TORCH_FORWARD[cls] if _TORCH_AS_DEFINED else _PATCHED


# module class -> its first base in _INLINED (formers' LayerNorm: nn.LayerNorm), filled outside torch.compile
# tracing only (a dict written while Dynamo traces broke the graph at every module on a first compiled call)
_OWNER: dict[type, type | None] = {c: c for c in _INLINED}


def _class_forward_replaced(m: nn.Module) -> bool:
    t = type(m)
    owner = _OWNER.get(t, _PATCHED)
    if owner is _PATCHED:
        owner = next((c for c in t.__mro__ if c in _TORCH_FORWARD), None)
        if not torch.compiler.is_compiling():
            _OWNER[t] = owner
    return owner is not None and (owner.__dict__.get("forward") is not _TORCH_FORWARD[owner]
                                  or not _TORCH_AS_DEFINED)


def forward_unpatched(*mods: nn.Module) -> bool:
    """No module here has its own `forward` set on the instance (accelerate-style wrappers, monkeypatches), nor
    the forward of its torch class replaced (for the classes the fast paths inline: `_INLINED`): a fast path that
    reads a module's weights instead of calling it must not skip such a replacement."""
    return not any("forward" in vars(m) or _class_forward_replaced(m) for m in mods)


def methods_as_defined(obj: nn.Module, base: type, original: dict) -> bool:
    """Whether obj runs `base`'s methods named in `original` ({name: the function as `base` defined it, taken at
    import}): neither its class (a subclass override, or `base` itself patched) nor the instance replaces one. A
    fast path that stands in for a chain of those methods (e.g. a model's features, pooling and head) must not
    skip a replacement."""
    t = type(obj)
    return all(getattr(t, k, None) is f and k not in obj.__dict__ for k, f in original.items())


def idle_dropout(m: nn.Module) -> bool:
    """A plain nn.Dropout in evaluation mode by its own flag, with no hooks or replaced forward: the identity, so a
    fast path may skip it. (MC dropout switches single Dropout modules back to training inside an eval model; a
    Dropout subclass may drop always.)"""
    if type(m) is not nn.Dropout or not hook_free(m) or not forward_unpatched(m):
        return False
    return not m.training or m.p == 0
