"""ModuleFormer (P24): sparse mixtures of stick-breaking attention experts and of FFN experts, with expert pruning
and extension.

P24 "ModuleFormer: Modularity Emerges from Mixture-of-Experts" (Shen et al., arXiv 2306.04640; official code
IBM/ModuleFormer, Apache-2.0: `moduleformer/modeling_moduleformer.py`, `utils/moe.py`, `utils/gate.py`).

    moduleformer       mixer  top-k attention experts (own q and o projections) over shared k, v; stick-breaking
    moduleformer_ffn   ffn    the `moe` FFN with ModuleFormer's defaults: MLP gate, raw top-k gates, MI loss

Module surgery (the paper's "extendability" and "specialisation then pruning" claims), for both `moduleformer`
and any `moe` FFN:

    prune_experts(module, keep)          keep only the listed experts (router rows too), k clipped
    add_experts(module, n, init=...)     append n experts that the router does not choose (outputs unchanged)
    freeze_except_experts(module, ids)   train only some experts and their router rows (gradient masks)
    expert_usage(model, batch)           how many assignments each expert got on a batch (from `last_load`)

Routing, dispatch and the MI loss come from `formers.nn.moe`; the stick-breaking weights are the ones of
`StickBreakingAttention.probs` (formers/nn/softmax_variants.py), called, not rewritten.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.nn.attention import KVCache, attention_mask
from formers.nn.hooks import report_aux
from formers.nn.moe import MoE, Router, balance_loss, dispatch, mi_loss, route, z_loss
from formers.nn.softmax_variants import StickBreakingAttention
from formers.registry import FormersError, register


def stick_breaking_weights(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A_ij = sigmoid(s_ij) prod_{j<m<=i} (1 - sigmoid(s_im)) over the last two dims of any (..., Nq, Nk) scores;
    `allowed` is a boolean mask broadcastable to them. Exactly `StickBreakingAttention.probs`, which uses no state."""
    return StickBreakingAttention.probs(None, scores, allowed)  # type: ignore[arg-type]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _route(logits: torch.Tensor, k: int, combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`formers.nn.moe.route`, except that float64 logits keep float64 gates (route computes them in float32)."""
    index, gates = route(logits, k, combine)
    if logits.dtype == torch.float64 and combine == "softmax":
        gates = torch.softmax(logits.gather(-1, index), dim=-1)
    elif logits.dtype == torch.float64 and combine == "softmax_raw":
        gates = torch.softmax(logits, dim=-1).gather(-1, index)
    return index, gates


