"""Activation statistics of one projection group's input, accumulated over calibration batches.

q/k/v read the same input, and so do gate/up, so one accumulator serves a whole group: the
reference code keeps a separate (identical) Hessian per projection. Each batch's contribution is computed
in fp32 and added to fp64 sums (``ACCUMULATOR``); ``reduced()`` sums them over the ranks of a launched run
and rounds them to fp32, which kernels read. In fp64 the order of the additions (which batches a rank ran,
in which order the ranks' partial sums meet) changes bits far below fp32's, so N ranks give one process's
statistics (checked bit for bit in tests/test_distributed.py).
Scale factors (per token vs per sequence, the 2 in H = 2XXᵀ) do not matter: Wanda ranks
within rows, outlier ratios compare with a mean, SparseGPT damps relative to the mean diagonal.
"""

from __future__ import annotations

import torch

from mosaic import dist

ACCUMULATOR = torch.float64  # the running sums; kernels read fp32 (``reduced``)


class InputStats:
    def __init__(self, dim: int, device: torch.device, hessian: bool):
        self.tokens = 0
        # always: norms alike with or without H
        self.sq = torch.zeros(dim, dtype=ACCUMULATOR, device=device)
        self.xtx = torch.zeros(dim, dim, dtype=ACCUMULATOR, device=device) if hessian else None
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

    def reduced(self) -> InputStats:
        """These statistics summed over every rank's batches, then in fp32 (what kernels read). Called once,
        after the last ``add``."""
        counts = torch.tensor([float(self.tokens)], dtype=ACCUMULATOR, device=self.device)
        for t in (self.sq, counts) + ((self.xtx,) if self.xtx is not None else ()):
            dist.sum_(t)
        self.tokens = int(counts.item())
        self.sq = self.sq.float()
        self.xtx = None if self.xtx is None else self.xtx.float()
        self.derived.clear()
        return self

    def mean_square(self) -> torch.Tensor:
        """Per input feature: mean over tokens of x_j² (Wanda's squared-norm statistic)."""
        return (self.sq / max(self.tokens, 1)).float()

    def norms(self) -> torch.Tensor:
        """‖X_j‖ per input feature (up to a constant factor)."""
        return self.mean_square().sqrt()

    def hessian(self) -> torch.Tensor:
        """XᵀX / tokens, a fresh fp32 tensor the caller may modify."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without a Hessian")
        upper = self.xtx.triu()
        return ((upper + upper.triu(1).t()) / max(self.tokens, 1)).float()


def _add_upper_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += xᵀx on and above the diagonal only, by column blocks: about 30% less time than a full
    matmul on CPU (there is no syrk in torch). The lower triangle is left unspecified. Each block's product
    is an fp32 matmul, added to ``gram`` in its own dtype (fp64)."""
    dim = x.shape[1]
    width = max(192, -(-dim // 8))
    for i0 in range(0, dim, width):
        block = gram[i0:i0 + width, i0:]
        if block.dtype == x.dtype:
            block.addmm_(x[:, i0:i0 + width].t(), x[:, i0:])
        else:
            block += x[:, i0:i0 + width].t() @ x[:, i0:]
