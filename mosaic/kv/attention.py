"""Teacher-forced Mustafar attention: one forward over a whole sequence sees what decoding would see.

A forward over a full sequence is all "prefill", so a pruning cache changes nothing in perplexity or
log-likelihoods. This attention function (registered with transformers' ``AttentionInterface`` as
"mustafar", with the eager additive mask under the same name in ``AttentionMaskInterface``) gives the
query at cache index i ≥ ``prompt_len`` the keys/values j ≥ i − window dense and the older ones pruned,
exactly as ``MustafarCache`` decoding does (``pruned_before``); queries inside the prompt attend densely,
as prefill does. With ``prompt_len`` equal to the prompt prefilled into the cache, its logits equal
step-by-step decoding logits; with 0 (the default), or with ``spec.prefill == "pruned"``, every token is
scored as if decoded one by one. Each layer prunes with its own sparsities (``spec.k_at(layer)``).

It also runs under a ``MustafarCache`` (the keys it gets are then the cache's, the pruned ones already
pruned): pruning is idempotent for the magnitude criteria, so each query still sees exactly what
one-by-one decoding sees, however the calls split the sequence (a prompt, chunks, several drafted tokens).
That is how ``prefill="pruned"`` generation runs.

Where nothing is pruned the arithmetic is transformers' eager attention, so at sparsity 0 the logits are
bit-identical to ``attn_implementation="eager"``. Where something is, the queries go in blocks through
fused ``scaled_dot_product_attention`` (each query masked to one copy, pruned or dense, of every key): ~4×
less work than the two full [queries × keys] products of the general form, which remains for autograd and
for K and V pruned from different token counts (per_channel on one side), and agrees with it to float
rounding (tested). Evaluation only: no dropout. ``observe``, if given, is called by every
attention forward with the real query, keys, values and output (e.g. a ``mosaic.kv.report.KVMeter``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from mosaic.kv.prune import KVSparsity

NAME = "mustafar"

# observe(module, spec, query, key, value, attention_mask, scaling, output [batch, tokens, heads, head_dim])
Observer = Callable[..., None]


@dataclass(frozen=True)
class Setting:
    """What ``mustafar_attention`` attaches to each attention module."""

    spec: KVSparsity
    prompt_len: int = 0
    observe: Observer | None = None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x if groups == 1 else x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _with_pruned_prefix(x: torch.Tensor, count: int, criterion) -> torch.Tensor:
    return torch.cat([criterion(x[..., :count, :]), x[..., count:, :]], dim=-2) if count else x


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           scaling: float, groups: int, spec: KVSparsity, layer: int | None = None, prompt_len: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer ``layer``'s attention output [batch, tokens, heads, head_dim] and weights (None from the
    blocked path), under ``spec``."""
    kv_len, q_len = key.shape[-2], query.shape[-2]
    positions = torch.arange(kv_len - q_len, kv_len, device=query.device)
    prompt = prompt_len if spec.prefill == "dense" else 0
    k_counts = _counts(positions, prompt, spec.keys_pruned_before) if spec.prunes_keys(layer) else None
    v_counts = _counts(positions, prompt, spec.values_pruned_before) if spec.prunes_values(layer) else None
    k_count = int(k_counts.max()) if k_counts is not None and k_counts.numel() else 0
    v_count = int(v_counts.max()) if v_counts is not None and v_counts.numel() else 0
    if not k_count and not v_count:  # nothing pruned: transformers' eager arithmetic, bit for bit
        return _eager(query, key, value, attention_mask, scaling, groups)
    counts = k_counts if k_count else v_counts
    general = (k_count and v_count and not torch.equal(k_counts, v_counts)) or query.requires_grad
    if general or (attention_mask is None and q_len > 1):  # no mask: eager's (non-causal) semantics
        return _corrected(query, key, value, attention_mask, scaling, groups, spec, layer, k_counts, v_counts)
    keys = _with_pruned_prefix(key, k_count, lambda x: spec.keys(x, layer))
    values = _with_pruned_prefix(value, v_count, lambda x: spec.values(x, layer))
    return _blocked(query, key, value, keys, values, attention_mask, scaling, groups, positions, counts), None


def _counts(positions: torch.Tensor, prompt_len: int, pruned_before) -> torch.Tensor:
    """How many of the oldest keys each query sees pruned (0 inside a densely given prompt)."""
    return pruned_before(positions) * (positions >= prompt_len)


def _eager(query, key, value, attention_mask, scaling, groups):
    scores = torch.matmul(query, _repeat_kv(key, groups).transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, _repeat_kv(value, groups)).transpose(1, 2).contiguous(), weights


