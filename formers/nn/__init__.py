"""Building blocks, one file per family. Importing this package registers them all."""

from formers.nn import act, attention, ffn, norm, position  # noqa: F401  (registration)
from formers.nn.hooks import aux_losses, report_aux, set_step

__all__ = ["aux_losses", "report_aux", "set_step"]
