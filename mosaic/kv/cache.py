"""A transformers cache that prunes each token's key and value once, as it leaves a dense window, and holds
the pruned history compressed in Mustafar's bitmap format (``mosaic.kv.format``).

Built like transformers' ``QuantizedCache``: one ``DynamicLayer`` subclass per decoder layer. Prefill attends
densely. At each later ``update`` the stored tokens that the new query no longer sees dense (all but the
last ``window``, see ``pruned_before``) are pruned, then the new tokens are appended: the step attends to
[pruned history | window + 1 dense tokens], as the official decode step does before pruning the token that
just left the window.

Each layer holds its keys and its values (``_Stream``) as, oldest first:

- compressed chunks of ``chunk`` pruned tokens each, every one a ``format.Compressed`` with its own bitmaps,
  prefix sums and offsets. ``chunk`` defaults to 256, the official kernel path's chunk, and must be a
  multiple of 64 so that K's channel-major tiles (64 tokens of one channel) are whole, never zero-padded;
  64 is the finest such chunk and keeps the fewest tokens dense;
- staging: pruned tokens that do not fill a chunk yet, stored dense (zeros included) until it completes;
- the window: tokens not pruned yet, dense.

The chunking delays compression only, never pruning: a token is pruned when it leaves the window, so the
teacher-forced attention still matches decoding. (The official code instead keeps up to window + 255
tokens unpruned; the bytes held are the same.)

``update`` returns the whole K and V dense: chunks decompressed (losslessly), staging, window. So between
steps the cache holds ``stats().held_bytes``, while during one layer's attention that layer's K and V also
exist densely, transiently: the official CUDA kernels decode tiles in registers, plain torch on CPU cannot.
``keep_decompressed=True`` keeps the decompressed chunks between steps, extended once per new chunk: faster
decoding of long contexts, but then nothing is saved, and ``held_bytes`` counts that copy.

Each layer prunes with its own sparsities (``spec.k_at(layer)``: one per layer or per KV head). Alone, the
cache attends a whole call's new tokens to the same keys: exact when the prompt comes in the first call and
every later call holds one token (``prefill="dense"``, Mustafar's decoding). A later call with several
tokens (chunked prefill, drafted tokens) leaves the tokens that leave the window within it dense for that
call. Run the model inside ``mustafar_attention(model, spec)`` to make every call exact: the attention then
prunes per query; ``prefill="pruned"`` requires it (and scores the prompt as if decoded one by one, as
evaluation does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from mosaic.kv.attention import NAME
from mosaic.kv.format import TILE, Compressed, compress, decompress, nbytes
from mosaic.kv.prune import KVSparsity

CHUNK = 256  # tokens per compressed chunk, as the official kernel path compresses them


def _bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class _Stream:
    """One layer's keys or values, along tokens: [compressed chunks | staging | window]."""

    def __init__(self, like: torch.Tensor, layout: str, criterion, chunk: int, keep_decompressed: bool):
        self.layout, self.criterion, self.chunk, self.keep = layout, criterion, chunk, keep_decompressed
        self.chunks: list[Compressed] = []
        self.staging = self.window = like[..., :0, :].clone()
        # if kept: the first memo.shape[-2] // chunk chunks, decompressed
        self.memo: torch.Tensor | None = None

    @property
    def pruned(self) -> int:
        return len(self.chunks) * self.chunk + self.staging.shape[-2]

    @property
    def length(self) -> int:
        return self.pruned + self.window.shape[-2]

    @property
    def token_bytes(self) -> int:
        """One token stored densely."""
        b, h, _, d = self.window.shape
        return b * h * d * self.window.element_size()

    def prune(self, count: int) -> None:
        """Prune the window's oldest tokens up to cache index ``count``, then compress every whole chunk."""
        n = count - self.pruned
        if n <= 0:
            return
        self.staging = torch.cat([self.staging, self.criterion(self.window[..., :n, :])], dim=-2)
        self.window = self.window[..., n:, :]  # a view until the next append
        whole = self.staging.shape[-2] // self.chunk * self.chunk
        if whole:
            self.chunks += [compress(part, self.layout)
                            for part in self.staging[..., :whole, :].split(self.chunk, -2)]
            self.staging = self.staging[..., whole:, :].clone()  # own its bytes, not the whole old buffer

    def append(self, states: torch.Tensor) -> None:
        self.window = torch.cat([self.window, states], dim=-2)

    def decompressed(self) -> list[torch.Tensor]:
        if not self.keep:
            return [decompress(c) for c in self.chunks]
        done = 0 if self.memo is None else self.memo.shape[-2] // self.chunk
        if done < len(self.chunks):
            kept = [] if self.memo is None else [self.memo]
            self.memo = torch.cat(kept + [decompress(c) for c in self.chunks[done:]], dim=-2)
        return [] if self.memo is None else [self.memo]

    def dense(self) -> torch.Tensor:
        """Every token, the pruned ones with their zeros: what attention sees."""
        return torch.cat([*self.decompressed(), self.staging, self.window], dim=-2)

    def crop(self, length: int) -> None:
        """Keep the oldest ``length`` tokens. Pruned ones stay pruned: a cut chunk goes back to staging."""
        self.window = self.window[..., : max(0, length - self.pruned), :].clone()
        while len(self.chunks) * self.chunk > length:
            self.staging = torch.cat([decompress(self.chunks.pop()), self.staging], dim=-2)
            self.memo = None
        self.staging = self.staging[..., : length - len(self.chunks) * self.chunk, :].clone()

    def map_batch(self, fn) -> None:
        """Apply ``fn`` along the batch (beam reorder, selection, repeat); chunks round-trip losslessly."""
        self.chunks = [compress(fn(decompress(c)), self.layout) for c in self.chunks]
        self.staging, self.window, self.memo = fn(self.staging), fn(self.window), None

    def zeros(self) -> tuple[int, int]:
        """Zeros and entries among the pruned tokens."""
        pruned = [*self.decompressed(), self.staging]
        return sum(int((x == 0).sum()) for x in pruned), sum(x.numel() for x in pruned)


