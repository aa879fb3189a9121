"""Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm converters (P54), exact re-parameterisations of a trained model.

P54 "Pre-RMSNorm and Pre-CRMSNorm Transformers" (Jiang et al., NeurIPS 2023); facts sheet P54 and the official
`example.py` / `torch/model.py` (github.com/ZixuanJiang/pre-rmsnorm-transformer, read for facts only).

    Step 1  recentre every writer to the residual stream (token embedding rows, absolute positions, cls token,
            attention `out` and FFN `fc2` weight rows and biases): W <- W - mean over the output dim. A Pre-LN
            model only ever reads the stream through LayerNorm, which removes the mean, so nothing changes.
    Step 2  fold each LayerNorm's gain g and bias b into its readers (W, c) -> (W diag(g), c + W b): attention
            q / kv, FFN fc1 / fc_in, the head after the final norm. On a zero-mean stream LN(x) = RMSNorm(x)
            with the same eps, so LayerNorm becomes RMSNorm with unit gain.
    Step 3  (CRMSNorm) a zero-mean d-vector is kept as its first d-1 coordinates (x_d = -sum of the others):
            writers drop their last output row, readers use W[:, :d-1] - W[:, d-1:], norms become `crmsnorm`.

How the converted model is built: `formers.create_model` with the same model name and options derived from the
modules (dim d-1 for CRMSNorm, softmax `head_dim` = the original Dh so that heads need not divide d-1, explicit
FFN `hidden`, `bias=True` where an LN bias folds in, sinusoidal positions replaced by the equivalent recentred
learned table, embeddings untied), then the converted weights are loaded. It is an ordinary formers model
(forward, generate, save/load). An `lm` whose final LayerNorm has a bias gets `head_bias=True`: that bias folds
into the vocabulary head (W_head b is a per-token constant a homogeneous norm cannot produce).

Exact up to rounding for every input, with one corner: an encoder with mean pooling over a row whose tokens are
all padded pools zeros in both models, so the folded final-norm bias then shifts that row's logits.

Supported: `lm` and `encoder` with the plain stack, placement `pre`, norm `layernorm`, residual `add`, mixer
`softmax`, FFN `mlp` / `glu` / none, positions learned / sinusoidal / rope / alibi / none. Anything else raises
FormersError.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

import formers
from formers.blocks import AddResidual, Block, PlainStack, PreNorm
from formers.models.encoder import Encoder
from formers.models.lm import LM
from formers.nn.attention import SoftmaxAttention
from formers.nn.ffn import GLU, MLP
from formers.nn.norm import LayerNorm
from formers.nn.position import ALiBi, LearnedPosition, NoPosition, RotaryPosition, SinusoidalPosition
from formers.registry import FormersError, entries

SUPPORTED = ("lm/encoder with the plain stack, placement 'pre', norm 'layernorm', residual 'add', mixer 'softmax', "
             "ffn 'mlp'/'glu'/none, position learned/sinusoidal/rope/alibi/none")


def _unsupported(what: str) -> FormersError:
    return FormersError(f"prenorm conversion: {what} is not supported; supported: {SUPPORTED}")


def _act_spec(act: nn.Module) -> dict[str, Any]:
    """The registry spec that rebuilds an activation module (its name and the options it stores)."""
    for e in entries("act"):
        if type(act) is e.obj:
            return {"name": e.name, **{k: getattr(act, k) for k in e.options() if hasattr(act, k)}}
    raise _unsupported(f"activation {type(act).__name__}")


def _block_spec(block: nn.Module, i: int, compress: bool) -> dict[str, Any]:
    """Block spec of the converted layer i (raises on structures that are not Pre-LN softmax blocks)."""
    if type(block) is not Block:
        raise _unsupported(f"layer {i} ({type(block).__name__})")
    subs = [block.attn] + ([block.ffn] if block.has_ffn else [])
    for sub in subs:
        if type(sub) is not PreNorm:
            raise _unsupported(f"layer {i}: placement {type(sub).__name__}")
        if type(sub.norm) is not LayerNorm:
            raise _unsupported(f"layer {i}: norm {type(sub.norm).__name__} (already converted?)")
        if type(sub.residual) is not AddResidual:
            raise _unsupported(f"layer {i}: residual {type(sub.residual).__name__}")
    eps = {sub.norm.eps for sub in subs}
    if len(eps) != 1:
        raise _unsupported(f"layer {i}: norms with different eps {sorted(eps)}")
    mixer = block.attn.fn
    if type(mixer) is not SoftmaxAttention:
        raise _unsupported(f"layer {i}: mixer {type(mixer).__name__}")
    ffn: Any = "none"
    if block.has_ffn:
        f = block.ffn.fn
        if type(f) not in (MLP, GLU):
            raise _unsupported(f"layer {i}: ffn {type(f).__name__}")
        ffn = {"name": "mlp" if type(f) is MLP else "glu", "hidden": f.fc2.in_features, "act": _act_spec(f.act),
               "bias": True, "dropout": f.drop.p}
    mixer_spec = {"name": "softmax", "heads": mixer.heads, "kv_heads": mixer.kv_heads, "head_dim": mixer.head_dim,
                  "bias": True, "dropout": mixer.dropout, "explicit": mixer.explicit, "scale": mixer.scale}
    return {"placement": "pre", "norm": {"name": "crmsnorm" if compress else "rmsnorm", "eps": eps.pop()},
            "residual": "add", "mixer": mixer_spec, "ffn": ffn, "dropout": block.attn.drop.p}


def _position_spec(pos: nn.Module) -> Any:
    if isinstance(pos, (LearnedPosition, SinusoidalPosition)):
        return "learned"  # a sinusoidal table becomes the equivalent (recentred) learned table
    if type(pos) is RotaryPosition:
        return {"name": "rope", "base": pos.base, "fraction": pos.fraction}
    if type(pos) is ALiBi:
        return "alibi"
    if type(pos) is NoPosition:
        return "none"
    raise _unsupported(f"position {type(pos).__name__}")


def converted_spec(model: nn.Module, compress: bool) -> dict[str, Any]:
    """The `formers.create_model` spec ({"name": ..., options}) of the converted model."""
    if type(model) not in (LM, Encoder):
        raise _unsupported(f"model {type(model).__name__}")
    if type(model.stack) is not PlainStack:
        raise _unsupported(f"stack {type(model.stack).__name__}")
    specs = [_block_spec(b, i, compress) for i, b in enumerate(model.stack.blocks)]
    if type(model.norm) is not LayerNorm or model.norm.eps != specs[0]["norm"]["eps"]:
        raise _unsupported("a final norm that is not the blocks' LayerNorm")
    opts: dict[str, Any] = {
        "vocab": model.vocab, "dim": model.dim - int(compress), "depth": model.depth, "max_len": model.max_len,
        "position": _position_spec(model.position), "block": specs[0],
        "layers": {str(i): s for i, s in enumerate(specs) if s != specs[0]} or None, "stack": "plain",
        "dropout": model.drop.p,
    }
    if type(model) is LM:
        if getattr(model, "mem_len", 0):  # Transformer-XL segment memory reads k/v, unaffected by the conversion
            opts["mem_len"] = model.mem_len
        # the final LayerNorm's bias becomes a bias on the vocabulary head (W_head b is a per-token constant)
        head_bias = model.norm.bias is not None or model.head.bias is not None
        return {"name": "lm", **opts, "tie_embeddings": False, "head_bias": head_bias}
    use_cls = model.cls_token is not None
    opts["max_len"] = model.max_len - int(use_cls)  # the encoder adds the cls slot itself
    return {"name": "encoder", **opts, "num_classes": model.num_classes, "pool": model.pool, "level": model.level}


# ---------------------------------------------------------------------------------------------- weight algebra

def _writer(w: torch.Tensor, dim: int, compress: bool) -> torch.Tensor:
    """Recentre a residual writer along `dim` (its output features) and, to compress, drop the last feature."""
    w = w - w.mean(dim, keepdim=True)
    return w.narrow(dim, 0, w.shape[dim] - 1) if compress else w


def _reader(w: torch.Tensor, b: torch.Tensor | None, norm: nn.LayerNorm | None,
            compress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the preceding LN's affine into a reader (W, c) -> (W diag(g), c + W b); to compress, read the implicit
    coordinate -sum(x_1..x_{d-1}) through W[:, :d-1] - W[:, d-1:]. Weights (out, d)."""
    if norm is not None and norm.bias is not None:
        shift = w @ norm.bias  # (out,)
        b = shift if b is None else b + shift
    if norm is not None and norm.weight is not None:
        w = w * norm.weight[None, :]
    if compress:
        w = w[:, :-1] - w[:, -1:]
    return w, b


