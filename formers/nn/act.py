"""Activations (family `act`). Each is a module so that learnable ones (later issues) fit the same slot."""

from torch import nn

from formers.registry import register


@register("act", "gelu", paper="baseline")
class GELU(nn.GELU):
    """GELU, x * Phi(x) (Hendrycks & Gimpel); `approximate='tanh'` for the GPT-2 form."""

    def __init__(self, approximate: str = "none"):
        super().__init__(approximate=approximate)


@register("act", "relu", paper="baseline")
class ReLU(nn.ReLU):
    """ReLU, max(0, x)."""

    def __init__(self):
        super().__init__()


@register("act", "silu", paper="baseline", aliases=("swish",))
class SiLU(nn.SiLU):
    """SiLU / Swish, x * sigmoid(x)."""

    def __init__(self):
        super().__init__()
