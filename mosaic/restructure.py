"""Composite pruning's structured step: remove whole attention heads and MLP channels, physically.

Units that keep the model valid:
  attention  query heads, kept so that every kept key/value head serves the same number r of query
             heads (GQA stays integral): a layer keeps g key/value groups × r query heads each.
             q/k/v lose rows (and biases), o_proj loses the matching columns.
  MLP        intermediate channels: gate/up rows, down_proj columns. Kept widths are multiples of
             --round_to.

Scores are activation-aware: a unit's importance is the energy it adds to the residual stream,
Σ_j ‖W_out[:, j]‖² · E[x_j²] over its columns j of o_proj / down_proj (x: that projection's input, from
the dense calibration pass). How much each layer gives up comes from the sparsity allocation at the
structured ratio R (uniform, OWL or Mosaic: low-outlier projections give up more structure); within a
layer the lowest-energy units go.

The pruning pass then runs with this plan: kept rows are pruned unstructured, and the columns of o_proj
/ down_proj that feed removed units are pruned as whole columns first, so SparseGPT's OBS update
moves their contribution onto the kept columns. Finally ``apply`` slices the weights.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from mosaic import allocate as alloc
from mosaic.adapter import ATTENTION, MLP, PROJECTIONS, Adapter

log = logging.getLogger(__name__)


@dataclass
class LayerPlan:
    heads: list[int]  # kept query heads
    kv_heads: list[int]  # kept key/value heads
    channels: list[int]  # kept MLP intermediate channels

    def to_json(self) -> dict:
        return {"heads": len(self.heads), "kv_heads": len(self.kv_heads), "intermediate": len(self.channels),
                "kept_heads": self.heads, "kept_kv_heads": self.kv_heads}


@dataclass(frozen=True)
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads


def geometry(adapter: Adapter, layer: nn.Module) -> Geometry:
    p = adapter.projections(layer)
    d = adapter.head_dim(layer)
    return Geometry(heads=p["q"].out_features // d, kv_heads=p["k"].out_features // d, head_dim=d,
                    hidden=p["q"].in_features, intermediate=p["gate"].out_features)


def kept_params(g: Geometry, plan: LayerPlan) -> dict[str, int]:
    h, kv, c, d = len(plan.heads), len(plan.kv_heads), len(plan.channels), g.head_dim
    return {"q": h * d * g.hidden, "k": kv * d * g.hidden, "v": kv * d * g.hidden, "o": g.hidden * h * d,
            "gate": c * g.hidden, "up": c * g.hidden, "down": g.hidden * c}


def kept_projection_params(adapter: Adapter, model: nn.Module,
                           plans: list[LayerPlan]) -> list[dict[str, int]]:
    """Weights per (layer, projection) that ``plans`` keep: what a composite run's map is weighted by."""
    return [kept_params(geometry(adapter, layer), plan) for layer, plan in zip(adapter.layers(model), plans)]


def full_plan(g: Geometry) -> LayerPlan:
    return LayerPlan(list(range(g.heads)), list(range(g.kv_heads)), list(range(g.intermediate)))


# --- scores --------------------------------------------------------------------------------------------

def unit_scores(adapter: Adapter, layer: nn.Module, o_norms: torch.Tensor, down_norms: torch.Tensor) -> dict:
    """Residual-stream energy of each query head and each MLP channel (from o/down input norms)."""
    g = geometry(adapter, layer)
    o = adapter.projection(layer, "o").weight.detach().float()
    down = adapter.projection(layer, "down").weight.detach().float()
    col_o = o.square().sum(0) * o_norms.to(o.device).float().square()
    col_down = down.square().sum(0) * down_norms.to(down.device).float().square()
    return {"heads": col_o.view(g.heads, g.head_dim).sum(1).cpu(), "channels": col_down.cpu()}


# --- planning ------------------------------------------------------------------------------------------

def attention_options(g: Geometry, uniform: bool = False) -> list[tuple[int, int, int]]:
    """(kept kv groups, query heads per group, params removed) for every valid attention shape."""
    full = sum(kept_params(g, full_plan(g))[p] for p in ATTENTION)
    out = []
    for groups in range(1, g.kv_heads + 1):
        for r in range(1, g.per_group + 1):
            if uniform and g.hidden % (groups * r):  # a plain config needs hidden % heads == 0
                continue
            plan = LayerPlan(list(range(groups * r)), list(range(groups)), [])
            kept = sum(kept_params(g, plan)[p] for p in ATTENTION)
            out.append((groups, r, full - kept))
    return out


def choose_heads(g: Geometry, energy: torch.Tensor, groups: int, r: int) -> tuple[list[int], list[int]]:
    """Keep the r best query heads of each group, and the ``groups`` groups whose kept heads score best."""
    q = g.per_group
    best_in_group = [sorted(range(k * q, (k + 1) * q), key=lambda h: -float(energy[h]))[:r]
                     for k in range(g.kv_heads)]
    group_score = [sum(float(energy[h]) for h in best) for best in best_in_group]
    kept_groups = sorted(sorted(range(g.kv_heads), key=lambda k: -group_score[k])[:groups])
    heads = sorted(h for k in kept_groups for h in best_in_group[k])
    return heads, kept_groups


