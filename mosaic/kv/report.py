"""What the KV sparsity really did in an evaluation, measured on the keys and values its forwards computed.

``KVMeter`` is an observer for ``mustafar_attention(model, spec, observe=meter)``. For every sequence a
forward sees (each batch row; padding left out) and every layer, it models the cache that holds the
sequence after its last token, as ``kv_bytes`` does: all but the last ``window`` tokens pruned (whole groups
for per_channel). On those pruned tokens' real vectors it counts the zeros (``achieved``: the share of their
entries that are zero) and the bitmap format's bytes from the real tile occupancy (``format.tile_nnz``), in
fp16 as the paper stores them; the unpruned tokens count dense. A window that covers every token prunes
nothing, and the meter says 0, whatever the spec asks.

``report`` gives the record results.json keeps under ``kv_cache``: the spec, the map's per-vector sparsity
(``planned``, exact from the integer counts), the measured sparsity and bytes, and the steady-state bytes of
a ``context``-token cache by ``kv_bytes`` with each layer's own number of KV heads (read from its k_proj:
composite checkpoints differ per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mosaic.kv.attention import attention_modules
from mosaic.kv.format import kv_bytes, stream_nbytes, tile_nnz
from mosaic.kv.prune import KVSparsity, heads_of, pruned_per_vector


def kv_heads(model: nn.Module) -> list[int]:
    """KV heads of every decoder layer, from the widths of its k_proj and v_proj."""
    heads = []
    for m in attention_modules(model):
        k, v = m.k_proj.out_features // m.head_dim, m.v_proj.out_features // m.head_dim
        if k != v or k * m.head_dim != m.k_proj.out_features:
            raise ValueError(f"layer {m.layer_idx}: k_proj / v_proj widths {m.k_proj.out_features} / "
                             f"{m.v_proj.out_features} are not the same whole number of "
                             f"{m.head_dim}-wide heads")
        heads.append(k)
    return heads


def head_dim(model: nn.Module) -> int:
    return attention_modules(model)[0].head_dim


def planned(spec: KVSparsity, heads: list[int], dim: int) -> dict[str, float]:
    """The share of each pruned vector's entries the spec removes, over all (layer, KV head) streams alike:
    the counts each vector really loses (round(s·size), or the official count), not the nominal s."""
    out = {}
    for side, at, method in (("k", spec.k_at, spec.k_method), ("v", spec.v_at, spec.v_method)):
        size = dim if method == "per_token" else spec.group
        counts = [pruned_per_vector(size, s, spec.reference) for i, h in enumerate(heads)
                  for s in heads_of(at(i if spec.allocated else None), h)]
        out[side] = sum(counts) / (size * len(counts))
    return out


@dataclass
class _Side:
    """One layer's pruned keys (or values), summed over sequences."""

    zeros: torch.Tensor | None = None  # [kv heads] zeros among the pruned vectors' entries
    entries: int = 0  # entries of the pruned vectors, per KV head
    bytes: int = 0  # the pruned vectors in the bitmap format

    def add(self, pruned: torch.Tensor, tiles: torch.Tensor, value_bytes: int) -> None:
        zeros = (pruned == 0).sum((0, 2, 3)).cpu()
        self.zeros = zeros if self.zeros is None else self.zeros + zeros
        self.entries += pruned.shape[0] * pruned.shape[2] * pruned.shape[3]
        self.bytes += stream_nbytes(tiles.cpu(), value_bytes)


@dataclass
class _Layer:
    k: _Side
    v: _Side
    window_bytes: int = 0  # keys and values not pruned, dense
    dense_bytes: int = 0  # every key and value dense
    tokens: int = 0  # sequence tokens (summed over sequences)


