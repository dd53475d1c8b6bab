"""Streaming, the model source for a model larger than memory: one decoder layer at a time, disk to disk.

The model is built on the meta device (no weights). ``Streamed.held(part)`` materialises one part from
the checkpoint's safetensors shards (``shards.ShardSource``) and releases it afterwards; the parts are
``"embed"``, each decoder layer ``i`` and ``"head"`` (final norm and LM head; a tied head reads the
embedding's tensor). The layer-wise engine (``run_layers``) and the perplexity loop take such a scope, so
the same kernels and the same engine run, one layer in memory.

``StreamRun`` offers what ``source.InMemory`` offers (see ``source.py``). Its ``prune`` writes each pruned
layer into its own shard as soon as it is done, in a hidden ``.<name>.partial`` directory beside
``--save_model`` (or beside ``--save`` when that holds it), and after each layer the resume record
(``resume.py``), so a killed run continues with ``--resume``. ``save`` links the shards into the output
directory with the index, config, tokenizer and ``mosaic.json``: the files ``save_pretrained`` writes, and
the same tensors as the in-memory path. The partial directory goes only once that directory is in place
(``export.after_commit``): a failure while finishing keeps it resumable.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mosaic import dist, fit, resume
from mosaic.adapter import GROUPS, adapter_for
from mosaic.calibrate import on_device, run_layers
from mosaic.errors import OptionError
from mosaic.export import after_commit, make_serializable, write_json
from mosaic.load import Loaded, all_finite, load_model, resolve_device, resolve_dtype, resolve_model
from mosaic.options import check_streamable, parse_memory, workload
from mosaic.prune import group_pruner, stats_for
from mosaic.restructure import apply, reconfigure
from mosaic.resume import (
    Progress,
    check_leftover,
    fingerprint,
    partial_dir,
    resolved_settings,
    run_identity,
)
from mosaic.shards import ShardSource, link_or_copy, return_freed_memory, shard_name, write_index, write_shard
from mosaic.source import InMemory

log = logging.getLogger(__name__)




def _counts(tensors: dict[str, torch.Tensor]) -> dict:
    return {"total": sum(t.numel() for t in tensors.values()),
            "nonzero": sum(int(torch.count_nonzero(t)) for t in tensors.values()),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def _add(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


# --- the model on the meta device ---------------------------------------------------------------------

class Streamed:
    """A model skeleton whose parts are materialised from ``source`` one at a time."""

    def __init__(self, model: nn.Module, source: ShardSource, dtype: torch.dtype):
        self.model, self.source, self.dtype = model, source, dtype
        self.adapter = adapter_for(model)
        names = {id(m): n for n, m in model.named_modules()}
        a = self.adapter
        self.modules: dict = {"embed": [a.embed_tokens(model)],
                              "head": [a.final_norm(model), a.lm_head(model)]}
        self.modules.update({i: [layer] for i, layer in enumerate(a.layers(model))})
        self.prefix = {part: [names[id(m)] for m in mods] for part, mods in self.modules.items()}
        self.tied = tied_names(model)
        self.live = 0  # decoder layers materialised right now
        self.peak_live = 0  # ... and at most, over the run (tests check it is 1)

    @property
    def n_layers(self) -> int:
        return len(self.modules) - 2

    def names(self, part) -> list[str]:
        return [f"{p}.{n}" for p, m in zip(self.prefix[part], self.modules[part]) for n in m.state_dict()]

    def saved_names(self, part) -> list[str]:
        """What ``save_pretrained`` writes of this part: tied copies are left out."""
        return [n for n in self.names(part) if n not in self.tied]

    def load(self, part) -> dict[str, torch.Tensor]:
        """Materialise ``part``: one copy of its tensors (``ShardSource.read``), checked finite slice by
        slice (``all_finite``)."""
        names = self.names(part)
        reads = self.source.read([self.tied.get(n, n) for n in names], self.dtype)
        tensors = {n: reads[self.tied.get(n, n)] for n in names}
        for name, t in tensors.items():
            if not all_finite(t):
                raise OptionError("model", f"weight {name} holds NaN or inf values; repair or re-download "
                                  "the checkpoint")
            _assign(self.model, name, t)
        if isinstance(part, int):
            self.live += 1
            self.peak_live = max(self.peak_live, self.live)
        return tensors

    def release(self, part) -> None:
        for m in self.modules[part]:
            m.to("meta")
        if isinstance(part, int):
            self.live -= 1

    @contextmanager
    def held(self, part) -> Iterator[None]:
        self.load(part)
        try:
            yield
        finally:
            self.release(part)

    def state(self, part) -> dict[str, torch.Tensor]:
        """The part's current tensors under their checkpoint names (tied copies left out)."""
        keep = set(self.saved_names(part))
        out = {}
        for prefix, m in zip(self.prefix[part], self.modules[part]):
            for n, t in m.state_dict().items():
                if f"{prefix}.{n}" in keep:
                    out[f"{prefix}.{n}"] = t.detach().contiguous()
        return out


