"""Activation statistics of one projection group's input, accumulated over calibration batches.

q/k/v read the same input, and so do gate/up, so one accumulator serves a whole group: the
reference code keeps a separate (identical) Hessian per projection. Everything is fp32 whatever the
model dtype. Scale factors (per token vs per sequence, the 2 in H = 2XXᵀ) do not matter: Wanda ranks
within rows, outlier ratios compare with a mean, SparseGPT damps relative to the mean diagonal.
"""

from __future__ import annotations

import torch


class InputStats:
    def __init__(self, dim: int, device: torch.device, hessian: bool):
        self.tokens = 0
        # always: norms alike with or without H
        self.sq = torch.zeros(dim, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device) if hessian else None
        # what kernels derive from these statistics (SparseGPT's factor of H⁻¹, ALPS's eigendecomposition of
        # the normalised H), kept so that pruning the same group again (the search tries many sparsities)
        # skips it; cleared by ``add``
        self.derived: dict = {}

    @property
    def device(self) -> torch.device:
        return self.sq.device

    def to(self, device: torch.device) -> InputStats:
        """The same statistics on ``device`` (values unchanged, so kernels give identical results); these
        very statistics when they are there already."""
        if torch.device(device) == self.device:
            return self
        moved = InputStats.__new__(InputStats)
        moved.tokens, moved.derived = self.tokens, {}
        moved.sq = self.sq.to(device)
        moved.xtx = None if self.xtx is None else self.xtx.to(device)
        return moved

    def without_hessian(self) -> InputStats:
        """Only the per-feature sums of squares: the same norms, a d-th of the memory."""
        if self.xtx is None:
            return self
        kept = InputStats.__new__(InputStats)
        kept.tokens, kept.derived, kept.xtx, kept.sq = self.tokens, {}, None, self.sq
        return kept

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.derived.clear()
        self.sq.add_(x.square().sum(0))
        if self.xtx is not None:
            _add_upper_gram(self.xtx, x)
        self.tokens += x.shape[0]

    def mean_square(self) -> torch.Tensor:
        """Per input feature: mean over tokens of x_j² (Wanda's squared-norm statistic)."""
        return self.sq / max(self.tokens, 1)

    def norms(self) -> torch.Tensor:
        """‖X_j‖ per input feature (up to a constant factor)."""
        return self.mean_square().sqrt()

    def hessian(self) -> torch.Tensor:
        """XᵀX / tokens, a fresh fp32 tensor the caller may modify."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without a Hessian")
        upper = self.xtx.triu()
        return (upper + upper.triu(1).t()) / max(self.tokens, 1)


def _add_upper_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += xᵀx on and above the diagonal only, by column blocks: about 30% less time than a full
    matmul on CPU (there is no syrk in torch). The lower triangle is left unspecified."""
    dim = x.shape[1]
    width = max(192, -(-dim // 8))
    for i0 in range(0, dim, width):
        gram[i0:i0 + width, i0:].addmm_(x[:, i0:i0 + width].t(), x[:, i0:])
