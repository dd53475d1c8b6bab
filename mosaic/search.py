"""The `search` allocation: one sparsity per projection, chosen by the pruned model's own output error.

1. Statistics: one dense pass over the calibration windows collects every group's Hessian XᵀX (the run's
   profiling pass, which then keeps Hessians; ``dense_hessians`` without one).
2. Sensitivity: on calibration windows the dense model's next-token distribution p is sampled and one
   backward pass gives each projection's per-output-channel Fisher
   G_i = E[(∂ log p(ŷ)/∂y_i)²]. To second order, pruning a projection by ΔW raises KL(p ‖ p̂) by
   ½ Σ_i G_i · ΔW_i H ΔW_iᵀ (the first-order term vanishes at the dense model).
3. Curves: the kernel prunes every projection at a few levels around the target, from the dense
   statistics, and each level's KL increase is measured with that formula.
4. Solve: minimise the summed curves subject to Σ n_j·s_j = S·N by water-filling along the convex hull
   of each curve (the Lagrangian solution; the last segment taken is split, so the map's weighted mean
   Σ n_j·s_j / N is S to float precision).
5. Guard: the uniform map, the outlier-based `mosaic` map (the seed) and the solution are each applied
   (the kernel on the dense statistics) and scored by the true KL on held-out windows (drawn after the
   statistics windows, sharing no token with them or with each other; for c4, no document).
6. Refine (``generations`` > 0): the best of the three is pruned as the run will prune it (sequential
   statistics by default), keeping the statistics each group saw, and that model is refined by an
   evolutionary level-switch search scored by the true KL on the held-out windows (mosaic/refine.py): a
   changed group is re-pruned with those kept statistics. The refined map
   fits the held-out windows and its start's statistics, so it is then pruned as planned and must beat its
   start on validation windows drawn after the held-out ones; the better wins. The search never returns
   something worse than where it started.

"Exact target" means exact in the map. What a kernel prunes is round(n_j·s_j) weights of each projection,
so the model loses Σ_j round(n_j·s_j) weights: within half a weight per projection of S·N (at most P/2 for
P projections; for SmolLM2, 105 weights in 106 M), not necessarily round(S·N). The same holds for every map,
the uniform one included, and for the refinement's switches (5% of the smaller projection is rarely a whole
number of weights). The achieved count is reported (``sparsity.zeros`` in results.json).

The search runs where the model is (all of it must be in memory) and is reproducible with the seed on
CPU; GPU reductions are not deterministic.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mosaic import dist, refine
from mosaic.adapter import GROUPS, PROJECTIONS, Adapter
from mosaic.calibrate import Activations, run_layers
from mosaic.prune import SparsityMap
from mosaic.stats import InputStats

log = logging.getLogger(__name__)

LEVELS = (-0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2)  # around the target


@dataclass
class SearchResult:
    sparsity: SparsityMap
    chosen: str  # which candidate won: search (the curve solve), seed, uniform or evolved
    # per candidate, KL(dense ‖ pruned from the dense statistics) per token, held out
    fitness: dict[str, float]
    levels: list[float]
    tokens: int
    evolution: dict | None = None

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "fitness_kl": self.fitness, "levels": self.levels,
                "tokens": self.tokens, "evolution": self.evolution}


def dense_hessians(model: nn.Module, adapter: Adapter, acts: Activations, compute=None,
                   calib_dtype=None) -> list[dict[tuple[str, ...], InputStats]]:
    """Every group's input statistics, with Hessians, from the dense model (kept on CPU)."""
    stats: list[dict] = [{} for _ in adapter.layers(model)]

    def on_group(index, _layer, group, group_stats):
        stats[index][group] = group_stats.to(torch.device("cpu"))

    run_layers(model, adapter, acts, on_group, mode="dense", hessian=True, compute=compute,
               calib_dtype=calib_dtype, desc="search: statistics")
    return stats


