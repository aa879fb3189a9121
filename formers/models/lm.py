"""Decoder-only language model (GPT-style): causal stack over token embeddings, a linear head over the vocabulary,
`generate()` with greedy, temperature, top-k and top-p sampling through the KV cache, and Transformer-XL style
segment memory (`mem_len`, `forward_segment`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.blocks import PlainStack, _classes_unpatched, block_plan, lean_block
from formers.models.base import SequenceModel
from formers.nn.attention import KVCache
from formers.nn.hooks import clear_aux, forward_unpatched, hook_free
from formers.registry import FormersError, register


@register("model", "lm", paper="baseline")
class LM(SequenceModel):
    """Decoder-only Transformer LM (Radford et al., GPT): logits = W_head Norm(Stack(Embed(ids) + Pos)).

    Shapes: ids (B, N) -> logits (B, N, V).
    `mem_len` > 0 enables `forward_segment`: segment-level recurrence with a memory of the previous segments'
    keys/values (Transformer-XL, Dai et al. 2019; used by GTrXL, P48).
    """

    causal = True

    def __init__(self, vocab: int = 256, dim: int = 256, depth: int = 4, max_len: int = 1024,
                 position: Any = "learned", block: dict | None = None, layers: dict | None = None,
                 stack: Any = "plain", tie_embeddings: bool = False, dropout: float = 0.0, mem_len: int = 0,
                 head_bias: bool = False):
        super().__init__(vocab, dim, depth, max_len, position, block, layers, stack, dropout)
        if mem_len < 0:
            raise FormersError(f"model: mem_len must be >= 0 (0 = no segment memory), got {mem_len}")
        self.mem_len = mem_len
        self.head = nn.Linear(dim, vocab, bias=head_bias)  # a bias appears when P54's converters fold a norm bias
        self._init_weights()
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def new_cache(self, capacity: int = 0) -> list[KVCache]:
        """One empty KVCache per block application; `capacity` (tokens) pre-sizes the softmax key/value buffers
        of decoding so that they are allocated once (0: sized by the first update, doubled when full)."""
        return [KVCache(capacity) for _ in range(self.stack.num_applications)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: list | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(idx, mask=mask, cache=cache))

    def forward_segment(self, idx: torch.Tensor, memory: list[KVCache] | None = None
                        ) -> tuple[torch.Tensor, list[KVCache]]:
        """One segment of Transformer-XL style training: ids (B, N) attend to themselves (causally) and to the
        memory of earlier segments; returns (logits (B, N, V), new memory).

        `memory` is None for the first segment, else the list returned by the previous call (one KVCache per
        block application; it is not modified). The new memory holds each layer's keys/values of the last
        `mem_len` positions, detached: no gradient flows into past segments. Positions continue from the memory
        (offset = memory length). When memory is truncated, rotary keys are re-rotated so relative distances stay
        exact (this assumes mixers cache keys after rotation, as `softmax` does); absolute encodings restart at
        offset mem_len. Mixers with a recurrent `state` instead of keys carry that state whole (detached).
        """
        if self.mem_len <= 0:
            raise FormersError("forward_segment needs segment memory; set model.mem_len > 0 (e.g. the segment length)")
        if memory is None:
            cache = self.new_cache()
        else:
            if len(memory) != self.stack.num_applications:
                raise FormersError(f"memory has {len(memory)} layers but the stack applies "
                                   f"{self.stack.num_applications} blocks; pass the memory this model returned")
            cache = [_copy_cache(m) for m in memory]
        logits = self(idx, cache=cache)
        return logits, [self._truncate(c) for c in cache]

    def _truncate(self, c: KVCache) -> KVCache:
        """Detached copy of `c` keeping the last mem_len keys/values, positions renumbered from 0."""
        out = KVCache()
        out.state = {k: v.detach() for k, v in c.state.items()}
        out.length = c.length
        if c.k is None:
            return out
        k, v = c.k.detach(), c.v.detach()  # (B, H, L, Dh): views into the cache buffer (or the fused qkv)
        drop = k.shape[2] - self.mem_len
        if drop > 0:
            k, v = k[:, :, drop:], v[:, :, drop:]  # (B, H, mem_len, Dh)
            positions = self._relative_positions()
            if positions is not None:  # shift the cached rotations by -drop (identity for non-rotary encodings)
                shift = torch.full((k.shape[2],), -drop, device=k.device)
                k = positions.rotate(k, k, shift, shift)[1]
        # own copies: views would keep the whole buffer (or the fused q/k/v projection) alive with the memory
        out.k, out.v, out.length = k.contiguous().clone(), v.contiguous().clone(), k.shape[2]
        return out

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the vocabulary head by a fresh `num_classes`-way head (untied)."""
        w = self.head.weight
        self.head = nn.Linear(self.dim, num_classes, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        self.tie_embeddings = False

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend `idx` (B, N) by `max_new_tokens` tokens; returns (B, N + max_new_tokens).

        With `use_cache` each step feeds only the newest token through the KV cache; without it the whole
        sequence is recomputed (the reference the tests compare against)."""
        if idx.dim() == 1:
            idx = idx[None]
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise FormersError(f"generate: expected a prompt of token ids (batch, length >= 1), got shape "
                               f"{tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise FormersError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        # the model sees the prompt and every generated token but the last: a position table (learned positions)
        # must hold that many; sinusoids have no end
        seen, table = idx.shape[1] + max(max_new_tokens - 1, 0), getattr(self.position, "max_len", None)
        if getattr(self.position, "kind", "") == "absolute" and table is not None and seen > table:
            raise FormersError(f"generating {idx.shape[1] + max_new_tokens} tokens feeds {seen} to the model, more "
                               f"than the {table} learned positions (max_len); ask for fewer tokens or use "
                               "model.position=rope")
        # evaluation mode for the call, then every module's own mode back (a frozen norm or an MC-dropout layer
        # keeps its flag), also when generation fails
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            return self._generate(idx, max_new_tokens, temperature, top_k, top_p, greedy, use_cache, generator)
        finally:
            for m, training in modes:
                m.training = training

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, greedy, use_cache, generator):
        B, N = idx.shape
        total = N + max_new_tokens
        out = torch.empty(B, total, dtype=torch.long, device=idx.device)  # filled in place, not re-concatenated
        out[:, :N] = idx
        # mixers without an exact incremental form (e.g. ProbSparse) make generation recompute every step
        use_cache = use_cache and all(getattr(m, "supports_cache", True) for m in self.modules())
        # every token but the last generated one goes through the stack: the cache never grows past that
        cache = self.new_cache(capacity=total - 1) if use_cache else None
        logits = self(idx, cache=cache)[:, -1]  # (B, V)
        plan = decode_plan(self) if use_cache else None
        for t in range(N, total):
            nxt = out.narrow(1, t, 1)  # (B, 1)
            nxt.copy_(sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                             generator=generator))
            if t + 1 < total:  # the last token's logits would go unused
                if plan is not None:
                    logits = decode_step(self, plan, nxt, cache)
                else:
                    logits = (self(nxt, cache=cache) if use_cache else self(out.narrow(1, 0, t + 1)))[:, -1]
        return out


# ------------------------------------------------------------------------------------------ lean decoding step
#
# One decoded token costs ~50 module calls and their checks, as much time at batch 1 as the matmuls themselves. For
# a stack of standard blocks (Pre-LN, plain causal softmax attention, add residuals, no hooks) `decode_plan` reads
# every block's weights once per `generate` call (`block_plan`, as the stack's lean inference in formers/blocks.py)
# and `decode_step` runs the same ATen ops as the modules would, in the same order, without the module machinery.
# Parts it does not know (another norm, feed-forward or activation) are still called as modules, so every such block
# qualifies, with relative positions (rotary, ALiBi) applied as the attention applies them.
# tests/test_fast_paths.py checks it against the module path and against generation without a cache.


def decode_plan(model: LM) -> list[tuple] | None:
    """Per block (norm, attention weights, norm, feed-forward) for `decode_step`, or None where any block, the
    stack or the model is not the standard kind, a module is in training mode, has a hook or a `forward` replaced on
    the instance, or a module whose weights are read directly (embedding, q, kv, out, inlined norms and MLPs) is a
    subclass (then generation calls the modules). Relative positions (rotary, ALiBi) are applied as the attention
    applies them."""
    cls, mods = type(model), list(model.modules())
    if (any(m.training for m in mods) or type(model.stack) is not PlainStack or type(model.embed) is not nn.Embedding
            or model.embed.max_norm is not None  # decode_step reads the table as it is; the module renormalises rows
            or not hook_free(*mods) or not forward_unpatched(*mods)
            or cls.forward is not LM.forward
            or cls.forward_head is not LM.forward_head  # a subclass's own forward would not be replayed
            or cls.forward_features is not SequenceModel.forward_features or not _classes_unpatched()):
        return None
    plan = []
    for block in model.stack.blocks:
        p = block_plan(block, fold=False)  # a cache keeps every key and value whole: no folded value bias
        if p is None or not p[1][-1]:  # not the standard kind, or not causal
            return None
        plan.append(p)
    return plan


def decode_step(model: LM, plan: list[tuple], idx: torch.Tensor, cache: list[KVCache]) -> torch.Tensor:
    """Logits (B, V) of one new token per row, ids (B, 1), appending to `cache`: the model's forward on that token,
    with the blocks run from `plan` (decode_plan) instead of through their modules."""
    clear_aux(model)  # a feed-forward module called below may report an auxiliary loss, as in forward
    x = F.embedding(idx, model.embed.weight)  # (B, 1, D)
    if getattr(model.position, "kind", "") == "absolute":
        x = model.position(x, cache[0].length)
    positions = model._relative_positions()  # rotary, ALiBi or none
    for p, c in zip(plan, cache):
        x = lean_block(p, x, cache=c, positions=positions)  # the block's inference ops, its keys and values cached
    return model.forward_head(model.norm(x))[:, -1]


def _copy_cache(c: KVCache) -> KVCache:
    """A shallow copy, so that running a segment does not grow the caller's memory in place."""
    out = KVCache()
    out.k, out.v, out.state, out.length = c.k, c.v, dict(c.state), c.length
    return out


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One-line errors for sampling settings that have no meaning (before any token is generated)."""
    if not temperature >= 0:
        raise FormersError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise FormersError(f"generate: top_k must be >= 1 (or None for no cut), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise FormersError(f"generate: top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits (B, V) -> (B, 1): greedy, or sampling with temperature, top-k, top-p."""
    if greedy or temperature == 0:
        return logits.argmax(-1, keepdim=True)
    # shifted so the largest is 0 before dividing: a tiny temperature then gives -inf, not inf - inf = nan
    logits = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
