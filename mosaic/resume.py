"""Resuming a killed streamed run: the record of what a pass has finished (``Progress``), kept atomically
and durably in a hidden ``.partial`` directory beside the output, with a fingerprint of everything that
decides the pruned weights (settings, the content of the checkpoint and calibration files, this package's
version), so that ``--resume`` never continues a different run and a rerun never silently discards one."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mosaic
from mosaic import dist
from mosaic.errors import OptionError
from mosaic.export import replace_file, write_json

log = logging.getLogger(__name__)

STATE = "stream-state"  # resume records inside the partial directory
PROGRESS = "progress.json"  # in STATE
SAMPLE = 2**20  # bytes hashed at each end of a checkpoint file for its content identity


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
            "zs_batch_size", "kv_sparsity", "k_sparsity", "v_sparsity", "kv_window", "kv_method",
            "kv_reference", "cache_dir", "offline", "device_map"}
    doc = {k: v for k, v in sorted(options.items()) if k not in skip}
    doc["allocation_map"], doc["nm"] = sparsity, nm
    doc["identity"] = identity or {}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(checkpoint: Path, calib_dataset: str | None) -> dict:
    """The content identity of a run's inputs: every file of the checkpoint directory (weights, config,
    tokenizer), every calibration text that is a file (each source of a mixture), and this package's version
    (read at call time)."""
    from mosaic.data import parse_mixture

    files = sorted(p for p in Path(checkpoint).iterdir() if p.is_file() and not p.name.startswith("."))
    out = {"mosaic": mosaic.__version__, "checkpoint": {p.name: file_identity(p) for p in files}}
    texts = [Path(s.name).expanduser() for s in parse_mixture(calib_dataset)] if calib_dataset else []
    texts = [t for t in texts if t.is_file()]
    if len(texts) == 1 and calib_dataset and Path(calib_dataset).expanduser() == texts[0]:
        out["calib_dataset"] = file_identity(texts[0], sample=None)  # one file: as before mixtures
    elif texts:
        out["calib_dataset"] = {str(t): file_identity(t, sample=None) for t in texts}
    return out


def resolved_settings(dtype: torch.dtype, compute: torch.device, calib_dtype: torch.dtype) -> dict:
    """What the ``auto`` options resolved to on this machine, and the libraries that compute: a run killed
    on a GPU (bf16) must not be resumed on a CPU (fp32), nor one calibrated in bf16 continued in fp32."""
    import transformers

    return {"dtype": str(dtype).removeprefix("torch."), "device": compute.type,
            "calib_dtype": str(calib_dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__}


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


def start(partial: Path, print_: str, resume: bool, overwrite: bool, n_layers: int) -> tuple[Progress, bool]:
    """The record to continue (``resume`` and the same fingerprint; True), or a fresh one in an emptied
    ``partial`` (False), refusing to discard finished layers without ``overwrite``."""
    state = partial / STATE / PROGRESS
    if resume and state.is_file():
        done = Progress(**json.loads(state.read_text()))
        if done.fingerprint != print_:
            raise OptionError("resume", f"{partial} was written by another run (other pruning settings, "
                              "model or calibration files, resolved dtype, device or calibration dtype, or "
                              "Mosaic, torch or transformers version); rerun exactly that run on such a "
                              "machine to continue it, or pass --overwrite without --resume to discard it")
        log.info("resuming at layer %d of %d from %s", done.next_layer, n_layers, partial)
        return done, True
    if resume:
        log.info("nothing to resume in %s: starting from the first layer", partial)
    check_leftover(partial, resume, overwrite)
    if state.is_file():
        log.warning("discarding the finished layers in %s (--overwrite)", partial)
    shutil.rmtree(partial, ignore_errors=True)
    (partial / STATE).mkdir(parents=True)
    return Progress(fingerprint=print_), False

def save(partial: Path, progress: Progress, hidden: list[torch.Tensor] | None,
         dense: list[torch.Tensor] | None = None) -> None:
    """The next layer's inputs (the pruned stream, and the dense one when reconstructing), then the record
    that names them; the previous layer's files go once the record no longer does. Under torchrun each rank
    saves its own share of the inputs (``dist.rank_file``), and rank 0 writes the record once all are on
    disk."""
    state = partial / STATE
    old = [progress.inputs, progress.dense_inputs]
    progress.inputs = progress.dense_inputs = None
    for attr, stream, stem in (("inputs", hidden, "inputs"), ("dense_inputs", dense, "dense")):
        if stream is not None:
            name = f"{stem}-{progress.next_layer:05d}.pt"
            replace_file(state / dist.rank_file(name),
                         lambda tmp, xs=stream: torch.save([h.cpu() for h in xs], tmp), durable=True)
            setattr(progress, attr, name)
    dist.barrier()
    dist.from_writer(lambda: replace_file(state / PROGRESS, lambda tmp: write_json(tmp, progress.__dict__),
                                          durable=True))
    for name in old:
        if name and name not in (progress.inputs, progress.dense_inputs):
            (state / dist.rank_file(name)).unlink(missing_ok=True)


def load_inputs(partial: Path, name: str) -> list[torch.Tensor]:
    """A saved stream of layer inputs (this rank's share, under torchrun)."""
    return torch.load(partial / STATE / dist.rank_file(name))
