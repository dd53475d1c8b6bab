"""Sparsity allocation: from an outlier profile to one sparsity per (layer, projection).

Notation: S the target sparsity, λ (--Lamda) the half-range, D the outlier ratios (percent),
n[i][p] the weight count of projection p in layer i, minmax(x) = (x − min x)/(max x − min x).

uniform     s[i][p] = S.
owl         OWL (Yin et al. 2024), per layer: c = minmax(D_layer)·2λ, s[i] = S − (c[i] − mean c),
            the same for all seven projections of layer i (the reference formula, unchanged).
mosaic      Per projection (this toolkit's formula for Mosaic's projection outlier distribution,
            the "as intended" reading of the released code, algorithms.md §5.2.7):
                r[i][p] = minmax over layers i of D[i][p]      (each projection type its own curve)
                s[i][p] = clip(S + λ − 2λ·r[i][p] + δ,  max(S−λ, 0),  min(S+λ, 0.99))
            More outliers → lower sparsity, and q's depth profile differs from down's. δ is solved
            by bisection so that the parameter-weighted mean Σ n·s / Σ n equals S exactly: the
            target is hit, not drifted. (Normalising all projections jointly instead was tried on
            SmolLM2 and was far worse: the low-ratio up_proj matrices were over-pruned.)
mosaic_ref  The released Mosaic code (algorithms.md §5.2): s[i][p] = S − c_L[i] + mean(c_p), with
            c_L = minmax(D_layer)·2λ and c_p = minmax(D[·][p])·2λ; values ≤ 0 become 0.01. Its
            global sparsity drifts from S; the drift is reported. Values ≥ 1 are capped at 0.99.
owl_nm      OWL's layer-wise N:M (``wanda_owl_structure``): c = minmax(D_layer)·λ, c −= mean c,
            N[i] = N − round(c[i]) (round half to even), clipped to [0, M]. Its defaults are the
            OWL README's for N:M, λ = 2 and M = 6 (``HYPER_DEFAULTS``).

A degenerate profile (all ratios equal, or one layer) falls back to uniform with a warning.
For owl and mosaic, values are clipped to [0, 0.99] and re-centred with the same offset solve, so
the weighted mean stays S even at extreme targets.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mosaic.adapter import PROJECTIONS
from mosaic.errors import OptionError
from mosaic.prune import NMPlan, SparsityMap, uniform_map

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl", "mosaic", "mosaic_ref", "search")
# (λ, M) when --Lamda / --Hyper_m are not given: the papers' unstructured defaults (OWL README: λ=0.08,
# M=5), and for OWL's layer-wise N:M the values its README uses for 5:8 (λ=2, M=6). With λ=0.08 the
# N:M offsets c − mean(c) lie in (−0.08, 0.08) and round to 0 everywhere: a no-op.
HYPER_DEFAULTS = {"owl_nm": (2.0, 6.0)}
DEFAULT_HYPER = (0.08, 5.0)
MAX_SPARSITY = 0.99
FORMAT = "mosaic-allocation/1"


def hyper_defaults(allocation: str) -> tuple[float, float]:
    """Default (λ, M) for an allocation rule."""
    return HYPER_DEFAULTS.get(allocation, DEFAULT_HYPER)


def minmax(values: list[float]) -> list[float] | None:
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12:
        return None
    return [(v - lo) / (hi - lo) for v in values]


def weighted_mean(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def solve_offset(base: list[float], weights: list[int], target: float, lo: float, hi: float) -> list[float]:
    """clip(base + δ, lo, hi) with δ chosen so that the weighted mean equals ``target``."""
    if not lo - 1e-12 <= target <= hi + 1e-12:
        raise ValueError(f"target {target} outside [{lo}, {hi}]")

    def values(delta: float) -> list[float]:
        return [min(max(b + delta, lo), hi) for b in base]

    d_lo, d_hi = lo - max(base), hi - min(base)  # all values at lo / all at hi
    for _ in range(200):
        mid = (d_lo + d_hi) / 2
        if weighted_mean(values(mid), weights) < target:
            d_lo = mid
        else:
            d_hi = mid
    return values((d_lo + d_hi) / 2)


def _flatten(per_layer: list[dict[str, float]]) -> list[float]:
    return [row[p] for row in per_layer for p in PROJECTIONS]


def _unflatten(flat: list[float], n_layers: int) -> SparsityMap:
    k = len(PROJECTIONS)
    return [dict(zip(PROJECTIONS, flat[i * k:(i + 1) * k])) for i in range(n_layers)]


def owl(layer_ratios: list[float], params: list[dict[str, int]], target: float, lam: float) -> SparsityMap:
    norm = minmax(layer_ratios)
    if norm is None:
        log.warning("OWL: all layer outlier ratios are equal; falling back to uniform sparsity")
        return uniform_map(len(layer_ratios), target)
    c = [2 * lam * r for r in norm]
    mean_c = sum(c) / len(c)
    per_layer = [target - (ci - mean_c) for ci in c]
    flat_base = [s for s in per_layer for _ in PROJECTIONS]
    flat = solve_offset(flat_base, _flatten(params), target, 0.0, MAX_SPARSITY)
    return _unflatten(flat, len(layer_ratios))


def mosaic(ratios: list[dict[str, float]], params: list[dict[str, int]], target: float,
           lam: float) -> SparsityMap:
    curves = {p: minmax([row[p] for row in ratios]) for p in PROJECTIONS}
    if all(c is None for c in curves.values()):
        log.warning("Mosaic: all projection outlier ratios are equal; falling back to uniform sparsity")
        return uniform_map(len(ratios), target)
    base = [target + lam - 2 * lam * (curves[p][i] if curves[p] is not None else 0.5)
            for i in range(len(ratios)) for p in PROJECTIONS]
    lo, hi = max(target - lam, 0.0), min(target + lam, MAX_SPARSITY)
    return _unflatten(solve_offset(base, _flatten(params), target, lo, hi), len(ratios))


def mosaic_ref(ratios: list[dict[str, float]], layer_ratios: list[float], target: float,
               lam: float) -> SparsityMap:
    c_layer = minmax(layer_ratios)
    if c_layer is None:
        log.warning("mosaic_ref: all layer outlier ratios are equal; falling back to uniform sparsity")
        return uniform_map(len(ratios), target)
    c_layer = [2 * lam * v for v in c_layer]
    out: SparsityMap = [{} for _ in ratios]
    for p in PROJECTIONS:
        c_p = minmax([row[p] for row in ratios])
        mean_c_p = 0.0 if c_p is None else 2 * lam * sum(c_p) / len(c_p)  # the reference yields NaN here
        for i in range(len(ratios)):
            s = target - c_layer[i] + mean_c_p
            out[i][p] = min(0.01 if s <= 0 else s, MAX_SPARSITY)
    return out


def owl_nm(layer_ratios: list[float], n: int, m: int, lam: float) -> NMPlan:
    norm = minmax(layer_ratios)
    if norm is None:
        log.warning("OWL N:M: all layer outlier ratios are equal; using %d:%d everywhere", n, m)
        return [(n, m)] * len(layer_ratios)
    c = [lam * r for r in norm]
    mean_c = sum(c) / len(c)
    plan = [(min(max(n - round(ci - mean_c), 0), m), m) for ci in c]
    if len(set(plan)) == 1:
        log.warning("wanda_owl_structure: every layer got %d:%d (λ=%g is too small to move N by one); "
                    "raise --Lamda (the OWL reference uses 2)", *plan[0], lam)
    return plan


def allocate(name: str, profile, n_layers: int, target: float, lam: float) -> SparsityMap:
    if name == "uniform":
        return uniform_map(n_layers, target)
    if target > MAX_SPARSITY:
        raise OptionError("sparsity_ratio",
                          f"{target} is above {MAX_SPARSITY}, the most any projection may get")
    if name == "owl":
        return owl(profile.layer_ratios, profile.params, target, lam)
    if name == "mosaic":
        return mosaic(profile.ratios, profile.params, target, lam)
    if name == "mosaic_ref":
        return mosaic_ref(profile.ratios, profile.layer_ratios, target, lam)
    raise OptionError("allocation", f"unknown allocation '{name}'; use one of {', '.join(ALLOCATIONS)}")


def overall(sparsity: SparsityMap, params: list[dict[str, int]]) -> float:
    """Parameter-weighted mean of an allocation."""
    return weighted_mean(_flatten(sparsity), _flatten(params))


# --- allocation files ----------------------------------------------------------------------------

def write_file(path: str | os.PathLike, sparsity: SparsityMap, nm: NMPlan, meta: dict) -> None:
    """Write the map atomically (temp file, then rename), at full precision: applying the file gives
    exactly the model that produced it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, **meta, "projections": list(PROJECTIONS),
           "sparsity": [{p: float(row[p]) for p in PROJECTIONS} for row in sparsity],
           "nm": [list(x) if x else None for x in nm]}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


