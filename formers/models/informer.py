"""Informer (P73) for long-sequence time-series forecasting, and two forecasting baselines.

P73: Zhou et al. 2021, "Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting"
(AAAI 2021), https://arxiv.org/abs/2012.07436. Facts from the official code zhouhaoyi/Informer2020 (Apache-2.0;
models/model.py, encoder.py, decoder.py, embed.py, attn.py; defaults from main_informer.py), read, not copied.

Components:
- `DataEmbedding`: value Conv1d(k3, circular) + sinusoidal positions + `timeF` Linear(time features) -> dropout.
- `InformerAttention`: a registered token mixer (ProbSparse `probsparse` or full `softmax`) with the official
  output projection and the decoder's `mix` option.
- `DistilLayer`: Conv1d(k3, circular) -> BatchNorm1d -> ELU -> MaxPool1d(3, 2, 1); L -> ceil(L / 2).
- `EncoderLayer`, `DecoderLayer`: post-norm layers with a position-wise (1x1 conv) GELU feed-forward, the
  `ffn` `mlp` with hidden_dropout (a 1x1 conv is a Linear per time step).
- models `informer`, `informer_full` (Informer-dagger: full attention everywhere), `informer_stack`
  (InformerStack: encoders with s_layers "3,2,1" layers over the last L, L/2, L/4 inputs, outputs concatenated);
  baselines `repeat_last` and `dlinear`.

Every model is called as model(x_enc, x_mark_enc, x_dec, x_mark_dec) -> (B, pred_len, c_out), the official
signature: x_enc (B, seq_len, enc_in) scaled values, x_mark_enc (B, seq_len, mark_dim) time features, x_dec
(B, label_len + pred_len, dec_in) = the last label_len known values then pred_len zeros, x_mark_dec its time
features (the task `forecast` builds them). The baselines read x_enc only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from formers.nn.ffn import MLP
from formers.nn.position import SinusoidalPosition
from formers.registry import FormersError, build, register


def _check_inputs(model: nn.Module, x_enc, x_mark_enc, x_dec, x_mark_dec, enc_in: int, dec_in: int | None,
                  mark_dim: int | None) -> None:
    name = type(model).__name__
    if x_enc.dim() != 3 or x_enc.shape[-1] != enc_in:
        raise FormersError(f"{name}: x_enc must be (batch, seq_len, enc_in={enc_in}), got {tuple(x_enc.shape)}")
    if dec_in is None:
        return
    if x_dec is None or x_dec.dim() != 3 or x_dec.shape[-1] != dec_in or x_dec.shape[0] != x_enc.shape[0]:
        got = None if x_dec is None else tuple(x_dec.shape)
        raise FormersError(f"{name}: x_dec must be (batch, label_len + pred_len, dec_in={dec_in}), got {got}")
    for mark, x, what in ((x_mark_enc, x_enc, "x_mark_enc"), (x_mark_dec, x_dec, "x_mark_dec")):
        if mark is None or mark.shape != (*x.shape[:2], mark_dim):
            got = None if mark is None else tuple(mark.shape)
            raise FormersError(f"{name}: {what} must be {(*x.shape[:2], mark_dim)} (time features, mark_dim="
                               f"{mark_dim}), got {got}")


# ------------------------------------------------------------------------------------------------ building blocks


def _run(owner: nn.Module, layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """layer(*args), through activation checkpointing when `owner.grad_checkpointing` is on, `owner` is training
    and autograd records (the pattern of blocks.Stack.run and VisionModel.run)."""
    if owner.grad_checkpointing and owner.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class DataEmbedding(nn.Module):
    """P73 Informer (Zhou et al. 2021) input embedding (embed.py DataEmbedding with embed='timeF'):

        e_t = Conv1d_k3,circular(x)_t + PE_t + W_mark mark_t + b,   then dropout.

    The value conv has a bias and Kaiming-normal weights (fan_in, leaky_relu), as the official TokenEmbedding;
    PE is the fixed sinusoidal table (sin on even, cos on odd features). (B, L, c_in), (B, L, F) -> (B, L, D)."""

    def __init__(self, c_in: int, d_model: int, mark_dim: int, dropout: float = 0.0):
        super().__init__()
        self.value = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1, padding_mode="circular")
        nn.init.kaiming_normal_(self.value.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.position = SinusoidalPosition(d_model)
        self.temporal = nn.Linear(mark_dim, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mark: torch.Tensor) -> torch.Tensor:
        v = self.value(x.transpose(1, 2)).transpose(1, 2)  # (B, L, D)
        return self.drop(self.position(v + self.temporal(mark)))


class InformerAttention(nn.Module):
    """Informer's AttentionLayer (attn.py) around a registered mixer: ProbSparse (`probsparse`, P73) or full
    softmax attention (`softmax`), then the output projection W_o (with bias).

    `mix` (the decoder's self-attention, on by default in main_informer.py): the official code transposes the
    per-head outputs (B, L, H, Dh) to (B, H, L, Dh) and reads that memory as (B, L, H*Dh) before W_o, so row t of
    the projected input holds pieces of several time steps of one head. We reproduce that exact reshuffle.
    The decoder's masked ProbSparse attention uses the official (global) query selection: top-u over the whole
    sequence; lazy queries output cumsum(V) (see `probsparse`). Full attention has attention dropout (the official
    FullAttention); ProbSparse has none (the official ProbAttention never applies its dropout).
    UNCERTAIN / ours: the mixers' q, k, v projections have no bias (the official nn.Linear ones have).
    x (B, N, D), context (B, M, D) or None -> (B, N, D)."""

    def __init__(self, d_model: int, heads: int, attn: str = "prob", causal: bool = False, factor: int = 5,
                 dropout: float = 0.0, mix: bool = False, seed: int | None = None):
        super().__init__()
        if attn == "prob":
            self.inner = build("mixer", "probsparse", dim=d_model, heads=heads, causal=causal, factor=factor,
                               seed=seed, causal_selection="global")
        elif attn == "full":
            self.inner = build("mixer", "softmax", dim=d_model, heads=heads, causal=causal, dropout=dropout)
        else:
            raise FormersError(f"model.attn: must be 'prob' or 'full', got {attn!r}")
        self.inner.out = nn.Identity()  # the heads' concatenation comes out; `mix` acts before W_o
        self.heads, self.mix = heads, mix
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        y = self.inner(x, context=context)  # (B, N, H*Dh), ordered (N, H, Dh)
        if self.mix:
            B, N, D = y.shape
            y = y.view(B, N, self.heads, D // self.heads).transpose(1, 2).reshape(B, N, D)  # (H, N, Dh) memory
        return self.out(y)


class DistilLayer(nn.Module):
    """P73 Informer (Zhou et al. 2021) self-attention distilling (encoder.py ConvLayer):

        X_{j+1} = MaxPool_3,2,1(ELU(BatchNorm(Conv1d_k3,circular(X_j))))

    The conv pads 1 step circularly (the official choice on torch >= 1.5); MaxPool1d(kernel 3, stride 2,
    padding 1) halves the length: L -> ceil(L / 2) (96 -> 48). (B, L, D) -> (B, ceil(L/2), D)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1, padding_mode="circular")
        self.norm = nn.BatchNorm1d(d_model)
        self.pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(F.elu(self.norm(self.conv(x.transpose(1, 2)))))  # (B, D, ceil(L/2))
        return y.transpose(1, 2)


