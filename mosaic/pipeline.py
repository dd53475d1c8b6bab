"""One pruning run, as a chain of steps each fed by the previous one's output:

    load → calibrate → profile → allocate → prune → restructure → evaluate → export

``run(Options)`` is what the CLI calls; it is also the Python API.
"""

from __future__ import annotations

import logging
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mosaic import __version__
from mosaic import allocate as alloc
from mosaic.calibrate import capture, check_staged_forward, layer_kwargs
from mosaic.data import KNOWN, calibration_windows, eval_tokens
from mosaic.errors import UsageError
from mosaic.eval.perplexity import perplexity
from mosaic.export import atomic_dir, check_writable, save_checkpoint, write_json
from mosaic.load import DEFAULT_MODEL, Loaded, compute_device, load_model
from mosaic.profile import profile_model
from mosaic.prune import KERNELS, METHODS, measure, prune_from_norms, prune_model, uniform_map
from mosaic.report import summary_text, write_plots

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Every knob of a run; the CLI flags map one to one onto these fields."""

    model: str = DEFAULT_MODEL
    cache_dir: str = "llm_weights"
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    offline: bool = False
    prune_method: str = "wanda"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    allocation: str | None = None
    allocation_file: str | None = None
    Hyper_m: float = 5.0
    Lamda: float = 0.08
    calib_dataset: str = "wiki-offline"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib_batch_size: int = 8
    calib_dtype: str = "auto"
    true_sequential: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    eval_datasets: str = "wiki-offline"
    eval_windows: int | None = None
    eval_seqlen: int = 2048
    eval_batch_size: int = 1
    save: str | None = None
    save_model: str | None = None
    overwrite: bool = False
    extra: dict = field(default_factory=dict)  # how the run was invoked, for the record


# --- validation ------------------------------------------------------------------------------------

def parse_sparsity_type(kind: str, sparsity: float) -> tuple[int, int] | None:
    """None for unstructured, (N, M) for an N:M pattern whose ratio matches the sparsity."""
    if kind == "unstructured":
        return None
    parts = kind.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise UsageError("--sparsity_type", f"'{kind}' is not a type; use unstructured or N:M such as 2:4")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise UsageError("--sparsity_type", f"'{kind}' needs 0 < N < M")
    if abs(n / m - sparsity) > 1e-6:
        raise UsageError("--sparsity_type", f"{kind} prunes {n}/{m} = {n / m:g} of the weights but "
                         f"--sparsity_ratio is {sparsity:g}; pass --sparsity_ratio {n / m:g}")
    return n, m


def _positive(value, flag: str) -> None:
    if value is not None and value <= 0:
        raise UsageError(flag, f"must be > 0, got {value}")


def _dataset(name: str, flag: str) -> None:
    if name not in KNOWN and not Path(name).expanduser().exists():
        raise UsageError(flag, f"unknown dataset '{name}' (and no such file); use one of {', '.join(KNOWN)} "
                         "or a path to a .txt/.jsonl file")


def eval_names(opts: Options) -> list[str]:
    names = [n.strip() for n in opts.eval_datasets.split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def validate(opts: Options) -> tuple[int, int] | None:
    """Check every flag before any work; returns the N:M pattern (or None)."""
    if opts.prune_method not in METHODS:
        raise UsageError("--prune_method", f"unknown method '{opts.prune_method}'; choose from {', '.join(METHODS)}")
    if not 0 <= opts.sparsity_ratio < 1:
        raise UsageError("--sparsity_ratio", f"must be in [0, 1), got {opts.sparsity_ratio}")
    nm = parse_sparsity_type(opts.sparsity_type, opts.sparsity_ratio)
    method = METHODS[opts.prune_method]
    allocation = opts.allocation or method.allocation
    if opts.allocation is not None and opts.allocation not in alloc.ALLOCATIONS:
        raise UsageError("--allocation", f"unknown allocation '{opts.allocation}'; use one of {', '.join(alloc.ALLOCATIONS)}")
    if allocation == "owl_nm" and nm is None:
        raise UsageError("--sparsity_type", f"{opts.prune_method} chooses N per layer: give an N:M type such as 5:8")
    if nm is not None and allocation not in ("uniform", "owl_nm"):
        raise UsageError("--sparsity_type", f"N:M gives every projection the same pattern, so allocation "
                         f"'{allocation}' cannot apply; use unstructured, or wanda_owl_structure for per-layer N:M")
    for value, flag in ((opts.nsamples, "--nsamples"), (opts.seqlen, "--seqlen"),
                        (opts.calib_batch_size, "--calib_batch_size"), (opts.eval_windows, "--eval_windows"),
                        (opts.eval_seqlen, "--eval_seqlen"), (opts.eval_batch_size, "--eval_batch_size"),
                        (opts.blocksize, "--blocksize"), (opts.percdamp, "--percdamp"), (opts.Hyper_m, "--Hyper_m")):
        _positive(value, flag)
    if opts.Lamda < 0:
        raise UsageError("--Lamda", f"must be >= 0, got {opts.Lamda}")
    if nm and opts.blocksize % nm[1]:
        raise UsageError("--blocksize", f"must be a multiple of M={nm[1]} for {opts.sparsity_type}")
    if METHODS[opts.prune_method].kernel is not None:
        _dataset(opts.calib_dataset, "--calib_dataset")
    for name in eval_names(opts):
        _dataset(name, "--eval_datasets")
    if opts.calib_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError("--calib_dtype", f"'{opts.calib_dtype}' is not one of auto, float32, bfloat16, float16")
    check_writable(opts.save, "--save", opts.overwrite)
    check_writable(opts.save_model, "--save_model", opts.overwrite)
    if opts.allocation_file and Path(opts.allocation_file).is_dir():
        raise UsageError("--allocation_file", f"{opts.allocation_file} is a directory; give a .json file path")
    return nm


# --- helpers ---------------------------------------------------------------------------------------

class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 3)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_calib_dtype(spec: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bf16 forwards for an fp32 model on a CPU with native bf16 (2.4× faster matmuls, the
    statistics and all weight math stay fp32); otherwise the model's own dtype."""
    if spec == "auto":
        if model_dtype == torch.float32 and device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return model_dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def context_length(config) -> int:
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


