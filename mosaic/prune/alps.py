"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024): one-shot pruning as a constrained least-squares
problem, min ‖X(W − Ŵ)ᵀ‖² s.t. a sparsity pattern, solved by ADMM with a penalty (ρ) schedule driven by
how much the support still changes, then refined on the final support by conjugate gradients.

Numerics as the official code: damping ``percdamp · mean(diag H)`` (part of the objective), the diagonal
normalisation H ← S⁻¹HS⁻¹ with S = √diag H (so H has a unit diagonal and needs no other preconditioner),
variables B = W·S (kept in the weights' [out, in] layout, so each projection is a block of rows; the official
code holds the transpose), the target B₀·H, (H + ρI)⁻¹ from one fp64 eigendecomposition, the first
support from the largest |B₀| (= |W|·‖X_j‖), ρ₀ = 0.1, checks every 3 iterations, a 300-iteration cap.

What differs without changing the algorithm:
- Projections sharing an input (q/k/v, gate/up) share H: their rows of B are solved in one ADMM,
  each with its own exact budget of round(s·numel) pruned weights (the official code has one budget
  per matrix; it never sees shared inputs).
- The projection onto the budget is a ``kthvalue`` threshold, not a full top-k sort.
- CG computes H·P once per iteration, and its stopping test reads the residual on the support (the
  official test reads the unmasked one, which never vanishes, so it always ran to the cap).
- (H + ρI)⁻¹ is rebuilt from the fp64 eigenvectors in fp32 (the precision the official code uses it in),
  and the device is the weights' (no hard-coded CUDA); the ρ reset keeps the dense start at hand.
- The eigendecomposition is kept with the statistics (``cached_eigen``), so the search, which prunes one
  group at many sparsities, computes it once per group; the results are bit for bit those of a fresh one.
- Columns removed whole (composite pruning) are dropped from the problem, so the solve moves their
  contribution onto the kept columns; the sparsities then apply to what is kept.

One addition that can change the result, on by default (``alps_guard``; ``guard``): when ADMM's final
support differs from the initial one, B0 is also refitted on the initial support by the same CG, and any
projection whose ADMM result fits worse (by ``fit``) takes that refit instead. ADMM is a heuristic on a
non-convex problem: with H = I, where magnitude pruning is the exact optimum, it can end a few weights off
it, and the guard then returns magnitude pruning. On real activations it has not been seen to fire
(``alps_start_kept`` in the notes counts it). When the two supports agree the guard does nothing, not even
its CG.
"""

from __future__ import annotations

import time

import torch

from mosaic.prune.masks import n_of_m, smallest_k, target_count
from mosaic.stats import InputStats


def normalise(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped H scaled to a unit diagonal, and the scale S = √diag(H + damp·I)."""
    H = hessian.clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    scale = H.diagonal().sqrt() + 1e-8
    return H / scale.unsqueeze(1) / scale.unsqueeze(0), scale


def projector(segments: list[tuple[int, int, int]], nm: tuple[int, int] | None):
    """P_k as a support mask of Z [out, in]: in each segment of rows (one projection) keep all but its
    ``pruned`` smallest |Z|; with N:M, prune N of every M consecutive inputs of each row."""

    def support_of(Z: torch.Tensor) -> torch.Tensor:
        if nm is not None:
            return ~n_of_m(Z.abs(), *nm)
        mask = torch.ones_like(Z, dtype=torch.bool)
        for r0, r1, pruned in segments:
            if pruned:
                torch.logical_not(smallest_k(Z[r0:r1].abs(), pruned), out=mask[r0:r1])
        return mask

    return support_of