def fisher(model: nn.Module, adapter: Adapter, windows: torch.Tensor, batch_size: int,
           seed: int) -> list[dict[str, torch.Tensor]]:
    """Per projection, the mean squared gradient of log p(ŷ) w.r.t. each output channel, with ŷ sampled
    from the dense model itself (the Fisher of its predictive distribution). Each batch samples ŷ with its
    own generator and the sums are fp64, so under torchrun (each rank its share of the batches, the sums
    added over ranks) the result is one process's."""
    layers = adapter.layers(model)
    sums = [{p: torch.zeros(adapter.projection(layer, p).out_features, dtype=torch.float64)
             for p in PROJECTIONS} for layer in layers]
    hooks, tokens = [], 0

    def save_grad(i, p):
        def hook(_module, _args, output):
            def on_grad(g):
                sums[i][p] += g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
            output.register_hook(on_grad)
        return hook

    for i, layer in enumerate(layers):
        for p in PROJECTIONS:
            hooks.append(adapter.projection(layer, p).register_forward_hook(save_grad(i, p)))
    embed = model.get_input_embeddings()
    hooks.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    requires = [q.requires_grad for q in model.parameters()]
    model.requires_grad_(False)
    device = next(model.parameters()).device
    batches = windows.split(batch_size)
    try:
        for b in dist.mine(len(batches)):
            batch, gen = batches[b], torch.Generator().manual_seed(seed * 1_000_003 + b)
            with torch.enable_grad():
                logits = model(batch.to(device)).logits[:, :-1].float()
                probs = F.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).cpu()
                sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sampled, reduction="sum")
                loss.backward()
            tokens += sampled.numel()
    finally:
        for h in hooks:
            h.remove()
        for q, r in zip(model.parameters(), requires):
            q.requires_grad_(r)
    tokens = int(dist.sum_float(float(tokens)))
    return [{p: (dist.sum_(s) / max(tokens, 1)).float() for p, s in row.items()} for row in sums]


def curves(model: nn.Module, adapter: Adapter, kernel, stats, grads, levels: list[float],
           options: dict) -> list[dict[str, list[float]]]:
    """Predicted KL increase of each projection at each level: ½ Σ_i G_i ΔW_i H ΔW_iᵀ."""
    out = []
    layers = adapter.layers(model)
    for index, layer in enumerate(tqdm(layers, desc="search: sensitivity", unit="layer", leave=False)):
        row = {}
        for group in GROUPS:
            weights = [adapter.projection(layer, p).weight.data for p in group]
            group_stats = stats[index][group].to(weights[0].device)
            H = group_stats.hessian()
            for p in group:
                row[p] = []
            for level in levels:
                pruned = [w.float().clone() for w in weights]
                kernel.prune(pruned, group_stats, [level] * len(group), None, **options)
                for p, w, q in zip(group, weights, pruned):
                    d = w.float() - q
                    g = grads[index][p].to(d.device).unsqueeze(1)
                    row[p].append(float(0.5 * (g * (d @ H) * d).sum()))
        out.append(row)
    return out


def water_fill(curve_rows: list[dict[str, list[float]]], levels: list[float], params: list[dict[str, int]],
          target: float) -> SparsityMap:
    """Minimise Σ_j e_j(s_j) with Σ_j n_j s_j = target · Σ_j n_j: every matrix starts at its lowest level,
    then the cheapest hull segments (KL per pruned weight) are taken in order, the last one in part."""
    segments, start = [], []
    for i, row in enumerate(curve_rows):
        for p in PROJECTIONS:
            n, e = params[i][p], row[p]
            hull = [0]  # lower convex hull of (level, e), left to right
            for k in range(1, len(levels)):
                while len(hull) >= 2:
                    a, b = hull[-2], hull[-1]
                    if (e[b] - e[a]) * (levels[k] - levels[a]) >= (e[k] - e[a]) * (levels[b] - levels[a]):
                        hull.pop()
                    else:
                        break
                hull.append(k)
            start.append((i, p, levels[0]))
            for a, b in zip(hull, hull[1:]):
                width = (levels[b] - levels[a]) * n  # weights this segment prunes
                segments.append(((e[b] - e[a]) / width, i, p, levels[a], levels[b], n))
    sparsity = [dict.fromkeys(PROJECTIONS, 0.0) for _ in curve_rows]
    for i, p, s in start:
        sparsity[i][p] = s
    total = sum(params[i][p] for i in range(len(params)) for p in PROJECTIONS)
    remaining = target * total - sum(params[i][p] * sparsity[i][p]
                                     for i in range(len(params)) for p in PROJECTIONS)
    for _slope, i, p, lo, hi, n in sorted(segments, key=lambda s: s[0]):  # convex: each matrix's in order
        if remaining <= 1e-12 * total:
            break
        step = min(hi - lo, remaining / n)
        sparsity[i][p] = lo + step
        remaining -= step * n
        if step < hi - lo:  # the split segment ends the walk (float residue must not start another)
            break
    return sparsity


