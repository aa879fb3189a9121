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


@register("model", "dual_encoder", paper="P29")
class DualEncoder(Encoder):
    """Two-tower encoder of LRA's retrieval task (Tay et al. 2021, Sec. 3.3): one shared encoder embeds each
    document to a pooled vector, then Y = MLP([X1, X2, X1 * X2, X1 - X2]) with MLP = Linear(4D, mlp_dim), ReLU,
    Linear(mlp_dim, C) (the LRA code's dual classifier head, read for its layout).

    Input (B, 2, N) (the two documents) or (B, 2N) (the two concatenated; split in halves); mask of the same shape.
    forward_features -> (B, 2, N', D); forward_head(pre_logits=True) -> the MLP's hidden (B, mlp_dim)."""

    def __init__(self, *args, mlp_dim: int | None = None, **kw):
        super().__init__(*args, **kw)
        if self.level != "sequence":
            raise FormersError("dual_encoder classifies pairs of sequences; level='token' is not available")
        hidden = mlp_dim or self.dim
        self.head = nn.Linear(hidden, self.num_classes)
        self.interaction = nn.Sequential(nn.Linear(4 * self.dim, hidden), nn.ReLU())
        self.mlp_dim = hidden
        self._init_weights()

    @staticmethod
    def _towers(x: torch.Tensor | None, what: str) -> torch.Tensor | None:
        if x is None or x.dim() == 3:
            if x is not None and x.shape[1] != 2:
                raise FormersError(f"dual_encoder: {what} must be (batch, 2, length), got {tuple(x.shape)}")
            return x
        if x.dim() != 2 or x.shape[1] % 2:
            raise FormersError(f"dual_encoder: {what} must be (batch, 2, length) or (batch, 2 * length), got "
                               f"{tuple(x.shape)}")
        return x.reshape(x.shape[0], 2, x.shape[1] // 2)

    def forward_features(self, idx, *, mask=None, cache=None):
        idx, mask = self._towers(idx, "input"), self._towers(mask, "mask")
        B, _, N = idx.shape
        flat_mask = None if mask is None else mask.reshape(B * 2, N)
        h = super().forward_features(idx.reshape(B * 2, N), mask=flat_mask, cache=cache)
        return h.reshape(B, 2, *h.shape[1:])

    def forward_head(self, x, pre_logits=False, mask=None):
        B = x.shape[0]
        mask = self._towers(mask, "mask")
        flat_mask = None if mask is None else mask.reshape(B * 2, -1)
        pooled = super().forward_head(x.reshape(B * 2, *x.shape[2:]), pre_logits=True, mask=flat_mask)
        x1, x2 = pooled.reshape(B, 2, -1).unbind(1)
        h = self.interaction(torch.cat([x1, x2, x1 * x2, x1 - x2], dim=-1))
        return h if pre_logits else self.head(h)

    def reset_classifier(self, num_classes: int) -> None:
        w = self.head.weight
        self.head = nn.Linear(self.mlp_dim, num_classes, device=w.device, dtype=w.dtype)
        self.num_classes = num_classes