def tied_names(model: nn.Module) -> dict[str, str]:
    """Tied tensor name -> the name it shares storage with (the LM head and the embedding)."""
    config = model.config
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, list | tuple):
        keys = dict.fromkeys(keys, "model.embed_tokens.weight")
    return dict(keys)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def skeleton(path: str, dtype: torch.dtype) -> nn.Module:
    """The model with its weights on the meta device (buffers such as RoPE frequencies are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return model


# --- choosing and opening ---------------------------------------------------------------------------

def choose(opts, plan, path: str, dtype: torch.dtype) -> ShardSource | None:
    """The source to stream from, or None to load in memory: always with offload disk, and with offload
    auto when the weights and the run's working set would not fit the memory budget (``host_need``)."""
    if opts.offload == "none":
        return None
    if not Path(path).is_dir():
        if opts.offload == "disk":
            raise OptionError("offload", f"streaming reads a local checkpoint; download {path} first "
                              "(huggingface-cli download) and pass its directory")
        return None
    try:
        source = ShardSource(path)
    except OptionError as e:
        if opts.offload == "disk" or e.option == "model":  # a damaged checkpoint cannot be loaded either
            raise
        return None
    if opts.offload == "auto" and not opts.resume:
        need = host_need(path, opts, plan, source.nbytes(dtype), dtype)
        budget = parse_memory(opts.max_memory) if opts.max_memory else fit.available_memory()
        if sum(need.values()) <= budget:
            return None
        log.warning("the weights (as %s) and the run's working set, %s, exceed the memory budget "
                    "(%.2f GiB%s): streaming one layer at a time from disk (--offload disk)",
                    str(dtype).replace("torch.", ""), fit.describe(need), budget / 2**30,
                    ", --max_memory" if opts.max_memory else "")
    check_streamable(opts, plan)
    if opts.device_map:
        log.info("streaming: --device_map is not used; each layer runs on the compute device")
    return source


def host_need(path: str, opts, plan, weights: int, dtype: torch.dtype) -> dict[str, int]:
    """Host bytes, by part, of this run with the model loaded in memory: ``fit.host_need`` for the run's
    ``fit.Workload`` (``options.workload``, the same that ``load.place`` counts on the device)."""
    from transformers import AutoConfig


    config = AutoConfig.from_pretrained(path)
    adapter_for(config)  # an unsupported architecture is named as such, before its config is read for sizes
    return fit.host_need(config, weights, workload(opts, plan), dtype, resolve_device(opts.device))


def open_source(opts, plan):
    """The loaded model and where its weights live: a ``StreamRun`` when this run streams (``--offload``,
    or a device map that offloaded layers), else ``source.InMemory`` over the model ``load_model`` loaded."""

    streamed = open_run(opts, plan)
    if streamed is None:
        loaded = load_model(opts.model, dtype=opts.dtype, device=opts.device, cache_dir=opts.cache_dir,
                            device_map=opts.device_map, offline=opts.offline, work=workload(opts, plan))
        if opts.device_map:  # a map that offloaded layers: streamed instead, or refused
            streamed = instead_of_offload(opts, plan, loaded)
        if streamed is None:
            return loaded, InMemory(loaded.model, loaded.adapter)
    return streamed.loaded, streamed