def stitched(model: nn.Module, adapter: Adapter, kernel, stats, sparsity: SparsityMap,
             options: dict) -> nn.Module:
    """A copy of the model with every projection pruned from the dense statistics (no sequential pass)."""
    from mosaic.prune import prune_from_stats

    pruned = copy.deepcopy(model)
    prune_from_stats(pruned, adapter, kernel, sparsity, [None] * len(sparsity), stats, options=options)
    return pruned


def levels_around(target: float) -> list[float]:
    return sorted({min(max(target + d, 0.0), 0.99) for d in LEVELS})


def search(model: nn.Module, adapter: Adapter, kernel, stats: list[dict[tuple[str, ...], InputStats]],
           fisher_windows: torch.Tensor, held_out: torch.Tensor, params: list[dict[str, int]], target: float,
           seed_map: SparsityMap | None, *, batch_size: int, seed: int, options: dict, generations: int = 0,
           validation: torch.Tensor | None = None, final=None) -> SearchResult:
    """The allocation minimising the predicted KL, guarded by the true KL of uniform and the seed map, then
    refined for ``generations`` by the true KL on ``held_out``. The Fisher comes from ``fisher_windows``
    (statistics windows), the true KL from ``held_out`` only, so nothing is scored on the tokens it was fitted
    to. With ``final(map, seen_stats) -> model`` (the run's own pruning) and ``validation``, the refinement
    starts from the model as shipped and re-prunes with the statistics it kept; the refined map must then
    beat its start as shipped on ``validation`` (windows neither step has seen). Without them it refines the
    dense-statistics surrogate and the held-out KL decides. ``stats``: every group's dense statistics with
    Hessians (``dense_hessians``); ``batch_size``: windows per Fisher batch."""
    from mosaic.prune import uniform_map

    grads = fisher(model, adapter, fisher_windows, batch_size, seed)
    levels = levels_around(target)
    curve_rows = curves(model, adapter, kernel, stats, grads, levels, options)
    candidates = {"search": water_fill(curve_rows, levels, params, target),
                  "uniform": uniform_map(len(params), target)}
    if seed_map is not None:
        candidates["seed"] = seed_map
    # one window per batch: the refinement's first selection stage scores every offspring on the first window
    # (a batch of two costs each offspring twice as much, and the layers re-run dominate a generation)
    scorer = refine.fitness(model, adapter, held_out, 1)
    fitness, best = {}, None
    bar = tqdm(candidates.items(), desc="search: fitness", leave=False)
    for name, sparsity in bar:
        pruned = stitched(model, adapter, kernel, stats, sparsity, options)
        fitness[name] = scorer.reset(pruned)
        if best is None or fitness[name] < fitness[best[0]]:
            best = (name, pruned, scorer.inputs)
        bar.set_postfix(kl=f"{fitness[name]:.4f}", candidate=name)
    evolution, judged = None, fitness
    if generations > 0:
        start = best[0]
        shipped = final is not None and validation is not None
        if shipped:  # refine the model the run ships: the start pruned as planned, with the statistics it saw
            # (kernels without statistics record none: the dense ones stand in)
            seen = [dict(row) for row in stats]
            del best
            stats, start_kl = seen, scorer.reset(final(candidates[start], seen))
            check = refine.fitness(model, adapter, validation, 1)
            judged = {start: check.reset(scorer.model)}
        else:
            scorer.model, scorer.inputs, start_kl = best[1], best[2], fitness[start]
        evolved = refine.evolve(model, scorer, kernel, stats, candidates[start], start_kl, params,
                                generations, seed=seed, options=options)
        evolution = {"from": start, "statistics": "as shipped" if shipped else "dense", **evolved.to_json()}
        if evolved.accepted:  # otherwise it is the start itself
            candidates["evolved"] = evolved.sparsity
            if shipped:  # it fits the held-out windows and its start's statistics: judge both as shipped
                judged["evolved"] = check.reset(final(evolved.sparsity))
            else:
                fitness["evolved"] = evolved.fitness  # the same surrogate as the other candidates
        if shipped:
            evolution["validation_kl_final"] = judged
    best = scorer = None
    order = ("evolved", "search", "seed", "uniform")
    chosen = min(judged, key=lambda k: (judged[k], order.index(k)))
    tokens = held_out.shape[0] * (held_out.shape[1] - 1)
    log.info("search: KL on %d held-out tokens: %s; %s chosen%s", tokens,
             ", ".join(f"{k} {v:.4f}" for k, v in fitness.items()), chosen,
             "" if judged is fitness else " on validation windows (" + ", ".join(
                 f"{k} {v:.4f}" for k, v in judged.items()) + ")")
    return SearchResult(candidates[chosen], chosen, fitness, levels, tokens, evolution)
