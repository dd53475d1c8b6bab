"""Pruning kernels and the one registry that maps method names to (kernel, allocation).

A kernel prunes the weights of one projection group in place, given the group's input statistics
and one sparsity per projection: ``prune(weights, stats, sparsities, nm, **options) -> infos``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mosaic import dist
from mosaic.adapter import GROUPS, PROJECTIONS, Adapter
from mosaic.calibrate import Activations, on_device, run_layers
from mosaic.prune import alps, magnitude, sparsegpt, wanda
from mosaic.stats import InputStats


@dataclass(frozen=True)
class Kernel:
    name: str
    stats: str  # what it needs from calibration: "none", "norms" or "hessian"
    prune: Callable[..., list[dict]]
    options: tuple[str, ...] = ()  # the knobs it takes; any other is a TypeError, never silently dropped


KERNELS: dict[str, Kernel] = {
    "magnitude": Kernel("magnitude", "none", magnitude.prune),
    "wanda": Kernel("wanda", "norms", wanda.prune),
    "sparsegpt": Kernel("sparsegpt", "hessian", sparsegpt.prune, ("blocksize", "percdamp")),
    "alps": Kernel("alps", "hessian", alps.prune,
                   ("percdamp", "alps_rho0", "alps_max_iter", "alps_cg_iters", "alps_guard")),
}


def check_options(kernel: Kernel, options: dict) -> None:
    """A knob ``kernel`` does not take is an error before any work, never silently dropped."""
    unknown = sorted(set(options) - set(kernel.options))
    if unknown:
        raise TypeError(f"{kernel.name} takes no option {', '.join(unknown)}; it takes "
                        f"{', '.join(kernel.options) or 'none'}")


@dataclass(frozen=True)
class Method:
    kernel: str | None  # None: evaluate only
    allocation: str  # uniform | owl | mosaic | mosaic_ref | owl_nm | search


# Names from the reference code (Wanda, OWL, Mosaic) work unchanged.
METHODS: dict[str, Method] = {
    "dense": Method(None, "uniform"),
    "magnitude": Method("magnitude", "uniform"),
    "wanda": Method("wanda", "uniform"),
    "sparsegpt": Method("sparsegpt", "uniform"),
    "magnitude_owl": Method("magnitude", "owl"),
    "wanda_owl": Method("wanda", "owl"),
    "sparsegpt_owl": Method("sparsegpt", "owl"),
    "magnitude_mosaic": Method("magnitude", "mosaic"),
    "wanda_mosaic": Method("wanda", "mosaic"),
    "sparsegpt_mosaic": Method("sparsegpt", "mosaic"),
    "alps": Method("alps", "uniform"),
    "alps_owl": Method("alps", "owl"),
    "alps_mosaic": Method("alps", "mosaic"),
    "magnitude_search": Method("magnitude", "search"),
    "wanda_search": Method("wanda", "search"),
    "sparsegpt_search": Method("sparsegpt", "search"),
    "alps_search": Method("alps", "search"),
    "wanda_owl_structure": Method("wanda", "owl_nm"),
}

# sparsity[layer][projection] -> fraction of that projection's weights to prune
SparsityMap = list[dict[str, float]]
# N:M pattern per layer (None: unstructured)
NMPlan = list[tuple[int, int] | None]


def uniform_map(num_layers: int, sparsity: float) -> SparsityMap:
    return [dict.fromkeys(PROJECTIONS, sparsity) for _ in range(num_layers)]


def prune_group(adapter: Adapter, layer: nn.Module, group: tuple[str, ...], stats, kernel: Kernel,
                sparsities: dict[str, float], nm: tuple[int, int] | None, options: dict,
                plan=None) -> list[dict]:
    """Prune one projection group of one layer in place. With a structure ``plan`` (composite pruning),
    only the kept rows are pruned unstructured, and input columns feeding removed units are removed whole
    (the kernel compensates for them where it can); the sparsities then refer to what is kept."""
    from mosaic.restructure import selection

    projections = [adapter.projection(layer, p) for p in group]
    sps = [sparsities[p] for p in group]
    rows, kept_columns = selection(plan, adapter.head_dim(layer), group) if plan is not None else ({}, None)
    if all(s == 0 for s in sps) and nm is None and kept_columns is None:
        return []
    weights = [proj.weight.data[rows[p].to(proj.weight.device)] if p in rows else proj.weight.data
               for p, proj in zip(group, projections)]
    extra = dict(options)
    if kept_columns is not None:
        forced = torch.ones(projections[0].in_features, dtype=torch.bool)
        forced[kept_columns] = False
        extra["forced_columns"] = forced
    infos = kernel.prune(weights, stats, sps, nm, **extra)
    for p, proj, w in zip(group, projections, weights):
        if p in rows:
            proj.weight.data[rows[p].to(w.device)] = w
    return [{"projection": p, **info} for p, info in zip(group, infos) if info]


def prune_model(
    model: nn.Module,
    adapter: Adapter,
    kernel: Kernel,
    sparsity: SparsityMap,
    nm: NMPlan,
    acts: Activations | None,
    *,
    mode: str = "sequential",
    compute: torch.device | None = None,
    calib_dtype: torch.dtype | None = None,
    options: dict | None = None,
    structure: list | None = None,
    seen_stats: list[dict] | None = None,
    stats: list[dict[tuple[str, ...], InputStats]] | None = None,
    recovery=None,
) -> list[dict]:
    """Prune every projection of every layer; returns notes (e.g. extra damping) per projection. With
    ``seen_stats`` (one dict per layer) each group's statistics, as the kernel saw them, are kept there (CPU).
    ``stats`` (from an earlier dense pass) replace the engine's own; ``recovery`` tunes each pruned layer
    (``recover.Reconstruction``), which needs the engine's walk even for kernels that read no statistics."""
    check_options(kernel, options or {})
    if recovery is None and (kernel.stats == "none" or stats is not None):
        return prune_from_stats(model, adapter, kernel, sparsity, nm, stats, compute, structure, options)
    if acts is None:
        raise ValueError(f"{kernel.name} needs calibration activations")
    notes: list[dict] = []
    prune = group_pruner(adapter, kernel, sparsity, nm, options or {}, structure, notes,
                         together=mode != "sequential")

    def on_group(index, layer, group, seen) -> None:
        seen = stats_for(kernel, stats, index, group, seen)
        if seen_stats is not None and seen is not None:
            seen_stats[index][group] = seen.to(torch.device("cpu"))
        prune(index, layer, group, seen)

    run_layers(model, adapter, acts, on_group, mode=mode, hessian=kernel.stats == "hessian" and stats is None,
               compute=compute, calib_dtype=calib_dtype, desc=f"prune ({kernel.name})", recovery=recovery)
    return notes


