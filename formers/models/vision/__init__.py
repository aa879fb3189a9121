"""Vision backbones (issue 6). Importing this package registers every model; one module per paper family."""

import importlib

# each backbone module registers its named sizes in the `model` family when imported
for _name in ("baselines", "vit", "efficientvit", "cvt", "poolformer", "t2t_vit", "tnt", "cct", "spectformer", "fmvit",
              "activator"):
    try:
        importlib.import_module(f"formers.models.vision.{_name}")
    except ModuleNotFoundError as e:  # a backbone module not written yet
        if e.name != f"formers.models.vision.{_name}":
            raise