def _feed_forward(d_model: int, d_ff: int, dropout: float, activation: str) -> MLP:
    """P73 Informer (Zhou et al. 2021) feed-forward: the official pair of Conv1d(kernel 1) layers as the `mlp` ffn
    (nn.Linear: the same map per time step and the same default initialisation, fan_in = channels x 1):

        FFN(x) = drop(W2 drop(act(W1 x + b1)) + b2)"""
    return MLP(d_model, hidden=d_ff, act=activation, dropout=dropout, hidden_dropout=dropout)


class EncoderLayer(nn.Module):
    """P73 Informer (Zhou et al. 2021) post-norm encoder layer (encoder.py EncoderLayer):

        x' = LN(x + drop(Attn(x))),   y = LN(x' + FFN(x'))"""

    def __init__(self, d_model: int, d_ff: int, attention: InformerAttention, dropout: float, activation: str):
        super().__init__()
        self.attn = attention
        self.ffn = _feed_forward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    """P73 Informer (Zhou et al. 2021) post-norm decoder layer (decoder.py DecoderLayer): masked self-attention,
    full cross-attention to the encoder output m (the mixer's `context`), FFN; each followed by add & LayerNorm:

        x' = LN(x + drop(SelfAttn_causal(x))),   x'' = LN(x' + drop(CrossAttn(x', m))),   y = LN(x'' + FFN(x''))"""

    def __init__(self, d_model: int, d_ff: int, self_attention: InformerAttention,
                 cross_attention: InformerAttention, dropout: float, activation: str):
        super().__init__()
        self.self_attn, self.cross_attn = self_attention, cross_attention
        self.ffn = _feed_forward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x)))
        x = self.norm2(x + self.drop(self.cross_attn(x, context=memory)))
        return self.norm3(x + self.ffn(x))