def eigen(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L, Q with H = Q diag(L) Qᵀ, from one fp64 eigendecomposition, kept in fp32: (H + ρI)⁻¹ is rebuilt
    from them for every ρ in fp32, the precision the official code uses it in."""
    L, Q = torch.linalg.eigh(H.double())
    return L.float(), Q.float()


def cached_eigen(stats: InputStats, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigen`` of ``H``, the normalised Hessian of these statistics at ``percdamp`` on H's device, computed
    once and kept with the statistics (where they live, as ``sparsegpt.cached_factor``): pruning the group
    again at another sparsity (the search's levels and mutations) reuses it, bit for bit."""
    key = ("alps", percdamp)
    if key in stats.derived:
        L, Q = stats.derived[key]
        return L.to(H.device), Q.to(H.device)
    L, Q = eigen(H)
    stats.derived[key] = (L.to(stats.device), Q.to(stats.device))
    return L, Q


def admm(eig: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, B0: torch.Tensor, support_of,
         n_kept: int, rho: float, max_iter: int, update_iter: int = 3,
         switch_iter: int = 30) -> tuple[torch.Tensor, dict]:
    """The ADMM loop with the official ρ schedule on H = Q diag(L) Qᵀ (``eig``); returns B (not yet
    projected) and what it did."""
    L, Q = eig

    def inverse(r: float) -> torch.Tensor:
        return (Q / (L + r)) @ Q.t()

    support0 = support_of(B0)
    D0 = B0 * support0
    D, V, support = D0.clone(), torch.zeros_like(B0), support0
    B, rhs, Z = torch.empty_like(B0), torch.empty_like(B0), torch.empty_like(B0)
    Hinv, raised, it, change = inverse(rho), False, 0, 0
    for it in range(1, max_iter + 1):
        torch.add(target, D, alpha=rho, out=rhs).sub_(V)
        torch.mm(rhs, Hinv, out=B)  # B = (T − V + ρD)(H + ρI)⁻¹, H symmetric
        torch.add(B, V, alpha=1 / rho, out=Z)
        new = support_of(Z)
        torch.mul(Z, new, out=D)
        V.add_(B, alpha=rho).sub_(D, alpha=rho)
        if it % update_iter:
            continue
        change = int((new != support).count_nonzero())
        support = new
        if change > 0.1 * n_kept:
            rho, raised = rho * 1.3, True
        elif change > 0.005 * n_kept:
            rho, raised = rho * 1.2, True
        elif change:
            if raised:
                rho *= 1.1
            else:  # support still moving at a tiny ρ: start over with a smaller one
                rho /= 5
                D, V = D0.clone(), torch.zeros_like(B0)
        elif raised:
            break
        else:
            rho /= 5
        rho = min(rho, 1e6)
        if it > switch_iter and change < 3e-4 * n_kept:
            break
        Hinv = inverse(rho)
    return B, {"iterations": it, "rho": rho, "support_change": change / max(n_kept, 1)}


def conjugate_gradient(H: torch.Tensor, target: torch.Tensor, X: torch.Tensor, support: torch.Tensor,
                       iters: int, rtol: float = 1e-4) -> tuple[torch.Tensor, int]:
    """Solve x_S H_SS = target_S for every row at once (one matmul per iteration), from X on the
    support; stops when every row's residual on the support is below ``rtol`` of its target."""
    X = X * support
    R = (target - X @ H) * support
    P = R.clone()
    rr = R.square().sum(1, keepdim=True)
    tol = (rtol * (target * support).norm(dim=1, keepdim=True)).square()
    done = 0
    while done < iters and not bool((rr <= tol).all()):
        done += 1
        HP = (P @ H).mul_(support)
        curvature = (P * HP).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, rr / curvature, torch.zeros_like(rr))
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, HP, value=-1)
        rr_next = R.square().sum(1, keepdim=True)
        beta = torch.where(rr > 0, rr_next / rr, torch.zeros_like(rr))
        P = R + beta * P
        rr = rr_next
    return X, done


