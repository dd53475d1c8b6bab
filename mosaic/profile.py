"""Outlier profile of the dense model: how many Wanda scores of each projection are outliers.

For every (layer, projection) the Wanda scores A = |W|·‖X‖ are computed from one dense calibration
pass, and the outlier ratio is D = 100 · #{A > M · mean(A)} / numel(A) (OWL's ``check_outlier_mean``
with the projection's own mean: Mosaic's projection outlier distribution). The layer ratio (OWL's
layer outlier distribution) uses all seven projections of a layer together, with their joint mean.

The same pass keeps each group's input statistics (per-feature sums of squares, on CPU), so Wanda
with dense statistics (``calib_stats="dense"``) prunes from exactly these, without a second pass; with
``hessian`` it keeps whole Hessians XᵀX instead (the `search` allocation's dense statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mosaic.adapter import GROUPS, PROJECTIONS, Adapter
from mosaic.calibrate import Activations, run_layers
from mosaic.prune.wanda import scores as wanda_scores
from mosaic.stats import InputStats


@dataclass
class Profile:
    ratios: list[dict[str, float]]  # D[layer][projection], percent
    layer_ratios: list[float]  # OWL's per-layer ratio, percent
    params: list[dict[str, int]]  # weights per projection
    stats: list[dict[tuple[str, ...], InputStats]]  # dense input statistics per layer and group (on CPU)
    hyper_m: float

    def drop_hessians(self) -> None:
        """Keep only what the norms need (the search is done with the Hessians)."""
        self.stats = [{g: v.without_hessian() for g, v in row.items()} for row in self.stats]

    def norms(self, layer: int, group: tuple[str, ...]) -> torch.Tensor:
        return self.stats[layer][group].norms()

    def to_json(self) -> dict:
        return {"hyper_m": self.hyper_m, "projection_ratios": self.ratios, "layer_ratios": self.layer_ratios}


def outlier_count(scores: torch.Tensor, threshold: float) -> int:
    return int((scores > threshold).sum())


def layer_profile(weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], hyper_m: float
                  ) -> tuple[dict[str, float], float]:
    """Outlier ratios of each projection (own mean) and of the whole layer (joint mean)."""
    scores = {p: wanda_scores(weights[p], norms[p]) for p in PROJECTIONS}
    ratios = {p: 100.0 * outlier_count(a, hyper_m * a.mean().item()) / a.numel() for p, a in scores.items()}
    total = sum(a.numel() for a in scores.values())
    joint_mean = sum(a.double().sum().item() for a in scores.values()) / total
    layer = 100.0 * sum(outlier_count(a, hyper_m * joint_mean) for a in scores.values()) / total
    return ratios, layer


@torch.no_grad()
def profile_model(model: nn.Module, adapter: Adapter, acts: Activations, hyper_m: float, *,
                  compute: torch.device | None = None, calib_dtype: torch.dtype | None = None,
                  scope=None, hessian: bool = False) -> Profile:
    """One dense pass over the calibration activations (``acts`` is consumed: it ends at the last layer);
    ``scope`` as in ``run_layers`` (a streamed model holds one layer at a time); ``hessian``: keep XᵀX."""
    n_layers = len(adapter.layers(model))
    ratios: list = [None] * n_layers
    layer_ratios: list = [None] * n_layers
    stats: list[dict] = [{} for _ in range(n_layers)]
    params = [{p: adapter.projection(layer, p).weight.numel() for p in PROJECTIONS}
              for layer in adapter.layers(model)]

    def on_group(index: int, layer: nn.Module, group: tuple[str, ...], group_stats: InputStats) -> None:
        stats[index][group] = group_stats
        if group != GROUPS[-1]:
            return
        by_projection = {p: stats[index][g].norms() for g in GROUPS for p in g}
        weights = {p: adapter.projection(layer, p).weight for p in PROJECTIONS}
        ratios[index], layer_ratios[index] = layer_profile(weights, by_projection, hyper_m)
        stats[index] = {g: v.to(torch.device("cpu")) for g, v in stats[index].items()}

    run_layers(model, adapter, acts, on_group, mode="dense", hessian=hessian, compute=compute,
               calib_dtype=calib_dtype, desc="profile", scope=scope)
    return Profile(ratios=ratios, layer_ratios=layer_ratios, params=params, stats=stats, hyper_m=hyper_m)
