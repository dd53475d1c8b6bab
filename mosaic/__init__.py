"""Mosaic: composite projection pruning for LLaMA-family language models."""

__version__ = "0.1.0"


def load_pretrained(directory: str, *, dtype: str = "float32", device: str = "cpu"):
    """Load a checkpoint saved by Mosaic (also composite ones with per-layer widths) as a model."""
    from mosaic.load import load_pretrained as _load

    return _load(directory, dtype=dtype, device=device)