def _round_width(width: float, full: int, multiple: int) -> int:
    w = int(round(width / multiple)) * multiple
    return min(max(w, multiple), full) if full >= multiple else full


def plan_structure(adapter: Adapter, layers: list[nn.Module], scores: list[dict],
                   budgets: list[tuple[float, float]], *, round_to: int = 8, uniform_widths: bool = False
                   ) -> list[LayerPlan]:
    """Kept heads/channels per layer, removing about ``budgets[i] = (attention, mlp)`` params in layer i.

    Per-layer rounding error is carried into the next layer so the total stays close to the budget.
    With ``uniform_widths`` every layer gets the same shape (the mean budget), chosen per layer by score.
    """
    geos = [geometry(adapter, layer) for layer in layers]
    if uniform_widths:
        mean_att = sum(b[0] for b in budgets) / len(budgets)
        mean_mlp = sum(b[1] for b in budgets) / len(budgets)
        budgets = [(mean_att, mean_mlp)] * len(budgets)
    plans, carry_att, carry_mlp = [], 0.0, 0.0
    shared_shape = None
    for g, s, (att, mlp) in zip(geos, scores, budgets):
        if uniform_widths and shared_shape is not None:
            groups, r, width = shared_shape
        else:
            want_att = att + (0.0 if uniform_widths else carry_att)
            groups, r, removed = min(attention_options(g, uniform_widths),
                                     key=lambda o: (abs(o[2] - want_att), -(o[0] * o[1])))
            want_mlp = mlp + (0.0 if uniform_widths else carry_mlp)
            width = _round_width(g.intermediate - want_mlp / (3 * g.hidden), g.intermediate, round_to)
            carry_att = want_att - removed
            carry_mlp = want_mlp - (g.intermediate - width) * 3 * g.hidden
            if uniform_widths:
                shared_shape = (groups, r, width)
        heads, kv = choose_heads(g, s["heads"], groups, r)
        channels = sorted(s["channels"].argsort(descending=True)[:width].tolist())
        plans.append(LayerPlan(heads, kv, channels))
    return plans


def budgets_from_allocation(sparsity: list[dict[str, float]],
                            params: list[dict[str, int]]) -> list[tuple[float, float]]:
    """Params to remove per layer in attention and in the MLP, from an allocation at ratio R."""
    return [(sum(s[p] * n[p] for p in ATTENTION), sum(s[p] * n[p] for p in MLP))
            for s, n in zip(sparsity, params)]


# --- what the pruning pass needs -------------------------------------------------------------------------

def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def selection(plan: LayerPlan, head_dim: int,
              group: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """For one projection group: the rows each projection keeps, and the input columns removed (forced)."""
    if group == ("q", "k", "v"):
        return {"q": head_rows(plan.heads, head_dim), "k": head_rows(plan.kv_heads, head_dim),
                "v": head_rows(plan.kv_heads, head_dim)}, None
    if group == ("gate", "up"):
        rows = torch.tensor(plan.channels, dtype=torch.long)
        return {"gate": rows, "up": rows}, None
    if group == ("o",):
        return {}, head_rows(plan.heads, head_dim)  # kept columns; the caller forces the rest
    return {}, torch.tensor(plan.channels, dtype=torch.long)


# --- surgery ---------------------------------------------------------------------------------------------

def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None,
            cols: torch.Tensor | None = None) -> nn.Linear:
    w = linear.weight.data
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.data
        out.bias.data.copy_(b[rows.to(b.device)] if rows is not None else b)
    return out


def apply(adapter: Adapter, layers: list[nn.Module], plans: list[LayerPlan]) -> None:
    """Slice every layer's projections to its plan (in place)."""
    for layer, plan in zip(layers, plans):
        g = geometry(adapter, layer)
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        q_rows, kv_rows = head_rows(plan.heads, g.head_dim), head_rows(plan.kv_heads, g.head_dim)
        ch = torch.tensor(plan.channels, dtype=torch.long)
        attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced(attn.o_proj, cols=q_rows)
        attn.num_key_value_groups = len(plan.heads) // len(plan.kv_heads)
        attn.num_heads, attn.num_key_value_heads = len(plan.heads), len(plan.kv_heads)
        mlp.gate_proj = _sliced(mlp.gate_proj, rows=ch)
        mlp.up_proj = _sliced(mlp.up_proj, rows=ch)
        mlp.down_proj = _sliced(mlp.down_proj, cols=ch)
        mlp.intermediate_size = len(plan.channels)