@dataclass
class AllocationFile:
    sparsity: SparsityMap
    nm: NMPlan | None  # None: the file prescribes no N:M pattern
    meta: dict  # everything else the file records (target, method, ...)


def read_file(path: str | os.PathLike) -> AllocationFile:
    """Parse and check an allocation file on its own; ``check_file`` checks it against a run."""
    option = "allocation_file"
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OptionError(option, f"cannot read {path}: {e}") from e
    rows = doc.get("sparsity") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise OptionError(option, f"{path} has no 'sparsity' list (one {{projection: sparsity}} per layer)")
    sparsity: SparsityMap = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(PROJECTIONS):
            raise OptionError(option, f"{path}: layer {i} must list exactly the projections "
                              f"{', '.join(PROJECTIONS)}")
        for p, s in row.items():
            if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < 1:
                raise OptionError(option, f"{path}: layer {i} {p} sparsity {s!r} is not in [0, 1)")
        sparsity.append({p: float(row[p]) for p in PROJECTIONS})
    nm = doc.get("nm")
    plan = None
    if nm is not None and any(x for x in nm):
        if not isinstance(nm, list) or len(nm) != len(rows):
            raise OptionError(option,
                              f"{path}: 'nm' must list one [N, M] (or null) per layer, like 'sparsity'")
        plan = []
        for i, x in enumerate(nm):
            ok = (isinstance(x, list) and len(x) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
                  and 0 <= x[0] < x[1])
            if not ok:
                raise OptionError(option, f"{path}: layer {i} 'nm' entry {x!r} is not [N, M] with 0 <= N < M")
            plan.append(tuple(x))
        if len({m for _, m in plan}) != 1:
            raise OptionError(option,
                              f"{path}: 'nm' mixes group sizes M {sorted({m for _, m in plan})}; use one M")
    meta = {k: v for k, v in doc.items() if k not in ("sparsity", "nm", "projections")}
    return AllocationFile(sparsity, plan, meta)


