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
    threshold = kth_smallest(flat, k)
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:  # fill from the ties at the threshold, in index order
        ties = (flat == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor; the same value as ``kthvalue``, several times
    faster on large tensors: a strided sample brackets it, and only the values in the bracket are
    searched (ALPS selects over whole matrices at every iteration)."""
    n = flat.numel()
    if n < 1 << 16:
        return flat.kthvalue(k).values
    sample = flat[:: n // 8192].sort().values
    s = sample.numel()
    at = k / n * s
    margin = 4 * (at * (1 - k / n)) ** 0.5 + 2
    lo = sample[int(at - margin)] if at - margin >= 0 else flat.min()
    hi = sample[int(at + margin)] if at + margin < s else flat.max()
    below = int((flat < lo).count_nonzero())
    band = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + band.numel():
        return band.kthvalue(k - below).values
    return flat.kthvalue(k).values  # the sample misled us (heavy ties, adversarial order)


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
