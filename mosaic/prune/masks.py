"""Mask selection shared by the kernels. A mask is a bool tensor: True = prune this weight.

Every selection is exact: asked to prune ``k`` entries it prunes exactly ``k`` (ties broken by
position), so achieved sparsity equals the requested one to within one weight per matrix.
"""

from __future__ import annotations

import torch


def target_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity asks to prune (rounded, so 0.7 of 10 is 7)."""
    return int(round(numel * sparsity))


def smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest entries of ``scores`` (any shape); ties go to the earlier index."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:  # fill from the ties at the threshold, in index order
        ties = (flat == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def row_counts(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Split ``k`` prunes over rows as evenly as possible: every row gets k // rows, and the k % rows
    rows whose next-smallest score is lowest get one more."""
    rows, cols = scores.shape
    base, extra = divmod(k, rows)
    counts = torch.full((rows,), base, dtype=torch.long, device=scores.device)
    if extra:
        next_best = scores.sort(dim=1, stable=True).values[:, base]
        counts[smallest_k(next_best, extra)] += 1
    return counts.clamp_(max=cols)


def smallest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the ``counts[r]`` smallest entries of each row r (stable: ties to the earlier column)."""
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, ranks < counts.unsqueeze(1))
    return mask


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M pattern: in every group of ``m`` consecutive input columns of each row, prune the ``n``
    smallest. Requires the column count to be a multiple of ``m``."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs in_features ({cols}) divisible by M ({m})")
    groups = scores.reshape(rows, cols // m, m)
    idx = groups.argsort(dim=2, stable=True)[..., :n]  # stable: ties to the earlier column
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)
