"""Decoder-only language model (GPT-style): causal stack over token embeddings, a linear head over the vocabulary,
and `generate()` with greedy, temperature, top-k and top-p sampling through the KV cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from formers.models.base import SequenceModel
from formers.registry import FormersError, register


@register("model", "lm", paper="baseline")
class LM(SequenceModel):
    """Decoder-only Transformer LM (Radford et al., GPT): logits = W_head Norm(Stack(Embed(ids) + Pos)).

    Shapes: ids (B, N) -> logits (B, N, V).
    """

    causal = True

    def __init__(self, vocab: int = 256, dim: int = 256, depth: int = 4, max_len: int = 1024,
                 position: Any = "learned", block: dict | None = None, layers: dict | None = None,
                 stack: Any = "plain", tie_embeddings: bool = False, dropout: float = 0.0):
        super().__init__(vocab, dim, depth, max_len, position, block, layers, stack, dropout)
        self.head = nn.Linear(dim, vocab, bias=False)
        self._init_weights()
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: list | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(idx, mask=mask, cache=cache))

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
        if getattr(self.position, "kind", "") == "absolute" and idx.shape[1] + max_new_tokens > self.max_len:
            raise FormersError(f"generating {idx.shape[1] + max_new_tokens} tokens exceeds max_len={self.max_len} "
                               "of the absolute positions; ask for fewer tokens")
        was_training = self.training
        self.eval()
        # mixers without an exact incremental form (e.g. ProbSparse) make generation recompute every step
        use_cache = use_cache and all(getattr(m, "supports_cache", True) for m in self.modules())
        cache = self.new_cache() if use_cache else None
        logits = self(idx, cache=cache)[:, -1]
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                         generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            logits = self(nxt, cache=cache)[:, -1] if use_cache else self(idx)[:, -1]
        self.train(was_training)
        return idx


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits (B, V) -> (B, 1): greedy, or sampling with temperature, top-k, top-p."""
    if greedy or temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
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