def _set_linear(dst: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    dst.weight.copy_(w)
    if dst.bias is not None:
        dst.bias.copy_(b if b is not None else torch.zeros_like(dst.bias))
    elif b is not None:
        raise FormersError("prenorm conversion: internal error, a reader bias has no place to go")


def _convert(model: nn.Module, compress: bool) -> nn.Module:
    spec = converted_spec(model, compress)
    src = copy.deepcopy(model)  # the caller's model stays untouched
    p = next(src.parameters())
    new = formers.create_model(spec.pop("name"), **spec).to(device=p.device, dtype=p.dtype)
    new.train(model.training)
    with torch.no_grad():
        new.embed.weight.copy_(_writer(src.embed.weight, 1, compress))
        if isinstance(src.position, (LearnedPosition, SinusoidalPosition)):
            table = src.position.emb if isinstance(src.position, LearnedPosition) else \
                src.position.table(torch.arange(src.max_len, device=p.device)).to(p.dtype)  # (max_len, D)
            new.position.emb.copy_(_writer(table, 1, compress))
        if isinstance(src, Encoder) and src.cls_token is not None:
            new.cls_token.copy_(_writer(src.cls_token, 2, compress))
        for old_b, new_b in zip(src.stack.blocks, new.stack.blocks, strict=True):
            a, na = old_b.attn.fn, new_b.attn.fn
            _set_linear(na.q, *_reader(a.q.weight, a.q.bias, old_b.attn.norm, compress))
            _set_linear(na.kv, *_reader(a.kv.weight, a.kv.bias, old_b.attn.norm, compress))
            _set_linear(na.out, _writer(a.out.weight, 0, compress),
                        None if a.out.bias is None else _writer(a.out.bias, 0, compress))
            if old_b.has_ffn:
                f, nf = old_b.ffn.fn, new_b.ffn.fn
                fin, nfin = (f.fc1, nf.fc1) if isinstance(f, MLP) else (f.fc_in, nf.fc_in)
                _set_linear(nfin, *_reader(fin.weight, fin.bias, old_b.ffn.norm, compress))
                _set_linear(nf.fc2, _writer(f.fc2.weight, 0, compress),
                            None if f.fc2.bias is None else _writer(f.fc2.bias, 0, compress))
        _set_linear(new.head, *_reader(src.head.weight, src.head.bias, src.norm, compress))
    return new


def to_prermsnorm(model: nn.Module) -> nn.Module:
    """Pre-LN `lm` / `encoder` -> an equivalent Pre-RMSNorm model (a new model; the input is untouched)."""
    return _convert(model, compress=False)


def to_precrmsnorm(model: nn.Module) -> nn.Module:
    """Pre-LN `lm` / `encoder` -> an equivalent Pre-CRMSNorm model with a (d-1)-dim residual stream (new model)."""
    return _convert(model, compress=True)


def convert_run(run_dir: str | Path, out_dir: str | Path, kind: Literal["prermsnorm", "precrmsnorm"]) -> Path:
    """Load a trained Pre-LN run, convert it and write a new run folder (config.yaml + model.safetensors) that
    `formers.load_run(out_dir)` rebuilds. The folder is written under a temporary name and renamed at the end."""
    from formers.train.checkpoint import save_weights

    if kind not in ("prermsnorm", "precrmsnorm"):
        raise FormersError(f"convert_run: kind must be 'prermsnorm' or 'precrmsnorm', got {kind!r}")
    out = Path(out_dir)
    if out.exists():
        raise FormersError(f"convert_run: {out} already exists; choose a new output folder")
    model = formers.load_run(run_dir)
    compress = kind == "precrmsnorm"
    new = _convert(model, compress)
    cfg = copy.deepcopy(model.run_config)
    cfg["model"] = converted_spec(model, compress)
    cfg["name"] = f"{cfg.get('name', 'run')}-{kind}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp"))
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        save_weights(new, tmp / "model.safetensors")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


__all__ = ["to_prermsnorm", "to_precrmsnorm", "convert_run", "converted_spec"]