def versions() -> dict:
    import accelerate
    import datasets
    import transformers

    out = {"mosaic": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "datasets": datasets.__version__}
    try:
        from importlib.metadata import version

        out["lm_eval"] = version("lm_eval")
    except Exception:
        pass
    return out


def peak_memory() -> dict:
    mem = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        mem["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return mem


def parameter_report(model) -> dict:
    params = list(model.parameters())
    unique = {id(p): p for p in params}.values()  # tied embeddings count once
    return {"total": sum(p.numel() for p in unique), "nonzero": int(sum(int((p != 0).sum()) for p in unique)),
            "bytes": sum(p.numel() * p.element_size() for p in unique)}


# --- the run -------------------------------------------------------------------------------------------

def run(opts: Options) -> dict:
    nm = validate(opts)
    method = METHODS[opts.prune_method]
    kernel = KERNELS.get(method.kernel) if method.kernel else None
    timer = Timer()

    with timer("load"):
        loaded = load_model(opts.model, dtype=opts.dtype, device=opts.device, cache_dir=opts.cache_dir,
                            device_map=opts.device_map, offline=opts.offline)
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    compute = compute_device(model)
    n_layers = len(adapter.layers(model))
    ctx = context_length(model.config)
    seqlen, eval_seqlen = min(opts.seqlen, ctx), min(opts.eval_seqlen, ctx)
    if seqlen < opts.seqlen:
        log.warning("--seqlen %d exceeds the model's context %d; using %d", opts.seqlen, ctx, seqlen)
    model_dtype = next(model.parameters()).dtype
    calib_dtype = resolve_calib_dtype(opts.calib_dtype, model_dtype, compute)
    before = parameter_report(model)
    mode = "sequential" if opts.true_sequential else "reference"

    allocation = opts.allocation or method.allocation
    sparsity_map, nm_plan, profile = None, [nm] * n_layers, None
    file_exists = bool(opts.allocation_file) and Path(opts.allocation_file).is_file()
    if kernel is not None and file_exists:
        sparsity_map, file_nm = alloc.read_file(opts.allocation_file, n_layers)
        nm_plan = file_nm or nm_plan
        allocation = f"file:{opts.allocation_file}"
    needs_profile = kernel is not None and sparsity_map is None and allocation != "uniform"
    needs_calib = kernel is not None and (kernel.stats != "none" or needs_profile)

    windows = None
    if needs_calib:
        with timer("calibration_data"):
            windows = calibration_windows(tokenizer, opts.calib_dataset, opts.nsamples, seqlen, opts.seed)

    notes: list[dict] = []
    if kernel is not None:
        with timer("prune"):
            acts = capture(model, adapter, windows, opts.calib_batch_size) if needs_calib else None
            if acts is not None and mode == "sequential":
                _check_staged(model, adapter, acts, compute, calib_dtype)
            if needs_profile:
                with timer("profile"):
                    profile = profile_model(model, adapter, acts, opts.Hyper_m, compute=compute,
                                            calib_dtype=calib_dtype)
                if allocation == "owl_nm":
                    nm_plan = alloc.owl_nm(profile.layer_ratios, nm[0], nm[1], opts.Lamda)
                    sparsity_map = uniform_map(n_layers, opts.sparsity_ratio)
                else:
                    sparsity_map = alloc.allocate(allocation, profile, n_layers, opts.sparsity_ratio, opts.Lamda)
                if opts.allocation_file:
                    alloc.write_file(opts.allocation_file, sparsity_map, nm_plan,
                                     {"model": opts.model, "method": opts.prune_method, "allocation": allocation,
                                      "target": opts.sparsity_ratio, "Lamda": opts.Lamda, "Hyper_m": opts.Hyper_m})
            sparsity_map = sparsity_map or uniform_map(n_layers, opts.sparsity_ratio)
            options = {"blocksize": opts.blocksize, "percdamp": opts.percdamp}
            if profile is not None and kernel.stats == "norms":
                prune_from_norms(model, adapter, kernel, sparsity_map, nm_plan, profile.norms, compute)
            elif kernel.stats == "none":
                notes = prune_model(model, adapter, kernel, sparsity_map, nm_plan, None, compute=compute)
            else:
                if profile is not None:  # the profiling pass consumed the activations: replay layer 0
                    acts = capture(model, adapter, windows, opts.calib_batch_size)
                notes = prune_model(model, adapter, kernel, sparsity_map, nm_plan, acts, mode=mode,
                                    compute=compute, calib_dtype=calib_dtype, options=options)
            del acts

    achieved = measure(model, adapter)
    after = parameter_report(model)

    ppl = {}
    with timer("evaluate"):
        for name in eval_names(opts):
            ids = eval_tokens(tokenizer, name)
            if ids.numel() < eval_seqlen:
                raise UsageError("--eval_datasets", f"'{name}' has {ids.numel()} tokens, fewer than one window of "
                                 f"--eval_seqlen {eval_seqlen}")
            ppl[name] = perplexity(model, adapter, ids, eval_seqlen, opts.eval_windows, opts.eval_batch_size,
                                   compute, desc=f"ppl {name}")

    results = {
        "mosaic_version": __version__,
        "command": opts.extra.get("argv", sys.argv),
        "args": {k: v for k, v in asdict(opts).items() if k != "extra"},
        "versions": versions(),
        "model": {"source": loaded.source, "path": loaded.path, "family": adapter.family, "layers": n_layers,
                  "dtype": str(model_dtype).replace("torch.", ""), "device": str(compute)},
        "settings": {"seqlen": seqlen, "eval_seqlen": eval_seqlen, "mode": mode if kernel else None,
                     "calib_dtype": str(calib_dtype).replace("torch.", "") if needs_calib else None,
                     "allocation": allocation if kernel else None, "nm": nm_plan if any(nm_plan) else None},
        "sparsity": sparsity_report(opts.sparsity_ratio, sparsity_map, achieved, profile),
        "parameters": {"before": before, "after": after},
        "perplexity": ppl,
        "notes": notes,
    }
    if profile is not None:
        results["profile"] = profile.to_json()
        if allocation in ("mosaic_ref", "owl", "mosaic"):
            results["sparsity"]["allocated_overall"] = alloc.overall(sparsity_map, profile.params)
            results["sparsity"]["drift"] = results["sparsity"]["allocated_overall"] - opts.sparsity_ratio
    return finish(results, loaded, opts, timer)


def _check_staged(model, adapter, acts, compute, calib_dtype) -> None:
    """Guard the one-pass engine: the staged forward must reproduce layer 0's own forward."""
    from mosaic.calibrate import on_device, working_copy

    layer = adapter.layers(model)[0]
    with on_device(layer, compute) as device:
        work = working_copy(layer, calib_dtype)
        h = acts.hidden[0].to(device, calib_dtype)
        tol = 1e-4 if h.dtype == torch.float32 else 2e-2
        check_staged_forward(adapter, work, h, layer_kwargs(acts, 0, h, device, {}), atol=tol)


def sparsity_report(target: float, allocated, achieved: dict, profile) -> dict:
    rows = []
    for i, got in enumerate(achieved["per_layer"]):
        for p, s in got.items():
            row = {"layer": i, "projection": p, "achieved": round(s, 6)}
            if allocated is not None:
                row["allocated"] = round(allocated[i][p], 6)
            if profile is not None:
                row["outlier_ratio"] = round(profile.ratios[i][p], 4)
            rows.append(row)
    return {"target": target, "achieved": achieved["overall"], "zeros": achieved["zeros"],
            "projection_params": achieved["params"], "per_projection": rows}


def finish(results: dict, loaded: Loaded, opts: Options, timer: Timer) -> dict:
    """Write the checkpoint and results (atomically), then print the summary."""
    manifest = {"mosaic_version": __version__, "source_model": loaded.source, "method": opts.prune_method,
                "sparsity_type": opts.sparsity_type, "settings": results["settings"],
                "sparsity": {k: results["sparsity"][k] for k in ("target", "achieved")},
                "allocation": [{r["projection"]: r.get("allocated") for r in results["sparsity"]["per_projection"]
                                if r["layer"] == i} for i in range(results["model"]["layers"])]}

    def write_model(directory: Path) -> None:
        with timer("save_model"):
            results["checkpoint"] = {"path": str(opts.save_model),
                                     "safetensors_bytes": save_checkpoint(loaded.model, loaded.tokenizer, directory, manifest)}

    def write_results(directory: Path) -> None:
        results["time_s"] = timer.seconds
        results["memory"] = peak_memory()
        write_json(directory / "results.json", results)
        (directory / "summary.txt").write_text(summary_text(results) + "\n")
        write_plots(results, directory)

    write_outputs(opts.save, opts.save_model, opts.overwrite, write_results, write_model)
    results.setdefault("time_s", timer.seconds)
    results.setdefault("memory", peak_memory())
    print(summary_text(results), flush=True)
    return results


def _inside(inner: str, outer: str) -> Path | None:
    try:
        return Path(inner).resolve().relative_to(Path(outer).resolve())
    except ValueError:
        return None


def write_outputs(save, save_model, overwrite, write_results, write_model) -> None:
    """--save and --save_model, each atomic; one nested inside the other is written in one go."""
    if save and save_model and (rel := _inside(save_model, save)) is not None:
        with atomic_dir(save, overwrite) as tmp:
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            write_model(tmp / rel)
            write_results(tmp)
        return
    if save and save_model and (rel := _inside(save, save_model)) is not None:
        with atomic_dir(save_model, overwrite) as tmp:
            write_model(tmp)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            write_results(tmp / rel)
        return
    if save_model:
        with atomic_dir(save_model, overwrite) as tmp:
            write_model(tmp)
    if save:
        with atomic_dir(save, overwrite) as tmp:
            write_results(tmp)
