"""EMoE (P46): split a trained dense FFN into a mixture of experts without adding parameters.

P46 "Emergent Mixture-of-Experts: Can Dense Pre-trained Transformers Benefit from Emergent Modular Structures?"
(EMoE, Qiu et al.); facts sheet P46 and the official code github.com/qiuzh20/EMoE (`Language/moe_utils.py`,
`bert_to_MoE` / `gpt_to_MoE`; the modified Tutel in `tutel/tutel/impls/fast_dispatch.py` and
`tutel/tutel/gates/top.py`), read for facts only.

    cluster_neurons(w1, n, ...)    hidden unit -> expert: balanced k-means on the L2-normalised rows of W1
    balanced_kmeans(x, n, ...)     k-means whose clusters all hold len(x) / n points (written here in torch)
    moefy(ffn, n_experts, k)       an `mlp` FFN -> the `moe` FFN (formers/nn/moe.py) computing the same function
    moefy_model(model, ...)        replace chosen layers' `mlp` FFNs of an `lm` / `encoder` in place
    moefy_run(run, out, ...)       a trained run folder -> a new run folder that `formers.load_run` rebuilds

The conversion of y = W2 act(W1 x + b1) + b2 (W1 (H, D), W2 (D, H)) into E experts of H / E units each:
    1. group the hidden units: k-means with equal cluster sizes on the rows of W1 normalised to unit length
       (the official code calls `KMeansConstrained(size_min = size_max = H / E)`);
    2. expert e takes its units' rows of W1 and entries of b1 and the matching columns of W2;
    3. every expert's output bias is b2 / k, so the k experts a token visits add up to one b2;
    4. the gate of expert e is the mean of its (unnormalised) W1 rows, no bias: score_e(x) = <mean_e W1, x>;
    5. each token runs the top-k experts by score, each added with weight one (Tutel's `one_score_gate` sets every
       top-k gate to 1).
So the MoE output for a token is exactly the dense FFN with the hidden units outside its k chosen experts
switched off (their contribution, including act(b1) of a unit with zero input, is dropped), and with k = E it is
the dense FFN. The converted layer is an ordinary `moe` with combine `unit`, no capacity limit (no token is
dropped), no auxiliary loss and a fixed router.

UNCERTAIN / chosen here: the paper calls the centroid gate fixed; the official code tries to freeze it with
`wg.weight.require_grad = False` (a misspelt attribute, so nothing is frozen), and with unit gates only its
load-importance auxiliary loss could then move it. We freeze it (`train_router=False`) and report no auxiliary
loss. Which layers: the official runs convert one layer (BERT layer 10, GPT2-XL layer 44); `layers` chooses here,
default all. Random grouping: `--random_cluster` in the official code takes contiguous blocks of units.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import formers
from formers.blocks import Block, PlainStack, layer_specs
from formers.nn.ffn import MLP
from formers.nn.moe import MoE
from formers.registry import FormersError, split_spec
from formers.stacks import LoopedStack

CLUSTERINGS = ("balanced_kmeans", "random", "contiguous")


# ------------------------------------------------------------------------------------------------ clustering

def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (P, D), (C, D) -> (P, C), clamped at 0 against rounding."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.t() + c.pow(2).sum(1)[None, :]).clamp_min(0)


def _centroids(x: torch.Tensor, labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """Mean of each cluster's points (C, D); every cluster is non-empty here (equal sizes)."""
    sums = torch.zeros(clusters, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    return sums / torch.bincount(labels, minlength=clusters).clamp_min(1).to(x.dtype)[:, None]


def _objective(x: torch.Tensor, labels: torch.Tensor, clusters: int) -> float:
    """k-means objective: sum of squared distances of the points to their cluster's mean."""
    return float((x - _centroids(x, labels, clusters)[labels]).pow(2).sum())


def _plusplus(x: torch.Tensor, clusters: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability ~ D(x)^2."""
    centres = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    closest = _sq_dist(x, x[centres]).squeeze(1)  # (P,)
    for _ in range(1, clusters):
        total = float(closest.sum())
        i = int(torch.multinomial(closest / total, 1, generator=gen)) if total > 0 else \
            int(torch.randint(x.shape[0], (1,), generator=gen))
        centres.append(i)
        closest = torch.minimum(closest, _sq_dist(x, x[i:i + 1]).squeeze(1))
    return x[centres].clone()


def _greedy_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Balanced assignment for fixed centres: walk the (point, cluster) pairs from the closest up and give each
    unassigned point the first cluster that still has room (`size` slots each)."""
    points, clusters = dist.shape
    labels, room, left = [-1] * points, [size] * clusters, points
    for flat in torch.argsort(dist.reshape(-1), stable=True).tolist():
        i, j = divmod(flat, clusters)
        if labels[i] < 0 and room[j] > 0:
            labels[i], room[j], left = j, room[j] - 1, left - 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def _swap_refine(dist: torch.Tensor, labels: torch.Tensor, max_swaps: int) -> torch.Tensor:
    """Improve a balanced assignment for fixed centres by exchanging two points of two clusters while that lowers
    the total distance (sizes stay equal). Each round takes the best exchange over all cluster pairs."""
    labels = labels.clone()
    points, clusters = dist.shape
    rows = torch.arange(points)
    for _ in range(max_swaps):
        # gain[i, c]: how much point i's cost drops by moving from its cluster to c
        gain = dist[rows, labels][:, None] - dist  # (P, C)
        best = torch.full((clusters, clusters), float("-inf"), dtype=dist.dtype)
        best = best.scatter_reduce_(0, labels[:, None].expand(-1, clusters), gain, "amax")  # max_{i in a} gain[i, b]
        total = best + best.t()  # exchanging the best i of a (to b) with the best j of b (to a)
        flat = int(total.argmax())
        a, b = divmod(flat, clusters)
        if a == b or not float(total[a, b]) > 1e-12 * max(1.0, float(dist.abs().max())):
            break
        in_a, in_b = (labels == a).nonzero().squeeze(1), (labels == b).nonzero().squeeze(1)
        i, j = in_a[int(gain[in_a, b].argmax())], in_b[int(gain[in_b, a].argmax())]
        labels[i], labels[j] = b, a
    return labels


def balanced_kmeans(x: torch.Tensor, clusters: int, iters: int = 100, n_init: int = 3, seed: int = 0) -> torch.Tensor:
    """Equal-size k-means: (P, D) points -> (P,) labels in 0..clusters-1, each label used P / clusters times.

    Lloyd iterations whose assignment step respects the sizes: a greedy pass over (point, cluster) pairs by
    distance, then pairwise exchanges between clusters while they lower the cost, compared with exchanges started
    from the previous labels (so the objective never rises). `n_init` k-means++ starts, the lowest objective wins.
    Deterministic for a given seed (float64 on the CPU).

    UNCERTAIN: the official code uses `k_means_constrained.KMeansConstrained` (a min-cost-flow assignment, i.e.
    the optimal balanced assignment for fixed centres; n_init 10, max_iter 1000, random_state 0); greedy plus
    exchanges is a local optimum of the same step, so the clusters can differ from the library's."""
    points = x.shape[0]
    if clusters < 1 or points % clusters:
        raise FormersError(f"balanced_kmeans: {points} points do not split into {clusters} equal clusters; "
                           f"choose a number of clusters that divides {points}")
    x = x.detach().to("cpu", torch.float64)
    size = points // clusters
    best_labels, best_cost = None, float("inf")
    for restart in range(max(1, n_init)):
        gen = torch.Generator().manual_seed(seed * 1000 + restart)
        centres = _plusplus(x, clusters, gen)
        labels = None
        for _ in range(iters):
            dist = _sq_dist(x, centres)
            new = _swap_refine(dist, _greedy_assign(dist, size), points)
            if labels is not None:  # keep the better of a fresh assignment and the refined previous one
                old = _swap_refine(dist, labels, points)
                rows = torch.arange(points)
                if float(dist[rows, old].sum()) <= float(dist[rows, new].sum()):
                    new = old
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            centres = _centroids(x, labels, clusters)
        cost = _objective(x, labels, clusters)
        if cost < best_cost:
            best_labels, best_cost = labels, cost
    return best_labels


def cluster_neurons(w1: torch.Tensor, n_experts: int, clustering: str = "balanced_kmeans",
                    seed: int = 0) -> torch.Tensor:
    """Hidden unit -> expert, (H, D) first-layer weight -> (H,) labels, n_experts groups of H / n_experts units.

        balanced_kmeans  balanced k-means of the L2-normalised rows of W1 (EMoE, P46)
        random           a seeded random partition (the paper's random-split ablation)
        contiguous       units [e*s, (e+1)*s) form expert e: what the official code's `--random_cluster` does (a
                         trained FFN's unit order is arbitrary, so this is a random split that needs no seed)
    """
    hidden = w1.shape[0]
    if n_experts < 1 or hidden % n_experts:
        raise FormersError(f"moefy: the FFN's {hidden} hidden units do not split into {n_experts} equal experts; "
                           f"choose a number of experts that divides {hidden}")
    size = hidden // n_experts
    if clustering == "balanced_kmeans":
        return balanced_kmeans(nn.functional.normalize(w1.detach().to("cpu", torch.float64), dim=1), n_experts,
                               seed=seed)
    if clustering == "random":
        labels = torch.empty(hidden, dtype=torch.long)
        labels[torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))] = \
            torch.arange(hidden) // size
        return labels
    if clustering == "contiguous":
        return torch.arange(hidden) // size
    raise FormersError(f"moefy: clustering must be one of {', '.join(CLUSTERINGS)}, got {clustering!r}")


