"""Where a run's weights live while it works on them. The steps ask the source, never which kind it is:

- ``InMemory``: the whole model is loaded (``load.load_model``);
- ``stream.StreamRun``: the model is read from the checkpoint's shards one part at a time and each pruned
  layer is written back to a shard as soon as it is done (``--offload disk``).

Both offer the same few things: ``held(part)`` (a scope in which ``"embed"``, a layer index or ``"head"``
is in memory), ``prune(job, timer)`` (every layer pruned, reconstructed and restructured as ``job`` says,
timed as phases of ``timer``; the kernel's notes), ``achieved()`` and ``after()`` (what the pruned weights
hold), ``before`` (the parameter report of the unpruned model), ``save(directory, tokenizer, manifest)``
(the checkpoint; its safetensors bytes), ``evaluation_scope(checkpoint)`` (how evaluation reaches the
layers) and ``report()`` (results.json's ``streaming`` section, or None).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mosaic.adapter import Adapter
from mosaic.calibrate import Activations, Calibration
from mosaic.export import save_checkpoint
from mosaic.load import Loaded
from mosaic.prune import Kernel, NMPlan, SparsityMap, measure, prune_from_stats, prune_model
from mosaic.restructure import restructure


@dataclass
class PruneJob:
    """What the pruning pass does to every layer, whichever source holds the weights."""

    kernel: Kernel | None  # None: nothing is pruned (the weights are copied through)
    sparsity: SparsityMap | None
    nm: NMPlan
    activations: Callable[[], Activations] | None  # fresh layer-0 calibration inputs
    mode: str | None  # the engine's mode (calibrate.run_layers); None: no pass over activations
    compute: torch.device
    calib_dtype: torch.dtype
    options: dict  # the kernel's own knobs
    # statistics given up front (Wanda with dense statistics): no pass for them
    stats: list[dict] | None = None
    check: Callable[[Activations], None] | None = None  # guard on the staged forward, before the first layer
    structure: list | None = None  # composite: heads and channels to remove, per layer
    recovery: object | None = None  # recover.Reconstruction: each layer tuned right after its kernel
    seen_stats: list[dict] | None = None  # filled with the statistics each group was pruned with (the search)
    run_options: dict | None = None  # the run's options, for a streamed run's resume fingerprint


def prune_in_memory(model: nn.Module, adapter: Adapter, job: PruneJob) -> list[dict]:
    """Prune ``model`` (the run's, or a copy the search scores) in place as ``job`` says; the kernel's
    notes."""
    if job.kernel is None:
        return []
    if job.stats is not None and job.seen_stats is not None:
        for seen, given in zip(job.seen_stats, job.stats):
            seen.update(given)
    if job.stats is not None and job.recovery is None:  # the profiling pass's own statistics: no second pass
        return prune_from_stats(model, adapter, job.kernel, job.sparsity, job.nm, job.stats, job.compute,
                                job.structure)
    acts = job.activations() if job.mode else None
    if job.check is not None:
        job.check(acts)
    return prune_model(model, adapter, job.kernel, job.sparsity, job.nm, acts, mode=job.mode or "sequential",
                       compute=job.compute, calib_dtype=job.calib_dtype, options=job.options,
                       structure=job.structure, seen_stats=job.seen_stats, stats=job.stats,
                       recovery=job.recovery)


def parameter_report(model: nn.Module) -> dict:
    params = list(model.parameters())
    unique = {id(p): p for p in params}.values()  # tied embeddings count once
    return {"total": sum(p.numel() for p in unique), "nonzero": int(sum(int((p != 0).sum()) for p in unique)),
            "bytes": sum(p.numel() * p.element_size() for p in unique)}


class InMemory:
    """The whole model in memory: every part is always held."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        self.model, self.adapter = model, adapter
        self.before = parameter_report(model)

    def held(self, part) -> AbstractContextManager:
        return nullcontext()

    def prune(self, job: PruneJob, timer) -> list[dict]:
        if job.kernel is None:
            return []
        with timer("prune"):
            notes = prune_in_memory(self.model, self.adapter, job)
        if job.structure is not None:
            with timer("restructure"):
                restructure(self.model, self.adapter, job.structure)
        return notes

    def achieved(self) -> dict:
        return measure(self.model, self.adapter)

    def after(self) -> dict:
        return parameter_report(self.model)

    def save(self, directory: Path, tokenizer, manifest: dict) -> int:
        return save_checkpoint(self.model, tokenizer, directory, manifest)

    def evaluation_scope(self, checkpoint: Path | None) -> Callable:
        return self.held

    def report(self) -> dict | None:
        return None


@dataclass
class Setup:
    """The loaded model, where its weights live, and what every later step needs to know about it."""

    loaded: Loaded
    source: object  # InMemory or stream.StreamRun: the same few methods (see above)
    compute: torch.device
    n_layers: int
    dtype: torch.dtype
    calib_dtype: torch.dtype
    seqlen: int
    eval_seqlen: int

    @property
    def model(self):
        return self.loaded.model

    @property
    def adapter(self):
        return self.loaded.adapter

    def inputs(self, calib: Calibration) -> Activations:
        """Fresh layer-0 calibration inputs (each pass over the layers consumes its own)."""
        return calib.activations(self.model, self.adapter, self.source.held)
