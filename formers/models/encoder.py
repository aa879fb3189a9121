"""Bidirectional encoder (BERT-style) with a classification head: sequence classification with cls or mean pooling,
or token classification (one label per position). Variable-length batches can run packed (P37 ByteTransformer):
`forward_packed(ids, seqlens)`, or `forward(idx, mask=..., packed=True)` / `Encoder(packed=True)` on a padded batch."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from formers.models.base import SequenceModel
from formers.nn.attention import check_key_mask
from formers.nn.hooks import clear_aux
from formers.nn.packed import check_seqlens, pack, positions_in_sequence, sequence_ids, unpack
from formers.registry import FormersError, register


@register("model", "encoder", paper="baseline")
class Encoder(SequenceModel):
    """Bidirectional Transformer encoder (Devlin et al. BERT) + linear classifier.

    sequence: logits = W pool(Norm(Stack(Embed(ids) + Pos))) with pool = cls token or masked mean; (B, N) -> (B, C).
    token:    logits = W h_i per position; (B, N) -> (B, N, C).

    Packed (P37 ByteTransformer, `formers.nn.packed`): `forward_packed(ids (T,) or (1, T), seqlens)` runs the
    embedding, every norm, FFN and residual on the T packed tokens only and attention per sequence; the cls token
    is inserted at the start of each sequence inside the pack, positions (learned, sinusoidal, rotary) restart at 0
    in each sequence, mean pooling is a per-sequence segment sum. It returns (S, C) for level='sequence' and
    (T, C) for level='token', equal to the padded forward with a key-padding mask on the valid tokens (tested).
    `packed=True` (constructor default or per call) makes `forward(idx, mask=...)` pack the right-padded batch,
    run `forward_packed` and unpack: the same call, no compute on padding; token logits at padded positions are 0.
    Packing assumes position-wise channel mixers and norms (not batch statistics, MoE capacity or convolutions
    over the sequence) and a token mixer that takes `seqlens` (softmax and its hook-based variants; others raise).
    """

    causal = False

    def __init__(self, vocab: int = 256, dim: int = 256, depth: int = 4, max_len: int = 1024,
                 position: Any = "learned", block: dict | None = None, layers: dict | None = None,
                 stack: Any = "plain", num_classes: int = 2, pool: Literal["cls", "mean"] = "cls",
                 level: Literal["sequence", "token"] = "sequence", dropout: float = 0.0, packed: bool = False):
        if pool not in ("cls", "mean"):
            raise FormersError(f"model.pool: expected 'cls' or 'mean', got {pool!r}")
        if level not in ("sequence", "token"):
            raise FormersError(f"model.level: expected 'sequence' or 'token', got {level!r}")
        self.pool, self.level, self.packed = pool, level, packed
        use_cls = pool == "cls" and level == "sequence"
        super().__init__(vocab, dim, depth, max_len + int(use_cls), position, block, layers, stack, dropout)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes
        self._init_weights()

    def forward_features(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None, cache=None,
                         last_rows: int | None = None) -> torch.Tensor:
        """Token ids (B, N) -> hidden states (B, N, D), or (B, 1 + N, D) with the cls token first. `last_rows=1`
        (used by `forward`, only where `_cls_only()`) returns only the cls token's row (B, 1, D), which the last
        block computes alone."""
        if cache is not None:
            raise FormersError("the encoder is bidirectional and has no KV cache")
        if self.cls_token is None:
            return super().forward_features(idx, mask=mask)
        B = idx.shape[0]
        clear_aux(self)  # auxiliary losses describe this forward pass only
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.embed(idx)], dim=1)  # (B, 1 + N, D)
        if mask is not None:
            check_key_mask(mask, B, idx.shape[-1], "mask")
            mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        if getattr(self.position, "kind", "") == "absolute":
            x = self.position(x, 0)
        if last_rows is not None:
            return self.norm(self.stack.forward_prefix(self.drop(x), last_rows, mask=mask))  # (B, last_rows, D)
        x = self.stack(self.drop(x), mask=mask, positions=self._relative_positions(), cache=None)
        return self.norm(x)

    def _cls_only(self) -> bool:
        """The last block may stop at the cls token's row: evaluation, cls pooling of sequences, no relative
        positions (the prefix path's attention takes none), a plain stack whose last block allows it
        (`Block.prefix_ok`), the encoder's own forward methods, no hooks or replaced forward on the stack or norm."""
        from formers.blocks import PlainStack
        from formers.nn.hooks import methods_as_defined, plain_tree

        if self.training or self.cls_token is None or self._relative_positions() is not None:
            return False
        if not methods_as_defined(self, Encoder, _ENCODER_METHODS):  # a subclass's, patch's or instance's own
            return False
        return type(self.stack) is PlainStack and self.stack.prefix_ok() and plain_tree(self.norm, evaluating=True)

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

    def forward(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None,
                packed: bool | None = None) -> torch.Tensor:
        """ids (B, N), mask (B, N) -> logits (B, C) or (B, N, C). `packed` (default: the model's setting) removes
        the padding inside (needs right-padded rows); without a mask there is no padding and nothing to pack."""
        if (self.packed if packed is None else packed) and mask is not None:
            return self._forward_padded_as_packed(idx, mask)
        if self._cls_only():  # inference fast path: the last block computes the cls row only (tests/test_fast_paths)
            return self.forward_head(self.forward_features(idx, mask=mask, last_rows=1), mask=mask)
        return self.forward_head(self.forward_features(idx, mask=mask), mask=mask)

    # ---- packed variable-length batches (P37)
    def _forward_padded_as_packed(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if type(self).forward_features is not Encoder.forward_features:
            raise FormersError(f"model '{type(self).__name__}' does not run packed; use packed=False")
        if idx.dim() != 2 or mask.shape != idx.shape:
            raise FormersError(f"packed forward: expected ids (batch, length) and a mask of the same shape, got "
                               f"{tuple(idx.shape)} and {tuple(mask.shape)}")
        mask = mask.bool()
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise FormersError("packed forward needs right-padded rows (each row's valid tokens first, then "
                               "padding), as positions count from each row's first token; use packed=False")
        ids, seqlens = pack(idx, mask)
        logits = self.forward_packed(ids, seqlens)
        # (1, T, C) spelled out: a (T, C) of one token and one class would read as (1, T) packed ids
        return logits if self.level == "sequence" else unpack(logits[None], seqlens, mask=mask)  # (B, N, C)

    def _absolute_at(self, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The absolute position encoding (T, D) at per-token positions `pos` (T,)."""
        p = self.position
        if pos.numel() and int(pos.max()) >= self.max_len:
            raise FormersError(f"a packed sequence of {int(pos.max()) + 1} tokens (cls included) exceeds "
                               f"max_len={self.max_len}; set model.max_len higher")
        if isinstance(getattr(p, "emb", None), torch.Tensor):  # learned table (max_len, D)
            return p.emb[pos]
        if hasattr(p, "table"):  # sinusoidal
            return p.table(pos).to(dtype)
        raise FormersError(f"position '{type(p).__name__}' has no per-token table for packed sequences; use "
                           "learned, sinusoidal, rope, alibi or none")

    def forward_features_packed(self, idx: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        """Packed ids (T,) or (1, T) with cumulative offsets `seqlens` (S + 1,) -> hidden states (1, T', D).

        Without a cls token T' = T, in the order of the ids. With one (pool='cls', level='sequence') T' = T + S:
        sequence i's cls token sits at packed row seqlens[i] + i, followed by its tokens."""
        if idx.dim() == 2 and idx.shape[0] == 1:
            idx = idx[0]
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise FormersError(f"forward_packed: expected packed integer token ids of shape (T,) or (1, T), got "
                               f"{tuple(idx.shape)} {idx.dtype}")
        # checked where they are (offsets given on the CPU are read without a device synchronisation), then moved
        seqlens = check_seqlens(seqlens, idx.shape[0]).to(idx.device)
        clear_aux(self)  # auxiliary losses describe this forward pass only
        x = self.embed(idx)  # (T, D)
        if self.cls_token is not None:
            S, T = len(seqlens) - 1, idx.shape[0]
            shift = torch.arange(S + 1, device=idx.device)
            cls_rows = seqlens[:-1] + shift[:-1]  # (S,): where each cls token goes
            tok_rows = torch.arange(T, device=idx.device) + sequence_ids(seqlens) + 1  # (T,)
            src = torch.empty(T + S, dtype=torch.long, device=idx.device)
            src[tok_rows] = torch.arange(T, device=idx.device)
            src[cls_rows] = T  # row T of the table below is the cls token
            x = torch.cat([x, self.cls_token[0]]).index_select(0, src)  # (T + S, D)
            seqlens = seqlens + shift
        if getattr(self.position, "kind", "") == "absolute":
            x = x + self._absolute_at(positions_in_sequence(seqlens), x.dtype)
        x = self.stack(self.drop(x[None]), mask=None, positions=self._relative_positions(), cache=None,
                       seqlens=seqlens)
        return self.norm(x)

    def forward_packed(self, idx: torch.Tensor, seqlens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Packed ids (T,) or (1, T), cumulative offsets `seqlens` (S + 1,) -> logits (S, C) for level='sequence'
        or (T, C) for level='token' (the pooled / per-token features instead with `pre_logits`)."""
        h = self.forward_features_packed(idx, seqlens)[0]  # (T', D)
        seqlens = seqlens.to(h.device).long()
        if self.level == "token":
            x = h
        elif self.cls_token is not None:
            x = h[seqlens[:-1] + torch.arange(len(seqlens) - 1, device=h.device)]  # (S, D): each cls row
        else:  # mean over each sequence: segment sums
            S = len(seqlens) - 1
            sums = h.new_zeros(S, h.shape[1]).index_add(0, sequence_ids(seqlens), h)  # (S, D)
            x = sums / seqlens.diff().clamp_min(1).to(h.dtype)[:, None]
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int) -> None:
        w = self.head.weight
        self.head = nn.Linear(self.dim, num_classes, device=w.device, dtype=w.dtype)
        self.num_classes = num_classes


_ENCODER_METHODS = {k: vars(Encoder)[k] for k in ("forward", "forward_features", "forward_head")}  # as defined


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
