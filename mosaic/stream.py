"""Streaming: prune a model larger than memory, one decoder layer at a time, from disk to disk.

The model is built on the meta device (no weights). ``Streamed.held(part)`` materialises one part from
the checkpoint's safetensors shards (plain reads of only that part's tensors, no memory map) and
releases it afterwards; the parts are ``"embed"``, each decoder layer ``i`` and ``"head"`` (final norm
and LM head; a tied head reads the embedding's tensor). The layer-wise engine (``run_layers``) and the
perplexity loop take such a scope, so the same kernels and the same engine run, one layer in memory.

``StreamRun.prune`` writes each pruned layer into its own shard as soon as it is done, in a hidden
``.<name>.partial`` directory beside ``--save_model`` (or beside ``--save`` when that holds it); after
each layer the next layer's inputs and a progress record are saved atomically (and durably) there, so a
killed run continues with ``resume``. The record's fingerprint holds the settings, the content identity
of the checkpoint and calibration file and this package's version, so a resume never continues a
different run. ``finish`` links the shards into the output directory with the index, config, tokenizer
and ``mosaic.json``: the files ``save_pretrained`` writes, and the same tensors as the in-memory path.
The partial directory goes only once that directory is in place (``export.after_commit``): a failure
while finishing keeps it resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from mosaic import fit
from mosaic.adapter import GROUPS, adapter_for
from mosaic.calibrate import Activations, on_device, run_layers
from mosaic.errors import OptionError
from mosaic.export import after_commit, fsync_path, make_serializable, replace_file, write_json
from mosaic.load import all_finite

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STATE = "stream-state"  # resume records inside the partial directory
PROGRESS = "progress.json"  # in STATE
SAMPLE = 2**20  # bytes hashed at each end of a checkpoint file for its content identity
OFFLOAD = ("auto", "none", "disk")
HEADROOM = 0.8  # share of the available host memory the default budget allows

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of a size such as ``64GB``, ``500MiB`` or ``1e9``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise OptionError("max_memory", f"'{text}' is not a size; use e.g. 64GB, 500MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def available_memory() -> int:
    """Host memory this run may use by default: what is available now, with headroom."""
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(HEADROOM * free)


# --- reading ------------------------------------------------------------------------------------------

class ShardSource:
    """The tensors of a safetensors checkpoint (one file or shards with an index), read on demand."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if (self.directory / INDEX).is_file():
            weight_map = json.loads((self.directory / INDEX).read_text())["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE).is_file():
            self.files = dict.fromkeys(_header(self.directory / SINGLE)[0], self.directory / SINGLE)
        else:
            raise OptionError("offload", f"{self.directory} holds no safetensors weights ({SINGLE} or {INDEX}); "
                              "streaming reads safetensors checkpoints only")
        for file in dict.fromkeys(self.files.values()):
            check_shard(file)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, floating ones as ``dtype``. Read with plain file reads into fresh tensors
        rather than through a memory map, so the file's pages never count in this process's RSS; a tensor
        stored in another floating dtype is read and converted ``READ_CHUNK`` bytes at a time into its
        destination, never whole beside it. The heap's freed pages go back to the OS first: tokenizing the
        calibration text leaves a few hundred MB of them, which the embedding would otherwise come on top of."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise OptionError("model", f"{self.directory} lacks tensor {missing[0]}")
        _return_freed_memory()
        out = {}
        for file in dict.fromkeys(self.files[n] for n in names):
            header, base = _header(file)
            with open(file, "rb", buffering=0) as f:
                for n in names:
                    if self.files[n] != file:
                        continue
                    info = header[n]
                    start, end = info["data_offsets"]
                    stored = _DTYPES[info["dtype"]]
                    t = torch.empty(info["shape"], dtype=dtype if stored.is_floating_point else stored)
                    if end > start:
                        f.seek(base + start)
                        _read_as(f, t, stored, f"{file} ends inside tensor {n}")
                    out[n] = t
        return out

    def nbytes(self, dtype: torch.dtype) -> int:
        """What the weights take in memory as ``dtype`` (floating tensors; others as stored)."""
        total = 0
        for file in set(self.files.values()):
            for info in _header(file)[0].values():
                stored = _DTYPES[info["dtype"]]
                numel = 1
                for d in info["shape"]:
                    numel *= d
                total += numel * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
        return total


READ_CHUNK = 2**22  # bytes read at a time when a tensor's stored dtype differs from the run's


def _read_as(f, t: torch.Tensor, stored: torch.dtype, truncated: str) -> None:
    """Fill ``t`` from ``f``'s next ``t.numel()`` values of dtype ``stored``: straight into its memory, or
    through a ``READ_CHUNK`` buffer converted slice by slice (``copy_`` casts exactly as ``to`` does)."""
    flat = t.view(-1)
    if stored == t.dtype:
        _read_exactly(f, flat, truncated)
        return
    step = max(1, READ_CHUNK // stored.itemsize)
    buffer = torch.empty(min(step, flat.numel()), dtype=stored)
    for start in range(0, flat.numel(), step):
        part = buffer[:min(step, flat.numel() - start)]
        _read_exactly(f, part, truncated)
        flat[start:start + part.numel()].copy_(part)


def _read_exactly(f, t: torch.Tensor, truncated: str) -> None:
    """Read exactly ``t``'s bytes from ``f`` into it (a contiguous 1-D tensor)."""
    view = memoryview(t.view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        count = f.readinto(view[got:])
        if not count:
            raise OptionError("model", f"{truncated}: the file is truncated; re-download or re-save the checkpoint")
        got += count


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data offsets) and where its data begins."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if 8 + size > os.fstat(f.fileno()).st_size:
                raise ValueError(f"its header claims {size} bytes")
            header = json.loads(f.read(size))
    except FileNotFoundError as e:
        raise OptionError("model", f"{file} is missing; re-download or re-save the checkpoint") from e
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise OptionError("model", f"{file} is not a readable safetensors file ({e}); re-download or "
                          "re-save the checkpoint") from e
    header.pop("__metadata__", None)
    return header, 8 + size


def check_shard(file: Path) -> None:
    """Refuse, before any work, a safetensors file whose size is not what its header describes (a copy or
    download cut short): reading it would fail, or worse, hours into a run."""
    header, base = _header(file)
    expected = base + max((info["data_offsets"][1] for info in header.values()), default=0)
    size = file.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its header describes"
        raise OptionError("model", f"{file} is {what} ({size} bytes, its header describes {expected}); "
                          "re-download or re-save the checkpoint")


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
        self.modules: dict = {"embed": [a.embed_tokens(model)], "head": [a.final_norm(model), a.lm_head(model)]}
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
                raise OptionError("model", f"weight {name} holds NaN or inf values; repair or re-download the checkpoint")
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

def check_streamable(plan, opts) -> None:
    """What streaming cannot do (yet), refused before any work."""
    if plan.zs_tasks is not None:
        raise OptionError("eval_zero_shot", "zero-shot evaluation needs the whole model in memory, and this run "
                          "streams it; evaluate the saved checkpoint on a larger machine, or drop --eval_zero_shot")
    if plan.kv is not None:
        raise OptionError("kv_sparsity", "KV-cache sparsity evaluation is not streamed; run it in memory")
    if not opts.save_model:
        raise OptionError("save_model", "streaming writes each pruned layer to disk as it goes: give --save_model")


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
        budget = parse_memory(opts.max_memory) if opts.max_memory else available_memory()
        if sum(need.values()) <= budget:
            return None
        log.warning("the weights (as %s) and the run's working set, %s, exceed the memory budget (%.2f GiB%s): "
                    "streaming one layer at a time from disk (--offload disk)", str(dtype).replace("torch.", ""),
                    fit.describe(need), budget / 2**30, ", --max_memory" if opts.max_memory else "")
    check_streamable(plan, opts)
    if opts.device_map:
        log.info("streaming: --device_map is not used; each layer runs on the compute device")
    return source


def host_need(path: str, opts, plan, weights: int, dtype: torch.dtype) -> dict[str, int]:
    """Host bytes, by part, of this run with the model loaded in memory: ``fit.host_need`` for the run's
    ``fit.Workload`` (``pipeline.workload``, the same that ``load.place`` counts on the device)."""
    from transformers import AutoConfig

    from mosaic.load import resolve_device
    from mosaic.pipeline import workload  # imported here: the pipeline imports this module

    config = AutoConfig.from_pretrained(path)
    adapter_for(config)  # an unsupported architecture is named as such, before its config is read for sizes
    return fit.host_need(config, weights, workload(opts, plan), dtype, resolve_device(opts.device))


def open_run(opts, plan) -> StreamRun | None:
    """The streaming run for these options, or None to load the model in memory (``load_model``)."""
    from mosaic.load import resolve_device, resolve_dtype, resolve_model

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

    from mosaic.load import Loaded
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
    what = f"offloads {', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''} to CPU/disk (weights on meta)"
    fix = "use --offload disk (streams one layer at a time from the checkpoint) instead of this device map"
    if opts.offload == "none":
        raise OptionError("device_map", f"this map {what}, which cannot be pruned in place; {fix}")
    try:
        run = open_run(replace(opts, offload="disk"), plan)
    except OptionError as e:
        raise OptionError("device_map", f"this map {what}, which cannot be pruned in place, and streaming is not "
                          f"possible ({e.message}); keep every layer on a device") from e
    log.warning("--device_map %s, which the layer-wise engine cannot prune in place: streaming one layer at a "
                "time from %s instead (--offload disk)", what, run.loaded.path)
    return run


# --- writing ------------------------------------------------------------------------------------------

def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors shard, atomically (a killed run leaves the old file or none, never half of one) and
    durably (on disk before its name is: a progress record written after it never names lost data).
    Written straight from the tensors' memory: ``safetensors.torch.save_file`` first copies every tensor
    into a bytes object, which would double a layer's footprint while it is written."""
    codes = {t: c for c, t in _DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in tensors.values():
                if t.numel():
                    f.write(memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))

    replace_file(path, write, durable=True)


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS: glibc serves the next layer-sized blocks from a heap that
    otherwise only grows (RSS grew by about a layer per layer streamed)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a second name of ``source`` (no bytes copied), or a durable copy where the file
    system cannot link; either way ``source`` stays."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        fsync_path(target)


def write_index(directory: Path, shards: list[str]) -> dict:
    """``model.safetensors.index.json`` as ``save_pretrained`` writes it, from the shards' headers."""
    weight_map, size, params = {}, 0, 0
    for shard in shards:
        for n, info in _header(directory / shard)[0].items():
            weight_map[n] = shard
            start, end = info["data_offsets"]
            size += end - start
            numel = 1
            for d in info["shape"]:
                numel *= d
            params += numel
    index = {"metadata": {"total_parameters": params, "total_size": size}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


@dataclass
class Progress:
    """What a streamed pass has finished: resumable from ``next_layer``."""

    fingerprint: str
    next_layer: int = 0  # layers before it are in their shards
    inputs: str | None = None  # file with the inputs of ``next_layer`` (calibration activations)
    dense_inputs: str | None = None  # ... and the dense model's, when each layer is reconstructed
    reconstructed: list = field(default_factory=list)  # per layer: the reconstruction's record
    notes: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # per layer: {"row": {projection: sparsity}, "zeros", "params"}
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)


def fingerprint(options: dict, sparsity, nm, identity: dict | None = None) -> str:
    """What decides the pruned weights: a resumed run must match it. ``identity``: what the options name
    only by path or not at all (the checkpoint's and calibration file's content, this package's version)."""
    skip = {"save", "save_model", "overwrite", "resume", "offload", "max_memory", "extra", "eval_datasets",
            "eval_windows", "eval_seqlen", "eval_batch_size", "eval_dtype", "eval_zero_shot", "zs_limit",
            "zs_batch_size", "kv_sparsity", "k_sparsity", "v_sparsity", "kv_window", "kv_method", "kv_reference",
            "cache_dir", "offline", "device_map"}
    doc = {k: v for k, v in sorted(options.items()) if k not in skip}
    doc["allocation_map"], doc["nm"] = sparsity, nm
    doc["identity"] = identity or {}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(checkpoint: Path, calib_dataset: str | None) -> dict:
    """The content identity of a run's inputs: every file of the checkpoint directory (weights, config,
    tokenizer), the calibration text when it is a file, and this package's version."""
    from mosaic import __version__

    files = sorted(p for p in Path(checkpoint).iterdir() if p.is_file() and not p.name.startswith("."))
    out = {"mosaic": __version__, "checkpoint": {p.name: file_identity(p) for p in files}}
    if calib_dataset and Path(calib_dataset).expanduser().is_file():
        out["calib_dataset"] = file_identity(Path(calib_dataset).expanduser(), sample=None)
    return out


def file_identity(path: Path, sample: int | None = SAMPLE) -> str:
    """Size and SHA-256 of a file: of all of it (``sample`` None), else of its first and last ``sample``
    bytes, and all of a safetensors header (names, dtypes, shapes, offsets), so that hashing a checkpoint
    of hundreds of GB reads a few MB per file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if sample is None or size <= 2 * sample:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
        else:
            head = sample
            if path.suffix == ".safetensors":
                head = max(head, 8 + int.from_bytes(f.read(8), "little"))
                f.seek(0)
            digest.update(f.read(head))
            f.seek(max(head, size - sample))
            digest.update(f.read())
    return f"{size}:{digest.hexdigest()}"


def partial_dir(save_model: Path, save: Path | None = None) -> Path:
    """Where a streamed run into ``save_model`` keeps its finished layers until it is done: beside it, or
    beside ``save`` when ``save_model`` lies inside that (whatever is inside an output directory is
    replaced with it)."""
    if save is not None and save.resolve() in save_model.resolve().parents:
        return save.with_name(f".{save.name}.{save_model.name}.partial")
    return save_model.with_name(f".{save_model.name}.partial")


def check_leftover(partial: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to discard the finished layers of an interrupted run unless asked to (``overwrite``)."""
    state = partial / STATE / PROGRESS
    if resume or overwrite or not state.is_file():
        return
    try:
        done = f"{int(json.loads(state.read_text())['next_layer'])} finished layers"
    except (ValueError, KeyError, TypeError):
        done = "the finished layers"
    raise OptionError("resume", f"{partial} holds {done} of an interrupted run with this --save_model; pass "
                      "--resume to continue it, or --overwrite to discard it and start over")


def _layer_saved(index: int) -> None:
    """Called once layer ``index`` and the progress record are on disk (tests interrupt a run here)."""


class StreamRun:
    """One streamed pruning pass into ``partial`` (``partial_dir``), and the evaluation scope afterwards."""

    def __init__(self, streamed: Streamed, loaded, partial: Path, resume: bool, overwrite: bool = False):
        self.streamed, self.loaded, self.resume, self.overwrite = streamed, loaded, resume, overwrite
        self.partial = partial  # see partial_dir
        self.progress: Progress | None = None
        self.resumed_from: int | None = None
        self.before: dict = {}  # parameter report of the unpruned model, filled by the pass

    @property
    def n_shards(self) -> int:
        return self.streamed.n_layers + 2

    def _shard(self, part) -> str:
        k = 0 if part == "embed" else self.streamed.n_layers + 1 if part == "head" else part + 1
        return shard_name(k, self.n_shards)

    def _start(self, print_: str) -> Progress:
        state = self.partial / STATE / PROGRESS
        if self.resume and state.is_file():
            done = Progress(**json.loads(state.read_text()))
            if done.fingerprint != print_:
                raise OptionError("resume", f"{self.partial} was written by another run (other pruning settings, "
                                  "model or calibration files, or Mosaic version); rerun exactly that run to "
                                  "continue it, or pass --overwrite without --resume to discard it")
            log.info("resuming at layer %d of %d from %s", done.next_layer, self.streamed.n_layers, self.partial)
            self.resumed_from = done.next_layer
            return done
        if self.resume:
            log.info("nothing to resume in %s: starting from the first layer", self.partial)
        check_leftover(self.partial, self.resume, self.overwrite)
        if state.is_file():
            log.warning("discarding the finished layers in %s (--overwrite)", self.partial)
        shutil.rmtree(self.partial, ignore_errors=True)
        (self.partial / STATE).mkdir(parents=True)
        return Progress(fingerprint=print_)

    def _save(self, progress: Progress, hidden: list[torch.Tensor] | None,
              dense: list[torch.Tensor] | None = None) -> None:
        """The next layer's inputs (the pruned stream, and the dense one when reconstructing), then the record
        that names them; the previous layer's files go once the record no longer does."""
        state = self.partial / STATE
        old = [progress.inputs, progress.dense_inputs]
        progress.inputs = progress.dense_inputs = None
        for attr, stream, stem in (("inputs", hidden, "inputs"), ("dense_inputs", dense, "dense")):
            if stream is not None:
                name = f"{stem}-{progress.next_layer:05d}.pt"
                replace_file(state / name, lambda tmp, xs=stream: torch.save([h.cpu() for h in xs], tmp), durable=True)
                setattr(progress, attr, name)
        replace_file(state / PROGRESS, lambda tmp: write_json(tmp, progress.__dict__), durable=True)
        for name in old:
            if name and name not in (progress.inputs, progress.dense_inputs):
                (state / name).unlink(missing_ok=True)

    def prune(self, *, kernel, sparsity, nm, activations: Callable[[], Activations] | None, mode: str | None,
              compute: torch.device, calib_dtype, options: dict, run_options: dict, stats=None,
              check: Callable[[Activations], None] | None = None, structure: list | None = None,
              recovery=None) -> list[dict]:
        """Prune layer by layer (or copy, with no ``kernel``) into the partial directory; returns the notes.
        With a composite ``structure`` each layer is sliced to its plan before it is written; with
        ``recovery`` (``recover.Reconstruction``) each layer is reconstructed before it is written, and the
        dense stream is saved beside the pruned one so that a resumed run continues it."""
        from mosaic.prune import _group_pruner, stats_for
        from mosaic.restructure import apply

        s = self.streamed
        identity = run_identity(s.source.directory, run_options.get("calib_dataset"))
        progress = self.progress = self._start(fingerprint(run_options, sparsity, nm, identity))
        on_group = None
        if kernel is not None:
            on_group = _group_pruner(s.adapter, kernel, sparsity, nm, options, structure, progress.notes)
        if recovery is not None:
            recovery.layers = progress.reconstructed  # a resumed run's record continues
            if stats is not None or kernel.stats == "none":  # the engine walks for the reconstruction only
                pruner = on_group

                def on_group(index, layer, group, seen):
                    pruner(index, layer, group, stats_for(kernel, stats, index, group, seen))
        if progress.next_layer == 0:
            self._copy("embed", progress)
        acts = None

        @contextmanager
        def layer(index: int) -> Iterator[None]:
            tensors = s.load(index)
            try:
                before = _counts(tensors)
                del tensors
                yield
                if structure is not None:
                    apply(s.adapter, [s.modules[index][0]], [structure[index]])
                state = s.state(index)
                write_shard(self.partial / self._shard(index), state)
                _add(progress.before, before)
                _add(progress.after, _counts(state))
                progress.rows.append(_measure(s.adapter, s.modules[index][0]))
                progress.next_layer = index + 1
                last = index == s.n_layers - 1
                dense = recovery.dense if recovery is not None and not last else None
                self._save(progress, None if acts is None or last else acts.hidden, dense)
                _layer_saved(index)
            finally:
                s.release(index)
                _return_freed_memory()

        start = progress.next_layer
        if recovery is None and (kernel is None or kernel.stats == "none" or stats is not None):
            for index in range(start, s.n_layers):
                with layer(index), on_device(s.modules[index][0], compute) as device:
                    for group in GROUPS if on_group else ():
                        on_group(index, s.modules[index][0], group,
                                 stats[index][group].to(device) if stats is not None else None)
        elif start < s.n_layers:
            acts = activations()
            if start > 0:
                acts.hidden = torch.load(self.partial / STATE / progress.inputs)
                if recovery is not None:
                    recovery.dense = torch.load(self.partial / STATE / progress.dense_inputs)
            elif check is not None:
                with s.held(0):
                    check(acts)
            run_layers(s.model, s.adapter, acts, on_group, mode=mode,
                       hessian=kernel.stats == "hessian" and stats is None, compute=compute, calib_dtype=calib_dtype,
                       desc=f"prune ({kernel.name}, streamed)", scope=layer, start=start, recovery=recovery)
        self._copy("head", progress)
        for k in ("total", "nonzero", "bytes"):
            self.before[k] = progress.before.get(k, 0)
        return progress.notes

    def _copy(self, part, progress: Progress) -> None:
        """Embedding or head: written unchanged."""
        s = self.streamed
        tensors = {n: t.contiguous() for n, t in s.source.read(s.saved_names(part), s.dtype).items()}
        write_shard(self.partial / self._shard(part), tensors)
        counts = _counts(tensors)  # the embedding's go into the first layer's saved progress; the head's last
        _add(progress.before, counts)
        _add(progress.after, counts)

    def report(self) -> dict:
        """For results.json: that the run streamed, from where it resumed, and layers held at once."""
        return {"offload": "disk", "shards": self.n_shards, "resumed_from_layer": self.resumed_from,
                "peak_layers_in_memory": self.streamed.peak_live}

    @property
    def achieved(self) -> dict:
        rows = self.progress.rows
        zeros, total = sum(r["zeros"] for r in rows), sum(r["params"] for r in rows)
        return {"overall": zeros / max(total, 1), "zeros": zeros, "params": total, "per_layer": [r["row"] for r in rows]}

    @property
    def after(self) -> dict:
        return dict(self.progress.after)

    def finish(self, directory: Path, tokenizer, manifest: dict) -> int:
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
        if getattr(model.config, "auto_map", None):  # per-layer widths: ship the modeling code, as save_checkpoint
            from mosaic.modeling import MODELING_FILE

            shutil.copy(MODELING_FILE, directory / MODELING_FILE.name)
        write_json(directory / "mosaic.json", manifest)
        partial = self.partial
        after_commit(directory, lambda: shutil.rmtree(partial, ignore_errors=True))
        return sum(f.stat().st_size for f in directory.glob("*.safetensors"))

    def reader(self, checkpoint: Path | None) -> Callable:
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

