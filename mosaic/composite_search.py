"""`--allocation search` with `--sparsity_type composite`: per-layer head and channel counts chosen by the
model's own output, removing exactly the rule's structured parameter count R.

1. Rule: the composite plan of the `mosaic` rule at R (restructure.plan_composite) fixes R, the parameters
   it removes from the decoder projections.
2. Candidates, per layer: every attention shape that keeps GQA integral (restructure.attention_options:
   g kept key/value groups × r query heads each; with ``uniform_widths`` only shapes a plain config can
   hold) and MLP widths on a grid of multiples of --round_to around the rule's width (``mlp_widths``),
   plus the rule's own shape and width. Which heads and channels a shape keeps comes from the rule's unit
   scores (residual-stream energy), as for the rule itself.
3. Curves: each candidate is built with the real structured step, the kernel run on o_proj / down_proj
   with the removed columns forced out (SparseGPT and ALPS move their contribution onto the kept columns),
   from the dense statistics. Its KL increase is predicted to second order as in the unstructured search
   (search.py): ½ Σ_i G_i ΔW_i H ΔW_iᵀ, with G the Fisher of the o_proj / down_proj outputs.
4. Solve: whole heads cannot be split, so the solve is exact and discrete: a knapsack by dynamic programming
   over the layers' attention and MLP parts minimising the summed predicted KL subject to removing exactly R
   (counted in units of the greatest common divisor of every candidate's count, so no rounding is involved:
   the rule's own choice is always a solution). With ``uniform_widths`` it enumerates the shape pairs shared
   by every layer that remove exactly R.
5. Guard: the searched plan and the rule's plan are each pruned as the run will prune them (S − R spread by
   the `mosaic` rule over the kept weights), from the dense statistics, and scored by the true KL on the
   held-out search windows (drawn after the statistics windows, sharing no token with them); the better is
   kept, so the search never does worse than the rule on held-out KL.
6. Refine (``generations`` > 0, per-layer widths only): ``refine_structure`` moves parameters between layers
   by exact counts (MLP channels, or attention shapes traded for exactly as many parameters), scored by the
   true KL on the held-out windows; the refined plan is kept only if it beats its start on validation
   windows (drawn after the held-out ones), both pruned as the run prunes them.

The plan is a file: with --allocation_file the per-layer kept heads and channels are written beside the
unstructured map, with --round_to, --uniform_widths, R and a fingerprint of the model, and re-applied bit for
bit (``check_plan`` refuses a plan made for another model, R or rounding).
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mosaic import refine
from mosaic.adapter import ATTENTION, MLP, Adapter
from mosaic.errors import OptionError
from mosaic.restructure import (
    Geometry,
    LayerPlan,
    attention_options,
    choose_heads,
    geometry,
    head_rows,
    kept_params,
)
from mosaic.search import fisher

log = logging.getLogger(__name__)

GRID = 6  # MLP widths: the rule's, and up to GRID steps either side
STEP = 0.05  # ... of about this fraction of the full width, a multiple of --round_to


@dataclass
class Option:
    """One candidate for one part (attention or MLP) of one layer."""

    removed: int  # projection parameters it removes
    kept: tuple  # attention: (heads, kv_heads); MLP: (channels,)
    kl: float = 0.0  # predicted KL increase
    rule: bool = False

    @property
    def width(self) -> str:
        return f"{len(self.kept[0])}/{len(self.kept[1])}" if len(self.kept) == 2 else str(len(self.kept[0]))


@dataclass
class CompositeSearch:
    structure: list[LayerPlan]
    chosen: str  # "search", "rule" or "evolved"
    kl: dict[str, float]  # true held-out KL of each plan (from the dense statistics)
    predicted: dict[str, float]  # summed predicted KL of each plan
    removed: int  # R: projection parameters both plans remove
    rule: list[LayerPlan] = field(default_factory=list)
    tokens: int = 0
    evolution: dict | None = None

    def to_json(self, geos: list[Geometry]) -> dict:
        def widths(plans):
            return [{"heads": len(p.heads), "kv_heads": len(p.kv_heads), "intermediate": len(p.channels)}
                    for p in plans]

        def removed(g, p):
            k = kept_params(g, p)
            full = kept_params(g, LayerPlan(list(range(g.heads)), list(range(g.kv_heads)),
                                            list(range(g.intermediate))))
            return ({"attention": sum(full[q] - k[q] for q in ATTENTION)}
                    | {"mlp": sum(full[q] - k[q] for q in MLP)})

        searched = [removed(g, p) for g, p in zip(geos, self.structure)]
        ruled = [removed(g, p) for g, p in zip(geos, self.rule)]
        return {"chosen": self.chosen, "kl": self.kl, "predicted_kl": self.predicted,
                "structured_params_removed": self.removed, "tokens": self.tokens, "evolution": self.evolution,
                "widths": {"rule": widths(self.rule), "search": widths(self.structure)},
                # per layer, parameters the search removed beyond the rule's (negative: it kept more)
                "gave_up": [{part: s[part] - r[part] for part in s} for s, r in zip(searched, ruled)]}


def removed_params(g: Geometry, plan: LayerPlan) -> int:
    full = LayerPlan(list(range(g.heads)), list(range(g.kv_heads)), list(range(g.intermediate)))
    return sum(kept_params(g, full).values()) - sum(kept_params(g, plan).values())


def mlp_widths(g: Geometry, rule_width: int, round_to: int) -> list[int]:
    """The rule's width and up to ``GRID`` steps either side (a step: about ``STEP`` of the full width, a
    multiple of ``round_to``), within [round_to, intermediate]."""
    step = max(round_to, int(round(STEP * g.intermediate / round_to)) * round_to)
    out = {rule_width}
    for k in range(-GRID, GRID + 1):
        w = rule_width + k * step
        if min(round_to, g.intermediate) <= w <= g.intermediate:
            out.add(w)
    return sorted(out)


def _structured_kl(kernel, weight: torch.Tensor, stats, kept_columns: torch.Tensor, grad: torch.Tensor,
                   options: dict) -> float:
    """Predicted KL increase of removing every input column of ``weight`` outside ``kept_columns`` with the
    kernel's compensation onto the kept ones (no unstructured pruning)."""
    forced = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    forced[kept_columns.to(weight.device)] = False
    if not bool(forced.any()):
        return 0.0
    w = weight.float()
    pruned = [w.clone()]
    kernel.prune(pruned, stats, [0.0], None, **options, forced_columns=forced)
    d = w - pruned[0]
    H = stats.hessian().to(d.device).float()
    g = grad.to(d.device).float().unsqueeze(1)
    return float(0.5 * (g * (d @ H) * d).sum())


