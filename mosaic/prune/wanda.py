"""Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖, compared within each output row; no weight update."""

from __future__ import annotations

import torch

from mosaic.prune.masks import n_of_m, row_counts, smallest_per_row, target_count
from mosaic.stats import InputStats


def scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * norms.to(weight.device).unsqueeze(0)


def prune(weights: list[torch.Tensor], stats: InputStats, sparsities: list[float],
          nm: tuple[int, int] | None = None, forced_columns: torch.Tensor | None = None) -> list[dict]:
    """``forced_columns`` (bool, per input column): removed whole; the sparsity applies to the rest."""
    norms = stats.norms()
    for w, s in zip(weights, sparsities):
        score = scores(w, norms)
        if nm:
            mask = n_of_m(score, *nm)
        elif forced_columns is not None:
            forced = forced_columns.to(w.device)
            score[:, forced] = float("inf")
            kept = w.shape[0] * int((~forced).sum())
            mask = smallest_per_row(score, row_counts(score[:, ~forced], target_count(kept, s)))
            mask[:, forced] = True
        else:
            mask = smallest_per_row(score, row_counts(score, target_count(w.numel(), s)))
        w.masked_fill_(mask, 0)
    return [{} for _ in weights]