# ------------------------------------------------------------------------------------------------ one FFN

def _check(ffn: nn.Module, n_experts: int, k: int, where: str = "moefy") -> None:
    if type(ffn) is not MLP:
        raise FormersError(f"{where}: only the `mlp` FFN (fc1, act, fc2) can be split into experts, got "
                           f"{type(ffn).__name__}; choose layers whose ffn is `mlp`")
    hidden = ffn.fc1.out_features
    if n_experts < 1 or hidden % n_experts:
        raise FormersError(f"{where}: the FFN's {hidden} hidden units do not split into {n_experts} equal experts; "
                           f"choose a number of experts that divides {hidden}")
    if not 1 <= k <= n_experts:
        raise FormersError(f"{where}: k must be in 1..{n_experts} (the number of experts), got {k}")


def moe_options(n_experts: int, k: int, hidden: int, learn_gate: bool = False) -> dict[str, Any]:
    """The `moe` options of a converted FFN (everything but dim, act, bias, dropout, which come from the source).

    Fixed gate: combine `unit`. `learn_gate`: the router trains, so the gates must carry its gradient: combine
    `softmax` (renormalised over the top-k). UNCERTAIN: the official EMoE-learn variant uses Tutel's randomly
    initialised cosine top-k gate; we keep the centroid initialisation in the linear router."""
    return {"experts": n_experts, "k": k, "hidden": hidden, "glu": False, "capacity_factor": None,
            "eval_capacity_factor": None, "router": "linear", "noise": 0.0,
            "combine": "softmax" if learn_gate else "unit", "aux": "none", "z_weight": 0.0,
            "train_router": bool(learn_gate)}


