"""Perplexity with the papers' protocol (Wanda, SparseGPT, OWL, Mosaic).

The evaluation text is joined and tokenized once, cut into non-overlapping windows of ``seqlen``
tokens (the remainder is dropped; no stride, no carried context), each window's mean next-token
cross-entropy is computed in fp32, and ppl = exp(mean over windows).

The model runs layer by layer (the same capture/replay as calibration), so a model kept on CPU and
evaluated on a GPU never needs more than one layer there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mosaic import dist
from mosaic.adapter import Adapter
from mosaic.calibrate import capture, hidden_of, layer_kwargs, on_device, working_copy


@torch.no_grad()
def perplexity(
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    compute: torch.device | None = None,
    desc: str = "perplexity",
    dtype: torch.dtype | None = None,
    scope: Callable | None = None,
) -> dict:
    """``dtype`` runs the forwards in a per-layer working copy of that dtype (e.g. bf16 for an fp32
    model: about half the CPU time); the weights themselves are never cast. ``scope(part)`` holds a
    part ("embed", layer index, "head") while it runs: a streamed model materialises it from disk."""
    windows_available = ids.numel() // seqlen
    n = windows_available if max_windows is None else min(windows_available, max_windows)
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    # under torchrun each rank runs its share of the batches; the per-window losses are added in the
    # windows' order, so the perplexity is the float one process computes
    mine = set(dist.mine(-(-n // batch_size)))
    batches = [(i, b) for i, b in enumerate(ids[: n * seqlen].view(n, seqlen).split(batch_size)) if i in mine]
    windows = torch.cat([b for _, b in batches]) if batches else None
    losses = _window_losses(model, adapter, windows, batch_size, compute, desc, dtype,
                            scope or (lambda part: nullcontext())) if batches else []
    index = [i * batch_size + r for i, b in batches for r in range(b.shape[0])]
    mean_nll = dist.ordered_sum(list(zip(index, losses))) / n
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": n, "windows_available": windows_available,
            "seqlen": seqlen, "tokens": n * seqlen,
            "dtype": str(dtype or next(model.parameters()).dtype).replace("torch.", "")}


def _window_losses(model: nn.Module, adapter: Adapter, windows: torch.Tensor, batch_size: int, compute,
                   desc: str, dtype, held: Callable) -> list[float]:
    """Each window's mean next-token cross-entropy, in fp32, the model run layer by layer."""
    compute = compute or next(model.parameters()).device
    with held("embed"):
        acts = capture(model, adapter, windows, batch_size)
    cache: dict = {}
    layers = adapter.layers(model)
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", leave=False):
        with held(index), on_device(layers[index], compute) as device:
            work = working_copy(layers[index], dtype)
            outputs = []
            for h in acts.hidden:
                x = h.to(device, dtype or h.dtype)
                outputs.append(hidden_of(work(x, **layer_kwargs(acts, index, x, device, cache))).to(h.device))
            acts.hidden = outputs
    losses = []
    with (held("head"), on_device(adapter.final_norm(model), compute) as device,
          on_device(adapter.lm_head(model), compute)):
        norm, head = (working_copy(adapter.final_norm(model), dtype),
                      working_copy(adapter.lm_head(model), dtype))
        for h, batch in zip(acts.hidden, windows.split(batch_size)):
            logits = head(norm(h.to(device))).float()
            targets = batch[:, 1:].to(device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   reduction="none")
            losses.extend(loss.view(batch.shape[0], -1).mean(dim=1).tolist())
    return losses