def objective(H: torch.Tensor, B: torch.Tensor, B0: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖² in the normalised variables (with the damping ridge), up to a constant factor."""
    diff = B - B0
    return float((diff * (diff @ H)).sum())


def reduced_objective(H: torch.Tensor, B: torch.Tensor, target: torch.Tensor) -> float:
    """The same objective less a constant, B·H·Bᵀ − 2·B·targetᵀ: it also holds when columns were removed
    (H and B restricted to the kept columns, ``target`` still carrying the removed ones' contribution)."""
    return float((B * (B @ H)).sum() - 2 * (B * target).sum())


def guard(H: torch.Tensor, target: torch.Tensor, B: torch.Tensor, B0: torch.Tensor, support: torch.Tensor,
          start: torch.Tensor, segments: list[tuple[int, int, int]], cg_iters: int) -> list[int]:
    """Where ADMM's ``support`` differs from the initial one (``start``, the largest |B0|): refit B0 on
    ``start`` by the same CG, and in each projection (segment of rows) whose refined B fits worse, put
    that refit in B's place. Returns those projections. When the supports agree there is nothing to
    compare and the second CG is skipped."""
    if torch.equal(support, start):
        return []
    start_over, _ = conjugate_gradient(H, target, B0, start, cg_iters)
    worse = [j for j, (r0, r1, _) in enumerate(segments)
             if reduced_objective(H, B[r0:r1], target[r0:r1])
                > reduced_objective(H, start_over[r0:r1], target[r0:r1])]
    for j in worse:
        r0, r1, _ = segments[j]
        B[r0:r1] = start_over[r0:r1]
    return worse


def prune(weights: list[torch.Tensor], stats: InputStats, sparsities: list[float],
          nm: tuple[int, int] | None = None, percdamp: float = 0.01,
          forced_columns: torch.Tensor | None = None,
          alps_rho0: float = 0.1, alps_max_iter: int = 300, alps_cg_iters: int = 10,
          alps_guard: bool = True) -> list[dict]:
    """Prune the weights of one projection group in place; one info dict per projection.

    ``alps_guard`` (see ``guard``): where ADMM's support differs from the initial one, each projection
    whose CG-refined fit is worse than that of the initial support refined by the same CG gets the latter
    (``alps_start_kept`` in its notes). Off, the result is ADMM's support and CG alone."""
    if nm is None and (forced_columns is None or not bool(forced_columns.any())):
        active = [j for j, (w, s) in enumerate(zip(weights, sparsities)) if target_count(w.numel(), s)]
        if len(active) < len(weights):  # a projection with nothing to prune is left exactly as it is
            infos = [{} for _ in weights]
            if active:
                solved = prune([weights[j] for j in active], stats, [sparsities[j] for j in active], None,
                               percdamp, None, alps_rho0, alps_max_iter, alps_cg_iters, alps_guard)
                for j, info in zip(active, solved):
                    infos[j] = info
            return infos
    device = weights[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    H, scale = normalise(stats.hessian().to(device), percdamp)
    B0 = torch.cat([w.float() for w in weights], dim=0) * scale  # [out, in]
    target = B0 @ H
    columns = None
    if forced_columns is not None and bool(forced_columns.any()):
        if nm is not None:
            raise ValueError("N:M cannot be combined with structured column removal")
        columns = (~forced_columns.to(device)).nonzero().squeeze(1)
        H, B0, target = H[columns][:, columns], B0[:, columns].contiguous(), target[:, columns].contiguous()
        eig = eigen(H)  # of this restriction of H: not kept
    else:
        eig = cached_eigen(stats, H, percdamp)
    sync()
    eigh_done = time.perf_counter()
    inputs = B0.shape[1]
    segments, r0 = [], 0
    for w, s in zip(weights, sparsities):
        segments.append((r0, r0 + w.shape[0], target_count(inputs * w.shape[0], s)))
        r0 += w.shape[0]
    n_kept = B0.numel() - (B0.numel() * nm[0] // nm[1] if nm else sum(p for _, _, p in segments))
    support_of = projector(segments, nm)

    B, info = admm(eig, target, B0, support_of, n_kept, alps_rho0, alps_max_iter)
    sync()
    admm_done = time.perf_counter()
    support = support_of(B)
    B, cg_iters = conjugate_gradient(H, target, B, support, alps_cg_iters)
    worse = guard(H, target, B, B0, support, support_of(B0), segments, alps_cg_iters) if alps_guard else []
    sync()
    if columns is not None:
        full = torch.zeros(B.shape[0], forced_columns.numel(), device=device)
        full[:, columns] = B
        B = full
    W = B / scale
    for w, part in zip(weights, W.split([w.shape[0] for w in weights])):
        w.copy_(part)
    end = time.perf_counter()
    seconds = {"eigh_s": eigh_done - start, "admm_s": admm_done - eigh_done,
               "cg_s": end - admm_done}
    infos = [{"alps_iters": info["iterations"], "alps_rho": info["rho"], "alps_cg_iters": cg_iters,
              "alps_support_change": info["support_change"],
              **({"alps_start_kept": True} if j in worse else {})}
             for j in range(len(segments))]
    infos[0].update(seconds)  # the group's time, once
    return infos
