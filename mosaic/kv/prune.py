"""Mustafar's KV pruning criteria (Joo et al. 2025) on tensors of shape [batch, kv_heads, tokens, head_dim].

- ``per_token`` (the paper's default, Kt/Vt): in every head vector (one token, one KV head) prune exactly
  round(s·head_dim) entries of smallest magnitude.
- ``per_channel`` (Kc/Vc): in every channel of every group of ``group`` consecutive tokens (32, KIVI-style,
  aligned to token 0) prune exactly round(s·group) entries of smallest magnitude. Only whole groups are
  pruned.

Ties go to the lower index (stable sort). Keys are pruned after RoPE, as they are cached. The official
output-aware scores (Opa) are not implemented: the reference notes do not pin down how they accumulate.

``reference=True`` reproduces the official per-token code: k = max(1, int(s·head_dim)), keep |x| ≥ the k-th
smallest |x|. That prunes k−1 entries when there are no ties (0.7 of 64 → 43 instead of 45; 0 → none).

A sparsity is one number for every vector, or (``KVSparsity.k_layers`` / ``v_layers``, an allocation) one
per decoder layer, each a number or a tuple with one number per KV head of that layer; every vector still
loses exactly its own round(s·size) entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

METHODS = ("per_token", "per_channel")
PREFILLS = ("dense", "pruned")

LayerSparsity = float | tuple[float, ...]  # one layer's: all its KV heads alike, or one per KV head


def prune_count(size: int, sparsity: float) -> int:
    """Entries pruned out of ``size`` (rounded, so 0.7 of 64 is 45)."""
    return int(round(size * sparsity))


def _smallest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mask of the ``k`` smallest entries along ``dim`` (stable: ties to the lower index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = scores.argsort(dim=dim, stable=True).narrow(dim, 0, k)
        mask.scatter_(dim, order, True)
    return mask


def per_token(x: torch.Tensor, sparsity: float, reference: bool = False) -> torch.Tensor:
    """A pruned copy of ``x``: each vector along the last dimension loses its round(s·D) smallest
    |entries|."""
    magnitude = x.abs()
    if reference:
        k = max(1, int(sparsity * x.shape[-1]))
        threshold = magnitude.kthvalue(k, dim=-1, keepdim=True).values
        return x.masked_fill(magnitude < threshold, 0)
    return x.masked_fill(_smallest(magnitude, prune_count(x.shape[-1], sparsity), -1), 0)


def per_channel(x: torch.Tensor, sparsity: float, group: int = 32) -> torch.Tensor:
    """A pruned copy of ``x`` [..., tokens, D]: in each channel of each ``group`` tokens, the round(s·group)
    smallest |entries| are zeroed. ``tokens`` must be a multiple of ``group``."""
    *lead, tokens, dim = x.shape
    if tokens % group:
        raise ValueError(f"per_channel pruning needs whole groups: {tokens} tokens, group {group}")
    grouped = x.reshape(*lead, tokens // group, group, dim)
    mask = _smallest(grouped.abs(), prune_count(group, sparsity), -2)
    return grouped.masked_fill(mask, 0).reshape(x.shape)


def prune(x: torch.Tensor, sparsity: float | Sequence[float], method: str = "per_token", group: int = 32,
          reference: bool = False) -> torch.Tensor:
    """Dispatch to one criterion; returns a pruned copy. A sequence of sparsities gives one per KV head
    (dim 1)."""
    if not isinstance(sparsity, int | float):
        if len(sparsity) != x.shape[1]:
            raise ValueError(f"{len(sparsity)} per-head sparsities for {x.shape[1]} KV heads")
        return torch.cat([prune(x[:, h:h + 1], s, method, group, reference) for h, s in enumerate(sparsity)],
                         dim=1)
    if method == "per_token":
        return per_token(x, sparsity, reference)
    if method == "per_channel":
        if reference:
            raise ValueError("reference mode reproduces the official per-token code only")
        return per_channel(x, sparsity, group)
    raise ValueError(f"unknown KV pruning method {method!r}; choose from {METHODS}")


def heads_of(sparsity: LayerSparsity, kv_heads: int) -> tuple[float, ...]:
    """One layer's sparsity spelled out per KV head."""
    if isinstance(sparsity, int | float):
        return (float(sparsity),) * kv_heads
    if len(sparsity) != kv_heads:
        raise ValueError(f"{len(sparsity)} per-head sparsities for a layer with {kv_heads} KV heads")
    return tuple(sparsity)


def pruned_per_vector(size: int, sparsity: float, reference: bool = False) -> int:
    """Entries each vector (per_token: head_dim; per_channel: a group) loses: exact, or the official count."""
    if reference:
        return max(1, int(sparsity * size)) - 1 if sparsity > 0 else 0
    return prune_count(size, sparsity)


def pruned_before(position: int | torch.Tensor, window: int, method: str = "per_token", group: int = 32
                  ) -> int | torch.Tensor:
    """How many of the oldest tokens are pruned when the token at cache index ``position`` is decoded.

    The official decode step appends the new token, attends to [pruned history | window + 1 dense tokens],
    then prunes the token that left the window. So the query at ``position`` sees tokens
    ``position - window .. position`` dense and everything before pruned. Per-channel pruning waits for
    whole groups of tokens that have left the window. Works on ints and on tensors of positions.
    """
    count = position - window
    count = count * (count > 0)
    return count - count % group if method == "per_channel" else count


