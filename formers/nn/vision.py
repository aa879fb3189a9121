"""Shared vision parts: patch embedding and 2-D positions (family `position`: `learned_2d`, `sincos_2d`, `rope_2d`).

    PatchEmbed         (B, C, H, W) -> (B, N, D) tokens, N = (H/p)(W/p): a conv with kernel = stride = patch p
    resample_grid      bicubic resampling of a (h*w, D) table of grid positions to another grid (timm's
                       `resample_abs_pos_embed`), so that learned positions serve other input sizes
    sincos_2d_table    the fixed 2-D sin-cos table of MAE / MoCo v3: half the channels for the column, half for the row
    LearnedPosition2d  learned (prefix + h*w, D) positions, resampled on the fly for another grid      (`learned_2d`)
    SinCosPosition2d   fixed 2-D sin-cos positions; prefix (class) tokens get zeros                   (`sincos_2d`)
    RotaryPosition2d   axial 2-D RoPE: half of each head's dims rotate with the row, half with the column (`rope_2d`)

Tokens are laid out row-major after `prefix` extra tokens (class/distillation tokens): token t >= prefix sits at
row (t - prefix) // w, column (t - prefix) % w of an h x w grid.

Absolute 2-D positions keep the `position` family contract (`__init__(dim, max_len)`, forward(x, offset) adds to
x) with an extra `grid` argument; without one, the grid is the square that `max_len - prefix` tokens fill. The 2-D
RoPE is a relative encoding: a model hands `rope.bind(grid, prefix)` to every token mixer as its `positions`, and
the mixers' usual `positions.rotate(q, k, q_pos, k_pos)` call maps token indices to grid cells.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formers.registry import FormersError, build, register


def pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int side or an (h, w) pair -> (h, w)."""
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(s, int) for s in v):
        return int(v[0]), int(v[1])
    raise FormersError(f"expected a side (int) or an (height, width) pair, got {v!r}")


# ------------------------------------------------------------------------------------------------- patch embed