def layer_options(adapter: Adapter, layer: nn.Module, scores: dict, rule: LayerPlan, stats: dict,
                  grads: dict, kernel, options: dict, *, round_to: int,
                  uniform: bool) -> tuple[list[Option], list[Option]]:
    """Attention and MLP candidates of one layer, each with its predicted KL increase."""
    g = geometry(adapter, layer)
    o = adapter.projection(layer, "o").weight.data
    down = adapter.projection(layer, "down").weight.data
    o_stats, down_stats = stats[("o",)].to(o.device), stats[("down",)].to(down.device)  # kept on CPU
    attention = []
    rule_shape = (len(rule.kv_heads), len(rule.heads) // len(rule.kv_heads))
    shapes = attention_options(g, uniform)
    if rule_shape not in [(a, r) for a, r, _ in shapes]:
        shapes.append((*rule_shape, 0))
    for groups, r, _ in shapes:
        heads, kv = choose_heads(g, scores["heads"], groups, r)
        plan = LayerPlan(heads, kv, list(range(g.intermediate)))
        kl = _structured_kl(kernel, o, o_stats, head_rows(heads, g.head_dim), grads["o"], options)
        attention.append(Option(removed_params(g, plan), (heads, kv), kl, (groups, r) == rule_shape))
    mlp = []
    order = scores["channels"].argsort(descending=True)
    for width in mlp_widths(g, len(rule.channels), round_to):
        channels = sorted(order[:width].tolist())
        plan = LayerPlan(list(range(g.heads)), list(range(g.kv_heads)), channels)
        kl = _structured_kl(kernel, down, down_stats, torch.tensor(channels, dtype=torch.long),
                            grads["down"], options)
        mlp.append(Option(removed_params(g, plan), (channels,), kl, width == len(rule.channels)))
    for part in (attention, mlp):  # the rule's own choice first: it wins ties
        part.sort(key=lambda x: not x.rule)
    return attention, mlp


def knapsack(parts: list[list[Option]], total: int) -> list[int] | None:
    """One option per part, the summed ``removed`` exactly ``total``, the summed ``kl`` least (exact dynamic
    programming in units of the gcd of every count). Ties go to the earlier option. None: no solution."""
    unit = total
    for part in parts:
        for x in part:
            unit = math.gcd(unit, x.removed)
    unit = unit or 1
    cap = total // unit
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choices = []
    for part in parts:
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for k, x in enumerate(part):
            w = x.removed // unit
            if w > cap:
                continue
            cand = best[:cap + 1 - w] + x.kl
            better = cand < new[w:]
            new[w:][better] = cand[better]
            arg[w:][better] = k
        best = new
        choices.append(arg)
    if not np.isfinite(best[cap]):
        return None
    picked, c = [], cap
    for part, arg in zip(reversed(parts), reversed(choices)):
        k = int(arg[c])
        picked.append(k)
        c -= part[k].removed // unit
    return picked[::-1]


def solve(attention: list[list[Option]], mlp: list[list[Option]], total: int,
          uniform: bool) -> tuple[list[Option], list[Option]]:
    """The per-layer choice removing exactly ``total`` with the least predicted KL."""
    n = len(attention)
    if not uniform:
        parts = [p for i in range(n) for p in (attention[i], mlp[i])]
        picked = knapsack(parts, total)
        return ([attention[i][picked[2 * i]] for i in range(n)],
                [mlp[i][picked[2 * i + 1]] for i in range(n)])
    best = None  # one shape for all layers: candidates are listed in the same order in every layer
    for a in range(len(attention[0])):
        for m in range(len(mlp[0])):
            if sum(attention[i][a].removed + mlp[i][m].removed for i in range(n)) != total:
                continue
            cost = sum(attention[i][a].kl + mlp[i][m].kl for i in range(n))
            rule = attention[0][a].rule and mlp[0][m].rule
            if best is None or (cost, not rule) < best[0]:
                best = ((cost, not rule), a, m)
    _, a, m = best
    return [row[a] for row in attention], [row[m] for row in mlp]


def search_composite(model: nn.Module, adapter: Adapter, kernel, stats: list[dict], scores: list[dict],
                     rule: list[LayerPlan], fisher_windows: torch.Tensor, held_out: torch.Tensor, *,
                     round_to: int, uniform_widths: bool, batch_size: int, seed: int, options: dict,
                     build, plan_map=None, generations: int = 0,
                     validation: torch.Tensor | None = None) -> CompositeSearch:
    """The searched composite plan (see the module's docstring). ``stats``: every group's dense statistics
    with Hessians; ``scores``: the rule's unit scores per layer; ``rule``: the rule's plan;
    ``build(structure) -> model``: a copy of the model pruned with ``structure`` as the run will prune it
    (S − R included), from the dense statistics; ``plan_map(structure)``: the unstructured map it prunes
    with. With ``generations`` > 0 (per-layer widths only) the kept plan is refined (``refine_structure``)
    and the refined plan kept only if it beats its start on ``validation``."""
    layers = list(adapter.layers(model))
    geos = [geometry(adapter, layer) for layer in layers]
    total = sum(removed_params(g, p) for g, p in zip(geos, rule))
    grads = fisher(model, adapter, fisher_windows, batch_size, seed)
    attention, mlp = [], []
    for i, layer in enumerate(tqdm(layers, desc="search: composite candidates", unit="layer", leave=False)):
        a, m = layer_options(adapter, layer, scores[i], rule[i], stats[i], grads[i], kernel, options,
                             round_to=round_to, uniform=uniform_widths)
        attention.append(a)
        mlp.append(m)
    del grads
    att, mm = solve(attention, mlp, total, uniform_widths)
    searched = [LayerPlan(list(a.kept[0]), list(a.kept[1]), list(m.kept[0])) for a, m in zip(att, mm)]
    assert sum(removed_params(g, p) for g, p in zip(geos, searched)) == total
    predicted = {"rule": sum(next(x for x in row if x.rule).kl for part in (attention, mlp) for row in part),
                 "search": sum(x.kl for x in att + mm)}
    scorer = refine.fitness(model, adapter, held_out, 1)
    kl, built = {}, {}
    for name, plan in (("rule", rule), ("search", searched)):
        built[name] = build(plan)
        kl[name] = scorer.reset(built[name])
        built[name] = (built[name], scorer.inputs)
    chosen = "search" if kl["search"] < kl["rule"] else "rule"
    log.info("composite search: held-out KL rule %.4f, search %.4f (predicted %.4f, %.4f); %s kept",
             kl["rule"], kl["search"], predicted["rule"], predicted["search"], chosen)
    structure = searched if chosen == "search" else rule
    evolution = None
    if generations > 0 and not uniform_widths and validation is not None and plan_map is not None:
        scorer.model, scorer.inputs = built[chosen]
        built = None
        evolved = refine_structure(model, scorer, kernel, stats, scores, structure, plan_map(structure),
                                   kl[chosen], generations, seed=seed, options=options, round_to=round_to)
        evolution = {"from": chosen, **evolved.to_json(),
                     "structured_params_removed": sum(removed_params(g, p)
                                                      for g, p in zip(geos, evolved.structure))}
        scorer = None
        if evolved.accepted:  # it fits the held-out windows: judge it against its start on unseen ones
            check = refine.fitness(model, adapter, validation, 1)
            judged = {chosen: check.reset(build(structure))}
            judged["evolved"] = check.reset(build(evolved.structure))
            check = None
            evolution["validation_kl"] = judged
            if judged["evolved"] < judged[chosen]:
                structure, chosen = evolved.structure, "evolved"
                kl["evolved"] = evolved.fitness
        assert sum(removed_params(g, p) for g, p in zip(geos, structure)) == total
    return CompositeSearch(structure, chosen, kl, predicted, total, rule,
                           held_out.shape[0] * (held_out.shape[1] - 1), evolution)


# --- evolutionary refinement ---------------------------------------------------------------------------

@dataclass
class Refined:
    structure: list[LayerPlan]
    fitness: float
    start_fitness: float
    history: list[float] = field(default_factory=list)
    accepted: int = 0

    def to_json(self) -> dict:
        return {"generations": len(self.history), "accepted": self.accepted, "start_kl": self.start_fitness,
                "kl": self.fitness, "history": self.history}


def with_width(g: Geometry, scores: dict, plan: LayerPlan, width: int) -> LayerPlan:
    order = scores["channels"].argsort(descending=True)
    return LayerPlan(plan.heads, plan.kv_heads, sorted(order[:width].tolist()))


def with_shape(g: Geometry, scores: dict, plan: LayerPlan, groups: int, r: int) -> LayerPlan:
    heads, kv = choose_heads(g, scores["heads"], groups, r)
    return LayerPlan(heads, kv, plan.channels)


def mutate_structure(parent: list[LayerPlan], geos: list[Geometry], scores: list[dict], round_to: int,
                     gen: torch.Generator) -> tuple[list[LayerPlan], set[int]]:
    """One exact-count move between two layers: ``round_to`` MLP channels from one layer to another, or an
    attention shape traded for one that removes exactly as many more parameters in another layer. A move
    that does not fit is redrawn, up to 20 times; the changed layers come back empty when none fitted."""
    n = len(parent)
    for _ in range(20):
        i, j = (int(k) for k in torch.randperm(n, generator=gen)[:2])
        gi, gj = geos[i], geos[j]
        if int(torch.randint(2, (1,), generator=gen)) == 0:  # MLP channels: i keeps more, j fewer
            wi, wj = len(parent[i].channels) + round_to, len(parent[j].channels) - round_to
            if wi <= gi.intermediate and wj >= round_to and gi.hidden == gj.hidden:
                child = list(parent)
                child[i], child[j] = with_width(gi, scores[i], parent[i], wi), with_width(gj, scores[j],
                                                                                       parent[j], wj)
                return child, {i, j}
            continue
        now_i, now_j = removed_params(gi, parent[i]), removed_params(gj, parent[j])
        mlp_i = removed_params(gi, LayerPlan(list(range(gi.heads)), list(range(gi.kv_heads)),
                                             parent[i].channels))
        mlp_j = removed_params(gj, LayerPlan(list(range(gj.heads)), list(range(gj.kv_heads)),
                                             parent[j].channels))
        moves = []
        for ga, ra, removed_a in attention_options(gi):
            delta = now_i - (removed_a + mlp_i)  # > 0: i keeps delta more
            if delta <= 0:
                continue
            for gb, rb, removed_b in attention_options(gj):
                if removed_b + mlp_j - now_j == delta:
                    moves.append((ga, ra, gb, rb))
        if moves:
            ga, ra, gb, rb = moves[int(torch.randint(len(moves), (1,), generator=gen))]
            child = list(parent)
            child[i], child[j] = with_shape(gi, scores[i], parent[i], ga, ra), with_shape(gj, scores[j],
                                                                                       parent[j], gb, rb)
            return child, {i, j}
    return parent, set()


def refine_structure(dense: nn.Module, scorer: refine.Fitness, kernel, stats: list[dict], scores: list[dict],
                     start: list[LayerPlan], sparsity, start_fitness: float, generations: int, *, seed: int,
                     options: dict, round_to: int, offspring: int = 8) -> Refined:
    """A (1 + λ) search over per-layer widths with exact-count moves (``mutate_structure``), scored by the
    true KL of ``scorer`` (whose model is ``start`` pruned as the run prunes it, from the dense statistics).
    A changed layer is re-pruned from the dense weights and statistics with the start's unstructured map
    ``sparsity``. Each generation is ``refine.generation`` (two-stage selection, as in refine.evolve);
    never worse than the start on its windows."""
    from mosaic.adapter import GROUPS, PROJECTIONS
    from mosaic.prune import prune_group

    adapter, model = scorer.adapter, scorer.model
    dense_layers, layers = adapter.layers(dense), adapter.layers(model)
    geos = [geometry(adapter, layer) for layer in dense_layers]
    gen = torch.Generator().manual_seed(seed)
    parent, best = start, Refined(start, start_fitness, start_fitness)

    def snapshot(changed):
        return {i: [adapter.projection(layers[i], p).weight.data.clone() for p in PROJECTIONS]
                for i in sorted(changed)}

    def restore(weights):
        for i, tensors in weights.items():
            for p, w in zip(PROJECTIONS, tensors):
                adapter.projection(layers[i], p).weight.data.copy_(w)

    def apply(structure, changed):
        before = snapshot(changed)
        for i in sorted(changed):
            for p in PROJECTIONS:
                adapter.projection(layers[i], p).weight.data.copy_(
                    adapter.projection(dense_layers[i], p).weight.data)
            device = adapter.projection(layers[i], "q").weight.device
            for group in GROUPS:
                prune_group(adapter, layers[i], group, stats[i][group].to(device), kernel, sparsity[i], None,
                            options, structure[i])
        return before

    bar = tqdm(range(generations), desc="search: evolve widths", leave=False)
    for _ in bar:
        children = (mutate_structure(parent, geos, scores, round_to, gen) for _ in range(offspring))
        won = refine.generation(scorer, children, apply, snapshot, restore, min, best.fitness)
        if won:
            child, best.fitness = won
            parent = best.structure = child
            best.accepted += 1
        best.history.append(best.fitness)
        bar.set_postfix(kl=f"{best.fitness:.4f}", accepted=best.accepted)
    return best


# --- the plan as a file ------------------------------------------------------------------------------

def fingerprint(model: nn.Module, adapter: Adapter, held=None) -> dict:
    """What identifies the model a plan was made for: family, shape and a hash of its embedding (rounded to
    bf16 first, so an fp32 and a bf16 load of one checkpoint agree)."""
    layers = adapter.layers(model)
    with held("embed") if held else nullcontext():
        emb = model.get_input_embeddings().weight.detach()
        digest = hashlib.sha256(emb.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()).hexdigest()
    with held(0) if held else nullcontext():
        g = geometry(adapter, layers[0])
    return {"family": adapter.family, "layers": len(layers), "hidden": g.hidden, "heads": g.heads,
            "kv_heads": g.kv_heads, "head_dim": g.head_dim, "intermediate": g.intermediate,
            "embedding_sha256": digest[:16]}


def plan_meta(structure: list[LayerPlan], removed: int, round_to: int, uniform_widths: bool,
              print_: dict) -> dict:
    """What an --allocation_file records of a composite plan."""
    rows = [{"heads": p.heads, "kv_heads": p.kv_heads, "channels": p.channels} for p in structure]
    return {"structure": rows, "round_to": round_to, "uniform_widths": uniform_widths,
            "structured_params_removed": removed, "fingerprint": print_}


def read_plan(meta: dict, path: str) -> list[LayerPlan] | None:
    """The per-layer structure an --allocation_file holds (None: it holds none, as files of earlier runs)."""
    rows = meta.get("structure")
    if rows is None:
        return None
    try:
        return [LayerPlan([int(h) for h in r["heads"]], [int(k) for k in r["kv_heads"]],
                          [int(c) for c in r["channels"]]) for r in rows]
    except (TypeError, KeyError, ValueError) as e:
        raise OptionError("allocation_file", f"{path}: 'structure' must list heads, kv_heads and "
                          "channels per layer") from e


def check_options(meta: dict, path: str, round_to: int, uniform_widths: bool, composite: bool) -> None:
    """A composite plan must be applied with the rounding and width mode it was made with (before any
    work)."""
    if "structure" not in meta:
        return
    if not composite:
        raise OptionError("allocation_file", f"{path} holds a composite plan (heads and channels); add "
                          "--sparsity_type composite or use another file")
    if meta.get("round_to") != round_to:
        raise OptionError("allocation_file", f"{path} was made with --round_to {meta.get('round_to')}, not "
                          f"{round_to}")
    if bool(meta.get("uniform_widths")) != uniform_widths:
        made = "with" if meta.get("uniform_widths") else "without"
        raise OptionError("allocation_file", f"{path} was made {made} --uniform_widths; pass the same or use "
                          "another file")


def check_plan(meta: dict, path: str, model: nn.Module, adapter: Adapter, held=None) -> None:
    """A composite plan must fit the loaded model: its fingerprint, and the R it records (one line each)."""
    structure = read_plan(meta, path)
    if structure is None:
        return
    mine = fingerprint(model, adapter, held)
    theirs = meta.get("fingerprint")
    if theirs != mine:
        diff = sorted(k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k])
        raise OptionError("allocation_file", f"{path} is a composite plan for another model (differs in "
                          f"{', '.join(diff)})")
    layers = adapter.layers(model)
    geos = []
    for i in range(len(layers)):
        with held(i) if held else nullcontext():
            geos.append(geometry(adapter, layers[i]))
    for i, (g, p) in enumerate(zip(geos, structure)):
        ok = (p.heads and p.kv_heads and len(p.heads) % len(p.kv_heads) == 0
              and all(0 <= h < g.heads for h in p.heads) and all(0 <= k < g.kv_heads for k in p.kv_heads)
              and all(0 <= c < g.intermediate for c in p.channels) and p.channels)
        if not ok:
            raise OptionError("allocation_file", f"{path}: layer {i}'s structure does not fit this model")
    removed = sum(removed_params(g, p) for g, p in zip(geos, structure))
    if removed != meta.get("structured_params_removed"):
        raise OptionError("allocation_file", f"{path}: its structure removes {removed} parameters, not the "
                          f"{meta.get('structured_params_removed')} it records")

