"""Building blocks, one file per family. Importing this package registers them all."""

from formers.nn import (  # noqa: F401  (registration)
    act,
    attention,
    batchnorm,
    ffn,
    linear_attention,
    lra_baselines,
    memory,
    moduleformer,
    moe,
    mohd,
    norm,
    position,
    residual,
    softmax_variants,
    sparse_attention,
    vision,
)
from formers.nn.hooks import aux_losses, clear_aux, report_aux, set_step

__all__ = ["aux_losses", "clear_aux", "report_aux", "set_step"]
