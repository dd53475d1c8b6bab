"""A KV sparsity per decoder layer (``layer``) or per (layer, KV head) (``head``), K and V apart: spend the
pruning where the model's output cares least, at the same overall sparsity as the uniform spec.

1. ``sensitivity``: on calibration windows (never an evaluation split), how much the next-token
   distribution moves (KL(dense-cache ‖ pruned) per predicted token) when one layer's or one head's K cache
   alone (separately: V) is pruned at each of a few levels, everything else dense, through the
   teacher-forced attention (each query sees its last ``window`` tokens dense, older ones pruned).

   ``method="fisher"`` (the default, fast): one forward and one backward of the dense model give, at every
   attention output (before o_proj), the Fisher of its predictive distribution: the mean squared
   gradient of log p(ŷ), ŷ sampled from the model itself (as ``mosaic.search`` does for weights). Then each
   layer's attention alone is recomputed from its captured queries, keys and values with K (or V) pruned
   at each level, and KL ≈ ½ Σ G·Δ² over the outputs it changes (the second-order term; the first vanishes
   at the dense model). A KV head only changes the outputs of its own query heads, so one recomputation
   with every head of a layer pruned gives each head's curve too, and the layer's is their sum. For
   SmolLM2-135M, 4 windows × 512 tokens, about a minute on 2 CPU cores.

   ``method="exact"``: the true KL, one full forward per (layer or head, level, K or V) against dense
   logits computed once; ~360 forwards per window for SmolLM2 at layer granularity: for checking the
   estimate, or small models.

2. ``solve``: minimise the summed curves subject to the overall K (and, separately, V) sparsity, in integer
   counts of pruned entries per vector (round(s·head_dim) for per_token, round(s·group) for per_channel),
   as the criterion prunes them: every (layer or head) starts dense, then the cheapest segments of its
   curve's lower convex hull (KL per pruned entry) are taken in order (water-filling), the last one in
   part, so that Σ over all (layer, head) vectors of the count is round(target · size · vectors). The
   achieved share of pruned entries is then within half an entry per token of the target (SmolLM2:
   30 × 3 heads × 64 = 5760 entries, so within 1e-4). At ``layer`` granularity a remainder smaller than one
   layer's heads is spread over that layer's first heads (one entry more each), the one place a ``layer``
   map lists heads. Sparsities never exceed the highest measured level.

3. ``write`` / ``read``: the map as JSON (``--kv_allocation_file``), at full precision: re-applying it
   gives the same spec, so the same logits bit for bit. ``describe``: what it learned, in a few lines.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mosaic import dist
from mosaic.errors import OptionError
from mosaic.kv.attention import attend, mustafar_attention
from mosaic.kv.prune import KVSparsity, LayerSparsity, heads_of, prune_count
from mosaic.kv.report import head_dim, kv_heads

LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
WINDOWS, SEQLEN = 4, 512  # calibration windows × tokens the sensitivity reads by default
GRANULARITIES = ("layer", "head")
FORMAT = "mosaic-kv-allocation/1"
OPTION = "kv_allocation_file"


@dataclass
class Curves:
    """KL per predicted token when one unit's cache alone is pruned at each level: ``k[layer][unit][level]``,
    a unit being the whole layer (``layer``) or one KV head (``head``)."""

    levels: list[float]
    k: list[list[list[float]]]
    v: list[list[list[float]]]
    granularity: str
    kv_heads: list[int]
    head_dim: int
    tokens: int
    seconds: float
    method: str

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def by_layer(self) -> Curves:
        """Per-head curves summed per layer (the layer's own curve under the Fisher estimate, which adds)."""
        if self.granularity == "layer":
            return self
        add = [[[sum(level) for level in zip(*units)] for units in side] for side in (self.k, self.v)]
        return replace(self, k=[[row] for row in add[0]], v=[[row] for row in add[1]], granularity="layer")


# --- sensitivity -------------------------------------------------------------------------------------

def sensitivity(model: nn.Module, windows: torch.Tensor, spec: KVSparsity, granularity: str = "layer",
                levels: tuple[float, ...] = LEVELS, method: str = "fisher", seed: int = 0) -> Curves:
    """Curves for K and V of every layer (or KV head) on ``windows`` [n, tokens] of calibration token ids,
    with ``spec``'s window, criteria and group (its sparsities are not read)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    start = time.perf_counter()
    heads, dim = kv_heads(model), head_dim(model)
    base = replace(spec, k_sparsity=0.0, v_sparsity=0.0, k_layers=None, v_layers=None, reference=False,
                   prefill="dense")
    if method == "fisher":
        k, v, tokens = _fisher_curves(model, windows, base, heads, list(levels), seed)
        measured = "head"
    elif method == "exact":
        k, v, tokens = _exact_curves(model, windows, base, heads, list(levels), granularity)
        measured = granularity
    else:
        raise ValueError(f"method must be 'fisher' or 'exact', got {method!r}")
    curves = Curves(list(levels), k, v, measured, heads, dim, tokens, time.perf_counter() - start, method)
    return curves.by_layer() if granularity == "layer" else curves


@torch.no_grad()
def _fisher_curves(model: nn.Module, windows: torch.Tensor, base: KVSparsity, heads: list[int],
                   levels: list[float], seed: int):
    """Per (layer, KV head, level): ½ Σ G·Δ² of the attention output, summed over windows, per token."""
    sums = {side: [torch.zeros(h, len(levels), dtype=torch.float64) for h in heads] for side in ("k", "v")}
    gen = torch.Generator().manual_seed(seed)
    tokens = 0
    for window in windows:
        captured = _dense_pass(model, window.unsqueeze(0), base, gen)
        for layer, (q, k, v, mask, scaling, groups, out, g2) in captured.items():
            for j, level in enumerate(levels):
                for side in ("k", "v"):
                    spec = replace(base, **{f"{side}_sparsity": level})
                    pruned, _ = attend(q, k, v, mask, scaling, groups, spec, layer)
                    cost = 0.5 * (g2 * (pruned.float() - out.float()).pow(2)).sum((0, 1, 3))  # per query head
                    sums[side][layer][:, j] += cost.view(heads[layer], groups).sum(1).double().cpu()
        tokens += window.numel() - 1
    return ([(s / tokens).tolist() for s in sums["k"]], [(s / tokens).tolist() for s in sums["v"]], tokens)


def _dense_pass(model: nn.Module, ids: torch.Tensor, base: KVSparsity, gen: torch.Generator) -> dict:
    """One forward and backward of the dense model; per layer its attention's inputs, output, and the
    squared gradient of log p(ŷ) at that output, ŷ sampled from the model."""
    captured, grads = {}, {}

    def observe(module, _spec, query, key, value, mask, scaling, output):
        i = module.layer_idx
        captured[i] = (query.detach(), key.detach(), value.detach(), None if mask is None else mask.detach(),
                       scaling, module.num_key_value_groups, output.detach())
        if output.requires_grad:
            output.register_hook(lambda g: grads.__setitem__(i, g.detach().float().pow(2)))

    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_())
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    device = next(model.parameters()).device
    try:
        with torch.enable_grad(), mustafar_attention(model, base, observe=observe):
            logits = model(ids.to(device)).logits[:, :-1].float()
            probs = F.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).cpu()
            sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sampled, reduction="sum").backward()
    finally:
        hook.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return {i: (*captured[i], grads[i]) for i in sorted(captured)}


@torch.no_grad()
def _exact_curves(model: nn.Module, windows: torch.Tensor, base: KVSparsity, heads: list[int],
                  levels: list[float], granularity: str):
    """The true KL of every single-unit pruning, against the dense logits computed once."""
    device = next(model.parameters()).device
    ids = windows.to(device)
    with mustafar_attention(model, base):
        reference = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
    tokens = reference.shape[0] * reference.shape[1]

    def kl(side: str, layer: int, unit: int | None, level: float) -> float:
        sparsities = [0.0] * len(heads)
        at = level if unit is None else tuple(level if h == unit else 0.0 for h in range(heads[layer]))
        sparsities[layer] = at
        spec = replace(base, **{f"{side}_layers": sparsities})
        with mustafar_attention(model, spec):
            logp = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
        return float(F.kl_div(logp, reference, log_target=True, reduction="sum")) / tokens

    units = [[None] if granularity == "layer" else list(range(h)) for h in heads]
    curves = {side: [[[kl(side, i, u, s) for s in levels] for u in units[i]] for i in range(len(heads))]
              for side in ("k", "v")}
    return curves["k"], curves["v"], tokens


# --- solve -------------------------------------------------------------------------------------------

def _hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Lower convex hull of (count, cost) points, left to right; the cheapest cost per count."""
    best: dict[int, float] = {}
    for c, e in points:
        best[c] = min(e, best.get(c, e))
    hull: list[tuple[int, float]] = []
    for c, e in sorted(best.items()):
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (c - hull[-2][0]) >= (e - hull[-2][1]) * (
                hull[-1][0] - hull[-2][0]):
            hull.pop()
        hull.append((c, e))
    return hull


def solve_counts(curves: list[list[list[float]]], levels: list[float], weights: list[list[int]], size: int,
                 target: float) -> list[list[list[int]]]:
    """Entries to prune per vector: ``counts[layer][unit]`` lists one count for each of the unit's
    ``weights[layer][unit]`` vectors (of ``size`` entries), so that their sum over everything is
    round(target · size · Σ weights) at the least summed cost (``curves[layer][unit][level]``), by
    water-filling along each curve's lower convex hull from 0 (cost 0)."""
    total = sum(w for row in weights for w in row)
    wanted = round(target * size * total)
    if wanted > prune_count(size, max(levels)) * total:
        raise ValueError(f"target {target} is above the highest measured level {max(levels)}")
    counts = [[0] * len(row) for row in curves]
    segments = []
    for i, row in enumerate(curves):
        for u, costs in enumerate(row):
            hull = _hull([(0, 0.0)] + [(prune_count(size, s), e) for s, e in zip(levels, costs)])
            for (a, ea), (b, eb) in zip(hull, hull[1:]):
                segments.append(((eb - ea) / (weights[i][u] * (b - a)), i, u, a, b))
    remaining, extra = wanted, {}
    for _slope, i, u, a, b in sorted(segments):  # convex: each unit's segments come in order
        if remaining <= 0:
            break
        w = weights[i][u]
        steps = min(b - a, remaining // w)
        counts[i][u] = a + steps
        remaining -= steps * w
        # the segment taken in part ends the walk; what is left (< w) goes to its first vectors
        if steps < b - a:
            extra[i, u], remaining = remaining, 0
    return [[[c + (k < extra.get((i, u), 0)) for k in range(weights[i][u])] for u, c in enumerate(row)]
            for i, row in enumerate(counts)]


def solve(curves: Curves, spec: KVSparsity) -> KVSparsity:
    """``spec`` with per-layer (``layer``: a number per layer) or per-head maps whose overall K and V
    sparsities are its ``k_sparsity`` and ``v_sparsity`` (target 0: all zeros)."""
    if spec.reference:
        raise ValueError("reference mode reproduces the official uniform count; "
                         "an allocation prunes exact counts")
    weights = [[h] if curves.granularity == "layer" else [1] * h for h in curves.kv_heads]
    maps = {}
    for side, target, method in (("k", spec.k_sparsity, spec.k_method),
                                 ("v", spec.v_sparsity, spec.v_method)):
        size = curves.head_dim if method == "per_token" else spec.group
        counts = solve_counts(getattr(curves, side), curves.levels, weights, size, target)
        per_layer = [[c / size for unit in row for c in unit] for row in counts]  # one per KV head
        maps[f"{side}_layers"] = [s[0] if curves.granularity == "layer" and len(set(s)) == 1 else tuple(s)
                                  for s in per_layer]
    return replace(spec, **maps)


# --- files -------------------------------------------------------------------------------------------

@dataclass
class KVAllocationFile:
    k: list[LayerSparsity]
    v: list[LayerSparsity]
    kv_heads: list[int]
    head_dim: int
    meta: dict  # everything else: target, methods, group, granularity, curves, ...


def _entry(s: LayerSparsity) -> float | list[float]:
    return list(s) if isinstance(s, tuple) else s


def write(path: str | os.PathLike, spec: KVSparsity, heads: list[int], dim: int,
          meta: dict | None = None) -> None:
    """Write ``spec``'s maps atomically (temp file, then rename), at full precision."""
    if not spec.allocated:
        raise ValueError("the spec has no per-layer map to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(heads)
    doc = {"format": FORMAT, **(meta or {}), "target": {"k": spec.k_sparsity, "v": spec.v_sparsity},
           "k_method": spec.k_method, "v_method": spec.v_method, "group": spec.group, "window": spec.window,
           "kv_heads": list(heads),
           "head_dim": dim, "k": [_entry(spec.k_at(i)) for i in range(n)],
           "v": [_entry(spec.v_at(i)) for i in range(n)]}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def read_file(path: str | os.PathLike) -> KVAllocationFile:
    """Parse and check a KV allocation file on its own; ``check_file`` checks it against a run."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OptionError(OPTION, f"cannot read {path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise OptionError(OPTION, f"{path} is not a KV allocation file (no \"format\": \"{FORMAT}\")")
    heads, dim = doc.get("kv_heads"), doc.get("head_dim")
    if not isinstance(heads, list) or not heads or not all(isinstance(h, int) and h > 0 for h in heads):
        raise OptionError(OPTION, f"{path} has no 'kv_heads' list (the KV heads of every layer)")
    if not isinstance(dim, int) or dim < 1:
        raise OptionError(OPTION, f"{path} has no positive integer 'head_dim'")
    target = doc.get("target")
    if not isinstance(target, dict) or not all(_number(target.get(side)) for side in ("k", "v")):
        raise OptionError(OPTION, f"{path} has no 'target' {{\"k\": sparsity, \"v\": sparsity}}")
    maps = {}
    for side in ("k", "v"):
        rows = doc.get(side)
        if not isinstance(rows, list) or len(rows) != len(heads):
            raise OptionError(OPTION, f"{path}: '{side}' must list one entry per layer, "
                              f"as 'kv_heads' ({len(heads)})")
        for i, (row, h) in enumerate(zip(rows, heads)):
            values = [row] if _number(row) else row if isinstance(row, list) and len(row) == h else None
            if values is None or not all(_number(s) and 0 <= s < 1 for s in values):
                raise OptionError(OPTION, f"{path}: layer {i} {side.upper()} entry {row!r} is not a "
                                  f"sparsity in [0, 1) or a list of {h} (one per KV head)")
        maps[side] = [float(r) if _number(r) else tuple(float(s) for s in r) for r in rows]
    meta = {key: value for key, value in doc.items() if key not in ("k", "v", "kv_heads", "head_dim")}
    return KVAllocationFile(maps["k"], maps["v"], heads, dim, meta)


def check_file(f: KVAllocationFile, path: str | os.PathLike, spec: KVSparsity, heads: list[int] | None = None,
               dim: int | None = None, granularity: str | None = None) -> None:
    """The file must be for this run's targets, criteria and dense window, for the granularity the run names
    (``granularity`` layer or head; uniform, the default, applies whatever the file holds), and (once the
    model is loaded: ``heads``, ``dim``) for its layers, KV heads and head size."""
    target = f.meta["target"]
    if abs(target["k"] - spec.k_sparsity) > 1e-9 or abs(target["v"] - spec.v_sparsity) > 1e-9:
        raise OptionError(OPTION, f"{path} was made for K/V sparsity {target['k']:g}/{target['v']:g}, "
                          f"but this run asks {spec.k_sparsity:g}/{spec.v_sparsity:g}; "
                          "pass those sparsities or another file")
    for key in ("k_method", "v_method", "group"):
        if key in f.meta and f.meta[key] != getattr(spec, key):
            raise OptionError(OPTION, f"{path} was made with {key} {f.meta[key]}, not {getattr(spec, key)}")
    made = f.meta.get("granularity")
    if granularity not in (None, "uniform") and made is not None and made != granularity:
        raise OptionError(OPTION, f"{path} holds a {made} map, but this run asks --kv_allocation "
                          f"{granularity}; pass --kv_allocation {made} to apply it, or another file path to "
                          f"measure a {granularity} map")
    if "window" in f.meta and f.meta["window"] != spec.window:
        raise OptionError(OPTION, f"{path} was measured with --kv_window {f.meta['window']}, but this run "
                          f"keeps {spec.window} tokens dense; pass --kv_window {f.meta['window']} or another "
                          "file path")
    if heads is not None and len(heads) != len(f.kv_heads):
        raise OptionError(OPTION, f"{path} has {len(f.kv_heads)} layers; this model has {len(heads)}")
    if heads is not None and list(heads) != f.kv_heads:
        i = next(i for i, (a, b) in enumerate(zip(f.kv_heads, heads)) if a != b)
        raise OptionError(OPTION, f"{path} has {f.kv_heads[i]} KV heads in layer {i}; "
                          f"this model has {heads[i]}")
    if dim is not None and dim != f.head_dim:
        raise OptionError(OPTION, f"{path} was made for head_dim {f.head_dim}; this model's is {dim}")


def check_model(f: KVAllocationFile, path: str | os.PathLike, spec: KVSparsity, model: nn.Module) -> None:
    """``check_file`` against ``model``'s layers, KV heads per layer and head size."""
    check_file(f, path, spec, kv_heads(model), head_dim(model))


def apply(f: KVAllocationFile, spec: KVSparsity) -> KVSparsity:
    """``spec`` with the file's maps."""
    return replace(spec, k_layers=f.k, v_layers=f.v)


def read(path: str | os.PathLike, spec: KVSparsity, heads: list[int], dim: int) -> KVSparsity:
    """Read, check against the run and the model, apply."""
    f = read_file(path)
    check_file(f, path, spec, heads, dim)
    return apply(f, spec)


# --- what it learned -----------------------------------------------------------------------------------

def _units(sparsity, heads: list[int]) -> list[tuple[str, float]]:
    """(name, sparsity) per layer, or per layer.head where a layer's heads differ."""
    out = []
    for i, h in enumerate(heads):
        per_head = heads_of(sparsity(i), h)
        out += ([(f"{i}", per_head[0])] if len(set(per_head)) == 1
                else [(f"{i}.{j}", s) for j, s in enumerate(per_head)])
    return out


def describe(spec: KVSparsity, heads: list[int], shown: int = 3) -> list[str]:
    """A few lines: per side the share of entries pruned, which layers (layer.head where a layer's heads
    differ) keep their cache densest and which are pruned most, then K against V."""
    lines, spread = [], {}
    for side, at, target in (("K", spec.k_at, spec.k_sparsity), ("V", spec.v_at, spec.v_sparsity)):
        units = _units(lambda i, at=at: at(i if spec.allocated else None), heads)
        values = [s for _, s in units]
        mean = sum(sum(heads_of(at(i if spec.allocated else None), h))
                   for i, h in enumerate(heads)) / sum(heads)
        spread[side] = float(torch.tensor(values).std()) if len(values) > 1 else 0.0
        if max(values) == 0:
            lines.append(f"{side}: not pruned")
            continue
        order = sorted(units, key=lambda unit: unit[1])
        dense = [name for name, s in units if s <= 0.2]
        lines.append(f"{side}: {mean:.4f} of entries pruned (target {target:g}), "
                     f"{min(values):.2f}–{max(values):.2f}; densest "
                     + ", ".join(f"{n} ({s:.2f})" for n, s in order[:shown]) + "; pruned most "
                     + ", ".join(f"{n} ({s:.2f})" for n, s in order[::-1][:shown])
                     + (f"; kept at ≤ 20%: {', '.join(dense)}" if dense else ""))
    lines.append(f"K vs V: spread (std across layers/heads) {spread['K']:.2f} vs {spread['V']:.2f}")
    return lines


def allocate(model: nn.Module, spec: KVSparsity, granularity: str, windows: torch.Tensor | None,
             file: KVAllocationFile | None = None, path: str | None = None, meta: dict | None = None,
             seed: int = 0) -> tuple[KVSparsity, dict]:
    """``spec`` with its map for ``model``: the ``file``'s (read from ``path``, checked against the model's
    layers and heads), or solved from a sensitivity on ``windows`` of calibration text (``granularity``
    layer or head; then written to ``path`` if given), or uniform. Also what it learned, for the record."""
    heads, dim = kv_heads(model), head_dim(model)
    if file is not None:
        check_file(file, path, spec, heads, dim, granularity)
        spec, learned = apply(file, spec), {"source": f"file:{path}"}
    elif granularity == "uniform":
        return spec, {}
    else:
        curves = sensitivity(model, windows, spec, granularity, seed=seed)
        spec = solve(curves, spec)
        learned = {"source": granularity, "sensitivity_s": round(curves.seconds, 1),
                   "sensitivity_tokens": curves.tokens}
        if path:  # under torchrun every rank measures alike; rank 0 writes
            meta = {**(meta or {}), "granularity": granularity, "curves": curves.to_json()}
            dist.from_writer(lambda: write(path, spec, heads, dim, meta))
    return spec, {**learned, "learned": describe(spec, heads)} if spec.allocated else learned
