"""Checkpoints: model, optimizer and RNG state in one safetensors file plus a small JSON, written atomically.

Each checkpoint is a folder `ckpt-<step>` that appears by a single rename, so a kill at any moment leaves either
the old set of checkpoints or the new one, never a half-written file. Nothing here unpickles.

Checkpoints hold full tensors in the 1-process layout whatever the number of processes that wrote them: the model
(tied tensors once) under `model.<key>`, the optimizer state under `optim.<index>.<name>` (index: the parameter's
place in the optimizer's param groups). torch.distributed.checkpoint.state_dict moves state in and out of the
model and optimizer: with sharded (FSDP) parameters it gathers them on save (every rank takes part, rank 0 writes:
`write=False` elsewhere) and cuts each rank's shard on load, so N processes resume what 1 saved and vice versa.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from formers.registry import FormersError
from formers.train.distributed import is_sharded

# save: full tensors on the CPU, on rank 0 only (the others take part in gathering shards and get nothing)
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# load: every rank holds the full state (read from the same file) and keeps its own shard of it
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def _sharded(model: torch.nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def _tie_groups(model: torch.nn.Module) -> list[list[str]]:
    """The state-dict keys of each tensor, grouped by object identity: a tied tensor (the head sharing the
    embedding's weight, a module used twice) is one group of several keys, stored under the first."""
    groups: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(v), []).append(k)
    return list(groups.values())


def _param_index(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Every name of every parameter the optimizer holds -> its place in the optimizer's param groups."""
    place = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {k: place[id(p)] for k, p in model.named_parameters(remove_duplicate=False) if id(p) in place}


def _flat_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's full state as `optim.<index>.<name>` tensors and JSON scalars; empty on ranks other than 0
    when a process group is up."""
    osd = get_optimizer_state_dict(model, opt, options=_GATHER)
    if not osd:
        return {}, {}
    index = _param_index(model, opt)
    tensors, scalars = {}, {}
    for name, state in osd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{index[name]}.{k}"] = v.contiguous()
            else:
                scalars[f"{index[name]}.{k}"] = v
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflat_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any], where: Any) -> None:
    names: dict[int, str] = {}
    for k, i in _param_index(model, opt).items():
        names.setdefault(i, k)
    state: dict[str, dict[str, Any]] = {}
    try:
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(names[int(idx)], {})[name] = v
        for key, v in meta["scalars"].items():
            idx, name = key.split(".", 1)
            state.setdefault(names[int(idx)], {})[name] = v
        groups = [dict(g, params=[names[i] for i in g["params"]]) for g in meta["param_groups"]]
    except (KeyError, ValueError) as e:
        raise FormersError(f"the optimizer state in {where} does not fit the optimizer (parameter {e} is not in "
                           "it); was the config changed after training?") from None
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups}, options=_SCATTER)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on the CPU with tied tensors stored once (safetensors refuses aliases). With sharded (FSDP)
    parameters every rank must call this: the shards are gathered, and only rank 0 gets them (the others: {})."""
    sd = get_model_state_dict(model, options=_GATHER)
    for group in _tie_groups(model):
        for alias in group[1:]:
            sd.pop(alias, None)
    return {k: v.contiguous() for k, v in sd.items()}


def _skip(model: torch.nn.Module, write: bool) -> bool:
    """A rank that does not write has nothing to do unless it holds shards the writer needs."""
    return not write and not _sharded(model)


def save_weights(model: torch.nn.Module, path: Path, prefix: str = "", write: bool = True) -> None:
    """Save model weights to a safetensors file atomically (temp file + rename). `write=False`: take part in
    gathering sharded weights without writing (the ranks other than 0); without shards it returns at once."""
    if _skip(model, write):
        return
    tensors = model_tensors(model)
    if not write:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({prefix + k: v for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights(model: torch.nn.Module, path: Path, prefix: str = "") -> None:
    """Load safetensors weights into `model`, refusing files that do not fit it."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormersError(f"cannot read weights from {path}: {e}; the file is missing or corrupt") from None
    load_state(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, path)


def load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: Any) -> None:
    """Load full tensors `sd` (tied tensors under any one of their keys) into `model`, sharded or not; every rank
    of a sharded model must call this with the same `sd`."""
    expected = model.state_dict()
    groups = _tie_groups(model)
    missing = [k for group in groups if not any(k in sd for k in group) for k in group]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise FormersError(f"weights in {where} do not fit the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); was the config changed after training?")
    for k, v in sd.items():
        if expected[k].shape != v.shape:
            raise FormersError(f"weights in {where}: '{k}' has shape {tuple(v.shape)}, the model expects "
                               f"{tuple(expected[k].shape)}")
    # each tensor under the first of its keys, the one torch.distributed.checkpoint fills (a new dict: it puts each
    # rank's shards into the one it is given)
    first = {k: group[0] for group in groups for k in group}
    set_model_state_dict(model, {first[k]: v for k, v in sd.items()}, options=_SCATTER)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, rng: dict[str, torch.Tensor],
                    meta: dict[str, Any], keep: int = 2, write: bool = True) -> Path:
    """Write `ckpt-<step>`; `write=False` only takes part in gathering sharded state (ranks other than 0), and
    without shards returns at once."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:08d}"
    if _skip(model, write):
        return final
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    opt_tensors, opt_meta = _flat_optimizer(model, optimizer)
    if not write:
        return final
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".ckpt-{step:08d}-"))
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **meta}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("ckpt-*") if p.is_dir() and (p / "meta.json").exists())


def clean_partial(run_dir: Path) -> None:
    """Remove temp folders left by a kill during a checkpoint write."""
    for p in Path(run_dir).glob(".ckpt-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer=None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise FormersError(f"checkpoint {path} is corrupt or incomplete ({e}); delete it to resume from the "
                           "previous one") from None
    load_state(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    if optimizer is not None:
        _unflat_optimizer(model, optimizer, tensors, meta["optimizer"], path)
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta, rng
