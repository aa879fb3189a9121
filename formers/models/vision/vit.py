"""Vision Transformer (ViT), the vision baseline: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers
for Image Recognition at Scale" (ICLR 2021), https://arxiv.org/abs/2010.11929; sizes and conventions of timm's
`vision_transformer.py` (DeiT sizes: Touvron et al. 2021).

    z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos                  (eq. 1; E = conv patch embedding)
    z_l = Block_l(z_{l-1}),  l = 1..L                             (eqs. 2-3, Pre-LN: x + MSA(LN(x)), x + MLP(LN(x)))
    y   = Head(LN(z_L)[0])        'token' pooling (the class token; eq. 4)
    y   = Head(LN(mean_i z_L^i))  'avg' pooling over the patch tokens (timm's fc_norm: the norm after pooling)

The blocks are formers `Block`s built from a block spec exactly as in `lm`/`encoder`, so any registered mixer, ffn,
norm, placement or stack drops in: `vit_tiny(block={"mixer": {"name": "temperature", "temperature": 0.5}})` is P32's
temperature attention in a ViT. Model-level options fill the spec where it leaves them open: `heads` and the qkv
`bias` go to any mixer that takes them, LayerNorm eps 1e-6, MLP ratio 4 with exact GELU (timm's defaults).

Drop-path and layer-scale: `Block` has no per-branch hook, so after a block is built, each of its sublayers'
residuals r(x, u) is wrapped as r(x, DropPath(LayerScale(u))) (`BranchResidual`). Every placement (pre, post, peri,
lns) and residual (add, gru_gate) calls its residual with the branch output, so the block spec stays generic; for
pre-LN + add this is timm's x + drop_path(ls(f(norm(x)))).

Positions: 'learned' (`learned_2d`, resampled bicubically for other input sizes), 'sincos' (`sincos_2d`),
'rope' (axial `rope_2d` handed to every mixer) or 'none'. Weight init as timm's default: trunc-normal(0.02) linear
weights, zero biases, trunc-normal(0.02) learned positions, class token N(0, 1e-6), PyTorch's default for the
patch conv; components with their own `init_weights(std)` get std 0.02.

Paper options (formers/models/vision/vit_options.py, where the choices are explained):
    tap_scales=S                    P07 TAP: x + Attn(LN(TAP(x))) in every block, S dilated 3x3 means (1 = off)
    adl_weight, adl_threshold       P07 ADL: reports `adl` = weight * attention diversification loss while training
    ats_blocks, ats_tokens=K        P40 ATS: adaptive token sampling in those blocks; `model.last_kept` holds the
                                    kept counts per image after each of them (class token and 'token' pooling)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from formers.blocks import Block, PlainStack, build_stack, is_row_wise, layer_specs, merge_spec
from formers.models.vision.base import DropPath, LayerScale, VisionModel, drop_path_rates
from formers.models.vision.vit_options import TokenAwareAvgPool, ats_schedule, check_loop, install_tap, run_blocks
from formers.nn.hooks import clear_aux, methods_as_defined, plain_tree
from formers.nn.vision import LearnedPosition2d, PatchEmbed, RotaryPosition2d, SinCosPosition2d
from formers.registry import FormersError, build, get, register, split_spec

# ------------------------------------------------------------------------------------------------ building blocks


class BranchResidual(nn.Module):
    """A residual r(x, u) whose branch output u first passes layer-scale and drop-path: r(x, DropPath(gamma * u)).
    (B, N, D) -> (B, N, D)."""

    def __init__(self, residual: nn.Module, dim: int, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.residual = residual
        self.ls = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    @property
    def row_wise(self) -> bool:  # Block.prefix_ok: per-channel scale; drop-path draws per sample, none in eval
        return is_row_wise(self.residual) and not getattr(self.ls, "channels_first", False)

    def forward(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.drop_path(self.ls(update)))


def add_branch_scaling(block: nn.Module, dim: int, drop_path: float = 0.0, layer_scale: float | None = None
                       ) -> nn.Module:
    """Wrap the residual of every sublayer of a formers `Block` in a `BranchResidual`; returns the block.
    A no-op when drop_path == 0 and layer_scale is None."""
    if drop_path == 0.0 and layer_scale is None:
        return block
    for sub in (getattr(block, "attn", None), getattr(block, "ffn", None)):
        if sub is not None and hasattr(sub, "residual"):
            sub.residual = BranchResidual(sub.residual, dim, drop_path, layer_scale)
    return block


def fill_mixer(spec: Any, path: str, **defaults: Any) -> dict[str, Any]:
    """The mixer spec with the model-level `defaults` (e.g. heads, bias) added where the mixer takes that option
    and the spec does not set it."""
    name, opts = split_spec(spec, path)
    valid = get("mixer", name, path).options()
    return {"name": name, **{k: v for k, v in defaults.items() if k in valid and k not in opts}, **opts}


# -------------------------------------------------------------------------------------------------------- model


@register("model", "vit", paper="baseline")
class ViT(VisionModel):
    """Vision Transformer (Dosovitskiy et al. 2021): patch embedding + positions -> formers Blocks -> norm -> head.

    Images (B, in_chans, H, W), H and W multiples of `patch_size` -> logits (B, num_classes);
    forward_features -> tokens (B, prefix + (H/p)(W/p), dim), the class token first when `class_token`.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 dim: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 class_token: bool = True, global_pool: Literal["token", "avg", ""] = "token",
                 fc_norm: bool | None = None, pos_embed: Literal["learned", "sincos", "rope", "none"] = "learned",
                 rope_base: float = 100.0, block: dict | None = None, layers: dict | None = None,
                 stack: Any = "plain", drop_path: float = 0.0, layer_scale: float | None = None,
                 pos_drop: float = 0.0, head_drop: float = 0.0, norm_eps: float = 1e-6, tap_scales: int = 1,
                 adl_weight: float = 0.0, adl_threshold: float = 2.0, ats_blocks: list[int] | None = None,
                 ats_tokens: int | list[int] | None = None):
        """Paper options: `tap_scales` (P07 TAP, S scales, 1 = off), `adl_weight`/`adl_threshold` (P07 ADL, th),
        `ats_blocks`/`ats_tokens` (P40 ATS: the sampling blocks and K, one or one per block; None = the number of
        tokens entering the blocks, the official setting). See vit_options.py."""
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise FormersError(f"vit: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise FormersError("vit: global_pool='token' needs class_token=True; or set global_pool='avg'")
        if pos_embed not in ("learned", "sincos", "rope", "none"):
            raise FormersError(f"vit: pos_embed must be 'learned', 'sincos', 'rope' or 'none', got {pos_embed!r}")
        if min(img_size, patch_size, in_chans, dim, depth, heads) <= 0:
            raise FormersError("vit: img_size, patch_size, in_chans, dim, depth and heads must be positive")
        if img_size % patch_size:
            raise FormersError(f"vit: img_size={img_size} is not a multiple of patch_size={patch_size}")
        if tap_scales < 1 or adl_weight < 0 or adl_threshold <= 0:
            raise FormersError("vit: tap_scales must be >= 1, adl_weight >= 0 and adl_threshold > 0")
        self.ats = ats_schedule(ats_blocks, ats_tokens, depth)  # {block: K or None}
        if self.ats and (not class_token or global_pool != "token" or pos_embed == "rope"):
            raise FormersError("vit: ats_blocks needs class_token=True, global_pool='token' and a position that is "
                               "added to the input ('learned', 'sincos' or 'none'): sampled tokens are reordered")
        if self.ats and (tap_scales > 1 or adl_weight > 0):
            raise FormersError("vit: ats_blocks does not combine with tap_scales > 1 or adl_weight > 0 (sampled "
                               "tokens leave the grid); use ATS or TAP/ADL")
        self.tap_scales, self.adl_weight, self.adl_threshold = tap_scales, adl_weight, adl_threshold
        self.last_kept: list[torch.Tensor] = []  # ATS: kept token counts (B,) after each sampling block
        self.img_size, self.patch_size, self.in_chans, self.num_classes = img_size, patch_size, in_chans, num_classes
        self.other_size = img_size + patch_size  # any multiple of the patch works; positions are resampled
        self.dim = self.num_features = dim
        self.depth, self.heads, self.global_pool = depth, heads, global_pool
        self.num_prefix = int(class_token)
        grid = (img_size // patch_size,) * 2

        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_kind = pos_embed
        if pos_embed == "learned":
            self.pos = LearnedPosition2d(dim, grid=grid, prefix=self.num_prefix)
        elif pos_embed == "sincos":
            self.pos = SinCosPosition2d(dim, grid=grid, prefix=self.num_prefix)
        elif pos_embed == "rope":
            self.pos = RotaryPosition2d(dim, base=rope_base)
        else:
            self.pos = None
        self.pos_drop = nn.Dropout(pos_drop)

        # heads in the default mixer: otherwise the block defaults' own head count would win over `heads`
        defaults = {"norm": {"name": "layernorm", "eps": norm_eps}, "mixer": {"name": "softmax", "heads": heads},
                    "ffn": {"name": "mlp", "mult": mlp_ratio, "act": "gelu"}}
        specs = layer_specs(merge_spec(defaults, block or {}), layers, depth)
        for i, s in enumerate(specs):
            s["mixer"] = fill_mixer(s["mixer"], "model.block.mixer" if i == 0 else f"model.layers[{i}].mixer",
                                    heads=heads, bias=qkv_bias)
        rates = drop_path_rates(drop_path, depth)
        n_tokens = self.num_prefix + grid[0] * grid[1]

        def make_block(i: int) -> nn.Module:
            b = Block(dim, False, specs[i], path="model.block" if specs[i] == specs[0] else f"model.layers[{i}]",
                      max_len=n_tokens, layer=i)
            return add_branch_scaling(b, dim, rates[i], layer_scale)

        self.stack = build_stack(stack, depth, make_block)
        first = next(m for m in self.stack.modules() if isinstance(m, Block))
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        def norm() -> nn.Module:
            return build("norm", specs[0]["norm"], path="model.block.norm", reserved=("dim",), dim=dim)

        self.norm = norm() if first.final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = norm() if first.final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if self.ats or adl_weight > 0:
            check_loop(self.stack)
        if tap_scales > 1:  # after the init, so that the other weights equal those of the plain ViT (same seed)
            install_tap(self.stack, dim, tap_scales, self.num_prefix)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif m is not self and hasattr(m, "init_weights"):
                m.init_weights(std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.stack.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes). With class-token pooling in evaluation mode only the
        class token's row of the last block is computed (`Block.forward_prefix`): the logits are the same, about
        1/depth of the work is skipped. `forward_features` always returns every token."""
        if self._class_token_only():
            return self.forward_head(self.forward_features(x, last_rows=1))  # forward_features checks x
        return super().forward(x)

    def _class_token_only(self) -> bool:
        """The last block may stop at the class token's row: evaluation, 'token' pooling, a plain stack of formers
        Blocks without ATS/TAP or rotary positions, a last block that allows it, no hooks on the stack or norm."""
        if self.training or self.global_pool != "token" or self.ats or self.tap_scales > 1 or self.pos_kind == "rope":
            return False
        # a subclass's, a patched class's or an instance's own features, pooling or head would not see the
        # shortened last block
        if not methods_as_defined(self, ViT, _VIT_METHODS):
            return False  # the final norm: no hooks or replacement, in evaluation (batch statistics: every row)
        return type(self.stack) is PlainStack and self.stack.prefix_ok() and plain_tree(self.norm, evaluating=True)

    def forward_features(self, x: torch.Tensor, last_rows: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, prefix + (H/p)(W/p), D) after the final norm (if any); with ATS,
        (B, M, D): the class token, the kept tokens, then filler rows (counts in `last_kept[-1]`). `last_rows=n`
        (used by `forward`, only where `_class_token_only()`) returns only the first n tokens, computed by the last
        block for those rows alone."""
        self.check_input(x)
        clear_aux(self)  # auxiliary losses describe this forward pass only
        grid = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)  # (B, h*w, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h*w, D)
        positions = None
        if self.pos_kind in ("learned", "sincos"):
            x = self.pos(x, grid=grid)
        elif self.pos_kind == "rope":
            positions = self.pos.bind(grid, self.num_prefix)
        x = self.pos_drop(x)
        if self.tap_scales > 1:
            for m in self.modules():
                if isinstance(m, TokenAwareAvgPool):
                    m.grid = grid
        if self.ats or (self.adl_weight > 0 and self.training):
            x = run_blocks(self, x, positions)  # ATS: (B, M, D) with zero filler rows past `last_kept`
        elif last_rows is not None:
            x = self.stack.forward_prefix(x, last_rows)  # (B, last_rows, D)
        else:
            x = self.stack(x, positions=positions)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix:].mean(dim=1)  # patch tokens only (timm)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)