@dataclass
class KVMeter:
    """Counts what the cache of each evaluated sequence holds; pass as ``observe`` to
    ``mustafar_attention``."""

    value_bytes: int = 2
    layers: dict[int, _Layer] = field(default_factory=dict)
    sequences: int = 0

    def __deepcopy__(self, memo):
        return self  # a layer's working copy (e.g. bf16 evaluation) must count into this meter

    def __call__(self, module: nn.Module, spec: KVSparsity, query, key, value, attention_mask, scaling,
                 output):
        self.record(module.layer_idx, spec, key, value, attention_mask)

    @torch.no_grad()
    def record(self, layer: int, spec: KVSparsity, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> None:
        valid = _valid_keys(attention_mask, key.shape[0], key.shape[-2])
        if valid is None:
            self._count(layer, spec, key, value)
        else:  # padded rows: each sequence alone, its padding left out
            for b in range(key.shape[0]):
                keep = valid[b].nonzero().squeeze(1)
                self._count(layer, spec, key[b:b + 1, :, keep], value[b:b + 1, :, keep])
        if layer == 0:
            self.sequences += key.shape[0]

    def _count(self, layer: int, spec: KVSparsity, key: torch.Tensor, value: torch.Tensor) -> None:
        rows, heads, tokens, dim = key.shape
        c = self.layers.setdefault(layer, _Layer(_Side(), _Side()))
        vector_bytes = rows * heads * dim * self.value_bytes
        for layout, side, x, before, criterion in (("k", c.k, key, spec.keys_pruned_before, spec.keys),
                                                   ("v", c.v, value, spec.values_pruned_before, spec.values)):
            n = int(before(tokens))
            c.window_bytes += (tokens - n) * vector_bytes
            if n:
                pruned = criterion(x[..., :n, :], layer)
                side.add(pruned, tile_nnz(pruned, layout), self.value_bytes)
        c.dense_bytes += 2 * tokens * vector_bytes
        c.tokens += rows * tokens

    def achieved(self) -> dict[str, float] | None:
        """Zeros among the pruned tokens' entries, all layers and heads; None before any forward."""
        if not self.layers:
            return None
        out = {}
        for name in ("k", "v"):
            sides = [getattr(c, name) for c in self.layers.values()]
            entries = sum(s.entries * s.zeros.numel() for s in sides if s.zeros is not None)
            out[name] = (sum(int(s.zeros.sum()) for s in sides if s.zeros is not None) / entries
                         if entries else 0.0)
        return out

    def per_layer(self) -> list[dict]:
        """Per layer: the achieved sparsity of K and V per KV head (None where nothing was pruned)."""
        return [{"layer": i, **{name: None if side.zeros is None
                                else [int(z) / side.entries for z in side.zeros]
                                for name, side in (("k", c.k), ("v", c.v))}}
                for i, c in sorted(self.layers.items())]

    def bytes(self) -> dict | None:
        """The measured caches' bytes, summed over sequences, with per-token figures."""
        if not self.layers:
            return None
        layers = self.layers.values()
        keys, values = sum(c.k.bytes for c in layers), sum(c.v.bytes for c in layers)
        window, dense = sum(c.window_bytes for c in layers), sum(c.dense_bytes for c in layers)
        tokens = next(iter(layers)).tokens  # every layer sees every sequence
        compressed = keys + values + window
        return {"sequences": self.sequences, "tokens": tokens, "value_bytes": self.value_bytes,
                "dense": dense, "window": window, "keys": keys, "values": values, "compressed": compressed,
                "ratio": compressed / dense,
                "per_token": {"dense": dense / tokens, "compressed": compressed / tokens}}


def _valid_keys(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """[batch, keys] True where some query may attend to the key (padding is never attended); None: all."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    mask = attention_mask[:, 0, :, -kv_len:]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    valid = allowed.any(dim=1).expand(batch, kv_len)
    return None if bool(valid.all()) else valid


def granularity(spec: KVSparsity) -> str:
    """``uniform``, ``layer`` (one sparsity per layer) or ``head`` (some layer lists its heads)."""
    if not spec.allocated:
        return "uniform"
    entries = [s for layers in (spec.k_layers, spec.v_layers) if layers for s in layers]
    return "head" if any(isinstance(s, tuple) for s in entries) else "layer"


def report(model: nn.Module, spec: KVSparsity, meter: KVMeter | None = None, context: int = 2048) -> dict:
    """The ``kv_cache`` record: the spec, its map, what ``meter`` measured (None where nothing was), and
    the bytes of a ``context``-token fp16 cache by the format's formula, per layer with its own KV heads."""
    heads, dim = kv_heads(model), head_dim(model)
    size = kv_bytes(model.config, context, spec, value_bytes=2, kv_heads=heads)
    record = {"k_sparsity": spec.k_sparsity, "v_sparsity": spec.v_sparsity, "window": spec.window,
              "method": spec.k_method, "v_method": spec.v_method, "reference": spec.reference,
              "prefill": spec.prefill, "allocation": granularity(spec), "kv_heads": heads,
              "planned": planned(spec, heads, dim),
              "achieved": meter.achieved() if meter else None,
              "measured": meter.bytes() if meter else None,
              "bytes": {"context": context, "value_bytes": 2, "dense": size.dense, "window": size.window,
                        "keys": list(size.keys), "values": list(size.values),
                        "compressed": list(size.compressed),
                        "ratio": [c / size.dense for c in size.compressed]}}
    if spec.allocated:
        record["map"] = {"k": [list(s) if isinstance(s, tuple) else s for s in spec.k_layers or []] or None,
                         "v": [list(s) if isinstance(s, tuple) else s for s in spec.v_layers or []] or None}
    if meter and meter.layers:
        record["layers"] = meter.per_layer()
    return record


def summary_lines(record: dict) -> list[str]:
    """The kv_cache record in a few lines for summary.txt."""
    size, measured, achieved = record["bytes"], record.get("measured"), record.get("achieved")
    mib = 2 ** 20
    what = (f"K {achieved['k']:.1%} / V {achieved['v']:.1%} of each pruned vector zero (measured)"
            if achieved
            else f"K {record['planned']['k']:.1%} / V {record['planned']['v']:.1%} "
            "of each pruned vector (planned)")
    lines = [f"kv cache     {what}, {record['allocation']} allocation, "
             f"beyond a {record['window']}-token window ({record['method']})"]
    if measured:
        lines.append(f"kv cache     evaluated caches: {measured['per_token']['dense']:.0f} → "
                     f"{measured['per_token']['compressed']:.0f} B per token in fp16 "
                     f"({measured['ratio']:.1%} of dense, {measured['sequences']} sequences, "
                     "real tile occupancy)")
    lo, hi = size["compressed"]
    held = f"{lo / mib:.1f}" if lo == hi else f"{lo / mib:.1f}–{hi / mib:.1f}"
    lines.append(f"kv cache     a {size['context']}-token fp16 cache: {size['dense'] / mib:.1f} MiB dense "
                 f"→ {held} MiB ({size['ratio'][0]:.0%}–{size['ratio'][1]:.0%}, by the format's formula)")
    return lines