def check_layers(f: AllocationFile, path: str, n_layers: int) -> None:
    if len(f.sparsity) != n_layers:
        raise OptionError("allocation_file", f"{path} has {len(f.sparsity)} layers of sparsity; this model "
                          f"has {n_layers}")


def check_file(f: AllocationFile, path: str, n_layers: int | None, target: float, nm: tuple[int, int] | None,
               structured_ratio: float) -> None:
    """The file must fit the model (``n_layers``; None before it is loaded) and agree with the run's
    target, pattern and structured share."""
    option = "allocation_file"
    if n_layers is not None:
        check_layers(f, path, n_layers)
    declared = f.meta.get("target")
    if isinstance(declared, int | float) and abs(declared - target) > 1e-9:
        raise OptionError(option, f"{path} was made for a target sparsity of {declared:g}, but "
                          f"--sparsity_ratio is {target:g}; pass --sparsity_ratio {declared:g} or another "
                          "file")
    declared_r = f.meta.get("structured_ratio", 0.0) or 0.0
    if isinstance(declared_r, int | float) and abs(declared_r - structured_ratio) > 1e-9:
        raise OptionError(option, f"{path} was made with --structured_ratio {declared_r:g}, not "
                          f"{structured_ratio:g}")
    if (f.nm is None and nm is not None
            and any(abs(v - nm[0] / nm[1]) > 1e-9 for row in f.sparsity for v in row.values())):
        raise OptionError(option, f"{path} holds per-projection sparsities, but --sparsity_type "
                          f"{nm[0]}:{nm[1]} prunes one pattern everywhere; use --sparsity_type unstructured "
                          "or another file")
    if f.nm is not None:
        if nm is None:
            raise OptionError(option, f"{path} prescribes N:M patterns per layer; pass --sparsity_type "
                              f"N:{f.nm[0][1]} (e.g. the mean pattern) or another file")
        if f.nm[0][1] != nm[1]:
            raise OptionError(option, f"{path} uses groups of M={f.nm[0][1]}, but --sparsity_type is "
                              f"{nm[0]}:{nm[1]}")


@dataclass
class Allocation:
    """What every projection gets: the unstructured map, the N:M plan, and (composite) the structure."""

    sparsity: SparsityMap | None
    nm: NMPlan
    source: str | None  # the rule, or file:PATH; None when nothing is pruned
    target: float  # what the map's parameter-weighted mean should be
    params: list[dict[str, int]] | None  # the weights the map is weighted by (the kept ones, for composite)
    structure: list | None = None
    composite: dict | None = None
    search: dict | None = None  # the search's candidates and their KL (allocation search)