# ----------------------------------------------------------------------------------------------------- configs

# name -> (patch, dim, depth, heads); timm's vision_transformer.py configs (ViT paper Table 1 for base/large,
# DeiT for tiny/small)
VIT_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny_patch16_224": (16, 192, 12, 3),
    "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_large_patch16_224": (16, 1024, 24, 16),
}


def _named(name: str, *, num_classes: int, in_chans: int, img_size: int, drop_path: float, pos_embed: str,
           global_pool: str, block: dict | None, layers: dict | None, layer_scale: float | None) -> ViT:
    patch, dim, depth, heads = VIT_CONFIGS[name]
    return ViT(img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=num_classes, dim=dim,
               depth=depth, heads=heads, class_token=True, global_pool=global_pool, pos_embed=pos_embed,
               block=block, layers=layers, drop_path=drop_path, layer_scale=layer_scale)


def _register_named(name: str) -> None:
    def factory(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, drop_path: float = 0.0,
                pos_embed: Literal["learned", "sincos", "rope", "none"] = "learned",
                global_pool: Literal["token", "avg"] = "token", block: dict | None = None,
                layers: dict | None = None, layer_scale: float | None = None) -> ViT:
        return _named(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_path=drop_path,
                      pos_embed=pos_embed, global_pool=global_pool, block=block, layers=layers,
                      layer_scale=layer_scale)

    patch, dim, depth, heads = VIT_CONFIGS[name]
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"ViT (Dosovitskiy et al. 2021) at timm's `{name}` size: patch {patch}, dim {dim}, depth "
                       f"{depth}, heads {heads}, class token, learned positions.")
    register("model", name, paper="baseline")(factory)