@torch.no_grad()
def moefy(ffn: MLP, n_experts: int, k: int, clustering: str = "balanced_kmeans", learn_gate: bool = False,
          seed: int = 0) -> MoE:
    """EMoE: a dense `mlp` FFN -> an equivalent `moe` with `n_experts` experts of hidden / n_experts units, top-k.

    With the fixed centroid gate (default) the result computes, per token x with chosen experts S(x),
        y = sum_{e in S(x)} [W2_e act(W1_e x + b1_e) + b2 / k]
    which is the dense FFN restricted to the units of S(x), and the dense FFN itself when k = n_experts.
    `learn_gate=True` trains the router with softmax combine; each expert's b2 is then the whole b2 (the
    renormalised top-k gates sum to one, so the bias is still added once). UNCERTAIN: the official code keeps
    b2 / k in that mode as well, which adds only b2 / k.
    The source FFN is untouched; the MoE has its dtype, device and train/eval mode. Not carried over from the
    official training setup (all are fine-tuning choices, not part of the conversion): gate noise 1.0, capacity
    factor 1.5, dropout before the activation (`moe_drop` 0.1), the load-importance auxiliary loss.
    """
    _check(ffn, n_experts, k)
    w1, w2 = ffn.fc1.weight, ffn.fc2.weight  # (H, D), (D, H)
    hidden, dim = w1.shape
    labels = cluster_neurons(w1, n_experts, clustering, seed).to(w1.device)
    units = torch.argsort(labels, stable=True).view(n_experts, hidden // n_experts)  # (E, s) unit ids, ascending
    moe = MoE(dim, act="relu", bias=ffn.fc1.bias is not None, dropout=ffn.drop.p,
              **moe_options(n_experts, k, hidden // n_experts, learn_gate))
    moe.experts.act = copy.deepcopy(ffn.act)  # the very activation (and its parameters, if it learns any)
    moe = moe.to(device=w1.device, dtype=w1.dtype)
    keys = w1[units]  # (E, s, D)
    moe.experts.w1.copy_(keys.transpose(1, 2))  # (E, D, s)
    moe.experts.w2.copy_(w2.t()[units])  # (E, s, D)
    if ffn.fc1.bias is not None:
        moe.experts.b1.copy_(ffn.fc1.bias[units])  # (E, s)
        moe.experts.b2.copy_((ffn.fc2.bias if learn_gate else ffn.fc2.bias / k).expand(n_experts, dim))
    moe.router.net.weight.copy_(keys.mean(1))  # (E, D): centroid of the expert's unnormalised key vectors
    moe.router.requires_grad_(bool(learn_gate))
    moe.train(ffn.training)
    return moe


# ------------------------------------------------------------------------------------------------ models, runs

def _layer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's distinct blocks by layer index (plain stack; looped stack: pre, the looped block, post)."""
    stack = getattr(model, "stack", None)
    if type(stack) is PlainStack:
        blocks = list(stack.blocks)
    elif type(stack) is LoopedStack:
        blocks = [*stack.pre, stack.loop, *stack.post]
    else:
        raise FormersError(f"moefy: works on `lm` / `encoder` models with the plain or looped stack, got "
                           f"{type(model).__name__} with stack {type(stack).__name__}")
    if not all(type(b) is Block for b in blocks):
        raise FormersError("moefy: the model's layers are not formers Blocks; nothing to convert")
    return blocks


def _chosen(layers: list[int] | None, depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad or not chosen:
        raise FormersError(f"moefy: layers must be indices in 0..{depth - 1}, got {list(layers)}")
    return chosen


def moefy_model(model: nn.Module, n_experts: int, k: int, layers: list[int] | None = None,
                clustering: str = "balanced_kmeans", learn_gate: bool = False, seed: int = 0) -> nn.Module:
    """Replace the `mlp` FFN of the chosen layers (default: all) by its EMoE conversion, in place; returns the
    model. Every chosen layer must have an `mlp` FFN whose width the number of experts divides."""
    blocks = _layer_blocks(model)
    chosen = _chosen(layers, len(blocks))
    for i in chosen:  # check everything before changing anything
        if not blocks[i].has_ffn:
            raise FormersError(f"moefy: layer {i} has no FFN; leave it out of `layers`")
        _check(blocks[i].ffn.fn, n_experts, k, where=f"moefy: layer {i}")
    for i in chosen:
        blocks[i].ffn.fn = moefy(blocks[i].ffn.fn, n_experts, k, clustering, learn_gate, seed)
    return model


def _moe_spec(ffn_spec: Any, n_experts: int, k: int, hidden: int, learn_gate: bool) -> dict[str, Any]:
    """The config spec of a converted layer: the source `mlp` spec's act, bias and dropout, the MoE settings."""
    _, opts = split_spec(ffn_spec, "model.block.ffn")
    defaults = {n: p.default for n, p in formers.get("ffn", "mlp").options().items()}
    return {"name": "moe", "act": copy.deepcopy(opts.get("act", defaults["act"])),
            "bias": opts.get("bias", defaults["bias"]), "dropout": opts.get("dropout", defaults["dropout"]),
            **moe_options(n_experts, k, hidden, learn_gate)}


def moefy_run(run: str | Path, out: str | Path, n_experts: int, k: int, layers: list[int] | None = None,
              clustering: str = "balanced_kmeans", learn_gate: bool = False, seed: int = 0) -> Path:
    """Load a trained run, convert the chosen layers' FFNs (default: all) and write a new run folder (config.yaml
    + model.safetensors) that `formers.load_run(out)` rebuilds.

    The config keeps everything of the source run; the converted layers get an `ffn: {name: moe, ...}` spec: in
    `model.block` when every layer is converted and the source has no per-layer overrides, else as per-layer
    entries in `model.layers` (when the source already has overrides, each changed layer is written out in full
    so that no source override merges into the new FFN). The folder appears by one rename."""
    from formers.train.checkpoint import save_weights

    out = Path(out)
    if out.exists():
        raise FormersError(f"moefy_run: {out} already exists; choose a new output folder")
    model = formers.load_run(run)
    blocks = _layer_blocks(model)
    chosen = _chosen(layers, len(blocks))
    moefy_model(model, n_experts, k, chosen, clustering, learn_gate, seed)

    cfg = copy.deepcopy(model.run_config)
    spec = cfg["model"]
    src_block, src_layers = spec.get("block"), spec.get("layers")
    specs = layer_specs(src_block, src_layers, len(blocks))
    for i in chosen:
        name, _ = split_spec(specs[i]["ffn"], f"model.layers[{i}].ffn")
        if name != "mlp":  # the built module was an MLP, so the config must say so too
            raise FormersError(f"moefy_run: layer {i}'s config names ffn '{name}', not 'mlp'; cannot rewrite it")
        specs[i] = {**specs[i], "ffn": _moe_spec(specs[i]["ffn"], n_experts, k,
                                                  blocks[i].ffn.fn.experts.w1.shape[-1], learn_gate)}
    if not src_layers and len(chosen) == len(blocks):
        spec["block"] = {**(src_block or {}), "ffn": specs[0]["ffn"]}
    elif not src_layers:
        spec["layers"] = {str(i): {"ffn": specs[i]["ffn"]} for i in chosen}
    else:
        base = layer_specs(src_block, None, len(blocks))[0]
        spec["layers"] = {str(i): s for i, s in enumerate(specs) if s != base}
    cfg["name"] = f"{cfg.get('name', 'run')}-emoe"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp"))
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        save_weights(model, tmp / "model.safetensors")
        rebuilt = _layer_blocks(formers.load_run(tmp))  # the folder must load (shapes checked by load_weights)
        if [type(b.ffn.fn) if b.has_ffn else None for b in rebuilt] != \
                [type(b.ffn.fn) if b.has_ffn else None for b in blocks]:
            raise FormersError("moefy_run: internal error, the written config does not rebuild the converted model")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


__all__ = ["balanced_kmeans", "cluster_neurons", "moefy", "moefy_model", "moefy_run", "moe_options"]
