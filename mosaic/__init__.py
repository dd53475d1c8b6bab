"""Mosaic: composite projection pruning for LLaMA-family language models."""

__version__ = "0.1.0"
