"""Vision backbones. Importing this package registers every model; one module per paper family."""

from formers.models.vision import (  # noqa: F401  (registration)
    activator,
    baselines,
    cct,
    cvt,
    efficientvit,
    fmvit,
    poolformer,
    spectformer,
    t2t_vit,
    tnt,
    vit,
)
