"""Bidirectional encoder (BERT-style) with a classification head: sequence classification with cls or mean pooling,
or token classification (one label per position)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from formers.models.base import SequenceModel
from formers.nn.hooks import clear_aux
from formers.registry import FormersError, register


@register("model", "encoder", paper="baseline")
class Encoder(SequenceModel):
    """Bidirectional Transformer encoder (Devlin et al. BERT) + linear classifier.

    sequence: logits = W pool(Norm(Stack(Embed(ids) + Pos))) with pool = cls token or masked mean; (B, N) -> (B, C).
    token:    logits = W h_i per position; (B, N) -> (B, N, C).
    """

    causal = False

    def __init__(self, vocab: int = 256, dim: int = 256, depth: int = 4, max_len: int = 1024,
                 position: Any = "learned", block: dict | None = None, layers: dict | None = None,
                 stack: Any = "plain", num_classes: int = 2, pool: Literal["cls", "mean"] = "cls",
                 level: Literal["sequence", "token"] = "sequence", dropout: float = 0.0):
        if pool not in ("cls", "mean"):
            raise FormersError(f"model.pool: expected 'cls' or 'mean', got {pool!r}")
        if level not in ("sequence", "token"):
            raise FormersError(f"model.level: expected 'sequence' or 'token', got {level!r}")
        self.pool, self.level = pool, level
        use_cls = pool == "cls" and level == "sequence"
        super().__init__(vocab, dim, depth, max_len + int(use_cls), position, block, layers, stack, dropout)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes
        self._init_weights()

    def forward_features(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Token ids (B, N) -> hidden states (B, N, D), or (B, 1 + N, D) with the cls token first."""
        if cache is not None:
            raise FormersError("the encoder is bidirectional and has no KV cache")
        if self.cls_token is None:
            return super().forward_features(idx, mask=mask)
        B = idx.shape[0]
        clear_aux(self)  # auxiliary losses describe this forward pass only
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.embed(idx)], dim=1)  # (B, 1 + N, D)
        if mask is not None:
            mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        if getattr(self.position, "kind", "") == "absolute":
            x = self.position(x, 0)
        x = self.stack(self.drop(x), mask=mask, positions=self._relative_positions(), cache=None)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, mask: torch.Tensor | None = None):
        if self.level == "sequence":
            if self.pool == "cls":
                x = x[:, 0]
            elif mask is None:
                x = x.mean(1)
            else:
                w = mask.to(x.dtype)[..., None]  # (B, N, 1)
                x = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return x if pre_logits else self.head(x)

    def forward(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(idx, mask=mask), mask=mask)

    def reset_classifier(self, num_classes: int) -> None:
        w = self.head.weight
        self.head = nn.Linear(self.dim, num_classes, device=w.device, dtype=w.dtype)
        self.num_classes = num_classes
