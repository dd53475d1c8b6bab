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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from mosaic import __version__
from mosaic import allocate as alloc
from mosaic.calibrate import capture, check_staged_forward, layer_kwargs
from mosaic.data import KNOWN, calibration_windows, eval_tokens
from mosaic.errors import UsageError
from mosaic.eval import zeroshot as zs
from mosaic.eval.perplexity import perplexity
from mosaic.export import atomic_dir, check_writable, save_checkpoint, write_json
from mosaic.hub import hub_reachable
from mosaic.load import DEFAULT_MODEL, Loaded, compute_device, load_model
from mosaic.profile import profile_model
from mosaic.prune import KERNELS, METHODS, measure, prune_from_norms, prune_model, uniform_map
from mosaic.report import summary_text, write_plots
from mosaic.restructure import (
    budgets_from_allocation,
    geometry,
    kept_params,
    plan_structure,
    restructure,
    unit_scores,
)
from mosaic.restructure import summary as structure_summary

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
    structured_ratio: float = 0.0
    round_to: int = 8
    uniform_widths: bool = False
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
    eval_dtype: str = "model"
    eval_zero_shot: str | None = None
    zs_limit: int | None = None
    zs_batch_size: int = 16
    save: str | None = None
    save_model: str | None = None
    overwrite: bool = False
    extra: dict = field(default_factory=dict)  # how the run was invoked, for the record


# --- validation ------------------------------------------------------------------------------------