def _corrected(query, key, value, attention_mask, scaling, groups, spec, layer, k_counts, v_counts):
    """The general form, on full [queries, keys] products: pruned scores where the key is pruned for that
    query, and P·V + P_far·(V_pruned − V). Used where K and V are pruned from different token counts
    (per_channel on one side only) and under autograd (the sensitivity's backward pass)."""
    kv_len = key.shape[-2]
    scores = torch.matmul(query, _repeat_kv(key, groups).transpose(2, 3)) * scaling
    if k_counts is not None and int(k_counts.max()):  # same shapes, so unpruned scores keep their bits
        k_far = torch.arange(kv_len, device=query.device) < k_counts.unsqueeze(1)
        keys = _with_pruned_prefix(key, int(k_counts.max()), lambda x: spec.keys(x, layer))
        scores = torch.where(k_far, torch.matmul(query, _repeat_kv(keys, groups).transpose(2, 3)) * scaling,
                             scores)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, _repeat_kv(value, groups))
    if v_counts is not None and int(v_counts.max()):  # the correction is exactly 0 where nothing changed
        v_far = torch.arange(kv_len, device=query.device) < v_counts.unsqueeze(1)
        values = _with_pruned_prefix(value, int(v_counts.max()), lambda x: spec.values(x, layer))
        output = output + torch.matmul(weights * v_far, _repeat_kv(values - value, groups))
    return output.transpose(1, 2).contiguous(), weights


BLOCK = 256  # queries per fused call: each block attends to at most BLOCK − 1 keys twice


def _blocked(query, key, value, keys, values, attention_mask, scaling, groups, positions, counts):
    """The same attention as ``_corrected`` where K and V are pruned from the same count, in fused
    ``scaled_dot_product_attention`` calls over blocks of queries: a block whose queries see the oldest
    lo..hi keys pruned attends to [pruned keys 0..hi | dense keys lo..its last position], each query
    masked to exactly one copy of every key (the pruned one below its own count, the dense one from there
    to itself). No [queries × keys] product is made twice, and nothing past the block's last position.
    A query that the given mask hides from every key (a padding position) gets a different (unused)
    average than eager's."""
    outputs = []
    low = torch.finfo(query.dtype).min
    for start in range(0, query.shape[-2], BLOCK):
        stop = min(start + BLOCK, query.shape[-2])
        c, pos = counts[start:stop, None], positions[start:stop, None]
        lo, hi, end = int(c[0]), int(c[-1]), int(pos[-1]) + 1
        far = torch.arange(hi, device=query.device)
        near = torch.arange(lo, end, device=query.device)
        allowed = torch.cat([far < c, (near >= c) & (near <= pos)], dim=1)
        k = torch.cat([keys[..., :hi, :], key[..., lo:end, :]], dim=-2)
        v = torch.cat([values[..., :hi, :], value[..., lo:end, :]], dim=-2)
        if attention_mask is None:
            mask = torch.where(allowed, 0.0, low).to(query.dtype)
        else:
            given = attention_mask[..., start:stop, :]
            mask = torch.where(allowed, torch.cat([given[..., :hi], given[..., lo:end]], dim=-1), low)
        outputs.append(nn.functional.scaled_dot_product_attention(
            query[..., start:stop, :], _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask,
            scale=scaling))
    return torch.cat(outputs, dim=-2).transpose(1, 2).contiguous()


def mustafar_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``AttentionInterface`` signature; the spec comes from ``mustafar_attention``."""
    try:
        setting: Setting = module.mustafar
    except AttributeError:
        raise RuntimeError("use mosaic.kv.attention.mustafar_attention(model, spec) to enable this") from None
    output, weights = attend(query, key, value, attention_mask, scaling, module.num_key_value_groups,
                             setting.spec, module.layer_idx, setting.prompt_len)
    if setting.observe is not None:
        setting.observe(module, setting.spec, query, key, value, attention_mask, scaling, output)
    return output, weights


def register() -> None:
    """Make "mustafar" a valid ``attn_implementation`` (idempotent)."""
    AttentionInterface.register(NAME, mustafar_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's attention modules, in layer order."""
    modules = [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "layer_idx")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with key/value groups")
    return sorted(modules, key=lambda m: m.layer_idx)


@contextmanager
def mustafar_attention(model: nn.Module, spec: KVSparsity, prompt_len: int = 0,
                       observe: Observer | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model``'s forwards use the Mustafar attention; the previous implementation
    after."""
    register()
    modules = attention_modules(model)
    spec.check_layers(len(modules))
    previous = model.config._attn_implementation
    for m in modules:
        m.mustafar = Setting(spec, prompt_len, observe)
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        for m in modules:
            del m.mustafar
