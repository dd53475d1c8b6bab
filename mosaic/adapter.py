"""Where a model family keeps its decoder layers and projections.

Every supported family (LLaMA 1/2/3, SmolLM2, Mistral, Qwen2) uses the same pre-norm block:

    h = h + o_proj(attention(q_proj(n1(h)), k_proj(n1(h)), v_proj(n1(h))))
    h = h + down_proj(act(gate_proj(n2(h))) * up_proj(n2(h)))

so one adapter describes them all; the table below is the only place that names modules.
Nothing else in the package indexes into a model directly.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mosaic.errors import OptionError

PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

# Projections that read the same input, in the order the block computes them. This is also the
# true-sequential order: statistics for a group are collected after every earlier group is pruned.
GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")

_LLAMA_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# model_type -> human name. All share the LLaMA block layout above. Checkpoints with per-layer widths
# left by composite pruning have model_type "mosaic_<family>".
FAMILIES: dict[str, str] = {
    "llama": "LLaMA 1/2/3, SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
}


@dataclass(frozen=True)
class Adapter:
    family: str
    paths: dict[str, str]

    # --- model level -------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    # --- layer level -------------------------------------------------------------------------
    def projection(self, layer: nn.Module, name: str) -> nn.Linear:
        return layer.get_submodule(self.paths[name])

    def projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {name: self.projection(layer, name) for name in PROJECTIONS}

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def head_dim(self, layer: nn.Module) -> int:
        return layer.self_attn.head_dim

    def attention_block(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The block's first residual half: h + o_proj(attention(input_layernorm(h)))."""
        return hidden + layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)[0]

    def mlp_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The second half: h + down_proj(act(gate_proj(n(h))) · up_proj(n(h)))."""
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def unmasked(self, layer: nn.Module, names: tuple[str, ...]) -> list[nn.Parameter]:
        """The parameters that no mask covers in the residual halves ``names`` belong to: each half's
        pre-norm scale and the projections' biases (Qwen2's q/k/v)."""
        norms = ([layer.input_layernorm.weight] if set(names) & set(ATTENTION) else []) + \
                ([layer.post_attention_layernorm.weight] if set(names) & set(MLP) else [])
        return norms + [b for p in names if (b := self.projection(layer, p).bias) is not None]

    def staged_forward(
        self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict
    ) -> Generator[tuple[tuple[str, ...], torch.Tensor], None, torch.Tensor]:
        """Run one decoder layer, pausing at the input of each projection group.

        Yields ``(group, input)`` for the four groups of ``GROUPS`` and returns the layer output.
        The caller may change the group's weights before resuming: everything after the pause is
        computed with the new weights. It uses the layer's own attention and MLP modules, so
        attention masks, RoPE, GQA and biases behave exactly as in ``layer.forward``.
        """
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(hidden)
        yield GROUPS[0], self._as_received(layer, GROUPS[0], x)
        with _replaced(attn, "o_proj", nn.Identity()):
            o_in = attn(hidden_states=x, **kwargs)[0]
        del x
        yield GROUPS[1], self._as_received(layer, GROUPS[1], o_in)
        hidden = hidden + attn.o_proj(o_in)
        del o_in
        x = layer.post_attention_layernorm(hidden)
        yield GROUPS[2], self._as_received(layer, GROUPS[2], x)
        with _replaced(mlp, "down_proj", nn.Identity()):
            m = mlp(x)
        del x
        yield GROUPS[3], self._as_received(layer, GROUPS[3], m)
        return hidden + mlp.down_proj(m)

    def _as_received(self, layer: nn.Module, group: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """The group's input as its projections receive it: after any forward pre-hooks on them."""
        modules = [self.projection(layer, p) for p in group]
        hooks = [list(m._forward_pre_hooks.values()) for m in modules]
        if not any(hooks):
            return x
        if any(h != hooks[0] for h in hooks[1:]):
            raise NotImplementedError(f"projections {group} read one input but carry different forward "
                                      "pre-hooks")
        for hook in hooks[0]:
            out = hook(modules[0], (x,))
            if out is not None:
                x = out[0] if isinstance(out, tuple) else out
        return x


@contextmanager
def _replaced(parent: nn.Module, name: str, stand_in: nn.Module):
    original = getattr(parent, name)
    setattr(parent, name, stand_in)
    try:
        yield
    finally:
        setattr(parent, name, original)


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or its config); a clear error for any other architecture."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = str(getattr(config, "model_type", None))
    family = model_type.removeprefix("mosaic_")
    if family not in FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
        raise OptionError("model", f"architecture '{model_type}' is not supported; supported: {supported}")
    return Adapter(family=family, paths=_LLAMA_PATHS)
