"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with lazy blocked updates.

Numerics as the reference: fp32 Hessian H = XᵀX/n, dead inputs (H_jj = 0) zeroed, damping
``percdamp · mean(diag H)``, the upper Cholesky factor U of H⁻¹, column blocks of 128 whose mask is
chosen at block start from the already-updated weights by w²/U_jj² (N:M: every M columns).

Two changes, neither altering the result of the reference algorithm:
- Projections that share an input (q/k/v, gate/up) share H, so their rows are stacked and solved in
  one pass (each row's update only involves that row); masks are still chosen per projection.
- Each projection prunes exactly round(s·numel) weights: its per-block budgets are the differences
  of the rounded cumulative target, instead of the reference's '≤ threshold' that over-prunes on ties.
A Cholesky failure retries with 10× more damping (up to 1e4 × percdamp) and is reported.
"""

from __future__ import annotations

import torch

from mosaic.prune.masks import n_of_m, smallest_k
from mosaic.stats import InputStats


def inverse_cholesky(hessian: torch.Tensor, percdamp: float, tries: int = 5) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, escalating damp on failure."""
    mean_diag = hessian.diagonal().mean()
    damp = percdamp
    for _ in range(tries):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    raise RuntimeError(f"Cholesky failed even with damping {damp / 10:g} × mean diagonal")


def factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The dead inputs (H_jj = 0, set to 1 in ``H``) and the upper Cholesky factor of the damped H⁻¹."""
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    U, damp = inverse_cholesky(H, percdamp)
    return U, damp, dead


def cached_factor(stats: InputStats, percdamp: float,
                  device: torch.device) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``factor`` of these statistics' Hessian, computed on ``device`` once and kept with the statistics
    (where they live): pruning the group again at another sparsity reuses it, bit for bit."""
    key = ("sparsegpt", percdamp)
    if key not in stats.derived:
        U, damp, dead = factor(stats.hessian().to(device), percdamp)
        stats.derived[key] = (U.to(stats.device), damp, dead.to(stats.device))
    U, damp, dead = stats.derived[key]
    return U.to(device), damp, dead.to(device)


def _block_budget(rows: int, sparsity: float, i1: int, i2: int) -> int:
    """Prunes due in columns [i1, i2) so that the running total tracks round(s · rows · columns)."""
    return int(round(sparsity * rows * i2)) - int(round(sparsity * rows * i1))


def sweep(W: torch.Tensor, U: torch.Tensor, segments: list[tuple[int, int, float]],
          nm: tuple[int, int] | None, blocksize: int, forced: int = 0) -> None:
    """Prune W [rows, cols] in place. ``segments`` are (row_start, row_end, sparsity) per projection.

    The first ``forced`` columns are removed whole (structured pruning); the sparsities then apply to
    the remaining columns, and the OBS updates move the removed columns' contribution onto them.
    """
    rows, cols = W.shape
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        W1 = W[:, i1:i2].t().contiguous()  # [count, rows]: one column of W is one contiguous row here
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if i1 < forced:
            mask[: min(i2, forced) - i1] = True
        if nm is None:
            score = W1.square() / d.square().unsqueeze(1)
            lo = max(forced - i1, 0)  # first column of this block open to selection
            for r0, r1, s in segments:
                budget = _block_budget(r1 - r0, s, max(i1 - forced, 0), max(i2 - forced, 0))
                if lo < i2 - i1:
                    mask[lo:, r0:r1] = smallest_k(score[lo:, r0:r1], budget)
        scaled = mask / d.unsqueeze(1)  # err_j = w_j · mask_j / d_j
        err = torch.empty_like(W1)
        for j in range(i2 - i1):
            if nm and j % nm[1] == 0:
                group = W1[j:j + nm[1]].square() / d[j:j + nm[1]].square().unsqueeze(1)
                mask[j:j + nm[1]] = n_of_m(group.t().contiguous(), *nm).t()
                scaled[j:j + nm[1]] = mask[j:j + nm[1]] / d[j:j + nm[1]].unsqueeze(1)
            torch.mul(W1[j], scaled[j], out=err[j])
            W1[j:].addr_(U1[j, j:], err[j], alpha=-1)
        W[:, i1:i2] = W1.masked_fill_(mask, 0).t()
        if i2 < cols:
            W[:, i2:].addmm_(err.t(), U[i1:i2, i2:], alpha=-1)


def prune(weights: list[torch.Tensor], stats: InputStats, sparsities: list[float],
          nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
          forced_columns: torch.Tensor | None = None) -> list[dict]:
    """``forced_columns`` (bool, per input column): columns removed whole, with OBS compensation."""
    W = torch.cat([w.float() for w in weights], dim=0)
    order, forced = None, 0
    if forced_columns is not None and bool(forced_columns.any()):
        if nm is not None:
            raise ValueError("N:M cannot be combined with structured column removal")
        forced_columns = forced_columns.to(W.device)
        order = torch.cat([forced_columns.nonzero().squeeze(1), (~forced_columns).nonzero().squeeze(1)])
        forced = int(forced_columns.sum())
        W = W[:, order]
        U, damp, dead = factor(stats.hessian().to(W.device)[order][:, order], percdamp)
    else:
        U, damp, dead = cached_factor(stats, percdamp, W.device)
    W[:, dead] = 0
    segments, r0 = [], 0
    for w, s in zip(weights, sparsities):
        segments.append((r0, r0 + w.shape[0], s))
        r0 += w.shape[0]
    sweep(W, U, segments, nm, blocksize, forced)
    if order is not None:
        W = W[:, order.argsort()]
    for w, part in zip(weights, W.split([w.shape[0] for w in weights])):
        w.copy_(part)
    info = {"damp": damp} if damp != percdamp else {}
    return [dict(info) for _ in weights]
