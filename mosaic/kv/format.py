"""Mustafar's bitmap storage for pruned keys and values: lossless, byte-exact, in plain torch.

One stream per (batch, KV head), seen as a matrix whose rows are cut into 64-element tiles: V token-major
([tokens, head_dim]: a tile is 64 channels of one token), K channel-major ([head_dim, tokens]: a tile is 64
tokens of one channel), as the official kernel transposes K. A row shorter than a multiple of 64 (head_dim
16, a partial 64-token K tile) is zero-padded to whole tiles: padding costs bitmap bits, never values.

Per tile: a 64-bit bitmap (bit 63−i set iff element i is nonzero, kept in an int64) and the nonzeros in
element order, zero-padded to a multiple of 8 (the kernel's 16-byte loads in fp16). Per stream: int32 prefix
sums of the padded counts in units of 2 values (tiles + 1 entries) and an int32 offset of its first value.
So a stream of n tiles costs 8n + 4(n+1) + 4 + value_bytes·Σ 8⌈nnz/8⌉ bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mosaic.kv.prune import KVSparsity, heads_of, prune_count

TILE = 64
ALIGN = 8
LAYOUTS = ("k", "v")


@dataclass
class Compressed:
    bitmaps: torch.Tensor  # int64 [streams, tiles]: the uint64 bit patterns
    accum: torch.Tensor    # int32 [streams, tiles + 1]: prefix sums of padded counts, in units of 2 values
    offsets: torch.Tensor  # int32 [streams]: where each stream starts in ``values``
    values: torch.Tensor   # [Σ padded counts] in the dense dtype
    shape: tuple[int, ...]  # the dense [batch, kv_heads, tokens, head_dim]
    layout: str            # "k" (channel-major) or "v" (token-major)


def _rows(dense: torch.Tensor, layout: str) -> torch.Tensor:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    b, h, t, d = dense.shape
    rows = dense.reshape(b * h, t, d)
    return rows.transpose(1, 2) if layout == "k" else rows


def _tiles_per_row(width: int) -> int:
    return -(-width // TILE)


def _placement(nonzero: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Index in ``values`` of every nonzero (in ``nonzero``'s order), from each tile's start."""
    rank = nonzero.cumsum(-1) - 1
    return (starts.unsqueeze(-1) + rank)[nonzero]


def compress(dense: torch.Tensor, layout: str) -> Compressed:
    """Encode a [batch, kv_heads, tokens, head_dim] tensor (zeros are the pruned entries)."""
    rows = _rows(dense, layout)
    streams, n_rows, width = rows.shape
    per_row = _tiles_per_row(width)
    tiles = F.pad(rows, (0, per_row * TILE - width)).reshape(streams, n_rows * per_row, TILE)
    nonzero = tiles != 0
    padded = (nonzero.sum(-1) + ALIGN - 1) // ALIGN * ALIGN
    flat = padded.reshape(-1).cumsum(0)
    starts = (flat - padded.reshape(-1)).view_as(padded)
    values = tiles.new_zeros(int(flat[-1]) if flat.numel() else 0)
    values[_placement(nonzero, starts)] = tiles[nonzero]
    shifts = torch.arange(TILE - 1, -1, -1, device=dense.device)
    bitmaps = (nonzero.long() << shifts).sum(-1)  # distinct bits: the sum is an OR, bit 63 wraps to the sign
    accum = F.pad(padded.cumsum(-1), (1, 0)) // 2
    per_stream = padded.sum(-1)
    offsets = per_stream.cumsum(0) - per_stream
    return Compressed(bitmaps, accum.int(), offsets.int(), values, tuple(dense.shape), layout)


def decompress(c: Compressed) -> torch.Tensor:
    """The dense tensor back, exactly (a stored -0.0 comes back as 0.0)."""
    shifts = torch.arange(TILE - 1, -1, -1, device=c.bitmaps.device)
    nonzero = ((c.bitmaps.unsqueeze(-1) >> shifts) & 1).bool()
    starts = c.offsets.long().unsqueeze(-1) + c.accum[:, :-1].long() * 2
    tiles = c.values.new_zeros(nonzero.shape)
    tiles[nonzero] = c.values[_placement(nonzero, starts)]
    b, h, t, d = c.shape
    width = d if c.layout == "v" else t
    rows = tiles.reshape(b * h, -1, _tiles_per_row(width) * TILE)[..., :width]
    if c.layout == "k":
        rows = rows.transpose(1, 2)
    return rows.reshape(c.shape)


def nbytes(c: Compressed) -> int:
    """Bytes the compressed buffers occupy."""
    return sum(t.numel() * t.element_size() for t in (c.bitmaps, c.accum, c.offsets, c.values))


