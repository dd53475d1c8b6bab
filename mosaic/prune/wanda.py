"""Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖, compared within each output row; no weight update."""

from __future__ import annotations

import torch

from mosaic.prune.masks import n_of_m, row_counts, smallest_per_row, target_count
from mosaic.stats import InputStats


def scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * norms.to(weight.device).unsqueeze(0)


def prune(weights: list[torch.Tensor], stats: InputStats, sparsities: list[float],
          nm: tuple[int, int] | None = None, **_) -> list[dict]:
    norms = stats.norms()
    for w, s in zip(weights, sparsities):
        score = scores(w, norms)
        if nm:
            mask = n_of_m(score, *nm)
        else:
            mask = smallest_per_row(score, row_counts(score, target_count(w.numel(), s)))
        w.masked_fill_(mask, 0)
    return [{} for _ in weights]