def parse_sparsity_type(kind: str, sparsity: float) -> tuple[int, int] | None:
    """None for unstructured or composite, (N, M) for an N:M pattern whose ratio matches the sparsity."""
    if kind in ("unstructured", "composite"):
        return None
    parts = kind.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise UsageError("--sparsity_type", f"'{kind}' is not a type; use unstructured, composite or N:M such as 2:4")
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
    if opts.sparsity_type == "composite":
        if method.kernel not in ("wanda", "sparsegpt"):
            raise UsageError("--sparsity_type", f"composite needs a Wanda or SparseGPT method, not {opts.prune_method}")
        if not 0 <= opts.structured_ratio <= opts.sparsity_ratio:
            raise UsageError("--structured_ratio", f"must be in [0, --sparsity_ratio {opts.sparsity_ratio:g}], "
                             f"got {opts.structured_ratio:g}")
    elif opts.structured_ratio:
        raise UsageError("--structured_ratio", "removes whole heads and channels: add --sparsity_type composite")
    if opts.uniform_widths and opts.sparsity_type != "composite":
        raise UsageError("--uniform_widths", "applies to --sparsity_type composite only")
    for value, flag in ((opts.round_to, "--round_to"), (opts.nsamples, "--nsamples"), (opts.seqlen, "--seqlen"),
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
    if opts.eval_zero_shot is not None:
        _zero_shot_tasks(opts)
    _positive(opts.zs_batch_size, "--zs_batch_size")
    if opts.zs_limit is not None:
        _positive(opts.zs_limit, "--zs_limit")
    if opts.eval_dtype not in ("model", "float32", "bfloat16", "float16"):
        raise UsageError("--eval_dtype", f"'{opts.eval_dtype}' is not one of model, float32, bfloat16, float16")
    if opts.calib_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError("--calib_dtype", f"'{opts.calib_dtype}' is not one of auto, float32, bfloat16, float16")
    check_writable(opts.save, "--save", opts.overwrite)
    check_writable(opts.save_model, "--save_model", opts.overwrite)
    if opts.allocation_file and Path(opts.allocation_file).is_dir():
        raise UsageError("--allocation_file", f"{opts.allocation_file} is a directory; give a .json file path")
    return nm


# --- helpers ---------------------------------------------------------------------------------------

def _zero_shot_tasks(opts: Options) -> list[str]:
    tasks = zs.parse_tasks(opts.eval_zero_shot)
    if opts.offline or not hub_reachable():
        try:
            zs.check_offline_tasks(tasks)
        except zs.ZeroShotError as err:
            raise UsageError("--eval_zero_shot", str(err).removeprefix("--eval_zero_shot: ")) from err
    return tasks


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

@dataclass
class Plan:
    """What a run will do, derived from the options before any work."""

    method: str
    kernel: object | None
    allocation: str
    nm: tuple[int, int] | None
    composite: bool
    mode: str


def make_plan(opts: Options, nm) -> Plan:
    method = METHODS[opts.prune_method]
    return Plan(method=opts.prune_method, kernel=KERNELS.get(method.kernel) if method.kernel else None,
                allocation=opts.allocation or method.allocation, nm=nm,
                composite=opts.sparsity_type == "composite",
                mode="sequential" if opts.true_sequential else "reference")


def run(opts: Options) -> dict:
    nm = validate(opts)
    plan = make_plan(opts, nm)
    timer = Timer()

    # load
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
    kernel = plan.kernel

    sparsity_map, nm_plan, profile, structure, file_alloc = None, [nm] * n_layers, None, None, False
    if kernel is not None and opts.allocation_file and Path(opts.allocation_file).is_file():
        sparsity_map, file_nm = alloc.read_file(opts.allocation_file, n_layers)
        nm_plan, file_alloc = file_nm or nm_plan, True
    needs_profile = kernel is not None and (plan.composite or (not file_alloc and plan.allocation != "uniform"))
    needs_calib = kernel is not None and (kernel.stats != "none" or needs_profile)

    # calibrate
    windows = None
    if needs_calib:
        with timer("calibration_data"):
            windows = calibration_windows(tokenizer, opts.calib_dataset, opts.nsamples, seqlen, opts.seed)

    notes: list[dict] = []
    composite_report = None
    if kernel is not None:
        with timer("prune"):
            acts = capture(model, adapter, windows, opts.calib_batch_size) if needs_calib else None
            if acts is not None and plan.mode == "sequential":
                _check_staged(model, adapter, acts, compute, calib_dtype)
            # profile
            if needs_profile:
                with timer("profile"):
                    profile = profile_model(model, adapter, acts, opts.Hyper_m, compute=compute, calib_dtype=calib_dtype)
            # restructure plan (composite): which heads and channels go
            target, params = opts.sparsity_ratio, profile.params if profile else None
            if plan.composite:
                structure, composite_report = plan_composite(model, adapter, profile, plan, opts)
                params = [kept_params(geometry(adapter, layer), p)
                          for layer, p in zip(adapter.layers(model), structure)]
                target = composite_report["unstructured_target"]
            # allocate
            if file_alloc:
                pass
            elif plan.allocation == "owl_nm":
                nm_plan = alloc.owl_nm(profile.layer_ratios, nm[0], nm[1], opts.Lamda)
                sparsity_map = uniform_map(n_layers, opts.sparsity_ratio)
            elif plan.allocation == "uniform" or profile is None:
                sparsity_map = uniform_map(n_layers, target)
            else:
                sparsity_map = alloc.allocate(plan.allocation, replace(profile, params=params), n_layers, target,
                                              opts.Lamda)
            if opts.allocation_file and not file_alloc:
                alloc.write_file(opts.allocation_file, sparsity_map, nm_plan,
                                 {"model": opts.model, "method": opts.prune_method, "allocation": plan.allocation,
                                  "target": target, "Lamda": opts.Lamda, "Hyper_m": opts.Hyper_m})
            # prune
            options = {"blocksize": opts.blocksize, "percdamp": opts.percdamp}
            if profile is not None and kernel.stats == "norms":
                prune_from_norms(model, adapter, kernel, sparsity_map, nm_plan, profile.norms, compute, structure)
            elif kernel.stats == "none":
                notes = prune_model(model, adapter, kernel, sparsity_map, nm_plan, None, compute=compute)
            else:
                if profile is not None:  # the profiling pass consumed the activations: replay layer 0
                    acts = capture(model, adapter, windows, opts.calib_batch_size)
                notes = prune_model(model, adapter, kernel, sparsity_map, nm_plan, acts, mode=plan.mode,
                                    compute=compute, calib_dtype=calib_dtype, options=options, structure=structure)
            del acts
            # restructure: remove the planned heads and channels physically
            if structure is not None:
                restructure(model, adapter, structure)

    achieved = measure(model, adapter)
    after = parameter_report(model)

    # evaluate
    ppl = {}
    with timer("evaluate"):
        for name in eval_names(opts):
            ids = eval_tokens(tokenizer, name)
            if ids.numel() < eval_seqlen:
                raise UsageError("--eval_datasets", f"'{name}' has {ids.numel()} tokens, fewer than one window of "
                                 f"--eval_seqlen {eval_seqlen}")
            ppl[name] = perplexity(model, adapter, ids, eval_seqlen, opts.eval_windows, opts.eval_batch_size,
                                   compute, desc=f"ppl {name}",
                                   dtype=None if opts.eval_dtype == "model" else getattr(torch, opts.eval_dtype))

    zero_shot = None
    if opts.eval_zero_shot is not None:
        with timer("zero_shot"):
            try:
                zero_shot = zs.evaluate(model, tokenizer, _zero_shot_tasks(opts), limit=opts.zs_limit,
                                        batch_size=opts.zs_batch_size, offline=opts.offline or not hub_reachable(),
                                        data_dir=zs.default_data_dir(opts.cache_dir))
            except zs.ZeroShotError as err:
                raise UsageError("--eval_zero_shot", str(err).removeprefix("--eval_zero_shot: ")) from err

    results = {
        "mosaic_version": __version__,
        "command": opts.extra.get("argv", sys.argv),
        "args": {k: v for k, v in asdict(opts).items() if k != "extra"},
        "versions": versions(),
        "model": {"source": loaded.source, "path": loaded.path, "family": adapter.family, "layers": n_layers,
                  "dtype": str(model_dtype).replace("torch.", ""), "device": str(compute)},
        "settings": {"seqlen": seqlen, "eval_seqlen": eval_seqlen, "mode": plan.mode if kernel else None,
                     "calib_dtype": str(calib_dtype).replace("torch.", "") if needs_calib else None,
                     "allocation": (f"file:{opts.allocation_file}" if file_alloc else plan.allocation) if kernel else None,
                     "nm": nm_plan if any(nm_plan) else None},
        "sparsity": sparsity_report(opts.sparsity_ratio, sparsity_map, achieved, profile, composite_report),
        "parameters": {"before": before, "after": after},
        "perplexity": ppl,
        "notes": notes,
    }
    if zero_shot is not None:
        results["zero_shot"] = zero_shot
    if composite_report is not None:
        results["composite"] = composite_report
    if profile is not None:
        results["profile"] = profile.to_json()
        if sparsity_map is not None and plan.allocation in ("mosaic_ref", "owl", "mosaic") and not file_alloc:
            report = results["sparsity"]
            report["allocated_overall"] = alloc.overall(sparsity_map, params)
            report["drift"] = report["allocated_overall"] - target
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


def plan_composite(model, adapter, profile, plan: Plan, opts: Options) -> tuple[list, dict]:
    """Choose the heads and channels to remove (about R of the projection weights), and the unstructured
    sparsity the kept weights need so that R plus it make S of the original weights."""
    n_layers = len(profile.params)
    layers = list(adapter.layers(model))
    R = opts.structured_ratio
    if plan.allocation in ("uniform", "owl_nm") or R == 0:
        budget_map = uniform_map(n_layers, R)
    else:
        budget_map = alloc.allocate(plan.allocation, profile, n_layers, R, opts.Lamda)
    scores = [unit_scores(adapter, layer, profile.norms[i][("o",)], profile.norms[i][("down",)])
              for i, layer in enumerate(layers)]
    budgets = budgets_from_allocation(budget_map, profile.params)
    structure = plan_structure(adapter, layers, scores, budgets, round_to=opts.round_to,
                               uniform_widths=opts.uniform_widths)
    report = structure_summary(structure, profile.params, [geometry(adapter, layer) for layer in layers])
    total, kept = report["params_before"], report["params_kept"]
    removed = total - kept
    report["unstructured_target"] = max(0.0, (opts.sparsity_ratio * total - removed) / kept)
    report["requested_structured_ratio"] = R
    if report["structured_ratio"] > opts.sparsity_ratio + 1e-9:
        log.warning("structured removal %.4f exceeds --sparsity_ratio %.4f after rounding widths to multiples of %d",
                    report["structured_ratio"], opts.sparsity_ratio, opts.round_to)
    return structure, report


def sparsity_report(target: float, allocated, achieved: dict, profile, composite: dict | None = None) -> dict:
    """Allocated and achieved sparsity per (layer, projection). For composite runs the per-projection
    fractions refer to the kept (sliced) weights and ``achieved`` overall to the original weights."""
    rows = []
    for i, got in enumerate(achieved["per_layer"]):
        for p, s in got.items():
            row = {"layer": i, "projection": p, "achieved": round(s, 6)}
            if allocated is not None:
                row["allocated"] = round(allocated[i][p], 6)
            if profile is not None:
                row["outlier_ratio"] = round(profile.ratios[i][p], 4)
            rows.append(row)
    report = {"target": target, "achieved": achieved["overall"], "zeros": achieved["zeros"],
              "projection_params": achieved["params"], "per_projection": rows}
    if composite is not None:
        before = composite["params_before"]
        report["achieved"] = (before - achieved["params"] + achieved["zeros"]) / before
        report["structured"] = composite["structured_ratio"]
        report["unstructured"] = achieved["zeros"] / before
        report["projection_params_before"] = before
    return report


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