def open_run(opts, plan) -> StreamRun | None:
    """The streaming run for these options, or None to load the model in memory (``load_model``)."""

    if opts.offload == "none":
        return None
    compute = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, compute)
    path = resolve_model(opts.model, opts.cache_dir)
    source = choose(opts, plan, path, dtype)
    if source is None:
        return None
    partial = partial_dir(Path(opts.save_model), Path(opts.save) if opts.save else None)
    check_leftover(partial, opts.resume, opts.overwrite)
    from transformers import AutoTokenizer

    from mosaic.modeling import register

    register()
    model = skeleton(path, dtype)
    model.compute_device = compute  # read by compute_device()
    streamed = Streamed(model, source, dtype)
    loaded = Loaded(model=model, tokenizer=AutoTokenizer.from_pretrained(path), adapter=streamed.adapter,
                    source=opts.model, path=path)
    return StreamRun(streamed, loaded, partial, opts.resume, opts.overwrite)


def offloaded(model: nn.Module) -> list[str]:
    """The modules that accelerate's device map offloaded (their weights on the meta device, read from CPU
    memory or disk at each forward): the layer-wise engine cannot prune those in place."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not meta:
        return []
    mapped = [k for k in (getattr(model, "hf_device_map", None) or {})
              if any(k == "" or n == k or n.startswith(k + ".") for n in meta)]
    return mapped or [meta[0].rsplit(".", 1)[0]]


def instead_of_offload(opts, plan, loaded) -> StreamRun | None:
    """A ``device_map`` that offloaded layers to CPU or disk: stream the checkpoint one layer at a time
    instead (``offload disk``), or refuse in one line when streaming cannot do this run. None when nothing
    was offloaded."""
    modules = offloaded(loaded.model)
    if not modules:
        return None
    what = (f"offloads {', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''} to CPU/disk "
            "(weights on meta)")
    fix = "use --offload disk (streams one layer at a time from the checkpoint) instead of this device map"
    if opts.offload == "none":
        raise OptionError("device_map", f"this map {what}, which cannot be pruned in place; {fix}")
    try:
        run = open_run(replace(opts, offload="disk"), plan)
    except OptionError as e:
        raise OptionError("device_map", f"this map {what}, which cannot be pruned in place, and streaming is "
                          f"not possible ({e.message}); keep every layer on a device") from e
    log.warning("--device_map %s, which the layer-wise engine cannot prune in place: streaming one layer at "
                "a time from %s instead (--offload disk)", what, run.loaded.path)
    return run






def _layer_saved(index: int) -> None:
    """Called once layer ``index`` and the progress record are on disk (tests interrupt a run here)."""


class StreamRun:
    """One streamed pruning pass into ``partial`` (``partial_dir``), and the evaluation scope afterwards."""

    def __init__(self, streamed: Streamed, loaded, partial: Path, resume: bool, overwrite: bool = False):
        self.streamed, self.loaded, self.resume, self.overwrite = streamed, loaded, resume, overwrite
        self.partial = partial  # see partial_dir
        self.progress: Progress | None = None
        self.resumed_from: int | None = None
        self._walk = None  # the engine's activations while a pass runs (their inputs go with each layer)
        self.before: dict = {}  # parameter report of the unpruned model, filled by the pass

    @property
    def n_shards(self) -> int:
        return self.streamed.n_layers + 2

    def _shard(self, part) -> str:
        k = 0 if part == "embed" else self.streamed.n_layers + 1 if part == "head" else part + 1
        return shard_name(k, self.n_shards)


    def prune(self, job, timer) -> list[dict]:
        """Prune layer by layer as ``job`` (``source.PruneJob``) says, or copy with no kernel, into the
        partial directory; returns the notes. With a composite ``structure`` each layer is sliced to its plan
        before it is written (and the skeleton reconfigured afterwards); with ``recovery``
        (``recover.Reconstruction``) each layer is reconstructed before it is written, and the dense stream is
        saved beside the pruned one so that a resumed run continues it."""
        with timer("prune"):
            progress = self._open(job)
            if progress.next_layer == 0:
                self._copy("embed", progress)
            self._layers(job, progress, self._pruner(job, progress))
            self._copy("head", progress)
        for k in ("total", "nonzero", "bytes"):
            self.before[k] = progress.before.get(k, 0)
        if job.structure is not None:
            reconfigure(self.streamed.model, job.structure)  # the layers were sliced as they were written
        return progress.notes

    def _open(self, job) -> Progress:
        """The resume record: continued (``--resume``, same fingerprint) or fresh."""
        identity = {**run_identity(self.streamed.source.directory, job.run_options.get("calib_dataset")),
                    "resolved": resolved_settings(self.streamed.dtype, job.compute, job.calib_dtype),
                    "ranks": dist.world()}  # each rank saved its own share of the inputs
        print_ = fingerprint(job.run_options, job.sparsity, job.nm, identity)
        self.progress, resumed = dist.from_writer(lambda: resume.start(
            self.partial, print_, self.resume, self.overwrite, self.streamed.n_layers))
        if resumed:
            self.resumed_from = self.progress.next_layer
        return self.progress

    def _pruner(self, job, progress: Progress):
        """The engine callback that prunes a group (None: nothing to prune, the weights are copied)."""
        if job.kernel is None:
            return None
        on_group = group_pruner(self.streamed.adapter, job.kernel, job.sparsity, job.nm, job.options,
                                job.structure, progress.notes, together=job.mode in ("dense", "reference"))
        if job.recovery is not None:
            job.recovery.layers = progress.reconstructed  # a resumed run's record continues
            if job.stats is not None or job.kernel.stats == "none":  # the walk is for the reconstruction only
                pruner = on_group

                def on_group(index, layer, group, seen):
                    pruner(index, layer, group, stats_for(job.kernel, job.stats, index, group, seen))
        return on_group

    def _layers(self, job, progress: Progress, on_group) -> None:
        """Every layer from the record's next one: without a walk when no kernel reads activations (or the
        statistics were given), else through the engine, whose inputs a resumed run reloads."""
        s, start, self._walk = self.streamed, progress.next_layer, None
        reads_activations = job.kernel is not None and job.kernel.stats != "none" and job.stats is None
        if job.recovery is None and not reads_activations:
            for index in range(start, s.n_layers):
                layer = s.modules[index][0]
                with self._written(index, job, progress), on_device(layer, job.compute) as device:
                    for group in GROUPS if on_group else ():
                        on_group(index, layer, group,
                                 job.stats[index][group].to(device) if job.stats is not None else None)
            return
        if start == s.n_layers:
            return
        acts = self._walk = job.activations()
        if start > 0:
            acts.hidden = resume.load_inputs(self.partial, progress.inputs)
            if job.recovery is not None:
                job.recovery.dense = resume.load_inputs(self.partial, progress.dense_inputs)
        elif job.check is not None:
            with s.held(0):
                job.check(acts)
        run_layers(s.model, s.adapter, acts, on_group, mode=job.mode,
                   hessian=job.kernel.stats == "hessian" and job.stats is None, compute=job.compute,
                   calib_dtype=job.calib_dtype, desc=f"prune ({job.kernel.name}, streamed)",
                   scope=lambda index: self._written(index, job, progress), start=start,
                   recovery=job.recovery)

    @contextmanager
    def _written(self, index: int, job, progress: Progress) -> Iterator[None]:
        """Layer ``index`` held while it is pruned; then sliced (composite), written to its shard, counted,
        and the resume record saved with the next layer's inputs (the engine's, and the dense stream's)."""
        s = self.streamed
        tensors = s.load(index)
        try:
            before = _counts(tensors)
            del tensors
            yield
            if job.structure is not None:
                apply(s.adapter, [s.modules[index][0]], [job.structure[index]])
            state = s.state(index)
            dist.from_writer(lambda: write_shard(self.partial / self._shard(index), state))
            _add(progress.before, before)
            _add(progress.after, _counts(state))
            progress.rows.append(_measure(s.adapter, s.modules[index][0]))
            progress.next_layer = index + 1
            last = index == s.n_layers - 1
            dense = job.recovery.dense if job.recovery is not None and not last else None
            hidden = None if self._walk is None or last else self._walk.hidden
            resume.save(self.partial, progress, hidden, dense)
            _layer_saved(index)
        finally:
            s.release(index)
            return_freed_memory()

    def _copy(self, part, progress: Progress) -> None:
        """Embedding or head: written unchanged."""
        s = self.streamed
        tensors = {n: t.contiguous() for n, t in s.source.read(s.saved_names(part), s.dtype).items()}
        dist.from_writer(lambda: write_shard(self.partial / self._shard(part), tensors))
        counts = _counts(tensors)  # the embedding's go into the first layer's saved progress; the head's last
        _add(progress.before, counts)
        _add(progress.after, counts)

    def report(self) -> dict:
        """For results.json: that the run streamed, from where it resumed, and layers held at once."""
        return {"offload": "disk", "shards": self.n_shards, "resumed_from_layer": self.resumed_from,
                "peak_layers_in_memory": self.streamed.peak_live}

    def held(self, part):
        return self.streamed.held(part)

    def achieved(self) -> dict:
        rows = self.progress.rows
        zeros, total = sum(r["zeros"] for r in rows), sum(r["params"] for r in rows)
        return {"overall": zeros / max(total, 1), "zeros": zeros, "params": total,
                "per_layer": [r["row"] for r in rows]}

    def after(self) -> dict:
        return dict(self.progress.after)

    def save(self, directory: Path, tokenizer, manifest: dict) -> int:
        """Link (or copy) the shards into ``directory`` with the index, config, tokenizer and manifest. The
        partial directory is removed only once ``directory`` is in its final place (``after_commit``): until
        then it still holds every shard, so a failure here or later leaves the run to ``resume``."""
        model = self.streamed.model
        shards = [shard_name(k, self.n_shards) for k in range(self.n_shards)]
        for shard in shards:
            link_or_copy(self.partial / shard, directory / shard)
        write_index(directory, shards)
        make_serializable(model)
        use_cache, model.config.use_cache = model.config.use_cache, True
        model.config.architectures = [type(model).__name__]  # as save_pretrained sets it
        try:
            model.config.save_pretrained(directory)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(directory)
        finally:
            model.config.use_cache = use_cache
        tokenizer.save_pretrained(directory)
        # per-layer widths: ship the modeling code, as save_checkpoint
        if getattr(model.config, "auto_map", None):
            from mosaic.modeling import MODELING_FILE

            shutil.copy(MODELING_FILE, directory / MODELING_FILE.name)
        write_json(directory / "mosaic.json", manifest)
        partial = self.partial
        after_commit(directory, lambda: shutil.rmtree(partial, ignore_errors=True))
        return sum(f.stat().st_size for f in directory.glob("*.safetensors"))

    def evaluation_scope(self, checkpoint: Path | None) -> Callable:
        """The scope that evaluation uses: parts read from the written checkpoint."""
        s = self.streamed
        if checkpoint is not None:
            s = Streamed(s.model, ShardSource(checkpoint), s.dtype)
        return s.held


def _measure(adapter, layer: nn.Module) -> dict:
    """One layer's share of ``prune.measure``."""
    row, zeros, total = {}, 0, 0
    for name, proj in adapter.projections(layer).items():
        n = proj.weight.numel()
        z = n - int(torch.count_nonzero(proj.weight))  # no int64 copy of the weight, as (w == 0).sum() makes
        row[name] = z / n
        zeros += z
        total += n
    return {"row": row, "zeros": zeros, "params": total}