def stats_for(kernel: Kernel, given: list[dict] | None, index: int, group: tuple[str, ...], seen: InputStats):
    """What the kernel prunes a group from: statistics given from an earlier pass, none (magnitude), or what
    the engine collected (``seen``)."""
    if given is not None:
        return given[index][group].to(seen.device)
    return None if kernel.stats == "none" else seen


def prune_from_stats(model: nn.Module, adapter: Adapter, kernel: Kernel, sparsity: SparsityMap, nm: NMPlan,
                     stats: list[dict[tuple[str, ...], InputStats]] | None,
                     compute: torch.device | None = None, structure: list | None = None,
                     options: dict | None = None) -> list[dict]:
    """Prune with statistics kept from an earlier dense pass (Wanda with ``calib_stats="dense"``: the
    profiling pass's own statistics, so no second pass over the calibration data; the search's candidates),
    or with none (magnitude). Gives the same weights as a dense-mode ``prune_model``, which computes the
    same statistics."""
    compute = compute or next(model.parameters()).device
    notes: list[dict] = []
    on_group = group_pruner(adapter, kernel, sparsity, nm, options or {}, structure, notes, together=True)
    for index, layer in enumerate(tqdm(adapter.layers(model), desc=f"prune ({kernel.name})", leave=False)):
        with on_device(layer, compute) as device:
            for group in GROUPS:
                on_group(index, layer, group, stats[index][group].to(device) if stats is not None else None)
    return notes


def group_pruner(adapter: Adapter, kernel: Kernel, sparsity: SparsityMap, nm: NMPlan, options: dict,
                 structure: list | None, notes: list[dict], together: bool = False):
    """The engine callback that prunes one group as allocated, collecting the kernel's notes per layer.
    Under torchrun one owner rank (the least loaded by the kernel's cost) prunes the group and broadcasts
    its weights byte for byte, with the kernel's notes, so every rank holds the same layer. With
    ``together`` (the engine calls all of a layer's groups before it uses any: dense and reference modes)
    the owners prune their groups at once and the weights are broadcast after the layer's last group."""
    check_options(kernel, options)
    owners = dist.Owners()
    pending: list = []  # (owner, projections, the owner's notes or error), until the layer's last group

    def on_group(index: int, layer: nn.Module, group: tuple[str, ...], stats) -> None:
        plan = structure[index] if structure else None
        projections = [adapter.projection(layer, p) for p in group]
        cost = sum(p.weight.numel() * (p.in_features if kernel.stats == "hessian" else 1)
                   for p in projections)
        owner, outcome = owners.owner(cost), None
        if owner == dist.rank():
            try:
                outcome = prune_group(adapter, layer, group, stats, kernel, sparsity[index], nm[index],
                                      options, plan)
            except Exception as err:  # raised on every rank when the layer's groups are shared
                outcome = err
        pending.append((owner, projections, outcome))
        if together and dist.world() > 1 and group != GROUPS[-1]:
            return
        for owner, projections, outcome in pending:
            found = dist.run_on(owner, lambda outcome=outcome: _result(outcome))
            for proj in projections:
                dist.broadcast_(proj.weight.data, owner)
            notes.extend({"layer": index, **note} for note in found)
        pending.clear()

    return on_group


def _result(outcome):
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def measure(model: nn.Module, adapter: Adapter) -> dict:
    """Achieved sparsity: overall (over all decoder-layer projections) and per layer and projection."""
    per_layer, zeros, total = [], 0, 0
    for layer in adapter.layers(model):
        row = {}
        for name, proj in adapter.projections(layer).items():
            z, n = int((proj.weight == 0).sum()), proj.weight.numel()
            row[name] = z / n
            zeros += z
            total += n
        per_layer.append(row)
    return {"overall": zeros / max(total, 1), "zeros": zeros, "params": total, "per_layer": per_layer}


def nm_map(nm: NMPlan) -> SparsityMap:
    """What an N:M plan prunes: N/M of every projection of each layer."""
    return [dict.fromkeys(PROJECTIONS, n / m) for n, m in nm]


def projection_params(adapter: Adapter, model: nn.Module) -> list[dict[str, int]]:
    """Weights per (layer, projection): what a map's parameter-weighted mean is weighted by."""
    return [{p: proj.weight.numel() for p, proj in adapter.projections(layer).items()}
            for layer in adapter.layers(model)]