def stream_nbytes(tile_nnz: torch.Tensor, value_bytes: int) -> int:
    """The format's formula for streams with ``tile_nnz`` [streams, tiles] nonzeros per tile."""
    streams, tiles = tile_nnz.shape
    padded = int(((tile_nnz + ALIGN - 1) // ALIGN * ALIGN).sum())
    return streams * (8 * tiles + 4 * (tiles + 1) + 4) + value_bytes * padded


def tile_nnz(dense: torch.Tensor, layout: str) -> torch.Tensor:
    """Nonzeros of every tile [streams, tiles] of a [batch, kv_heads, tokens, head_dim] tensor, as
    ``compress`` cuts it: ``stream_nbytes(tile_nnz(x, layout), value_bytes) == nbytes(compress(x, layout))``
    without building the values."""
    rows = _rows(dense, layout)
    streams, n_rows, width = rows.shape
    per_row = _tiles_per_row(width)
    tiles = F.pad(rows != 0, (0, per_row * TILE - width)).reshape(streams, n_rows * per_row, TILE)
    return tiles.sum(-1)


def _padded_range(nnz: int, capacities: list[int]) -> tuple[int, int]:
    """Lowest and highest Σ 8⌈n_t/8⌉ over tiles of these capacities holding ``nnz`` nonzeros in all
    (exact for a single tile)."""
    ceiling = sum(-(-c // ALIGN) * ALIGN for c in capacities)
    highest = min(ceiling, nnz + (ALIGN - 1) * min(len(capacities), nnz))
    return -(-nnz // ALIGN) * ALIGN, highest // ALIGN * ALIGN


def _history_bytes(tokens: int, head_dim: int, sparsity: float, method: str, group: int, layout: str,
                   streams: int, value_bytes: int) -> tuple[int, int]:
    """(lowest, highest) bytes of ``tokens`` pruned tokens in every stream. The criterion fixes the nonzeros
    of each V row for per-token pruning and of each K row for per-channel pruning, else only each stream's
    total; the two are equal when that fixes every tile (per-token V with head_dim ≤ 64)."""
    if tokens == 0:
        return 0, 0
    width, n_rows = (head_dim, tokens) if layout == "v" else (tokens, head_dim)
    caps = [min(TILE, width - i) for i in range(0, width, TILE)]
    if method == "per_token":
        nnz = tokens * (head_dim - prune_count(head_dim, sparsity))
    else:
        nnz = tokens // group * head_dim * (group - prune_count(group, sparsity))
    if (method, layout) in (("per_token", "v"), ("per_channel", "k")):
        lo, hi = _padded_range(nnz // n_rows, caps)
        lo, hi = lo * n_rows, hi * n_rows
    else:
        lo, hi = _padded_range(nnz, caps * n_rows)
    meta = 12 * len(caps) * n_rows + 8  # bitmaps and prefix sums per tile, one more prefix sum, the offset
    return streams * (meta + value_bytes * lo), streams * (meta + value_bytes * hi)


@dataclass(frozen=True)
class KVBytes:
    dense: int                # the whole cache stored densely
    window: int               # the tokens still dense (part of every compressed total)
    keys: tuple[int, int]     # compressed pruned keys: (lowest, highest); equal when the format fixes them
    values: tuple[int, int]

    @property
    def compressed(self) -> tuple[int, int]:
        return (self.window + self.keys[0] + self.values[0], self.window + self.keys[1] + self.values[1])


def layer_heads(config, kv_heads: Sequence[int] | None = None) -> list[int]:
    """KV heads of every decoder layer: given, a composite checkpoint's per-layer widths, or the config's."""
    if kv_heads is not None:
        return list(kv_heads)
    per_layer = getattr(config, "layer_num_key_value_heads", None)
    return list(per_layer) if per_layer else [config.num_key_value_heads] * config.num_hidden_layers


def kv_bytes(config, context: int, spec: KVSparsity, value_bytes: int = 2, batch: int = 1,
             kv_heads: Sequence[int] | None = None) -> KVBytes:
    """Bytes of a Mustafar cache holding ``context`` tokens between decode steps (the last ``window`` dense,
    as the official code keeps them), for a HF decoder config, vs the same cache dense. ``kv_heads``: the KV
    heads of each layer (default: ``layer_heads(config)``); each layer's (head's) own sparsity counts."""
    heads = layer_heads(config, kv_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    streams = sum(heads) * batch
    token_bytes = streams * head_dim * value_bytes  # one token's K (or V) over all streams
    k_tokens = spec.keys_pruned_before(context)
    v_tokens = spec.values_pruned_before(context)

    # the official code keeps the k-th smallest, k = max(1, ⌊s·d⌋): k − 1 pruned
    def effective(s: float) -> float:
        return (max(1, int(s * head_dim)) - 1) / head_dim if spec.reference and s > 0 else s

    def history(tokens: int, at, method: str, layout: str) -> tuple[int, int]:
        by_sparsity = Counter(s for i, h in enumerate(heads)
                              for s in heads_of(at(i if spec.allocated else None), h))
        parts = [_history_bytes(tokens, head_dim, effective(s), method, spec.group, layout, n * batch,
                                value_bytes)
                 for s, n in sorted(by_sparsity.items())]
        return sum(lo for lo, _ in parts), sum(hi for _, hi in parts)

    return KVBytes(
        dense=2 * context * token_bytes,
        window=(2 * context - k_tokens - v_tokens) * token_bytes,
        keys=history(k_tokens, spec.k_at, spec.k_method, "k"),
        values=history(v_tokens, spec.v_at, spec.v_method, "v"),
    )
