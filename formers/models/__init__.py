"""Assembled models. Importing this package registers them."""

from formers import stacks  # noqa: F401  (registers the stack family beyond `plain`)
from formers.models import encoder, informer, lm, vision  # noqa: F401
