"""Compression and re-parameterisation that work on any formers model: converters to cheaper equivalents."""

from formers.compress.prenorm import convert_run, to_precrmsnorm, to_prermsnorm

__all__ = ["convert_run", "to_precrmsnorm", "to_prermsnorm"]