def restructured_config(model: nn.Module, plans: list[LayerPlan]):
    """A plain family config when every layer has the same (valid) widths, else a Mosaic config with
    per-layer widths and the auto_map that points at the modeling file shipped with the checkpoint."""
    from mosaic.modeling.modeling_mosaic import CLASSES

    config = model.config
    family = config.model_type.removeprefix("mosaic_")
    widths = {
        "layer_num_attention_heads": [len(p.heads) for p in plans],
        "layer_num_key_value_heads": [len(p.kv_heads) for p in plans],
        "layer_intermediate_size": [len(p.channels) for p in plans],
    }
    base = {k: v for k, v in config.to_dict().items()
            if k not in widths and k not in ("auto_map", "model_type")}
    base["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    uniform = all(len(set(v)) == 1 for v in widths.values())
    heads, kv, inter = (widths[k][0] for k in widths)
    base.update(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter)
    config_class, model_class, family_class = CLASSES[family]
    if uniform and config.hidden_size % heads == 0:
        return family_class.config_class(**base), family_class
    base["auto_map"] = {"AutoConfig": f"modeling_mosaic.{config_class.__name__}",
                        "AutoModelForCausalLM": f"modeling_mosaic.{model_class.__name__}"}
    return config_class(**base, **widths), model_class


def restructure(model: nn.Module, adapter: Adapter, plans: list[LayerPlan]) -> None:
    """Slice the model to ``plans`` and give it the matching config and class (save_pretrained-ready)."""
    apply(adapter, list(adapter.layers(model)), plans)
    reconfigure(model, plans)


def reconfigure(model: nn.Module, plans: list[LayerPlan]) -> None:
    """The config and class that match sliced layers (a streamed model's layers are sliced one by one)."""
    old = model.config
    config, model_class = restructured_config(model, plans)
    config.use_cache = False
    config._attn_implementation = old._attn_implementation
    for module in model.modules():  # the model, its base model and every attention module share one config
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = model_class


def summary(plans: list[LayerPlan], before: list[dict[str, int]], geos: list[Geometry]) -> dict:
    kept = [kept_params(g, p) for g, p in zip(geos, plans)]
    total_before = sum(n[p] for n in before for p in PROJECTIONS)
    total_kept = sum(n[p] for n in kept for p in PROJECTIONS)
    return {"params_before": total_before, "params_kept": total_kept,
            "structured_ratio": 1 - total_kept / total_before,
            "layers": [p.to_json() for p in plans]}


def layer_scores(adapter: Adapter, model: nn.Module, profile, held=None) -> list[dict]:
    """Every layer's unit scores (``unit_scores``) from the profile's o/down input norms."""
    scores = []
    for i, layer in enumerate(adapter.layers(model)):
        with held(i) if held else nullcontext():
            scores.append(unit_scores(adapter, layer, profile.norms(i, ("o",)), profile.norms(i, ("down",))))
    return scores


def describe(adapter: Adapter, model: nn.Module, structure: list[LayerPlan], before: list[dict[str, int]],
             structured_ratio: float, sparsity_ratio: float, round_to: int, held=None) -> dict:
    """results.json's ``composite`` section for ``structure``, with the unstructured target the kept weights
    need so that both together make ``sparsity_ratio`` of the original weights."""
    geos = []
    for i, layer in enumerate(adapter.layers(model)):
        with held(i) if held else nullcontext():
            geos.append(geometry(adapter, layer))
    report = summary(structure, before, geos)
    total, kept = report["params_before"], report["params_kept"]
    report["unstructured_target"] = max(0.0, (sparsity_ratio * total - (total - kept)) / kept)
    report["requested_structured_ratio"] = structured_ratio
    if report["structured_ratio"] > sparsity_ratio + 1e-9:
        log.warning("structured removal %.4f exceeds --sparsity_ratio %.4f after rounding widths to "
                    "multiples of %d", report["structured_ratio"], sparsity_ratio, round_to)
    return report


def plan_composite(adapter: Adapter, model: nn.Module, profile, rule: str, lamda: float,
                   structured_ratio: float, sparsity_ratio: float, *, round_to: int, uniform_widths: bool,
                   held=None, structure: list[LayerPlan] | None = None) -> tuple[list, dict]:
    """Choose the heads and channels to remove (about ``structured_ratio`` of the projection weights,
    spread over the layers by the allocation ``rule``), and the unstructured sparsity the kept weights
    need so that both together make ``sparsity_ratio`` of the original weights. ``held(i)``: a scope
    holding layer ``i``. A ``structure`` given (a plan file's) is taken as it is."""
    layers = list(adapter.layers(model))
    n_layers = len(layers)
    if structure is None:
        if rule in ("uniform", "owl_nm") or structured_ratio == 0:  # N:M plans spread structure uniformly
            budget_map = alloc.uniform_map(n_layers, structured_ratio)
        else:
            budget_map = alloc.allocate(rule, profile, n_layers, structured_ratio, lamda)
        scores = layer_scores(adapter, model, profile, held)
        structure = plan_structure(adapter, layers, scores,
                                   budgets_from_allocation(budget_map, profile.params),
                                   round_to=round_to, uniform_widths=uniform_widths)
    return structure, describe(adapter, model, structure, profile.params, structured_ratio, sparsity_ratio,
                               round_to)
