"""Compression and re-parameterisation that work on any formers model: converters to cheaper equivalents."""

from formers.compress.moefy import balanced_kmeans, cluster_neurons, moefy, moefy_model, moefy_run
from formers.compress.prenorm import convert_run, to_precrmsnorm, to_prermsnorm

__all__ = ["convert_run", "to_precrmsnorm", "to_prermsnorm", "moefy", "moefy_model", "moefy_run", "cluster_neurons",
           "balanced_kmeans"]