class PatchEmbed(nn.Module):
    """Conv patch embedding (ViT, Dosovitskiy et al. 2021): split the image into p x p patches and project each
    one linearly, i.e. a conv with kernel = stride = p. (B, C, H, W) -> (B, (H/p)(W/p), D) tokens (row-major),
    or the (B, D, H/p, W/p) map with `flatten=False`; `norm` (a norm spec, e.g. "layernorm") acts on the tokens.
    H and W must be multiples of p (FormersError otherwise)."""

    def __init__(self, in_chans: int = 3, dim: int = 768, patch_size: int | tuple[int, int] = 16,
                 norm: Any = None, bias: bool = True, flatten: bool = True):
        super().__init__()
        self.patch_size = pair(patch_size)
        if min(self.patch_size) <= 0 or in_chans <= 0 or dim <= 0:
            raise FormersError(f"patch embed: patch_size, in_chans and dim must be positive, got "
                               f"{self.patch_size}, {in_chans}, {dim}")
        self.in_chans, self.dim, self.flatten = in_chans, dim, flatten
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = build("norm", norm, path="patch_embed.norm", dim=dim) if norm else nn.Identity()

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) of an image of this size."""
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise FormersError(f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}; "
                               f"resize or pad the images")
        return height // ph, width // pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(x.shape[-2], x.shape[-1])
        x = self.proj(x)  # (B, D, h, w)
        if not self.flatten:
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # norm over channels, map kept
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, D)


# ------------------------------------------------------------------------------------------- learned positions


def resample_grid(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int], mode: str = "bicubic",
                  antialias: bool = True) -> torch.Tensor:
    """Resample a row-major (h*w, D) table of grid positions to another grid -> (h'*w', D).

    The table is read as a D-channel h x w image and interpolated (timm's `resample_abs_pos_embed`: bicubic with
    antialiasing, in float32 or float64, back to the table's dtype); `align_corners=False`, so each cell keeps its
    relative place in the image. A same-size call returns the table unchanged."""
    (h, w), (nh, nw) = pair(old), pair(new)
    if table.shape[0] != h * w:
        raise FormersError(f"resample_grid: table has {table.shape[0]} rows, not {h}x{w}")
    if (h, w) == (nh, nw):
        return table
    dt = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
    img = table.to(dt).reshape(1, h, w, -1).permute(0, 3, 1, 2)  # (1, D, h, w)
    img = F.interpolate(img, size=(nh, nw), mode=mode, antialias=antialias and mode in ("bilinear", "bicubic"),
                        align_corners=False if mode in ("bilinear", "bicubic") else None)
    return img.permute(0, 2, 3, 1).reshape(nh * nw, -1).to(table.dtype)  # (nh*nw, D)


def _default_grid(max_len: int, prefix: int, grid) -> tuple[int, int]:
    if grid is not None:
        return pair(grid)
    side = math.isqrt(max(max_len - prefix, 0))
    if side * side != max_len - prefix or side == 0:
        raise FormersError(f"position: {max_len - prefix} grid tokens do not fill a square; set grid=(h, w)")
    return side, side


@register("position", "learned_2d", paper="baseline")
class LearnedPosition2d(nn.Module):
    """Learned absolute positions over a 2-D token grid (ViT): x + P, P (prefix + h*w, D), prefix rows first.

    Another grid (another input size) is served by `resample_grid` on the fly (bicubic, as timm's dynamic image
    size); `resample(new_grid)` does it once and keeps the result (fine-tuning at a new resolution, ViT §3.2).
    The prefix (class-token) rows are never resampled. (B, prefix + h*w, D) -> same.
    """

    kind = "absolute"

    def __init__(self, dim: int, max_len: int = 1024, grid: int | tuple[int, int] | None = None, prefix: int = 0,
                 mode: str = "bicubic"):
        super().__init__()
        if prefix < 0:
            raise FormersError(f"position: prefix must be >= 0, got {prefix}")
        self.grid, self.prefix, self.mode = _default_grid(max_len, prefix, grid), prefix, mode
        self.emb = nn.Parameter(torch.zeros(prefix + self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.emb, std=0.02)

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.emb, std=std)

    def table(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The (prefix + h*w, D) positions for `grid` (default: the trained grid)."""
        grid = self.grid if grid is None else pair(grid)
        head, body = self.emb[: self.prefix], self.emb[self.prefix:]
        return torch.cat([head, resample_grid(body, self.grid, grid, self.mode)], dim=0)

    def resample(self, new_grid: int | tuple[int, int]) -> LearnedPosition2d:
        """Replace the learned table by its resampling to `new_grid`, in place; returns self."""
        new_grid = pair(new_grid)
        with torch.no_grad():
            table = self.table(new_grid)
        self.emb = nn.Parameter(table)
        self.grid = new_grid
        return self

    def forward(self, x: torch.Tensor, offset: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return x + _checked(self, x, offset, grid, self.table(grid))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix={self.prefix}"


def _checked(pos: nn.Module, x: torch.Tensor, offset: int, grid, table: torch.Tensor) -> torch.Tensor:
    if offset:
        raise FormersError(f"{type(pos).__name__}: 2-D positions have no offset (no decoding cache); got {offset}")
    if x.shape[1] != table.shape[0]:
        g = pos.grid if grid is None else pair(grid)
        raise FormersError(f"{type(pos).__name__}: {x.shape[1]} tokens do not match prefix {pos.prefix} + grid "
                           f"{g[0]}x{g[1]}; pass the token grid (grid=(h, w))")
    return table.to(x.dtype)


# ------------------------------------------------------------------------------------------------ 2-D sin-cos


def sincos_2d_table(dim: int, grid: int | tuple[int, int], base: float = 10000.0,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE `util/pos_embed.py` get_2d_sincos_pos_embed; MoCo v3): (h*w, dim).

    For the cell (r, c) and i < dim/4, with omega_i = base^(-i / (dim/4)):
        P[:, 0:dim/4] = sin(c omega),  P[:, dim/4:dim/2] = cos(c omega),     (the column: MAE's "w goes first")
        P[:, dim/2:3dim/4] = sin(r omega),  P[:, 3dim/4:] = cos(r omega).    (the row)
    """
    if dim % 4:
        raise FormersError(f"sincos_2d positions need dim divisible by 4, got {dim}")
    h, w = pair(grid)
    q = dim // 4
    omega = base ** (-torch.arange(q, dtype=torch.float64, device=device) / q)  # (dim/4,)
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)  # (h*w,) row-major
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    ac, ar = cols[:, None] * omega, rows[:, None] * omega  # (h*w, dim/4) each
    return torch.cat([ac.sin(), ac.cos(), ar.sin(), ar.cos()], dim=1).to(dtype)


@register("position", "sincos_2d", paper="baseline")
class SinCosPosition2d(nn.Module):
    """Fixed 2-D sin-cos positions (MAE, He et al. 2022; MoCo v3, Chen et al. 2021): x + P, P from
    `sincos_2d_table` for any grid; prefix (class) tokens get zeros (MAE's cls row). No parameters.
    (B, prefix + h*w, D) -> same."""

    kind = "absolute"

    def __init__(self, dim: int, max_len: int = 1024, grid: int | tuple[int, int] | None = None, prefix: int = 0,
                 base: float = 10000.0):
        super().__init__()
        if dim % 4:
            raise FormersError(f"sincos_2d positions need dim divisible by 4, got {dim}")
        self.dim, self.grid, self.prefix, self.base = dim, _default_grid(max_len, prefix, grid), prefix, base

    def table(self, grid: tuple[int, int] | None = None, dtype=torch.float32, device=None) -> torch.Tensor:
        body = sincos_2d_table(self.dim, self.grid if grid is None else grid, self.base, dtype, device)
        return torch.cat([body.new_zeros(self.prefix, self.dim), body], dim=0)  # (prefix + h*w, D)

    def forward(self, x: torch.Tensor, offset: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return x + _checked(self, x, offset, grid, self.table(grid, x.dtype, x.device))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix={self.prefix}, base={self.base}"


# --------------------------------------------------------------------------------------------------- 2-D RoPE


def rotate_2d(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Axial 2-D rotary embedding of heads x (..., N, Dh) at grid cells (rows, cols) (N,) each; Dh % 4 == 0.

    The first Dh/2 dims rotate with the row, the last Dh/2 with the column; inside each half, dim i pairs with
    i + Dh/4 (the rotate-half layout of formers' `rope`) and turns by angle pos * theta_i, theta_i = base^(-4i/Dh),
    i < Dh/4 (RoPE-ViT axial frequencies, Heo et al. 2024, naver-ai/rope-vit `compute_axial_cis`)."""
    dh = x.shape[-1]
    if dh % 4:
        raise FormersError(f"rope_2d needs a head dim divisible by 4, got {dh}")
    half, quarter = dh // 2, dh // 4
    ft = torch.float64 if x.dtype == torch.float64 else torch.float32
    theta = base ** (-torch.arange(quarter, device=x.device, dtype=ft) / quarter)  # (Dh/4,)
    out = []
    for part, pos in ((x[..., :half], rows), (x[..., half:], cols)):
        ang = pos.to(ft)[:, None] * theta  # (N, Dh/4)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        a, b = part[..., :quarter], part[..., quarter:]
        out += [a * cos - b * sin, b * cos + a * sin]
    return torch.cat(out, dim=-1)


class GridRotary:
    """A `rope_2d` bound to one token grid: the `positions` object token mixers receive (kind 'relative').
    Token index t < prefix is not rotated; t >= prefix sits at (row, col) = divmod(t - prefix, w)."""

    kind = "relative"
    has_bias = False

    def __init__(self, grid: tuple[int, int], prefix: int, base: float):
        self.grid, self.prefix, self.base = pair(grid), prefix, base

    def cells(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = (pos - self.prefix).clamp_min(0)  # prefix tokens -> cell (0, 0): angle 0, i.e. not rotated
        return torch.div(j, self.grid[1], rounding_mode="floor"), j % self.grid[1]

    def rotate(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        return rotate_2d(q, *self.cells(q_pos), self.base), rotate_2d(k, *self.cells(k_pos), self.base)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: int) -> None:
        return None


@register("position", "rope_2d", paper="baseline")
class RotaryPosition2d(nn.Module):
    """Axial 2-D rotary position embedding (RoPE-ViT "Rotary Position Embedding for Vision Transformer", Heo et al.,
    ECCV 2024, RoPE-Axial): q, k heads rotated by `rotate_2d`, so the score q_m . k_n depends on the grid cells only
    through (row_m - row_n, col_m - col_n). No parameters; any grid size.

    A relative encoding: a vision model passes `bind(grid, prefix)` to its mixers as `positions`. Used unbound (in
    a 1-D sequence model) it raises FormersError, since token indices alone do not say where the rows break.
    UNCERTAIN/choice: base 100 (rope-vit's default theta for the axial form; 10000 barely turns on small grids).
    """

    kind = "relative"
    has_bias = False

    def __init__(self, dim: int, max_len: int = 1024, base: float = 100.0):
        super().__init__()
        self.base = base

    def bind(self, grid: tuple[int, int], prefix: int = 0) -> GridRotary:
        return GridRotary(grid, prefix, self.base)

    def rotate(self, q, k, q_pos, k_pos):
        raise FormersError("rope_2d needs the 2-D token grid: use it in a vision model (position 'rope' of vit) or "
                           "pass rope.bind((h, w), prefix) as the mixer's positions; for 1-D sequences use 'rope'")

    def bias(self, q_pos, k_pos, heads):
        return None

    def extra_repr(self) -> str:
        return f"base={self.base}"


__all__ = ["PatchEmbed", "resample_grid", "sincos_2d_table", "rotate_2d", "LearnedPosition2d", "SinCosPosition2d",
           "RotaryPosition2d", "GridRotary", "pair"]
