"""MemoryFormer (P65): hashed lookup tables in place of fully-connected layers.

P65 "MemoryFormer: Minimize Transformer Computation by Removing Fully-Connected Layers" (Ding et al., NeurIPS 2024,
arXiv 2411.12992). Official code: C0-Design/MemoryFormer (`memory_module/memory.py`,
`memory_module/compute_code_score/kernel.py`, `megatron/model/transformer.py`, `configs/memoryformer_tiny.yml`).

Components
    linear/memory_linear   MemoryLinear: y = sum_k p_k T_k[h(z_k)] + b, a Linear replaced by K table look-ups
    ffn/memory_ffn         MemoryFFN: the "MemoryBlock" FFN, memory layer -> LayerNorm -> memory layer
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from formers.registry import FormersError, build, register

_SCORES = ("paper", "code")


@register("linear", "memory_linear", paper="P65")
class MemoryLinear(nn.Module):
    """Memory Layer of MemoryFormer (P65): a Linear(d_in -> d_out) replaced by K = d_in / tau hashed table look-ups.

    The input x (..., d_in) is cut into K chunks z_k of tau = `code_len` entries (the configuration the paper trains,
    `remove_projection: true`: no hashing projection before the cut). Each chunk is hashed to the integer whose
    binary digits are its signs, most significant bit first:
        h_k = sum_i [z_{k,i} >= 0] 2^(tau-1-i)  in [0, 2^tau)
    and picks a row of its own learnable table T_k (2^tau, d_out):
        y = sum_k p_k T_k[h_k] + b
    Chunk weight p_k (`score`):
        "paper"  p = exp(sum_i |z_i|) / prod_i (e^{z_i} + e^{-z_i})   (default)
                 the softmax probability of the chosen code among all 2^tau sign codes c, p(c) ~ exp(<z, c>).
                 Dividing each factor by e^{|z_i|} gives p = prod_i 1 / (1 + e^{-2|z_i|}) = prod_i sigmoid(2|z_i|),
                 computed here in log space as exp(-sum_i softplus(-2|z_i|)), so it never overflows; p in (2^-tau, 1].
        "code"   p = sum_i |z_i| / prod_i (1 + e^{-2|z_i|}) = sum_i |z_i| * (paper p)
                 what `compute_code_score_torch` in the official code actually computes (the paper's form is left
                 there as a comment). The extra factor sum|z| makes the layer positively homogeneous for large
                 |z| (y ~ |x|, like a Linear), while the paper's p saturates at 1.
    The indices are piecewise constant, so the gradient reaches x only through p_k; the tables get the gradient
    p_k dL/dy at the rows that were hit. Shapes (..., d_in) -> (..., d_out).

    Init as the official `MemoryLayer`: T ~ 0.02 N(0, 1), b ~ 0.001 N(0, 1). `init_weights(std)` (called by the
    model's init) sets T ~ N(0, std) and b = 0, the GPT-2 init the models give every nn.Linear.

    Cost: `flops()` = K d_out multiply-adds per token for the weighted gather-sum, plus d_in for p_k in the paper
    form (one per entry: the softplus term accumulated into the log-product) or 2 d_in in the code form (the sum
    |z| as well); the sign-to-index packing is integer work and not counted. A Linear costs d_in d_out, so the
    ratio is about tau.

    UNCERTAIN and chosen: the paper's p is the default, the code's form is `score="code"`; a zero entry hashes to
    bit 1 (`>=`, the torch path; the official CPU kernel uses `>`, which differs only at exact zeros); the bit order
    (first entry = most significant bit) follows `bin2dec` in the official code.
    """

    def __init__(self, in_features: int, out_features: int, code_len: int = 8, bias: bool = True,
                 score: Literal["paper", "code"] = "paper"):
        super().__init__()
        if code_len < 1 or code_len > 20:
            raise FormersError(f"memory_linear: code_len must be in [1, 20] (tables have 2**code_len rows), "
                               f"got {code_len}")
        if in_features < 1 or in_features % code_len:
            raise FormersError(f"memory_linear: in_features ({in_features}) must be a positive multiple of code_len "
                               f"({code_len}); pick code_len dividing it")
        if out_features < 1:
            raise FormersError(f"memory_linear: out_features must be >= 1, got {out_features}")
        if score not in _SCORES:
            raise FormersError(f"memory_linear: score must be one of {_SCORES}, got {score!r}")
        self.in_features, self.out_features, self.code_len, self.score = in_features, out_features, code_len, score
        self.num_tables = in_features // code_len
        self.table_size = 2 ** code_len
        # all K tables stacked: table k owns rows [k * 2^tau, (k + 1) * 2^tau)
        self.tables = nn.Parameter(0.02 * torch.randn(self.num_tables * self.table_size, out_features))
        self.bias = nn.Parameter(0.001 * torch.randn(out_features)) if bias else None
        self.register_buffer("bit_values", 2 ** torch.arange(code_len - 1, -1, -1), persistent=False)
        self.register_buffer("table_offsets", torch.arange(self.num_tables) * self.table_size, persistent=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, code_len={self.code_len}, "
                f"tables={self.num_tables}x{self.table_size}, score={self.score!r}, bias={self.bias is not None}")

    def active_parameters(self) -> int:
        """Parameters one token reads: one row of each of the K tables, and the bias."""
        return self.num_tables * self.out_features + (self.out_features if self.bias is not None else 0)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """The models' GPT-2 init, as nn.Linear gets it: N(0, std) table rows, zero bias."""
        self.tables.normal_(0.0, std)
        if self.bias is not None:
            self.bias.zero_()

    def _chunks(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise FormersError(f"memory_linear: expected last dim {self.in_features}, got input {tuple(x.shape)}")
        return x.unflatten(-1, (self.num_tables, self.code_len))  # (..., K, tau)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Hash indices h_k in [0, 2^tau): (..., d_in) -> (..., K) long."""
        bits = (self._chunks(x) >= 0).long()  # (..., K, tau)
        return (bits * self.bit_values).sum(-1)

    def chunk_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk weights p_k (see `score`): (..., d_in) -> (..., K)."""
        a = self._chunks(x).abs()  # (..., K, tau)
        p = torch.exp(-F.softplus(-2 * a).sum(-1))  # prod_i sigmoid(2|z_i|)
        return p * a.sum(-1) if self.score == "code" else p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = (self.codes(x) + self.table_offsets).reshape(-1, self.num_tables)  # (M, K) rows of `tables`
        p = self.chunk_weights(x).reshape(-1, self.num_tables).to(self.tables.dtype)  # (M, K)
        y = F.embedding_bag(rows, self.tables, per_sample_weights=p, mode="sum")  # (M, d_out) = sum_k p_k T[row_k]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def flops(self) -> int:
        """Multiply-adds per token: K d_out for the weighted gather-sum plus d_in (paper) or 2 d_in (code) for p_k."""
        return self.num_tables * self.out_features + (2 if self.score == "code" else 1) * self.in_features


@register("ffn", "memory_ffn", paper="P65")
class MemoryFFN(nn.Module):
    """MemoryFormer's FFN, the "MemoryBlock" (P65): two memory layers with a LayerNorm between, no activation.

    As `get_mlp` in the official `megatron/model/transformer.py` builds it with `double_mlp_table: true` (both
    released configs), K = dim / tau tables in each layer:
        expand="extra_bit" (default, the configs' `mlp_expand_type`; e = `extra_bits`, hard-coded 2 there)
            y = M2(LN(M1(x))),  M1: dim -> K (tau + e) with code_len tau,  M2: K (tau + e) -> dim with code_len tau + e
            so the second layer has the same K tables, each 4x taller (2^(tau+e) rows).
        expand="extra_table"  M1: dim -> 2 dim (code_len tau),  M2: 2 dim -> dim with 2K tables of code_len tau.
        expand="none"         a single memory layer dim -> dim (`double_mlp_table: false`).
    The memory layers' hashing is the non-linearity: `act_pos: none` in the configs, so no activation is applied.
    `norm` is a `norm`-family spec (the official block uses nn.LayerNorm even though the model uses RMSNorm).
    `score` is passed to both layers (see `memory_linear`). Shapes (B, N, D) -> (B, N, D).

    UNCERTAIN: the paper text describes the block as two memory layers that expand and contract the width; we
    follow the code for the widths. `flops()` counts the memory layers only (the norm is O(width)).
    """

    def __init__(self, dim: int, code_len: int = 8, expand: Literal["extra_bit", "extra_table", "none"] = "extra_bit",
                 extra_bits: int = 2, norm: Any = "layernorm", bias: bool = True,
                 score: Literal["paper", "code"] = "paper", dropout: float = 0.0):
        super().__init__()
        if dim % code_len:
            raise FormersError(f"memory_ffn: dim ({dim}) must be a multiple of code_len ({code_len})")
        if extra_bits < 0:
            raise FormersError(f"memory_ffn: extra_bits must be >= 0, got {extra_bits}")
        tables = dim // code_len
        opts = dict(bias=bias, score=score)
        if expand == "none":
            self.layers = nn.ModuleList([MemoryLinear(dim, dim, code_len=code_len, **opts)])
            self.norm = None
        else:
            if expand == "extra_bit":
                hidden, code_len2 = tables * (code_len + extra_bits), code_len + extra_bits
            elif expand == "extra_table":
                hidden, code_len2 = 2 * dim, code_len
            else:
                raise FormersError(f"memory_ffn: expand must be 'extra_bit', 'extra_table' or 'none', got {expand!r}")
            self.layers = nn.ModuleList([MemoryLinear(dim, hidden, code_len=code_len, **opts),
                                         MemoryLinear(hidden, dim, code_len=code_len2, **opts)])
            self.norm = build("norm", norm, dim=hidden, path="ffn.norm")
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers[0](x)
        if self.norm is not None:
            h = self.layers[1](self.norm(h))  # (B, N, hidden) -> (B, N, D)
        return self.drop(h)

    def flops(self) -> int:
        """Multiply-adds per token of the memory layers."""
        return sum(layer.flops() for layer in self.layers)
