"""Mustafar's KV pruning criteria (Joo et al. 2025) on tensors of shape [batch, kv_heads, tokens, head_dim].

- ``per_token`` (the paper's default, Kt/Vt): in every head vector (one token, one KV head) prune exactly
  round(s·head_dim) entries of smallest magnitude.
- ``per_channel`` (Kc/Vc): in every channel of every group of ``group`` consecutive tokens (32, KIVI-style,
  aligned to token 0) prune exactly round(s·group) entries of smallest magnitude. Only whole groups are pruned.

Ties go to the lower index (stable sort). Keys are pruned after RoPE, as they are cached. The official
output-aware scores (Opa) are not implemented: the reference notes do not pin down how they accumulate.

``reference=True`` reproduces the official per-token code: k = max(1, int(s·head_dim)), keep |x| ≥ the k-th
smallest |x|. That prunes k−1 entries when there are no ties (0.7 of 64 → 43 instead of 45; 0 → none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("per_token", "per_channel")


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
    """A pruned copy of ``x``: each vector along the last dimension loses its round(s·D) smallest |entries|."""
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


def prune(x: torch.Tensor, sparsity: float, method: str = "per_token", group: int = 32,
          reference: bool = False) -> torch.Tensor:
    """Dispatch to one criterion; returns a pruned copy."""
    if method == "per_token":
        return per_token(x, sparsity, reference)
    if method == "per_channel":
        if reference:
            raise ValueError("reference mode reproduces the official per-token code only")
        return per_channel(x, sparsity, group)
    raise ValueError(f"unknown KV pruning method {method!r}; choose from {METHODS}")


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


@dataclass(frozen=True)
class KVSparsity:
    """What is pruned, how and when: one value shared by the cache (decoding) and the attention
    (teacher-forced evaluation), so that both see the same keys and values."""

    k_sparsity: float = 0.5
    v_sparsity: float = 0.5
    window: int = 32
    k_method: str = "per_token"
    v_method: str = "per_token"
    group: int = 32
    reference: bool = False

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

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return prune(x, self.k_sparsity, self.k_method, self.group, self.reference)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return prune(x, self.v_sparsity, self.v_method, self.group, self.reference)

    def keys_pruned_before(self, position: int | torch.Tensor) -> int | torch.Tensor:
        return pruned_before(position, self.window, self.k_method, self.group)

    def values_pruned_before(self, position: int | torch.Tensor) -> int | torch.Tensor:
        return pruned_before(position, self.window, self.v_method, self.group)
