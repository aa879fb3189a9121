"""Assembled models. Importing this package registers them."""

from formers.models import encoder, lm  # noqa: F401