def _per_expert(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x sorted by expert (counts[e] rows each) times weight[e] (E, In, Out): a loop over experts only."""
    outs = [chunk @ weight[e] for e, chunk in enumerate(x.split(counts)) if chunk.shape[0] > 0]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[-1])


@register("mixer", "moduleformer", paper="P24", causal_ok=True, bidirectional_ok=False)
class ModuleFormerAttention(nn.Module):
    """Mixture of stick-breaking attention experts: per token, the top-k of E experts each attend with their own
    query and output projections over keys and values shared by all experts; causal only.

    P24 ModuleFormer (IBM/ModuleFormer `ModuleFormerAttention`: `q_proj` is an MoE whose `map` gives the k
    queries and whose `reduce` applies the output experts; `k_proj`, `v_proj` are plain Linears):
        p = softmax(router(x_t)),  E_t = top-k(p),  g_te = p_e (raw, not renormalised: `combine="softmax_raw"`)
        q_te = x_t Wq_e  (D -> H*Dh),   k_j = x_j Wk + bk,  v_j = x_j Wv + bv   (shared, H heads of Dh)
        a_tj^(e,h) = sigmoid(s_tj) prod_{j<m<=t} (1 - sigmoid(s_tm)),  s_tj = q_te^h . k_j^h / sqrt(Dh)
        y_t = sum_{e in E_t} g_te * Wo_e concat_h( sum_{j<=t} a_tj^(e,h) v_j^h )   (H*Dh -> D)
    The router is `formers.nn.moe.Router` (`mlp`: d -> router_hidden -> E, GELU; the official gate's dropout
    defaults to 0 through `moe_pdrop`). Auxiliary loss through `report_aux`: `att_mi` = aux_weight * (-H(e) +
    H(e|x)) (`aux="mi"`, the official default), or `att_balance` (`aux="switch"`), plus `att_z` = z_weight * z-loss.
    There is no capacity and no token dropping (the official gate has none). Each (token, slot) query is formed by
    its expert on a contiguous slice (dispatch: a loop over experts); the attention itself runs for all k slots
    at once, (B, k, H, N, Nk). Padding masks (B, Nk), relative positions (rope, alibi) and the KV cache (shared
    keys/values only) are supported; `last_load` holds the last forward's assignments per expert.
    x (B, N, D) -> (B, N, D).

    Defaults follow MoLM (README: 16 attention experts, top-2) and the official config (8 heads). UNCERTAIN /
    chosen: `head_dim` defaults to dim // heads like every formers mixer, whereas the official config has
    att_hidden = H*Dh = dim / 2 (pass head_dim=dim // (2 * heads) for that); the official aux weight is a
    config value (default 0 there); 0.01 is our choice. `kv_bias=True` as the official k/v Linears; the expert
    q/o projections have no bias (official ParallelExperts bias=False).
    """

    def __init__(self, dim: int, heads: int = 8, causal: bool = True, head_dim: int | None = None,
                 experts: int = 16, k: int = 2, router: str = "mlp", router_hidden: int = 256,
                 combine: str = "softmax_raw", aux: str = "mi", aux_weight: float = 0.01, z_weight: float = 0.0,
                 kv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if not causal:
            raise FormersError("mixer: moduleformer attention is causal only (stick-breaking over preceding keys); "
                               "use it in an lm, not an encoder")
        if experts < 1 or not 1 <= k <= experts:
            raise FormersError(f"mixer: moduleformer needs experts >= 1 and 1 <= k <= experts, got experts={experts}"
                               f", k={k}")
        if aux not in ("mi", "switch", "none"):
            raise FormersError(f"mixer: moduleformer aux must be 'mi', 'switch' or 'none', got {aux!r}")
        if combine not in ("softmax", "softmax_raw", "unit"):
            raise FormersError(f"mixer: moduleformer combine must be 'softmax', 'softmax_raw' or 'unit', "
                               f"got {combine!r}")
        head_dim = head_dim or dim // heads
        if head_dim < 1:
            raise FormersError(f"mixer: moduleformer needs heads <= dim (got heads={heads}, dim={dim}); "
                               f"lower heads or set head_dim")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        self.num_experts, self.k, self.combine, self.aux = experts, k, combine, aux
        self.aux_weight, self.z_weight, self.dropout = aux_weight, z_weight, dropout
        self.scale = head_dim ** -0.5
        inner = heads * head_dim
        self.router = Router(dim, experts, router, router_hidden)
        self.kv = nn.Linear(dim, 2 * inner, bias=kv_bias)  # shared keys and values: (k | v)
        # nn.Linear's default uniform bounds, per expert
        self.wq = nn.Parameter(torch.empty(experts, dim, inner).uniform_(-dim ** -0.5, dim ** -0.5))
        self.wo = nn.Parameter(torch.empty(experts, inner, dim).uniform_(-inner ** -0.5, inner ** -0.5))
        self.last_load: list[int] = []

    def active_parameters(self) -> int:
        """Parameters one token uses: router, shared k/v and the q/o projections of k experts."""
        shared = sum(p.numel() for p in self.router.parameters()) + sum(p.numel() for p in self.kv.parameters())
        return shared + self.k * (self.wq[0].numel() + self.wo[0].numel())

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """The models' GPT-2 init for the stacked expert projections: N(0, std)."""
        self.wq.normal_(0.0, std)
        self.wo.normal_(0.0, std)

    def _report(self, logits: torch.Tensor, index: torch.Tensor, real: torch.Tensor | None) -> None:
        if not (self.training or torch.is_grad_enabled()):
            return
        if real is not None:  # padded query tokens do not count in the routing statistics
            logits, index = logits[real], index[real]
            if logits.shape[0] == 0:
                return
        probs = torch.softmax(_wide(logits), dim=-1)
        if self.aux == "mi" and self.aux_weight:
            report_aux(self, "att_mi", self.aux_weight * mi_loss(probs))
        elif self.aux == "switch" and self.aux_weight:
            report_aux(self, "att_balance", self.aux_weight * balance_loss(probs, index))
        if self.z_weight:
            report_aux(self, "att_z", self.z_weight * z_loss(logits))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, positions=None,
                cache: KVCache | None = None, context: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, **unused) -> torch.Tensor:
        if context is not None:
            raise FormersError("the moduleformer mixer orders keys by position and has no cross-attention; "
                               "use softmax for a context")
        if seqlens is not None:
            raise FormersError("the moduleformer mixer does not take packed `seqlens`; pad the batch and pass a mask")
        if unused:
            raise FormersError(f"moduleformer mixer got unsupported arguments: {sorted(unused)}")
        B, N, D = x.shape
        H, Dh, E, K = self.heads, self.head_dim, self.num_experts, self.k
        T = B * N
        past = cache.length if cache is not None else 0
        if mask is not None and mask.shape != (B, past + N):
            raise FormersError(f"attention mask must have shape (batch, keys) = ({B}, {past + N}), "
                               f"got {tuple(mask.shape)}")

        xt = x.reshape(T, D)
        logits = self.router(xt)  # (T, E)
        index, gates = _route(logits, K, self.combine)  # (T, K) each
        self._report(logits, index, None if mask is None else mask[:, past:].reshape(T).bool())
        tok, slot, counts = dispatch(index, torch.ones_like(index, dtype=torch.bool), E)  # every assignment kept
        self.last_load = counts
        flat = tok * K + slot  # (A,) position of each sorted assignment in the (T, K) grid; A = T * K

        q = _per_expert(xt[tok], self.wq, counts)  # (A, H*Dh), grouped by expert
        q = q.new_empty(T * K, H * Dh).index_copy_(0, flat, q)  # back to token order
        q = q.view(B, N, K, H, Dh).permute(0, 2, 3, 1, 4)  # (B, K, H, N, Dh)
        k, v = self.kv(x).view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        if positions is not None:
            q_pos = torch.arange(past, past + N, device=x.device)
            q, k = positions.rotate(q.reshape(B, K * H, N, Dh), k, q_pos, q_pos)
            q = q.view(B, K, H, N, Dh)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, past + N, Dh)
        Nk = k.shape[2]

        scores = torch.einsum("bkhnd,bhmd->bkhnm", q, k) * self.scale  # (B, K, H, N, Nk)
        if positions is not None:
            bias = positions.bias(q_pos, torch.arange(Nk, device=x.device), H)  # (H, N, Nk) or None
            if bias is not None:
                scores = scores + bias.to(scores.dtype)
        allowed = attention_mask(N, Nk, causal=True, past=past, key_mask=mask, device=x.device)  # (B|1, 1, N, Nk)
        attn = stick_breaking_weights(scores, allowed.unsqueeze(1))  # (B, K, H, N, Nk); empty rows are 0
        attn = F.dropout(attn, p=self.dropout, training=self.training and self.dropout > 0)
        y = torch.einsum("bkhnm,bhmd->bnkhd", attn, v).reshape(T * K, H * Dh)  # (T*K, H*Dh), token order

        out = _per_expert(y[flat], self.wo, counts)  # (A, D), grouped by expert
        out = out * gates[tok, slot].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(xt).index_add_(0, tok, out).view(B, N, D)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, k={self.k}, heads={self.heads}, head_dim={self.head_dim}, "
                f"combine={self.combine!r}, aux={self.aux!r}")


