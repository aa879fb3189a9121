"""Stacks beyond `plain` (formers/blocks.py): a looped weight-shared stack (P60), the TLEG learngene stack (P21)
and WideNet's shared stack (P42: one token mixer and one channel mixer for every layer, per-layer norms).

Every stack is built as `Stack(depth, make_block, **options)`; `make_block(i)` builds layer i's block from the
model's block spec and per-layer overrides. `num_applications` is the number of block applications per forward
pass; the model gives each application its own KV cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from formers.blocks import Block, PlainStack, Stack
from formers.registry import FormersError, register


def _layout(block: nn.Module) -> list[tuple[str, str, object]]:
    """What must agree between layers that share one set of weights: module types, scalar settings (e.g. a
    placement's per-layer scale) and parameter shapes."""
    mods = [(n, type(m).__name__, sorted((k, v) for k, v in vars(m).items()
                                         if not k.startswith("_") and isinstance(v, (bool, int, float, str))))
            for n, m in block.named_modules()]
    return mods + [(n, "param", tuple(p.shape)) for n, p in block.named_parameters()]


@register("stack", "looped", paper="P60")
class LoopedStack(Stack):
    """Looped Transformer (AlgoFormer): `pre` blocks, one weight-shared block applied `loops` times, `post` blocks.

    P60 "On the Expressive Power of a Variant of the Looped Transformer" (AlgoFormer):
        output = TF_post(TF_loop^(T)(TF_pre(X))),  T = `loops`.
    With `inject` the loop input x0 = TF_pre(X) is re-added before every application after the first,
        h_1 = L(x0),  h_{t+1} = L(h_t + x0),
    which is the input injection of Yang et al. 2023 ("Looped Transformers are Better at Learning Learning
    Algorithms", Y_{t+1} = M(Y_t + P) with Y_0 = 0); P60's own text leaves injection open (facts sheet: UNCERTAIN).
    `depth` counts distinct blocks and must equal pre + 1 + post (layer i of the model's spec is block i: pre
    blocks first, then the looped block, then post). Parameters do not depend on `loops`. (B, N, D) -> (B, N, D).
    """

    def __init__(self, depth: int, make_block: Callable[[int], nn.Module], pre: int = 0, loops: int = 2,
                 post: int = 0, inject: bool = False):
        super().__init__()
        if pre < 0 or post < 0 or loops < 1:
            raise FormersError(f"stack: looped needs pre >= 0, post >= 0 and loops >= 1 (got pre={pre}, "
                               f"loops={loops}, post={post})")
        if depth != pre + 1 + post:
            raise FormersError(f"stack: looped builds pre + 1 + post = {pre + 1 + post} distinct blocks but "
                               f"model.depth={depth}; set model.depth to {pre + 1 + post} or change pre/post")
        self.loops, self.inject = loops, inject
        self.pre = nn.ModuleList(make_block(i) for i in range(pre))
        self.loop = make_block(pre)
        self.post = nn.ModuleList(make_block(pre + 1 + i) for i in range(post))

    @property
    def num_applications(self) -> int:
        return len(self.pre) + self.loops + len(self.post)

    def forward(self, x: torch.Tensor, *, cache: list | None = None, **kw) -> torch.Tensor:
        def slot(i: int):
            return None if cache is None else cache[i]

        for i, block in enumerate(self.pre):
            x = self.run(block, x, cache=slot(i), **kw)
        x0, first = x, len(self.pre)
        for t in range(self.loops):
            x = self.run(self.loop, x + x0 if (self.inject and t > 0) else x, cache=slot(first + t), **kw)
        first += self.loops
        for i, block in enumerate(self.post):
            x = self.run(block, x, cache=slot(first + i), **kw)
        return x


def _key(name: str) -> str:
    """Parameter names hold dots, which ParameterDict keys may not."""
    return name.replace(".", "-")


@register("stack", "learngene", paper="P21", aliases=("tleg",))
class LearngeneStack(Stack):
    """TLEG learngene stack: layer l's weights are theta_A + f(l, L) * theta_B, one template block for all layers.

    P21 "Transformer as Linear Expansion of Learngene" (Xia et al., AAAI 2024, arXiv 2312.05614):
        theta_l = theta_A + (l - 1) / (L - 1) * theta_B,   l = 1..L   (f = 0 for L = 1)
    for every parameter of the block; (theta_A, theta_B) is the learngene. The facts sheet marks the normalisation
    of f UNCERTAIN ((l-1)/(L-1) vs l/L); we take (l-1)/(L-1), so theta_A is the first layer and theta_A + theta_B
    the last. theta_A is the template block's own parameters (so the model's initialisation applies to it);
    theta_B starts at zero, i.e. the stack starts weight-shared and learns a linear change over depth. Stored
    parameters: 2 x one block, whatever L. Buffers are shared. Layers must not differ in structure or settings
    (per-layer overrides, layer-dependent placements; checked). `expand_to_depth(L')` builds the stage-2
    descendant: an L'-layer plain stack whose independent layers start at theta_A + f(l, L') theta_B.
    (B, N, D) -> (B, N, D).
    """

    def __init__(self, depth: int, make_block: Callable[[int], nn.Module]):
        super().__init__()
        if depth < 1:
            raise FormersError(f"stack: learngene needs depth >= 1, got {depth}")
        self.depth = depth
        self.template = make_block(0)
        want = _layout(self.template)
        with torch.device("meta"):  # structure check only: no memory, no initialisation cost
            for i in range(1, depth):
                if _layout(make_block(i)) != want:
                    raise FormersError(f"stack: learngene shares one template block across depth, but layer {i} "
                                       "differs from layer 0 (a per-layer override in model.layers, or a "
                                       "placement that depends on the layer index such as lns); remove it")
        self.theta_b = nn.ParameterDict({
            _key(n): nn.Parameter(torch.zeros_like(p)) for n, p in self.template.named_parameters()})

    @property
    def num_applications(self) -> int:
        return self.depth

    def coefficient(self, layer: int, depth: int | None = None) -> float:
        """f(l, L) = (l - 1) / (L - 1) for 1-based l; `layer` here is 0-based."""
        depth = self.depth if depth is None else depth
        return layer / (depth - 1) if depth > 1 else 0.0

    def layer_parameters(self, layer: int, depth: int | None = None) -> dict[str, torch.Tensor]:
        """theta_A + f(l, L) theta_B for every template parameter (differentiable in both)."""
        f = self.coefficient(layer, depth)
        return {n: p + f * self.theta_b[_key(n)] for n, p in self.template.named_parameters()}

    def forward(self, x: torch.Tensor, *, cache: list | None = None, **kw) -> torch.Tensor:
        for i in range(self.depth):
            params = self.layer_parameters(i)

            def layer(h: torch.Tensor, params=params, **kwargs) -> torch.Tensor:
                return functional_call(self.template, params, (h,), kwargs)

            x = self.run(layer, x, cache=None if cache is None else cache[i], **kw)
        return x

    @torch.no_grad()
    def expand_to_depth(self, depth: int) -> PlainStack:
        """Stage 2 of TLEG: a plain stack of `depth` independent blocks initialised from the learngene."""
        if depth < 1:
            raise FormersError(f"learngene: expand_to_depth needs depth >= 1, got {depth}")

        def make(i: int) -> nn.Module:
            block, params = copy.deepcopy(self.template), self.layer_parameters(i, depth)
            for n, p in block.named_parameters():
                p.copy_(params[n])
            return block

        return PlainStack(depth, make)


def _share(placement: nn.Module, sublayer: nn.Module) -> None:
    """Make `placement` call `sublayer` without registering it: a plain attribute, so the shared weights belong to
    the stack alone (state_dict lists them once; safetensors refuses aliased tensors)."""
    placement._modules.pop("fn", None)
    object.__setattr__(placement, "fn", sublayer)


@register("stack", "shared", paper="P42", aliases=("widenet",))
class SharedStack(PlainStack):
    """WideNet's stack: every layer runs ONE shared token mixer and ONE shared channel mixer, each layer keeps its
    own norms (placements).

    P42 "Go Wider Instead of Deeper" (Xue et al., AAAI 2022): with shared MHSA weights A and shared MoE weights M,
    layer l = 1..L is
        x'_l = x_{l-1} + A(LN_l^(1)(x_{l-1})),    x_l = x'_l + M(LN_l^(2)(x'_l))
    (Pre-LN shown; any placement works, since the placements are per layer). Scaling width with a MoE while sharing
    it across depth gives fewer trainable parameters; the per-layer LayerNorms let the same weights see
    differently normalised inputs. Parameters: one mixer + one ffn + L x (per-layer norms). In WideNet the ffn is
    the top-2 `moe` (capacity 1.25 train / 2.0 eval, load-balance loss; `ffn: {name: moe}`); any ffn works here.
    A shared MoE reports its auxiliary losses once per layer and they add up (formers.nn.hooks.report_aux).

    UNCERTAIN (facts sheet): whether the gate (router weights) is shared across layers. In the third-party Titans
    reference (hpcaitech/Titans, titans/model/moe/widenet.py) the router object (capacity, noise) and the experts
    are shared, while each layer's MoeLayer may own its gate matrix. We choose ONE router, shared: it is part of
    the shared MoE module, which is what "share the MoE layer" says most directly.

    Design: `make_block(i)` builds every layer; the stack then owns `self.mixer` and `self.ffn` (layer 0's) once,
    and every layer's placements call them through a plain, unregistered attribute `fn`. The state dict holds the
    shared weights once, under `stack.mixer` / `stack.ffn`, and `modules()` reaches them once (init, aux losses,
    set_step). Layers i > 0 drop the mixer and ffn they were built with. Per-layer overrides (model.layers) may
    change norms or placements; one that changes the mixer or ffn (type, settings, shapes) raises FormersError.
    Each layer still gets its own KV cache slot. (B, N, D) -> (B, N, D).
    """

    def __init__(self, depth: int, make_block: Callable[[int], nn.Module]):
        if depth < 1:
            raise FormersError(f"stack: shared needs depth >= 1, got {depth}")
        super().__init__(depth, make_block)  # self.blocks; forward and num_applications as in the plain stack
        blocks = list(self.blocks)
        first = blocks[0]
        if not isinstance(first, Block):
            raise FormersError("stack: shared needs Blocks (placement-wrapped mixer and ffn) from make_block")
        self.mixer = first.attn.fn
        self.ffn = first.ffn.fn if first.has_ffn else None
        want = (_layout(self.mixer), first.has_ffn, _layout(self.ffn) if first.has_ffn else None)
        for i, block in enumerate(blocks[1:], start=1):
            got = (_layout(block.attn.fn), block.has_ffn, _layout(block.ffn.fn) if block.has_ffn else None)
            if got != want:
                part = "mixer" if got[0] != want[0] else "ffn"
                raise FormersError(f"stack: shared uses one {part} for every layer, but layer {i}'s {part} differs "
                                   f"from layer 0's (a per-layer override in model.layers); override only norms "
                                   "or placements, or use stack plain")
        for block in blocks:
            _share(block.attn, self.mixer)
            if block.has_ffn:
                _share(block.ffn, self.ffn)
