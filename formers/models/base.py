"""What every formers sequence model shares: token embedding, positions, a stack of blocks, a final norm,
and the uniform method set (forward, forward_features, forward_head, num_params, reset_classifier,
set_grad_checkpointing)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from formers.blocks import Block, build_stack, layer_specs
from formers.nn.attention import KVCache, check_key_mask
from formers.nn.hooks import clear_aux
from formers.registry import FormersError, build


class SequenceModel(nn.Module):
    """Embedding -> positions -> stack of Blocks -> final norm (when the placement wants one); (B, N) ids in."""

    causal = False

    def __init__(self, vocab: int, dim: int, depth: int, max_len: int, position: Any, block: dict | None,
                 layers: dict | None, stack: Any, dropout: float):
        super().__init__()
        if dim <= 0 or depth <= 0 or vocab <= 0:
            raise FormersError(f"model: vocab, dim and depth must be positive (got {vocab}, {dim}, {depth})")
        self.vocab, self.dim, self.depth, self.max_len = vocab, dim, depth, max_len
        self.embed = nn.Embedding(vocab, dim)
        self.position = build("position", position, path="model.position", reserved=("dim", "max_len"),
                              dim=dim, max_len=max_len)
        self.drop = nn.Dropout(dropout)
        specs = layer_specs(block, layers, depth)
        self.stack = build_stack(stack, depth, lambda i: Block(
            dim, self.causal, specs[i], path="model.block" if specs[i] == specs[0] else f"model.layers[{i}]",
            max_len=max_len, layer=i))
        if getattr(self.position, "has_bias", False):  # a score bias (ALiBi) needs mixers that form per-key scores
            for m in self.stack.modules():
                if getattr(m, "takes_bias", True) is False:
                    raise FormersError(f"model.position: {type(self.position).__name__} adds a bias to attention "
                                       f"scores, which mixer '{getattr(m, 'mixer_name', type(m).__name__)}' never "
                                       "forms; use position rope, learned, sinusoidal or none")
        first = next(m for m in self.stack.modules() if isinstance(m, Block))
        self.norm = build("norm", specs[0]["norm"], path="model.block.norm", reserved=("dim",), dim=dim) \
            if first.final_norm else nn.Identity()

    # ---- the uniform API
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if getattr(self.position, "kind", None) == "absolute":
                n -= sum(p.numel() for p in self.position.parameters())
        return n

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.stack.grad_checkpointing = enable

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in range(self.stack.num_applications)]

    def _relative_positions(self):
        """The relative encoding handed to every mixer as `positions` (None for absolute encodings and NoPE)."""
        return self.position if getattr(self.position, "kind", "") == "relative" else None

    def forward_features(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None,
                         cache: list[KVCache] | None = None) -> torch.Tensor:
        """Token ids (B, N) -> normalised hidden states (B, N, D)."""
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise FormersError(f"expected integer token ids of shape (batch, length), got {tuple(idx.shape)} "
                               f"{idx.dtype}")
        offset = cache[0].length if cache else 0
        if mask is not None:  # keys: these, or with a cache these and the cached ones (the mixers take their own)
            N = idx.shape[1]
            check_key_mask(mask, idx.shape[0], (N, offset + N) if offset else N, "mask")
        clear_aux(self)  # auxiliary losses describe this forward pass only
        x = self.embed(idx)  # (B, N, D)
        if getattr(self.position, "kind", "") == "absolute":
            x = self.position(x, offset)
        x = self.stack(self.drop(x), mask=mask, positions=self._relative_positions(), cache=cache)
        return self.norm(x)

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) for linear and embedding weights, zero biases; norms stay at 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif hasattr(m, "init_weights"):  # parameters outside nn.Linear (stacked experts, lookup tables)
                m.init_weights(std=0.02)