@register("ffn", "moduleformer_ffn", paper="P24")
class ModuleFormerFFN(MoE):
    """ModuleFormer's FFN experts: the `moe` FFN with the official defaults (IBM/ModuleFormer `utils/moe.py`,
    `utils/gate.py`, `configuration_moduleformer.py`).

        p = softmax(W2 GELU(W1 x + b1)),  y = sum_{e in top-k(p)} p_e * Expert_e(x)
    MLP gate d -> 256 -> E (`router="mlp"`); gates are the raw top-k probabilities (the official renormalisation
    is commented out: `combine="softmax_raw"`); no capacity limit and no token dropping; bias-free experts with the
    tanh GELU (`gelu_new`); auxiliary loss `moe_mi` = balance_weight * (-H(e) + H(e|x)), no z-loss. 32 experts,
    top-2, as the official config and MoLM. Each expert's width is mult * dim / k = 2 * dim at the defaults, as
    the official ffd_hidden = 2048 for n_embd = 1024. UNCERTAIN: the MI weight (official config default 0, the
    paper's value not found); 0.01 is our choice. (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, experts: int = 32, k: int = 2, mult: float = 4.0, hidden: int | None = None,
                 act: Any = None, glu: bool = False, bias: bool = False, capacity_factor: float | None = None,
                 eval_capacity_factor: float | None = None, router: str = "mlp", router_hidden: int = 256,
                 combine: str = "softmax_raw", aux: str = "mi", balance_weight: float = 0.01, z_weight: float = 0.0,
                 train_router: bool = True, dropout: float = 0.0):
        super().__init__(dim, experts=experts, k=k, mult=mult, hidden=hidden,
                         act={"name": "gelu", "approximate": "tanh"} if act is None else act, glu=glu, bias=bias,
                         capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, router=router,
                         router_hidden=router_hidden, combine=combine, aux=aux, balance_weight=balance_weight,
                         z_weight=z_weight, train_router=train_router, dropout=dropout)


# ---------------------------------------------------------------------------------------------- expert surgery


def _expert_params(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every parameter stacked along a leading expert dimension."""
    if isinstance(module, ModuleFormerAttention):
        return [(module, "wq"), (module, "wo")]
    if isinstance(module, MoE):
        return [(module.experts, n) for n in ("w1", "b1", "w2", "b2") if getattr(module.experts, n) is not None]
    raise FormersError(f"expert surgery works on a `moe` FFN or the `moduleformer` mixer, got "
                       f"{type(module).__name__}")


