"""Compression and re-parameterisation that work on any formers model: converters to cheaper equivalents."""