class MustafarLayer(DynamicLayer):
    """One layer's cache; ``k_pruned`` / ``v_pruned`` oldest tokens have been pruned (each exactly once).

    ``keys`` / ``values`` stay None: the tokens live in ``k`` / ``v`` (``_Stream``), ``dense()`` rebuilds
    them.
    """

    is_croppable = False  # a crop cannot un-prune what the cropped steps pruned, so it is no exact rollback

    def __init__(self, spec: KVSparsity, chunk: int = CHUNK, keep_decompressed: bool = False,
                 layer: int | None = None):
        super().__init__()
        if chunk < TILE or chunk % TILE:
            raise ValueError(f"chunk must be a positive multiple of {TILE} tokens (whole K tiles), "
                             f"got {chunk}")
        self.spec, self.chunk, self.keep_decompressed, self.layer = spec, chunk, keep_decompressed, layer
        self.k: _Stream | None = None
        self.v: _Stream | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k = _Stream(key_states, "k", lambda x: self.spec.keys(x, self.layer), self.chunk,
                         self.keep_decompressed)
        self.v = _Stream(value_states, "v", lambda x: self.spec.values(x, self.layer), self.chunk,
                         self.keep_decompressed)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        position = self.get_seq_length()  # cache index of the first new token
        if position:
            self.k.prune(self.spec.keys_pruned_before(position))
            self.v.prune(self.spec.values_pruned_before(position))
        self.k.append(key_states)
        self.v.append(value_states)
        return self.dense()

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values, decompressed: pruned tokens with their zeros, then the window."""
        return self.k.dense(), self.v.dense()

    @property
    def k_pruned(self) -> int:
        return self.k.pruned if self.is_initialized else 0

    @property
    def v_pruned(self) -> int:
        return self.v.pruned if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.k.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            length = max(0, self.get_seq_length() + tokens_to_remove)
            self.k.crop(length)
            self.v.crop(length)

    def _map_batch(self, fn) -> None:
        if self.get_seq_length():
            self.k.map_batch(fn)
            self.v.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices, ...])

    def offload(self):
        raise NotImplementedError("MustafarCache does not offload layers")

    prefetch = offload

    def reset(self) -> None:
        super().reset()
        self.k = self.v = None


@dataclass(frozen=True)
class KVCacheStats:
    tokens: int               # tokens cached, summed over layers
    k_pruned_tokens: int      # tokens whose key is pruned (compressed or staged), summed over layers
    v_pruned_tokens: int
    k_sparsity: float         # share of zeros among the pruned keys' entries
    v_sparsity: float
    dense_bytes: int          # the whole cache stored densely in its dtype
    held_bytes: int           # what the cache's buffers occupy: the five below summed
    k_compressed_bytes: int   # key chunks in the bitmap format (format.nbytes)
    v_compressed_bytes: int
    staging_bytes: int        # pruned keys and values waiting for a whole chunk, dense
    window_bytes: int         # keys and values not pruned yet, dense
    decompressed_bytes: int   # chunks kept decompressed (keep_decompressed=True), else 0
    k_compressed_tokens: int  # tokens whose key is in a compressed chunk, summed over layers
    v_compressed_tokens: int


class MustafarCache(Cache):
    """``model.generate(..., past_key_values=MustafarCache(model.config, KVSparsity(0.7, 0.7)))``.

    ``chunk``: pruned tokens per compressed chunk (a multiple of 64); ``keep_decompressed``: trade the memory
    saving for speed, see the module docstring. ``config`` must be the model's own (``model.config``): with
    ``spec.prefill == "pruned"`` the cache checks there that the model runs the Mustafar attention."""

    def __init__(self, config, spec: KVSparsity | None = None, chunk: int = CHUNK,
                 keep_decompressed: bool = False):
        spec = spec or KVSparsity()
        config = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(config)
        if set(layer_types) - {"full_attention"}:
            raise ValueError("MustafarCache supports full-attention layers only, "
                             f"got {sorted(set(layer_types))}")
        spec.check_layers(config.num_hidden_layers)
        self.spec, self.text_config = spec, config
        super().__init__(layers=[MustafarLayer(spec, chunk, keep_decompressed, layer=i)
                                 for i in range(config.num_hidden_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.prefill == "pruned" and getattr(self.text_config, "_attn_implementation", None) != NAME:
            raise RuntimeError("prefill='pruned' prunes within a call, which only the Mustafar attention "
                               "can: run the model inside mosaic.kv.mustafar_attention(model, spec)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stats(self) -> KVCacheStats:
        layers = [layer for layer in self.layers if layer.get_seq_length()]
        ks, vs = [layer.k for layer in layers], [layer.v for layer in layers]
        both = ks + vs

        def sparsity(streams: list[_Stream]) -> float:
            counts = [s.zeros() for s in streams]
            return sum(z for z, _ in counts) / max(sum(n for _, n in counts), 1)

        k_bytes, v_bytes = (sum(nbytes(c) for s in streams for c in s.chunks) for streams in (ks, vs))
        staging, window = sum(_bytes(s.staging) for s in both), sum(_bytes(s.window) for s in both)
        memo = sum(_bytes(s.memo) for s in both if s.memo is not None)
        return KVCacheStats(
            tokens=sum(layer.get_seq_length() for layer in layers),
            k_pruned_tokens=sum(s.pruned for s in ks), v_pruned_tokens=sum(s.pruned for s in vs),
            k_sparsity=sparsity(ks), v_sparsity=sparsity(vs),
            dense_bytes=sum(s.length * s.token_bytes for s in both),
            held_bytes=k_bytes + v_bytes + staging + window + memo,
            k_compressed_bytes=k_bytes, v_compressed_bytes=v_bytes, staging_bytes=staging,
            window_bytes=window, decompressed_bytes=memo,
            k_compressed_tokens=sum(len(s.chunks) * s.chunk for s in ks),
            v_compressed_tokens=sum(len(s.chunks) * s.chunk for s in vs))
