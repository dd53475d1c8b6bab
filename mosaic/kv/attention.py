"""Teacher-forced Mustafar attention: one forward over a whole sequence sees what decoding would see.

A forward over a full sequence is all "prefill", so a pruning cache changes nothing in perplexity or
log-likelihoods. This attention function (registered with transformers' ``AttentionInterface`` as
"mustafar", with the eager additive mask under the same name in ``AttentionMaskInterface``) gives the
query at cache index i ≥ ``prompt_len`` the keys/values j ≥ i − window dense and the older ones pruned,
exactly as ``MustafarCache`` decoding does (``pruned_before``); queries inside the prompt attend densely,
as prefill does. With ``prompt_len`` equal to the prompt prefilled into the cache, its logits equal
step-by-step decoding logits; with 0 (the default) every token is scored as if decoded one by one.

The arithmetic follows transformers' eager attention, so at sparsity 0 the logits are bit-identical to
``attn_implementation="eager"``. Pruning magnitude criteria is idempotent, so keys that a
``MustafarCache`` already pruned come out the same. Evaluation only: no dropout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from mosaic.kv.prune import KVSparsity

NAME = "mustafar"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x if groups == 1 else x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _far(positions: torch.Tensor, kv_len: int, prompt_len: int, pruned_before) -> tuple[torch.Tensor, int]:
    """[queries, keys] mask of the pruned pairs, and how many of the oldest keys any query sees pruned."""
    counts = pruned_before(positions) * (positions >= prompt_len)
    far = torch.arange(kv_len, device=positions.device) < counts.unsqueeze(1)
    return far, int(counts.max()) if counts.numel() else 0


def _with_pruned_prefix(x: torch.Tensor, count: int, criterion) -> torch.Tensor:
    return torch.cat([criterion(x[..., :count, :]), x[..., count:, :]], dim=-2) if count else x


def mustafar_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``AttentionInterface`` signature; the spec comes from ``mustafar_attention``."""
    try:
        spec, prompt_len = module.mustafar
    except AttributeError:
        raise RuntimeError("use mosaic.kv.attention.mustafar_attention(model, spec) to enable this") from None
    groups = module.num_key_value_groups
    kv_len, q_len = key.shape[-2], query.shape[-2]
    positions = torch.arange(kv_len - q_len, kv_len, device=query.device)
    k_far, k_count = _far(positions, kv_len, prompt_len, spec.keys_pruned_before)
    v_far, v_count = _far(positions, kv_len, prompt_len, spec.values_pruned_before)

    dense_keys = _repeat_kv(key, groups)
    scores = torch.matmul(query, dense_keys.transpose(2, 3)) * scaling
    if k_count:  # same shapes as the dense product, so unpruned scores keep their exact bits
        pruned_keys = _repeat_kv(_with_pruned_prefix(key, k_count, spec.keys), groups)
        scores = torch.where(k_far, torch.matmul(query, pruned_keys.transpose(2, 3)) * scaling, scores)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, _repeat_kv(value, groups))
    if v_count:  # P·V + P_far·(V_pruned − V): the correction is exactly 0 where nothing changed
        delta = _repeat_kv(_with_pruned_prefix(value, v_count, spec.values) - value, groups)
        output = output + torch.matmul(weights * v_far, delta)
    return output.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Make "mustafar" a valid ``attn_implementation`` (idempotent)."""
    AttentionInterface.register(NAME, mustafar_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)


@contextmanager
def mustafar_attention(model: nn.Module, spec: KVSparsity, prompt_len: int = 0) -> Iterator[nn.Module]:
    """Within the block, ``model``'s forwards use the Mustafar attention; the previous implementation after."""
    register()
    modules = [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "layer_idx")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with key/value groups")
    previous = model.config._attn_implementation
    for m in modules:
        m.mustafar = (spec, prompt_len)
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        for m in modules:
            del m.mustafar