def _layers(layers, name: str) -> tuple[LayerSparsity, ...] | None:
    """A per-layer map as nested tuples of floats (JSON gives lists), each value checked."""
    if layers is None:
        return None
    out = []
    for i, entry in enumerate(layers):
        values = [entry] if isinstance(entry, int | float) else list(entry)
        if not values or any(isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1
                             for v in values):
            raise ValueError(f"{name}[{i}] must be a sparsity in [0, 1) or a non-empty list of them, "
                             f"got {entry!r}")
        out.append(float(entry) if isinstance(entry, int | float) else tuple(float(v) for v in values))
    if not out:
        raise ValueError(f"{name} must list one entry per decoder layer")
    return tuple(out)


def _at(layers: tuple[LayerSparsity, ...] | None, uniform: float, layer: int | None,
        name: str) -> LayerSparsity:
    if layers is None:
        return uniform
    if layer is None or not 0 <= layer < len(layers):
        raise ValueError(f"{name} holds {len(layers)} layers; layer {layer} has no sparsity")
    return layers[layer]


def _positive(sparsity: LayerSparsity) -> bool:
    return sparsity > 0 if isinstance(sparsity, float | int) else any(s > 0 for s in sparsity)


@dataclass(frozen=True)
class KVSparsity:
    """What is pruned, how and when: one value shared by the cache (decoding) and the attention
    (teacher-forced evaluation), so that both see the same keys and values.

    ``k_sparsity`` / ``v_sparsity`` apply to every vector, unless ``k_layers`` / ``v_layers`` give one
    sparsity per decoder layer (a number, or a tuple with one per KV head): then they are the targets the
    map was made for, and only the map prunes. ``prefill`` says how the queries of a densely given prompt
    attend: ``dense`` as Mustafar's official code (the prompt attends to itself unpruned, and is pruned
    before the first decoded token), ``pruned`` as if every prompt token had been decoded one by one, which
    is what evaluation scores (see ``mosaic.kv.attention``)."""

    k_sparsity: float = 0.5
    v_sparsity: float = 0.5
    window: int = 32
    k_method: str = "per_token"
    v_method: str = "per_token"
    group: int = 32
    reference: bool = False
    k_layers: tuple[LayerSparsity, ...] | None = None
    v_layers: tuple[LayerSparsity, ...] | None = None
    prefill: str = "dense"

    def __post_init__(self):
        for name in ("k_sparsity", "v_sparsity"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("k_method", "v_method"):
            if getattr(self, name) not in METHODS:
                raise ValueError(f"{name} must be one of {METHODS}, got {getattr(self, name)!r}")
        if self.window < 0 or self.group < 1:
            raise ValueError(f"window must be ≥ 0 and group ≥ 1, got {self.window} and {self.group}")
        if self.reference and "per_channel" in (self.k_method, self.v_method):
            raise ValueError("reference mode reproduces the official per-token code only")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {PREFILLS}, got {self.prefill!r}")
        for name in ("k_layers", "v_layers"):
            object.__setattr__(self, name, _layers(getattr(self, name), name))
        if self.reference and self.allocated:
            raise ValueError("reference mode reproduces the official uniform count only, "
                             "not per-layer sparsities")
        if self.k_layers and self.v_layers and len(self.k_layers) != len(self.v_layers):
            raise ValueError(f"k_layers has {len(self.k_layers)} layers, v_layers {len(self.v_layers)}")

    @property
    def allocated(self) -> bool:
        return self.k_layers is not None or self.v_layers is not None

    def check_layers(self, layers: int) -> None:
        """A per-layer map must cover the model's decoder layers exactly."""
        for name in ("k_layers", "v_layers"):
            given = getattr(self, name)
            if given is not None and len(given) != layers:
                raise ValueError(f"{name} holds {len(given)} layers; the model has {layers}")

    def k_at(self, layer: int | None = None) -> LayerSparsity:
        return _at(self.k_layers, self.k_sparsity, layer, "k_layers")

    def v_at(self, layer: int | None = None) -> LayerSparsity:
        return _at(self.v_layers, self.v_sparsity, layer, "v_layers")

    def prunes_keys(self, layer: int | None = None) -> bool:
        """Whether any key vector of ``layer`` loses an entry (s = 0 prunes nothing, in every mode)."""
        return _positive(self.k_at(layer))

    def prunes_values(self, layer: int | None = None) -> bool:
        return _positive(self.v_at(layer))

    def keys(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return prune(x, self.k_at(layer), self.k_method, self.group, self.reference)

    def values(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return prune(x, self.v_at(layer), self.v_method, self.group, self.reference)

    def keys_pruned_before(self, position: int | torch.Tensor) -> int | torch.Tensor:
        return pruned_before(position, self.window, self.k_method, self.group)

    def values_pruned_before(self, position: int | torch.Tensor) -> int | torch.Tensor:
        return pruned_before(position, self.window, self.v_method, self.group)
