"""Magnitude pruning: the smallest |W| of the whole matrix (no calibration data)."""

from __future__ import annotations

import torch

from mosaic.prune.masks import n_of_m, smallest_k, target_count
from mosaic.stats import InputStats


def prune(weights: list[torch.Tensor], stats: InputStats | None, sparsities: list[float],
          nm: tuple[int, int] | None = None) -> list[dict]:
    for w, s in zip(weights, sparsities):
        score = w.abs()
        mask = n_of_m(score, *nm) if nm else smallest_k(score, target_count(w.numel(), s))
        w.masked_fill_(mask, 0)
    return [{} for _ in weights]