def _router_head(module: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The router's last Linear (the one with a row per expert) and where it lives."""
    router = getattr(module, "router", None)
    if not isinstance(router, Router):
        raise FormersError(f"{type(module).__name__} has no formers.nn.moe.Router; expert surgery needs one")
    if isinstance(router.net, nn.Linear):
        return router, "net", router.net
    last = str(len(router.net) - 1)
    return router.net, last, router.net[-1]


def _new_head(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    head = nn.Linear(old.in_features, weight.shape[0], bias=bias is not None, device=weight.device,
                     dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.requires_grad_(old.weight.requires_grad)


def _set_param(owner: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    setattr(owner, name, nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad))


def prune_experts(module: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the experts in `keep` (new expert i = old expert keep[i]); the router's last Linear loses the
    other rows and k becomes min(k, len(keep)). In place; returns the module. Optimizer state for the replaced
    parameters is stale afterwards: build a new optimizer.

    The router logits of the kept experts are unchanged, so a token whose chosen experts are all kept chooses
    the same ones. With renormalised gates (`combine="softmax"`) its output is then unchanged; with ModuleFormer's
    raw gates (`softmax_raw`) every gate of the token grows by the same factor sum_all exp(l) / sum_kept exp(l),
    the probability mass the pruned experts held."""
    params = _expert_params(module)
    E = module.num_experts
    keep = [int(e) for e in keep]
    if not keep or len(set(keep)) != len(keep) or not all(0 <= e < E for e in keep):
        raise FormersError(f"prune_experts: keep must be a non-empty list of distinct expert ids in 0..{E - 1}, "
                           f"got {keep}")
    parent, attr, head = _router_head(module)
    idx = torch.tensor(keep, dtype=torch.long, device=head.weight.device)
    for owner, name in params:
        p = getattr(owner, name)
        _set_param(owner, name, p[idx], p)
    setattr(parent, attr, _new_head(head, head.weight[idx], None if head.bias is None else head.bias[idx]))
    module.num_experts, module.k = len(keep), min(module.k, len(keep))
    module.last_load = []
    return module


def add_experts(module: nn.Module, n: int, init: str = "copy", source: list[int] | None = None,
                router_bias: float = -1e4) -> nn.Module:
    """Append n experts (ids E .. E+n-1). In place; returns the module; build a new optimizer afterwards.

    init `copy`: new expert i copies the weights of old expert source[i] (default i mod E) and its router row;
    `random`: weights drawn N(0, s) with s the standard deviation of the existing experts' tensor, zero biases,
    zero router row. The router's last Linear gets a bias (zero for the old rows, so old logits are unchanged)
    and the new rows get `router_bias` on top: new logit = (source logit or 0) + router_bias.

    Exact scheme: with the default -1e4, exp(new logit - max) underflows to exactly 0 in float32 and float64, so a
    new expert is never in a token's top-k (as long as old logits are within 1e4 of each other) and takes no
    probability mass: outputs and the MI loss are unchanged. That also means the new experts get no gradient.
    To let finetuning wake them (the paper trains new modules and the gate on new data; its exact recipe is
    UNCERTAIN here), pass a finite bias such as 0.0 or -2.0, at the cost of changing the outputs at once."""
    if n < 1:
        raise FormersError(f"add_experts: n must be >= 1, got {n}")
    if init not in ("copy", "random"):
        raise FormersError(f"add_experts: init must be 'copy' or 'random', got {init!r}")
    params = _expert_params(module)
    E = module.num_experts
    source = [i % E for i in range(n)] if source is None else [int(s) for s in source]
    if len(source) != n or not all(0 <= s < E for s in source):
        raise FormersError(f"add_experts: source must list {n} expert ids in 0..{E - 1}, got {source}")
    parent, attr, head = _router_head(module)
    idx = torch.tensor(source, dtype=torch.long, device=head.weight.device)
    for owner, name in params:
        p = getattr(owner, name)
        if init == "copy":
            new = p[idx]
        elif p.dim() == 3:  # weights (E, In, Out)
            new = torch.randn((n, *p.shape[1:]), dtype=p.dtype, device=p.device) * p.detach().std()
        else:  # biases (E, Out)
            new = p.new_zeros((n, *p.shape[1:]))
        _set_param(owner, name, torch.cat([p.detach(), new.detach()]), p)
    old_bias = head.bias if head.bias is not None else head.weight.new_zeros(E)
    new_w = head.weight[idx] if init == "copy" else head.weight.new_zeros(n, head.in_features)
    new_b = (old_bias[idx] if init == "copy" else old_bias.new_zeros(n)) + router_bias
    setattr(parent, attr, _new_head(head, torch.cat([head.weight, new_w]).detach(),
                                    torch.cat([old_bias, new_b]).detach()))
    module.num_experts = E + n
    module.last_load = []
    return module


def freeze_except_experts(module: nn.Module, experts: list[int]) -> list[Any]:
    """Train only the listed experts of `module` (e.g. the ones `add_experts` appended) and their router rows:
    the module's other parameters get requires_grad False, and gradient hooks zero the other experts' slices of
    the stacked tensors and the other router rows. Returns the hook handles (`.remove()` them to undo the masks).
    Frozen rows stay fixed only with an optimizer without decoupled weight decay (Adam, or AdamW with
    weight_decay=0): decay would still shrink them."""
    params = _expert_params(module)
    E = module.num_experts
    if not experts or not all(0 <= int(e) < E for e in experts):
        raise FormersError(f"freeze_except_experts: experts must be ids in 0..{E - 1}, got {experts}")
    _, _, head = _router_head(module)
    live = [getattr(owner, name) for owner, name in params]
    live += [p for p in (head.weight, head.bias) if p is not None]
    module.requires_grad_(False)
    handles = []
    for p in live:
        p.requires_grad_(True)
        m = torch.zeros(E, dtype=p.dtype, device=p.device)
        m[list(map(int, experts))] = 1.0
        m = m.view(E, *([1] * (p.dim() - 1)))  # experts along dim 0 of every one of these tensors
        handles.append(p.register_hook(lambda g, m=m: g * m))
    return handles


def expert_usage(model: nn.Module, batch: Any) -> dict[str, list[int]]:
    """Run `model` on `batch` (a tensor, a tuple of positional inputs or a dict of keyword inputs) in eval mode
    without gradients and return, per `moe` FFN and `moduleformer` mixer (by module name), the number of
    (token, slot) assignments each expert received (`last_load`; for `moe` after capacity dropping)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        model.train(was)
    return {name: list(m.last_load) for name, m in model.named_modules()
            if isinstance(m, (MoE, ModuleFormerAttention))}


__all__ = ["ModuleFormerAttention", "ModuleFormerFFN", "stick_breaking_weights", "prune_experts", "add_experts",
           "freeze_except_experts", "expert_usage"]
