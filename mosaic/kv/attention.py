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

The arithmetic follows transformers' eager attention, so at sparsity 0 the logits are bit-identical to
``attn_implementation="eager"``. Evaluation only: no dropout. ``observe``, if given, is called by every
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


def _far(positions: torch.Tensor, kv_len: int, prompt_len: int, pruned_before) -> tuple[torch.Tensor, int]:
    """[queries, keys] mask of the pruned pairs, and how many of the oldest keys any query sees pruned."""
    counts = pruned_before(positions) * (positions >= prompt_len)
    far = torch.arange(kv_len, device=positions.device) < counts.unsqueeze(1)
    return far, int(counts.max()) if counts.numel() else 0


def _with_pruned_prefix(x: torch.Tensor, count: int, criterion) -> torch.Tensor:
    return torch.cat([criterion(x[..., :count, :]), x[..., count:, :]], dim=-2) if count else x


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           scaling: float, groups: int, spec: KVSparsity, layer: int | None = None, prompt_len: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s attention output [batch, tokens, heads, head_dim] and weights, under ``spec``."""
    kv_len, q_len = key.shape[-2], query.shape[-2]
    positions = torch.arange(kv_len - q_len, kv_len, device=query.device)
    prompt = prompt_len if spec.prefill == "dense" else 0
    k_far, k_count = (_far(positions, kv_len, prompt, spec.keys_pruned_before) if spec.prunes_keys(layer)
                      else (None, 0))
    v_far, v_count = (_far(positions, kv_len, prompt, spec.values_pruned_before) if spec.prunes_values(layer)
                      else (None, 0))

    scores = torch.matmul(query, _repeat_kv(key, groups).transpose(2, 3)) * scaling
    if k_count:  # same shapes as the dense product, so unpruned scores keep their exact bits
        pruned_keys = _repeat_kv(_with_pruned_prefix(key, k_count, lambda x: spec.keys(x, layer)), groups)
        scores = torch.where(k_far, torch.matmul(query, pruned_keys.transpose(2, 3)) * scaling, scores)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, _repeat_kv(value, groups))
    if v_count:  # P·V + P_far·(V_pruned − V): the correction is exactly 0 where nothing changed
        delta = _repeat_kv(_with_pruned_prefix(value, v_count, lambda x: spec.values(x, layer)) - value,
                           groups)
        output = output + torch.matmul(weights * v_far, delta)
    return output.transpose(1, 2).contiguous(), weights


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
