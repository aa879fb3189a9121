"""Checkpoints: model, optimizer and RNG state in one safetensors file plus a small JSON, written atomically.

Each checkpoint is a folder `ckpt-<step>` that appears by a single rename, so a kill at any moment leaves either
the old set of checkpoints or the new one, never a half-written file. Nothing here unpickles.

Checkpoints hold full tensors whatever the number of processes that wrote them: sharded (FSDP) parameters and
optimizer state are gathered on save (every rank takes part, rank 0 writes: `write=False` elsewhere) and cut to each
rank's shard on load (formers/train/distributed.py), so N processes resume what 1 saved and vice versa.
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

from formers.registry import FormersError
from formers.train.distributed import full_tensor, like


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = full_tensor(v).contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            p = params[int(idx)] if int(idx) < len(params) else None
            state.setdefault(int(idx), {})[name] = like(v, p) if p is not None and v.shape == p.shape else v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on the CPU with tied/shared tensors stored once (safetensors refuses aliases). With sharded
    (FSDP) parameters every rank must call this: the shards are gathered."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        local = getattr(v, "_local_tensor", v)  # a shard's own storage identifies a tied parameter
        key = (local.data_ptr(), v.shape, v.dtype) if local.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = full_tensor(v).contiguous()
    return out


def save_weights(model: torch.nn.Module, path: Path, prefix: str = "", write: bool = True) -> None:
    """Save model weights to a safetensors file atomically (temp file + rename). `write=False`: take part in
    gathering sharded weights without writing (the ranks other than 0)."""
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
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not _is_alias(model, k, sd)]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise FormersError(f"weights in {where} do not fit the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); was the config changed after training?")
    for k, v in sd.items():
        if expected[k].shape != v.shape:
            raise FormersError(f"weights in {where}: '{k}' has shape {tuple(v.shape)}, the model expects "
                               f"{tuple(expected[k].shape)}")
    model.load_state_dict({k: like(v, expected[k]) for k, v in sd.items()}, strict=False)


def _is_alias(model, key, sd) -> bool:
    """True when `key` names a tensor shared with another key that is present (tied embeddings)."""
    sd_model = model.state_dict()
    ptr = lambda t: getattr(t, "_local_tensor", t).data_ptr()  # noqa: E731  (a shard's own storage)
    return any(ptr(sd_model[k]) == ptr(sd_model[key]) for k in sd if k in sd_model)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, rng: dict[str, torch.Tensor],
                    meta: dict[str, Any], keep: int = 2, write: bool = True) -> Path:
    """Write `ckpt-<step>`; `write=False` only takes part in gathering sharded state (ranks other than 0)."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:08d}"
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
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
        _unflat_optimizer(optimizer, tensors, meta["optimizer"])
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta, rng
