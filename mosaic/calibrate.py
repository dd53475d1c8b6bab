"""The layer-wise engine: run calibration text through the model one decoder layer at a time.

1. ``capture`` runs the embedding once per batch with every decoder layer replaced by a recorder, so
   we get layer-0 inputs and the exact keyword arguments (attention mask, RoPE position embeddings,
   position ids, ...) that each layer receives. Those are replayed for every layer.
2. ``run_layers`` walks the layers. Only the current layer needs to be on the compute device; a
   model kept on CPU is brought over one layer at a time (its calibration activations stay in pinned host
   memory: each batch's layer output goes back as soon as it is finished), and with accelerate's
   ``device_map`` each layer runs where it lives. For each layer it collects the input statistics of each
   projection group (q/k/v, o, gate/up, down) and hands them to a callback, in one of three modes:

   sequential  Each group's statistics come after earlier groups of the same layer were pruned
               ("true sequential"). Done in ONE forward per layer by pausing the layer's forward at
               each group (``Adapter.staged_forward``) for all batches at once.
   reference   As the reference Wanda/SparseGPT/OWL code: statistics of all groups from the still
               dense layer, prune, then a second forward with the pruned layer for the next input.
   dense       Statistics of the dense model: every layer's outputs are computed before its callback
               runs, so the next layer sees dense inputs whatever the callback prunes (profiling, and
               pruning with ``calib_stats="dense"``).

In the first two modes each layer's inputs are the outputs of the already-pruned layers before it
(``calib_stats="sequential"``, the reference pruning pass); in ``dense`` mode they are the dense
model's. That choice is the run's statistics source, and it is the same for every kernel.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mosaic import dist
from mosaic.adapter import GROUPS, PROJECTIONS, Adapter
from mosaic.stats import InputStats

log = logging.getLogger(__name__)

# on_group(layer_index, layer, group, stats) -> None
GroupCallback = Callable[[int, nn.Module, tuple[str, ...], InputStats], None]
MODES = ("sequential", "reference", "dense")


@dataclass
class Activations:
    """Inputs of the current layer for every calibration batch, and each layer's keyword arguments."""

    hidden: list[torch.Tensor]
    layer_kwargs: dict[int, list[dict]]  # batch size -> per-layer kwargs


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, index: int, original: nn.Module, sink: dict, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last
        self.attention_type = getattr(original, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layer called with unexpected positional arguments")
        self.sink[self.index] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


@torch.no_grad()
def capture(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, batch_size: int) -> Activations:
    """Layer-0 inputs of ``input_ids`` [n, L] in batches, plus the kwargs every layer is called with."""
    layers = adapter.layers(model)
    originals = list(layers)
    sink: dict = {}
    embed_device = adapter.embed_tokens(model).weight.device
    if embed_device.type == "meta":
        embed_device = torch.device("cpu")
    hidden, by_size = [], {}
    try:
        for i in range(len(layers)):
            layers[i] = _Recorder(i, originals[i], sink, last=i == len(layers) - 1)
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(embed_device)
            sink.clear()
            with suppress(_Stop):
                model(input_ids=batch, use_cache=False)
            hidden.append(sink[0][0])
            if batch.shape[0] not in by_size:
                by_size[batch.shape[0]] = [_strip(sink[i][1]) for i in range(len(layers))]
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return Activations(hidden=hidden, layer_kwargs=by_size)


def _strip(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    kwargs["use_cache"] = False
    for key in ("past_key_values", "past_key_value"):
        kwargs.pop(key, None)
    return kwargs


def _to(obj, device: torch.device, dtype: torch.dtype | None = None):
    """Move tensors (in nested tuples/dicts) to ``device``; floating ones also to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _accelerate_device(layer: nn.Module) -> torch.device | None:
    hook = getattr(layer, "_hf_hook", None)
    return getattr(hook, "execution_device", None) if hook is not None else None


@contextmanager
def on_device(layer: nn.Module, compute: torch.device) -> Iterator[torch.device]:
    """Run ``layer`` on ``compute`` if it lives on CPU; on its own device otherwise."""
    param = next(layer.parameters())
    hooked = _accelerate_device(layer)
    if param.device.type == "meta":
        raise NotImplementedError("layers offloaded by accelerate (weights on the meta device) cannot be "
                                  "pruned in place; stream the checkpoint instead (--offload disk)")
    home = param.device
    target = compute if home.type == "cpu" and compute.type != "cpu" and hooked is None else home
    if target != home:
        layer.to(target)
    try:
        yield target
    finally:
        if target != home:
            layer.to(home)


def layer_kwargs(acts: Activations, index: int, batch: torch.Tensor, device: torch.device,
                 cache: dict) -> dict:
    """Layer ``index``'s kwargs for a batch like ``batch``, on ``device`` and in the batch's dtype."""
    key = (batch.shape[0], index, device, batch.dtype)
    if key not in cache:
        cache[key] = _to(acts.layer_kwargs[batch.shape[0]][index], device, batch.dtype)
    return cache[key]


def working_copy(layer: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The module that runs calibration forwards: the layer itself, or a copy in ``dtype`` (e.g. bf16
    forwards for an fp32 model; kernels still read and write the fp32 master weights)."""
    param = next(layer.parameters())
    if dtype is None or param.dtype == dtype:
        return layer
    return copy.deepcopy(layer).to(dtype)


def _sync(adapter: Adapter, work: nn.Module, layer: nn.Module, group: tuple[str, ...]) -> None:
    if work is not layer:
        for p in group:
            adapter.projection(work, p).weight.copy_(adapter.projection(layer, p).weight)


@torch.no_grad()
def run_layers(
    model: nn.Module,
    adapter: Adapter,
    acts: Activations,
    on_group: GroupCallback,
    *,
    mode: str = "sequential",
    hessian: bool = False,
    compute: torch.device | None = None,
    calib_dtype: torch.dtype | None = None,
    desc: str = "layers",
    scope: Callable[[int], AbstractContextManager] | None = None,
    start: int = 0,
    one_batch: bool | None = None,
    recovery=None,
) -> None:
    """Walk all decoder layers, calling ``on_group`` with each group's input statistics.

    ``acts.hidden`` is advanced to each layer's outputs as it goes (the last layer's outputs are
    not computed in reference mode, and not kept). With ``calib_dtype`` the forwards run in that dtype on
    a copy of each layer, while ``on_group`` sees (and prunes) the layer itself. ``scope(index)`` wraps
    each layer's turn (streaming: materialise the layer, then write and release it, with ``acts.hidden``
    already advanced); ``start`` skips the layers before it (``acts`` then holds that layer's inputs).
    ``one_batch`` (default: when a GPU computes from host-held activations) bounds the device to one
    batch's intermediates in sequential mode, recomputing each group's input from the layer input.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    compute = compute or next(model.parameters()).device
    layers = adapter.layers(model)
    cache: dict = {}
    if calib_dtype is not None:
        acts.hidden = [h.to(calib_dtype) for h in acts.hidden]
    if recovery is not None and recovery.dense is None:  # layer 0: the dense and pruned inputs are the same
        recovery.dense = list(acts.hidden)
    for index in tqdm(range(start, len(layers)), desc=desc, unit="layer", leave=False):
        with scope(index) if scope is not None else nullcontext():
            _run_layer(adapter, layers, index, acts, on_group, mode, hessian, compute, calib_dtype, cache,
                       one_batch, recovery)
        cache = {k: v for k, v in cache.items() if k[1] != index}  # this layer's kwargs are done


def _run_layer(adapter, layers, index, acts, on_group, mode, hessian, compute, calib_dtype, cache,
               one_batch=None, recovery=None) -> None:
    """One layer's turn: its groups' statistics to ``on_group``, and ``acts.hidden`` advanced past it."""
    layer = layers[index]
    last = index == len(layers) - 1
    with on_device(layer, compute) as device:
        work = working_copy(layer, calib_dtype)

        def on_work_group(i, _work, group, stats, layer=layer, work=work):
            on_group(i, layer, group, stats)
            # outside sequential mode a group's weights may arrive with a later group's (``group_pruner``)
            _sync(adapter, work, layer, group if mode == "sequential" else PROJECTIONS)

        kwargs = [layer_kwargs(acts, index, h, device, cache) for h in acts.hidden]
        host = device.type == "cuda" and acts.hidden[0].device.type == "cpu"  # a GPU computes, the host keeps
        if host:  # pinned: fast host <-> device copies, and the non-blocking upload below is safe
            acts.hidden = [h if h.is_pinned() else h.pin_memory() for h in acts.hidden]
        pruned_inputs, master_kwargs = None, None
        # the dense layer's outputs, before the kernel changes it (in the weights' dtype)
        if recovery is not None:
            pruned_inputs, dtype = list(acts.hidden), next(layer.parameters()).dtype
            master_kwargs = [layer_kwargs(acts, index, torch.empty(h.shape[0], 0, dtype=dtype), device, cache)
                             for h in acts.hidden]
            recovery.targets(layer, master_kwargs, device)
        keep = _to_pinned_host if host and not last else None
        if mode == "sequential" and (host if one_batch is None else one_batch):
            outputs = _sequential_one_batch(adapter, work, index, acts.hidden, kwargs, on_work_group, hessian,
                                            device, keep, last)
        elif mode == "sequential":
            inputs = [h.to(device, non_blocking=host) for h in acts.hidden]
            outputs = _sequential(adapter, work, index, inputs, kwargs, on_work_group, hessian, keep)
        else:
            inputs = [h.to(device, non_blocking=host) for h in acts.hidden]
            outputs = _dense_stages(adapter, work, index, inputs, kwargs, on_work_group, hessian)
            if mode == "reference" and not last:
                outputs = [hidden_of(work(h, **kw)) for h, kw in zip(inputs, kwargs)]
        del work
        if recovery is not None:
            outputs = recovery.tune(index, layer, pruned_inputs, master_kwargs, device, outputs, last)
        if not last:
            acts.hidden = [o.to(h.device) for o, h in zip(outputs, acts.hidden)]


def _collect(runs: list, hessian: bool) -> InputStats:
    """Advance every batch's staged forward to its next group input and accumulate statistics."""
    stats = None
    for run in runs:
        _, x = next(run)
        if stats is None:
            stats = InputStats(x.shape[-1], x.device, hessian)
        stats.add(x)
    return stats.reduced()


def _sequential(adapter, layer, index, inputs, kwargs, on_group, hessian, keep=None) -> list[torch.Tensor]:
    """``inputs`` is emptied (each staged forward holds its batch's input until the residual replaces it);
    ``keep`` takes each batch's output as soon as it is finished (to host memory, when a GPU computes)."""
    runs = [adapter.staged_forward(layer, h, kw) for h, kw in zip(inputs, kwargs)]
    inputs.clear()
    for group in GROUPS:
        on_group(index, layer, group, _collect(runs, hessian))
    keep = keep or (lambda out: out)
    return [keep(_finish(run)) for run in runs]


def _sequential_one_batch(adapter, layer, index, hidden, kwargs, on_group, hessian, device, keep,
                          last) -> list[torch.Tensor]:
    """Sequential statistics with one batch's intermediates on the device at a time: group k's input is
    recomputed from the layer input with groups < k already pruned (the same values the paused forwards
    of ``_sequential`` give), for about 2.5 forwards per layer instead of one."""
    for k, group in enumerate(GROUPS):
        stats = None
        for h, kw in zip(hidden, kwargs):
            run = adapter.staged_forward(layer, h.to(device, non_blocking=True), kw)
            for _ in range(k + 1):
                _, x = next(run)
            if stats is None:
                stats = InputStats(x.shape[-1], x.device, hessian)
            stats.add(x)
            del x
            run.close()
        on_group(index, layer, group, stats.reduced())
    if last:
        return []
    keep = keep or (lambda out: out)
    outputs = []
    for h, kw in zip(hidden, kwargs):
        run = adapter.staged_forward(layer, h.to(device, non_blocking=True), kw)
        for _ in GROUPS:
            next(run)
        outputs.append(keep(_finish(run)))
    return outputs


def _to_pinned_host(out: torch.Tensor) -> torch.Tensor:
    """A finished batch's layer output, copied to pinned host memory; its device copy is freed at once."""
    return torch.empty(out.shape, dtype=out.dtype, pin_memory=True).copy_(out)


def _dense_stages(adapter, layer, index, inputs, kwargs, on_group, hessian) -> list[torch.Tensor]:
    """All groups' statistics from the unmodified layer; ``on_group`` is called once all are in."""
    runs = [adapter.staged_forward(layer, h, kw) for h, kw in zip(inputs, kwargs)]
    collected = [(group, _collect(runs, hessian)) for group in GROUPS]
    outputs = [_finish(run) for run in runs]
    for group, stats in collected:
        on_group(index, layer, group, stats)
    return outputs


def hidden_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _finish(run) -> torch.Tensor:
    try:
        next(run)
    except StopIteration as done:
        return done.value
    raise RuntimeError("staged forward yielded more groups than expected")


@torch.no_grad()
def check_staged_forward(adapter: Adapter, layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                         atol: float = 1e-4) -> float:
    """Max |staged − layer.forward| on one batch; raises if the two disagree (unknown block wiring)."""
    run = adapter.staged_forward(layer, hidden, kwargs)
    for _ in GROUPS:
        next(run)
    staged = _finish(run)
    plain = hidden_of(layer(hidden, **kwargs))
    err = (staged.float() - plain.float()).abs().max().item()
    scale = plain.float().abs().max().item() + 1e-6
    if err > atol * max(1.0, scale):
        raise RuntimeError(f"the staged layer forward differs from the model's own forward by {err:.3g}; "
                           "this architecture is not a standard LLaMA block: use --no_true_sequential")
    return err


def check_staged(model: nn.Module, adapter: Adapter, acts: Activations, compute: torch.device,
                 calib_dtype: torch.dtype) -> None:
    """Guard the one-pass engine: the staged forward must reproduce layer 0's own forward."""
    layer = adapter.layers(model)[0]
    with on_device(layer, compute) as device:
        work = working_copy(layer, calib_dtype)
        h = acts.hidden[0].to(device, calib_dtype)
        tol = 1e-4 if h.dtype == torch.float32 else 2e-2
        check_staged_forward(adapter, work, h, layer_kwargs(acts, 0, h, device, {}), atol=tol)


@dataclass
class Calibration:
    """A run's calibration windows: for statistics, and those drawn after them for other uses."""

    windows: torch.Tensor  # [nsamples, seqlen] token ids
    batch_size: int
    # allocation search: the windows drawn after these (not in statistics)
    held_out: torch.Tensor | None = None
    validation: torch.Tensor | None = None  # ... and after those, to judge the refined map on unseen tokens
    distill: torch.Tensor | None = None  # distillation: training windows, none of them in the statistics
    distill_held_out: torch.Tensor | None = None  # ... and the ones that choose the state to keep
    guard: dict[str, torch.Tensor] | None = None  # per text: held-out windows recovery must not make worse

    def activations(self, model: nn.Module, adapter: Adapter, held: Callable) -> Activations:
        """Fresh layer-0 inputs (each pass over the layers consumes its own) of this rank's batches (all of
        them in one process); ``held("embed")`` holds the embedding while they are computed."""
        with held("embed"):
            return capture(model, adapter, dist.my_batches(self.windows, self.batch_size), self.batch_size)