for _name in VIT_CONFIGS:
    _register_named(_name)


@register("model", "vit_tiny", paper="baseline")
def vit_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path: float = 0.0,
             pos_embed: Literal["learned", "sincos", "rope", "none"] = "learned",
             global_pool: Literal["token", "avg"] = "avg", block: dict | None = None, layers: dict | None = None,
             layer_scale: float | None = None, dim: int = 96, depth: int = 6, heads: int = 3) -> ViT:
    """ViT for 28x28 Fashion-MNIST: patch 4 (7x7 = 49 tokens), dim 96, depth 6, heads 3 (~0.68M parameters) by
    default; `dim`, `depth`, `heads` size it.

    Choice: global average pooling without a class token by default (Beyer et al. 2022, "Better plain ViT baselines
    for ImageNet-1k", find it learns faster than the class token in short schedules); `global_pool='token'` adds
    the class token."""
    return ViT(img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=num_classes, dim=dim, depth=depth,
               heads=heads, class_token=global_pool == "token", global_pool=global_pool, pos_embed=pos_embed,
               block=block, layers=layers, drop_path=drop_path, layer_scale=layer_scale)


# ------------------------------------------------------------------------------------ paper options, registered


@register("model", "vit_tap_tiny", paper="P07")
def vit_tap_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path: float = 0.0,
                 tap_scales: int = 4, adl_weight: float = 1.0, adl_threshold: float = 2.0) -> ViT:
    """`vit_tiny` with P07's TAP in every block and ADL while training, at the official defaults (TAPADL_RVT
    main.py: --num-scales 4, --threshold 2, --adloss 1); average pooling without a class token, as RVT."""
    return ViT(img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=num_classes, dim=96, depth=6,
               heads=3, class_token=False, global_pool="avg", drop_path=drop_path, tap_scales=tap_scales,
               adl_weight=adl_weight, adl_threshold=adl_threshold)