class Encoder(nn.Module):
    """P73 Informer (Zhou et al. 2021) encoder (encoder.py Encoder): layers with a distilling layer between
    consecutive ones (none after the last), then a LayerNorm:

        Enc(x) = LN(Layer_n(Distil_{n-1}(... Distil_1(Layer_1(x)))))

    (B, L, D) -> (B, ceil(L / 2^(layers-1)), D) with distilling, (B, L, D) without."""

    def __init__(self, layers: list[EncoderLayer], distils: list[DistilLayer], d_model: int):
        super().__init__()
        self.layers, self.distils = nn.ModuleList(layers), nn.ModuleList(distils)
        self.norm = nn.LayerNorm(d_model)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = _run(self, layer, x)
            if i < len(self.distils):
                x = self.distils[i](x)
        return self.norm(x)


# ------------------------------------------------------------------------------------------------------ Informer


class _InformerNet(nn.Module):
    """The network of `informer`, `informer_full` and `informer_stack` (P73 Informer, Zhou et al. 2021): one
    distilling encoder per entry of `stack` (its layer count), a decoder, a projection. Keyword-only: the models
    below give their own signatures and defaults."""

    def __init__(self, *, stack: list[int], enc_in: int, dec_in: int, c_out: int, pred_len: int, mark_dim: int,
                 d_model: int, heads: int, d_layers: int, d_ff: int, factor: int, dropout: float, attn: str,
                 distil: bool, mix: bool, activation: str, sample_seed: int | None):
        super().__init__()
        for k, v in {"enc_in": enc_in, "dec_in": dec_in, "c_out": c_out, "pred_len": pred_len, "mark_dim": mark_dim,
                     "d_model": d_model, "heads": heads, "d_layers": d_layers, "d_ff": d_ff}.items():
            if v < 1:
                raise FormersError(f"model.{k}: must be >= 1, got {v}")
        if not stack or min(stack) < 1:
            raise FormersError(f"model: every encoder needs >= 1 layer, got {stack}")
        if d_model % heads:
            raise FormersError(f"model: d_model={d_model} is not divisible by heads={heads}")
        self.enc_in, self.dec_in, self.c_out, self.pred_len, self.mark_dim = enc_in, dec_in, c_out, pred_len, mark_dim

        def attention(causal: bool, kind: str = attn, mixed: bool = False) -> InformerAttention:
            return InformerAttention(d_model, heads, kind, causal, factor, dropout, mixed, sample_seed)

        self.enc_embedding = DataEmbedding(enc_in, d_model, mark_dim, dropout)
        self.dec_embedding = DataEmbedding(dec_in, d_model, mark_dim, dropout)
        self.encoders = nn.ModuleList(
            Encoder([EncoderLayer(d_model, d_ff, attention(False), dropout, activation) for _ in range(n)],
                    [DistilLayer(d_model) for _ in range(n - 1)] if distil else [], d_model)
            for n in stack)
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, d_ff, attention(True, mixed=mix), attention(False, "full"), dropout, activation)
            for _ in range(d_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.projection = nn.Linear(d_model, c_out)
        self.grad_checkpointing = False

    # ---- the uniform API
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder and decoder layer in the backward pass (not the distilling BatchNorm)."""
        self.grad_checkpointing = enable
        for enc in self.encoders:
            enc.grad_checkpointing = enable

    def encode(self, x_enc: torch.Tensor, x_mark_enc: torch.Tensor) -> torch.Tensor:
        """(B, L, enc_in), (B, L, F) -> encoder memory (B, M, D); M = sum over the stack's encoders of their output
        lengths (ceil(L / 2^(e_layers-1)) for one distilling encoder)."""
        x = self.enc_embedding(x_enc, x_mark_enc)
        L = x.shape[1]
        outs = []
        for i, enc in enumerate(self.encoders):  # InformerStack: encoder i reads the last L // 2^i steps
            n = L // 2 ** i
            if n < 1:
                raise FormersError(f"model: seq_len {L} is too short for {len(self.encoders)} stacked encoders")
            outs.append(enc(x[:, L - n:]))
        return torch.cat(outs, dim=1)

    def forward(self, x_enc: torch.Tensor, x_mark_enc: torch.Tensor, x_dec: torch.Tensor,
                x_mark_dec: torch.Tensor) -> torch.Tensor:
        _check_inputs(self, x_enc, x_mark_enc, x_dec, x_mark_dec, self.enc_in, self.dec_in, self.mark_dim)
        if x_dec.shape[1] < self.pred_len:
            raise FormersError(f"{type(self).__name__}: x_dec has {x_dec.shape[1]} steps, fewer than pred_len "
                               f"{self.pred_len}")
        memory = self.encode(x_enc, x_mark_enc)
        y = self.dec_embedding(x_dec, x_mark_dec)
        for layer in self.decoder:
            y = _run(self, layer, y, memory)
        y = self.projection(self.decoder_norm(y))  # (B, label_len + pred_len, c_out)
        return y[:, -self.pred_len:]


@register("model", "informer", paper="P73")
class Informer(_InformerNet):
    """Informer (P73): ProbSparse self-attention encoder with distilling, generative-style decoder.

        enc = Encoder(Embed(x_enc, mark_enc))               # e_layers, distilling halves L between layers
        dec = Decoder(Embed(x_dec, mark_dec), enc)           # masked ProbSparse self-attn (mix), full cross-attn
        y   = Linear(LN(dec))[:, -pred_len:]                 # one forward pass, no autoregression

    Defaults are main_informer.py's: d_model 512, 8 heads, e_layers 2, d_layers 1, d_ff 2048, dropout 0.05,
    factor 5 (ETTh1's multivariate horizon-24 script uses 3), GELU, distil and mix on, embed 'timeF'.
    Shapes: see the module docstring; output (B, pred_len, c_out). Options filled in by the `forecast` task:
    enc_in, dec_in, c_out, pred_len, mark_dim (4 hourly time features).
    `attn`: 'prob' (ProbSparse in both self-attentions) or 'full'. `activation`: any registered `act` (the
    official code offers gelu and relu). `sample_seed`: None draws ProbSparse's key sample from the global RNG on
    every call (official; reproducible under the trainer's seed, and the `forecast` task scores under a fixed
    seed), an int fixes it.
    UNCERTAIN / ours: no biases in the attention q, k, v projections (the mixers' contract); the 'fixed' and
    'learned' calendar embeddings of embed.py are not provided (the official scripts use timeF).
    """

    def __init__(self, enc_in: int = 7, dec_in: int = 7, c_out: int = 7, pred_len: int = 24, mark_dim: int = 4,
                 d_model: int = 512, heads: int = 8, e_layers: int = 2, d_layers: int = 1, d_ff: int = 2048,
                 factor: int = 5, dropout: float = 0.05, attn: Literal["prob", "full"] = "prob", distil: bool = True,
                 mix: bool = True, activation: str = "gelu", sample_seed: int | None = None):
        super().__init__(stack=[e_layers], enc_in=enc_in, dec_in=dec_in, c_out=c_out, pred_len=pred_len,
                         mark_dim=mark_dim, d_model=d_model, heads=heads, d_layers=d_layers, d_ff=d_ff, factor=factor,
                         dropout=dropout, attn=attn, distil=distil, mix=mix, activation=activation,
                         sample_seed=sample_seed)


@register("model", "informer_full", paper="P73")
class InformerFull(Informer):
    """Informer-dagger (P73 Tables 1-2): Informer with canonical full self-attention in the encoder and the
    masked decoder self-attention (official --attn full). Same parameters as `informer`, so weights transfer; with
    a ProbSparse budget c ceil(ln L) >= L the two models compute the same function (tested)."""

    def __init__(self, enc_in: int = 7, dec_in: int = 7, c_out: int = 7, pred_len: int = 24, mark_dim: int = 4,
                 d_model: int = 512, heads: int = 8, e_layers: int = 2, d_layers: int = 1, d_ff: int = 2048,
                 dropout: float = 0.05, distil: bool = True, mix: bool = True, activation: str = "gelu"):
        super().__init__(enc_in=enc_in, dec_in=dec_in, c_out=c_out, pred_len=pred_len, mark_dim=mark_dim,
                         d_model=d_model, heads=heads, e_layers=e_layers, d_layers=d_layers, d_ff=d_ff, factor=5,
                         dropout=dropout, attn="full", distil=distil, mix=mix, activation=activation)


@register("model", "informer_stack", paper="P73")
class InformerStack(_InformerNet):
    """InformerStack (model.py; --model informerstack): one encoder per entry of `s_layers` ("3,2,1" by default),
    encoder i with s_layers[i] layers (and distilling) over the last L // 2^i input steps; their outputs are
    concatenated along time as the decoder's memory. Otherwise as `informer`."""

    def __init__(self, enc_in: int = 7, dec_in: int = 7, c_out: int = 7, pred_len: int = 24, mark_dim: int = 4,
                 d_model: int = 512, heads: int = 8, s_layers: str | list = "3,2,1", d_layers: int = 1,
                 d_ff: int = 2048, factor: int = 5, dropout: float = 0.05, attn: Literal["prob", "full"] = "prob",
                 distil: bool = True, mix: bool = True, activation: str = "gelu", sample_seed: int | None = None):
        try:
            stack = [int(s) for s in s_layers.split(",")] if isinstance(s_layers, str) else [int(s) for s in s_layers]
        except ValueError:
            raise FormersError(f"model.s_layers: expected layer counts such as '3,2,1', got {s_layers!r}") from None
        super().__init__(stack=stack, enc_in=enc_in, dec_in=dec_in, c_out=c_out, pred_len=pred_len,
                         mark_dim=mark_dim, d_model=d_model, heads=heads, d_layers=d_layers, d_ff=d_ff, factor=factor,
                         dropout=dropout, attn=attn, distil=distil, mix=mix, activation=activation,
                         sample_seed=sample_seed)


# ----------------------------------------------------------------------------------------------------- baselines


@register("model", "repeat_last", paper="baseline")
class RepeatLast(nn.Module):
    """Naive forecast: every one of the pred_len steps repeats the last input value, y_{t+h} = x_t.

    No parameters (it needs no training). The last c_out input channels are the outputs (the target is the
    last channel for MS). (B, L, C_in) -> (B, pred_len, c_out)."""

    def __init__(self, pred_len: int = 24, c_out: int = 7, enc_in: int = 7):
        super().__init__()
        if min(pred_len, c_out, enc_in) < 1 or c_out > enc_in:
            raise FormersError(f"model: need pred_len, c_out >= 1 and c_out <= enc_in (got {pred_len}, {c_out}, "
                               f"{enc_in})")
        self.pred_len, self.c_out, self.enc_in = pred_len, c_out, enc_in

    def num_params(self) -> int:
        return 0

    def forward(self, x_enc: torch.Tensor, x_mark_enc: torch.Tensor | None = None, x_dec: torch.Tensor | None = None,
                x_mark_dec: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(self, x_enc, None, None, None, self.enc_in, None, None)
        last = x_enc[:, -1:, -self.c_out:]  # (B, 1, c_out)
        return last.expand(-1, self.pred_len, -1)


def moving_average(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Trend of DLinear's decomposition: the mean over a window of `kernel` steps centred on each step, the
    series padded by repeating its first and last values (kernel - 1) / 2 times. (B, L, C) -> (B, L, C)."""
    pad = (kernel - 1) // 2
    padded = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
    return F.avg_pool1d(padded.transpose(1, 2), kernel_size=kernel, stride=1).transpose(1, 2)


@register("model", "dlinear", paper="baseline")
class DLinear(nn.Module):
    """DLinear (Zeng et al. 2023, "Are Transformers Effective for Time Series Forecasting?", AAAI; facts from
    cure-lab/LTSF-Linear models/DLinear.py): decompose the input window into trend = moving average (kernel 25,
    end-replicated padding) and remainder, map each with a linear layer over time, per channel, and add:

        y[:, :, c] = W_s (x_c - trend_c) + b_s + W_t trend_c + b_t,   W in R^{pred_len x seq_len}

    `individual`=False shares W across channels (DLinear's default), True gives each channel its own. Both weights
    start at 1/seq_len (every step predicts the window mean), as in the reference. Outputs the last c_out
    channels. (B, seq_len, C_in) -> (B, pred_len, c_out)."""

    def __init__(self, seq_len: int = 96, pred_len: int = 24, enc_in: int = 7, c_out: int = 7, kernel: int = 25,
                 individual: bool = False):
        super().__init__()
        if min(seq_len, pred_len, enc_in, c_out) < 1 or c_out > enc_in:
            raise FormersError(f"model: need seq_len, pred_len, c_out >= 1 and c_out <= enc_in (got {seq_len}, "
                               f"{pred_len}, {c_out}, {enc_in})")
        if kernel < 1 or kernel % 2 == 0:
            raise FormersError(f"model.kernel: the moving average needs an odd kernel >= 1, got {kernel}")
        self.seq_len, self.pred_len, self.enc_in, self.c_out, self.kernel = seq_len, pred_len, enc_in, c_out, kernel
        n = enc_in if individual else 1
        self.individual = individual
        self.w_seasonal = nn.Parameter(torch.full((n, pred_len, seq_len), 1.0 / seq_len))
        self.w_trend = nn.Parameter(torch.full((n, pred_len, seq_len), 1.0 / seq_len))
        bound = seq_len ** -0.5  # nn.Linear's default bias initialisation
        self.b_seasonal = nn.Parameter(torch.empty(n, pred_len).uniform_(-bound, bound))
        self.b_trend = nn.Parameter(torch.empty(n, pred_len).uniform_(-bound, bound))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x_enc: torch.Tensor, x_mark_enc: torch.Tensor | None = None, x_dec: torch.Tensor | None = None,
                x_mark_dec: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(self, x_enc, None, None, None, self.enc_in, None, None)
        if x_enc.shape[1] != self.seq_len:
            raise FormersError(f"DLinear: x_enc has {x_enc.shape[1]} steps, the model was built for seq_len "
                               f"{self.seq_len}")
        trend = moving_average(x_enc, self.kernel)  # (B, L, C)
        season = x_enc - trend
        y = (torch.einsum("cpl,blc->bpc", self.w_seasonal, season) + self.b_seasonal.T
             + torch.einsum("cpl,blc->bpc", self.w_trend, trend) + self.b_trend.T)  # (B, pred_len, C)
        return y[:, :, -self.c_out:]


__all__ = ["Informer", "InformerFull", "InformerStack", "RepeatLast", "DLinear", "DataEmbedding",
           "InformerAttention", "DistilLayer", "EncoderLayer", "DecoderLayer", "Encoder", "moving_average"]
