"""Mustafar (Joo et al. 2025): unstructured KV-cache sparsity at inference. Knows nothing of weight pruning.

- ``prune``: the criteria (per-token, per-channel) and when a token is pruned (``KVSparsity``, uniform or
  with one sparsity per layer or KV head).
- ``format``: the bitmap tile format, ``compress`` / ``decompress`` and exact byte counts.
- ``cache``: ``MustafarCache``, a transformers cache that prunes tokens as they leave a dense window.
- ``attention``: a teacher-forced attention that reproduces what decoding with the cache sees.
- ``allocate``: per-layer / per-head sparsities from a sensitivity on calibration text, and their files.
- ``report``: ``KVMeter`` and ``report``: what an evaluation's cache really held.
"""

from mosaic.kv.attention import mustafar_attention
from mosaic.kv.cache import KVCacheStats, MustafarCache
from mosaic.kv.format import Compressed, KVBytes, compress, decompress, kv_bytes, nbytes
from mosaic.kv.prune import KVSparsity, per_channel, per_token, prune
from mosaic.kv.report import KVMeter, kv_heads, report

__all__ = ["Compressed", "KVBytes", "KVCacheStats", "KVMeter", "KVSparsity", "MustafarCache", "compress",
           "decompress", "kv_bytes", "kv_heads", "mustafar_attention", "nbytes", "per_channel", "per_token",
           "prune", "report"]
