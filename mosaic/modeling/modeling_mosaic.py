"""LLaMA-family models whose decoder layers have their own widths, as left by structured pruning.

This file is self-contained (torch + transformers only): Mosaic copies it into every checkpoint with
per-layer widths, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads the
checkpoint in a Python that has transformers but not Mosaic.

The config adds three per-layer lists to the base family's config:
    layer_num_attention_heads[i], layer_num_key_value_heads[i], layer_intermediate_size[i]
Head size (head_dim) and hidden size are unchanged. Every layer keeps an integral number of query
heads per key/value head, so grouped-query attention works as in the base model.
"""

from __future__ import annotations

import json
import os

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WIDTH_FIELDS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


def _fill_widths(config) -> None:
    n = config.num_hidden_layers
    defaults = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    for name, default in zip(WIDTH_FIELDS, defaults):
        if getattr(config, name) is None:
            setattr(config, name, [default] * n)
        else:
            setattr(config, name, [int(v) for v in getattr(config, name)])


def check_widths(config) -> None:
    """Raise ValueError if the per-layer widths cannot describe a valid model."""
    n = config.num_hidden_layers
    for name in WIDTH_FIELDS:
        if len(getattr(config, name)) != n:
            raise ValueError(f"{name} lists {len(getattr(config, name))} layers; num_hidden_layers is {n}")
    for i, (h, kv, inter) in enumerate(zip(*(getattr(config, f) for f in WIDTH_FIELDS))):
        if h < 1 or kv < 1 or h % kv or inter < 1:
            raise ValueError(f"layer {i}: {h} query heads, {kv} key/value heads, intermediate {inter} is not "
                             "a valid shape (need ≥ 1 each and heads divisible by key/value heads)")


def _config(base):
    """A config class for ``base`` with per-layer widths (hidden_size need not divide by the heads)."""

    @strict
    class MosaicConfig(base):
        model_type = f"mosaic_{base.model_type}"
        layer_num_attention_heads: list[int] | None = None
        layer_num_key_value_heads: list[int] | None = None
        layer_intermediate_size: list[int] | None = None

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            _fill_widths(self)

        def validate_architecture(self):
            _fill_widths(self)
            check_widths(self)

    MosaicConfig.__name__ = MosaicConfig.__qualname__ = f"Mosaic{base.__name__}"
    return MosaicConfig


MosaicLlamaConfig = _config(LlamaConfig)
MosaicMistralConfig = _config(MistralConfig)
MosaicQwen2Config = _config(Qwen2Config)


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)


def resize_layers(model: nn.Module, config) -> None:
    """Give each decoder layer the widths its config lists (weights are loaded afterwards)."""
    hidden = config.hidden_size
    for i, layer in enumerate(model.model.layers):
        heads = config.layer_num_attention_heads[i]
        kv_heads = config.layer_num_key_value_heads[i]
        inter = config.layer_intermediate_size[i]
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        attn.q_proj = _linear_like(attn.q_proj, hidden, heads * d)
        attn.k_proj = _linear_like(attn.k_proj, hidden, kv_heads * d)
        attn.v_proj = _linear_like(attn.v_proj, hidden, kv_heads * d)
        attn.o_proj = _linear_like(attn.o_proj, heads * d, hidden)
        attn.num_key_value_groups = heads // kv_heads
        attn.num_heads, attn.num_key_value_heads = heads, kv_heads
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, inter)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, inter)
        mlp.down_proj = _linear_like(mlp.down_proj, inter, hidden)
        mlp.intermediate_size = inter


def _checkpoint_shapes(directory: str) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors headers of a local checkpoint (no weights are read)."""
    shapes = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def verify_checkpoint(directory: str, config) -> None:
    """A clear error when the config's widths do not match the stored weights."""
    if not os.path.isdir(directory):
        return
    shapes = _checkpoint_shapes(directory)
    d, hidden = config.head_dim, config.hidden_size
    for i in range(config.num_hidden_layers):
        h, kv, inter = (getattr(config, f)[i] for f in WIDTH_FIELDS)
        expected = {"self_attn.q_proj": [h * d, hidden], "self_attn.k_proj": [kv * d, hidden],
                    "self_attn.v_proj": [kv * d, hidden], "self_attn.o_proj": [hidden, h * d],
                    "mlp.gate_proj": [inter, hidden], "mlp.up_proj": [inter, hidden],
                    "mlp.down_proj": [hidden, inter]}
        for module, shape in expected.items():
            key = f"model.layers.{i}.{module}.weight"
            if key in shapes and list(shapes[key]) != shape:
                raise ValueError(f"{directory}: {key} is stored as {shapes[key]} but config.json's widths "
                                 f"for layer {i} ({h} heads, {kv} kv heads, intermediate {inter}) need "
                                 f"{shape}")


class _PerLayerWidths:
    def __init__(self, config):
        super().__init__(config)
        resize_layers(self, config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            config = kwargs.get("config")
            if not isinstance(config, cls.config_class):
                config = cls.config_class.from_pretrained(path)
            verify_checkpoint(path, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class MosaicLlamaForCausalLM(_PerLayerWidths, LlamaForCausalLM):
    config_class = MosaicLlamaConfig


class MosaicMistralForCausalLM(_PerLayerWidths, MistralForCausalLM):
    config_class = MosaicMistralConfig


class MosaicQwen2ForCausalLM(_PerLayerWidths, Qwen2ForCausalLM):
    config_class = MosaicQwen2Config


# family -> (per-layer config, per-layer model, the family's own model class)
CLASSES = {
    "llama": (MosaicLlamaConfig, MosaicLlamaForCausalLM, LlamaForCausalLM),
    "mistral": (MosaicMistralConfig, MosaicMistralForCausalLM, MistralForCausalLM),
    "qwen2": (MosaicQwen2Config, MosaicQwen2ForCausalLM, Qwen2ForCausalLM),
}