@register("model", "vit_ats_tiny", paper="P40")
def vit_ats_tiny(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path: float = 0.0,
                 ats_blocks: list[int] | None = None, ats_tokens: int | list[int] | None = None) -> ViT:
    """`vit_tiny` with a class token and P40's ATS in blocks 2-5 of 6 (default; DeiT-S samples in 3-11 of 12),
    K = the number of input tokens (None; DeiT-S: 197 = all) as in the official DeiT-S config."""
    return ViT(img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=num_classes, dim=96, depth=6,
               heads=3, class_token=True, global_pool="token", drop_path=drop_path,
               ats_blocks=[2, 3, 4, 5] if ats_blocks is None else ats_blocks, ats_tokens=ats_tokens)


_VIT_METHODS = {k: vars(ViT)[k] for k in ("forward_features", "pool", "forward_head")}  # as defined, for the shortcut


@register("model", "vit_small_patch16_224_ats", paper="P40")
def vit_small_patch16_224_ats(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                              drop_path: float = 0.0, ats_tokens: int | list[int] | None = None) -> ViT:
    """DeiT-S (= `vit_small_patch16_224`) with ATS in blocks 3-11 and K = 197 (None: all input tokens), the
    official configs/ImageNet/DeiT_S.yaml (ATS_BLOCKS [3..11], NUM_TOKENS 197, DROP_TOKENS True); no parameters
    are added."""
    patch, dim, depth, heads = VIT_CONFIGS["vit_small_patch16_224"]
    return ViT(img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=num_classes, dim=dim,
               depth=depth, heads=heads, class_token=True, global_pool="token", drop_path=drop_path,
               ats_blocks=list(range(3, 12)), ats_tokens=ats_tokens)


__all__ = ["ViT", "BranchResidual", "add_branch_scaling", "fill_mixer", "VIT_CONFIGS", "vit_tiny", "vit_tap_tiny",
           "vit_ats_tiny", "vit_small_patch16_224_ats"]
