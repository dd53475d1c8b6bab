"""One pruning run, as a chain of steps each fed by the previous one's output:

    validate → load → calibrate → profile → allocate → prune (+ restructure) → export → evaluate

``run(Options)`` is what the CLI calls; it is also the Python API. The pruned model is written
(``export``) before any evaluation, so a failure or Ctrl-C while evaluating never loses it.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from mosaic import __version__, fit, recover, stream
from mosaic import allocate as alloc
from mosaic.adapter import PROJECTIONS
from mosaic.calibrate import Activations, capture, check_staged_forward, layer_kwargs, on_device, working_copy
from mosaic.data import KNOWN, calibration_windows, eval_tokens
from mosaic.errors import EvaluationError, OptionError
from mosaic.eval import zeroshot as zs
from mosaic.eval.perplexity import perplexity
from mosaic.export import atomic_dir, check_writable, replace_file, save_checkpoint, write_json
from mosaic.hub import hub_reachable
from mosaic.kv import KVSparsity, kv_bytes, mustafar_attention
from mosaic.kv.prune import METHODS as KV_METHODS
from mosaic.load import DEFAULT_MODEL, Loaded, all_finite, compute_device, load_model, parse_device_map
from mosaic.profile import Profile, profile_model
from mosaic.prune import (
    KERNELS,
    METHODS,
    Kernel,
    NMPlan,
    SparsityMap,
    measure,
    prune_from_stats,
    prune_model,
    uniform_map,
)
from mosaic.prune import kernel_options as select_options
from mosaic.report import summary_text, write_plots
from mosaic.restructure import (
    budgets_from_allocation,
    geometry,
    kept_params,
    plan_structure,
    reconfigure,
    restructure,
    unit_scores,
)
from mosaic.restructure import summary as structure_summary
from mosaic.search import search

log = logging.getLogger(__name__)

CALIB_STATS = ("sequential", "dense")


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
    Hyper_m: float | None = None  # None: the allocation's default (alloc.HYPER_DEFAULTS)
    Lamda: float | None = None
    structured_ratio: float = 0.0
    round_to: int = 8
    uniform_widths: bool = False
    calib_dataset: str = "wiki-offline"
    calib_stats: str = "sequential"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib_batch_size: int = 8
    calib_dtype: str = "auto"
    true_sequential: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    alps_rho0: float = 0.1  # ALPS: initial ADMM penalty, iteration cap, CG iterations on the final support
    alps_max_iter: int = 300
    alps_cg_iters: int = 10
    search_windows: int = 8  # --allocation search: Fisher windows, and as many held out to score allocations
    search_budget: int = 16  # --allocation search: generations of evolutionary refinement (0: the curve solve only)
    reconstruct: str = "none"  # recovery: tune each pruned layer (or its attention and MLP) to the dense output
    reconstruct_steps: int = recover.ReconstructSpec.steps
    reconstruct_lr: float = recover.ReconstructSpec.lr
    reconstruct_batch: int = recover.ReconstructSpec.batch
    distill_steps: int = 0  # recovery: end-to-end distillation from the dense model afterwards (0: none)
    distill_lr: float = recover.DistillSpec.lr
    distill_batch: int = recover.DistillSpec.batch
    distill_windows: int = 64  # calibration windows to distil on, none of them used for statistics
    eval_datasets: str = "wiki-offline"
    eval_windows: int | None = None
    eval_seqlen: int = 2048
    eval_batch_size: int = 1
    eval_dtype: str = "model"
    eval_zero_shot: str | None = None
    zs_limit: int | None = None
    zs_batch_size: int = 16
    kv_sparsity: float | None = None  # Mustafar KV-cache sparsity for evaluation: both K and V
    k_sparsity: float | None = None  # ... or each on its own (overrides kv_sparsity)
    v_sparsity: float | None = None
    kv_window: int = 32
    kv_method: str = "per_token"
    kv_reference: bool = False
    save: str | None = None
    save_model: str | None = None
    overwrite: bool = False
    offload: str = "auto"  # none: in memory; disk: stream layer by layer; auto: disk when it would not fit
    max_memory: str | None = None  # host memory budget for offload auto (default: what is available)
    resume: bool = False  # continue a killed streamed run from its last finished layer
    extra: dict = field(default_factory=dict)  # how the run was invoked, for the record


@dataclass
class Plan:
    """What a run will do, derived from the options before any work."""

    kernel: Kernel | None  # None: nothing is pruned (dense, or a target of 0)
    allocation: str  # the rule: uniform | owl | mosaic | mosaic_ref | owl_nm
    allocation_file: alloc.AllocationFile | None  # an existing file, applied instead of the rule
    nm: tuple[int, int] | None
    composite: bool
    mode: str | None  # engine mode: sequential | reference | dense; None without calibration statistics
    lamda: float
    hyper_m: float
    eval_names: list[str]
    zs_tasks: list[str] | None
    offline: bool
    kv: KVSparsity | None = None  # Mustafar KV-cache sparsity applied in evaluation
    reconstruct: recover.ReconstructSpec | None = None  # recovery: layer-wise reconstruction
    distill: recover.DistillSpec | None = None  # recovery: end-to-end distillation

    @property
    def needs_profile(self) -> bool:
        """The dense profiling pass: outlier ratios for a rule, widths for composite, and the very
        statistics that Wanda prunes from under dense statistics."""
        if self.kernel is None:
            return False
        rule = self.allocation_file is None and self.allocation != "uniform"
        return self.composite or rule or (self.mode == "dense" and self.kernel.stats == "norms")

    @property
    def needs_calibration(self) -> bool:
        return self.kernel is not None and (self.kernel.stats != "none" or self.needs_profile
                                            or self.recovers)

    @property
    def recovers(self) -> bool:
        return self.reconstruct is not None or self.distill is not None


def run(opts: Options) -> dict:
    plan = validate(opts)
    timer = Timer()
    setup = load(opts, plan, timer)
    texts = evaluation_texts(setup, plan, timer)
    calib = calibration(setup, plan, opts, timer)
    profile = profile_step(setup, calib, plan, timer)
    allocation = allocate_step(setup, plan, profile, opts, calib, timer)
    teacher = teacher_step(setup, plan)
    notes, reconstruction = prune_step(setup, calib, allocation, profile, plan, opts, timer)
    distilled = distill_step(setup, calib, teacher, plan, timer)
    results = record(setup, plan, allocation, profile, notes, opts, recovery_report(reconstruction, distilled))
    saved = export(setup, results, opts, timer)
    return evaluate(setup, texts, saved, results, plan, opts, timer)


# --- validate: everything that can be checked before any work ----------------------------------------

def parse_sparsity_type(kind: str, sparsity: float) -> tuple[int, int] | None:
    """None for unstructured or composite, (N, M) for an N:M pattern whose ratio matches the sparsity."""
    if kind in ("unstructured", "composite"):
        return None
    parts = kind.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise OptionError("sparsity_type", f"'{kind}' is not a type; use unstructured, composite or N:M such as 2:4")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise OptionError("sparsity_type", f"'{kind}' needs 0 < N < M")
    if abs(n / m - sparsity) > 1e-6:
        raise OptionError("sparsity_type", f"{kind} prunes {n}/{m} = {n / m:g} of the weights but "
                          f"--sparsity_ratio is {sparsity:g}; pass --sparsity_ratio {n / m:g}")
    return n, m


def _number(value, option: str, *, positive: bool = True) -> None:
    """Finite, and > 0 (``positive``) or >= 0; NaN and inf pass plain comparisons, so test them first."""
    if value is None:
        return
    if not math.isfinite(value):
        raise OptionError(option, f"must be a finite number, got {value}")
    if positive and value <= 0:
        raise OptionError(option, f"must be > 0, got {value}")
    if not positive and value < 0:
        raise OptionError(option, f"must be >= 0, got {value}")


def _fraction(value, option: str) -> None:
    """A share of weights or entries to prune: finite and in [0, 1) (NaN fails every comparison)."""
    if value is not None and not (math.isfinite(value) and 0 <= value < 1):
        raise OptionError(option, f"must be in [0, 1), got {value}")


def _dataset(name: str, option: str) -> None:
    if name not in KNOWN and not Path(name).expanduser().exists():
        raise OptionError(option, f"unknown dataset '{name}' (and no such file); use one of {', '.join(KNOWN)} "
                          "or a path to a .txt/.jsonl file")


def eval_names(opts: Options) -> list[str]:
    names = [n.strip() for n in opts.eval_datasets.split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


INTEGERS = ("round_to", "nsamples", "seqlen", "seed", "calib_batch_size", "eval_windows", "eval_seqlen",
            "eval_batch_size", "blocksize", "zs_limit", "zs_batch_size", "alps_max_iter", "alps_cg_iters",
            "search_windows", "search_budget", "kv_window", "reconstruct_steps", "reconstruct_batch", "distill_steps",
            "distill_batch", "distill_windows")
NUMBERS = ("sparsity_ratio", "structured_ratio", "Hyper_m", "Lamda", "percdamp", "alps_rho0", "kv_sparsity",
           "k_sparsity", "v_sparsity", "reconstruct_lr", "distill_lr")


def check_types(opts: Options) -> None:
    """Numbers are numbers of the right kind, from the CLI or the Python API (2.5 iterations, "0.5", or
    True is an error before any work, not a crash after calibration)."""
    for option in INTEGERS:
        value = getattr(opts, option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise OptionError(option, f"must be a whole number, got {value!r}")
    for option in NUMBERS:
        value = getattr(opts, option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise OptionError(option, f"must be a number, got {value!r}")


def validate(opts: Options) -> Plan:
    """Check every option before any work and derive the plan."""
    check_types(opts)
    if opts.prune_method not in METHODS:
        raise OptionError("prune_method", f"unknown method '{opts.prune_method}'; choose from {', '.join(METHODS)}")
    _fraction(opts.sparsity_ratio, "sparsity_ratio")
    nm = parse_sparsity_type(opts.sparsity_type, opts.sparsity_ratio)
    method = METHODS[opts.prune_method]
    if opts.allocation is not None and opts.allocation not in alloc.ALLOCATIONS:
        raise OptionError("allocation", f"unknown allocation '{opts.allocation}'; use one of {', '.join(alloc.ALLOCATIONS)}")
    allocation = opts.allocation or method.allocation
    if allocation == "owl_nm" and nm is None:
        raise OptionError("sparsity_type", f"{opts.prune_method} chooses N per layer: give an N:M type such as 5:8")
    if nm is not None and allocation not in ("uniform", "owl_nm"):
        raise OptionError("sparsity_type", f"N:M gives every projection the same pattern, so allocation "
                          f"'{allocation}' cannot apply; use unstructured, or wanda_owl_structure for per-layer N:M")
    composite = opts.sparsity_type == "composite"
    _number(opts.structured_ratio, "structured_ratio", positive=False)
    if composite:
        if method.kernel not in ("wanda", "sparsegpt", "alps"):
            raise OptionError("sparsity_type", f"composite needs a Wanda, SparseGPT or ALPS method, "
                              f"not {opts.prune_method}")
        if not 0 <= opts.structured_ratio <= opts.sparsity_ratio:
            raise OptionError("structured_ratio", f"must be in [0, --sparsity_ratio {opts.sparsity_ratio:g}], "
                              f"got {opts.structured_ratio:g}")
    elif opts.structured_ratio:
        raise OptionError("structured_ratio", "removes whole heads and channels: add --sparsity_type composite")
    if allocation == "search" and composite:
        raise OptionError("allocation", "search does not plan composite widths yet; use mosaic or owl with "
                          "--sparsity_type composite")
    if opts.uniform_widths and not composite:
        raise OptionError("uniform_widths", "applies to --sparsity_type composite only")
    for option in ("round_to", "nsamples", "seqlen", "calib_batch_size", "eval_windows", "eval_seqlen",
                   "eval_batch_size", "blocksize", "percdamp", "Hyper_m", "zs_batch_size", "zs_limit",
                   "alps_rho0", "alps_max_iter", "alps_cg_iters", "search_windows"):
        _number(getattr(opts, option), option)
    _number(opts.Lamda, "Lamda", positive=False)
    _number(opts.search_budget, "search_budget", positive=False)
    if nm and opts.blocksize % nm[1]:
        raise OptionError("blocksize", f"must be a multiple of M={nm[1]} for {opts.sparsity_type}")
    if opts.calib_stats not in CALIB_STATS:
        raise OptionError("calib_stats", f"'{opts.calib_stats}' is not one of {', '.join(CALIB_STATS)}")
    if opts.eval_dtype not in ("model", "float32", "bfloat16", "float16"):
        raise OptionError("eval_dtype", f"'{opts.eval_dtype}' is not one of model, float32, bfloat16, float16")
    if opts.calib_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise OptionError("calib_dtype", f"'{opts.calib_dtype}' is not one of auto, float32, bfloat16, float16")
    kernel = KERNELS[method.kernel] if method.kernel and opts.sparsity_ratio > 0 else None
    if method.kernel and kernel is None:
        log.info("--sparsity_ratio 0: nothing to prune; the dense model is evaluated and saved")
    if kernel is not None:
        _dataset(opts.calib_dataset, "calib_dataset")
    names = eval_names(opts)
    for name in names:
        _dataset(name, "eval_datasets")
    tasks, offline = None, opts.offline
    if opts.eval_zero_shot is not None:
        offline = offline or not hub_reachable()
        tasks = zero_shot_tasks(opts.eval_zero_shot, offline)
    check_writable(opts.save, "save", opts.overwrite)
    check_writable(opts.save_model, "save_model", opts.overwrite)
    file = None
    if kernel is not None and opts.allocation_file:
        if Path(opts.allocation_file).is_dir():
            raise OptionError("allocation_file", f"{opts.allocation_file} is a directory; give a .json file path")
        if Path(opts.allocation_file).is_file():
            file = alloc.read_file(opts.allocation_file)
            alloc.check_file(file, opts.allocation_file, None, opts.sparsity_ratio, nm, opts.structured_ratio)
    if kernel is None or kernel.stats == "none":
        mode = None
    elif opts.calib_stats == "dense":
        mode = "dense"
    else:
        mode = "sequential" if opts.true_sequential else "reference"
    kv = kv_spec(opts, bool(names) or tasks is not None)
    reconstruct, distill_spec = recovery_specs(opts, kernel, mode)
    lamda, hyper_m = alloc.hyper_defaults(allocation)
    plan = Plan(kernel=kernel, allocation=allocation, allocation_file=file, nm=nm, composite=composite, mode=mode,
                lamda=lamda if opts.Lamda is None else opts.Lamda,
                hyper_m=hyper_m if opts.Hyper_m is None else opts.Hyper_m,
                eval_names=names, zs_tasks=tasks, offline=offline, kv=kv, reconstruct=reconstruct,
                distill=distill_spec)
    check_offload(opts, plan)
    if plan.allocation == "search" and plan.allocation_file is None and kernel is not None \
            and opts.search_windows > opts.nsamples:
        raise OptionError("search_windows", f"the Fisher reads the first --search_windows of the --nsamples "
                          f"{opts.nsamples} statistics windows, so it must be at most {opts.nsamples}, got "
                          f"{opts.search_windows}")
    warn_unused(opts, plan)
    return plan


def warn_unused(opts: Options, plan: Plan) -> None:
    """One warning line for each option set away from its default that this run does not use."""
    kernel = plan.kernel.name if plan.kernel else None
    searches = kernel is not None and plan.allocation == "search" and plan.allocation_file is None
    used = {"search_budget": searches, "search_windows": searches, "blocksize": kernel == "sparsegpt",
            "percdamp": kernel in ("sparsegpt", "alps"), "alps_rho0": kernel == "alps",
            "alps_max_iter": kernel == "alps", "alps_cg_iters": kernel == "alps",
            "max_memory": opts.offload == "auto", "kv_window": plan.kv is not None,
            "kv_method": plan.kv is not None, "kv_reference": plan.kv is not None}
    why = {"search_budget": "the allocation is not a search", "search_windows": "the allocation is not a search",
           "blocksize": "only SparseGPT reads it", "percdamp": "only SparseGPT and ALPS read it",
           "alps_rho0": "only ALPS reads it", "alps_max_iter": "only ALPS reads it", "alps_cg_iters": "only ALPS reads it",
           "max_memory": "it budgets --offload auto only", "kv_window": "no KV-cache sparsity is set",
           "kv_method": "no KV-cache sparsity is set", "kv_reference": "no KV-cache sparsity is set"}
    for option in ("reconstruct_steps", "reconstruct_lr", "reconstruct_batch"):
        used[option], why[option] = opts.reconstruct != "none", "--reconstruct is none"
    for option in ("distill_lr", "distill_batch", "distill_windows"):
        used[option], why[option] = opts.distill_steps > 0, "--distill_steps is 0"
    defaults = Options()
    for option, is_used in used.items():
        if not is_used and getattr(opts, option) != getattr(defaults, option):
            log.warning("--%s has no effect in this run: %s", option, why[option])


def recovery_specs(opts: Options, kernel: Kernel | None, mode: str | None):
    """Reconstruction and distillation as the options ask: every knob's range checked whether or not it is
    used (``warn_unused`` names the knobs a run ignores)."""
    if opts.reconstruct not in recover.GRANULARITIES:
        raise OptionError("reconstruct", f"'{opts.reconstruct}' is not one of {', '.join(recover.GRANULARITIES)}")
    for option, least in (("reconstruct_steps", 0), ("reconstruct_batch", 1), ("distill_steps", 0),
                          ("distill_batch", 1), ("distill_windows", 2)):  # types: check_types, which runs first
        if getattr(opts, option) < least:
            raise OptionError(option, f"must be >= {least}, got {getattr(opts, option)}")
    for option in ("reconstruct_lr", "distill_lr"):
        _number(getattr(opts, option), option)
    wanted = opts.reconstruct != "none" or opts.distill_steps > 0
    if kernel is None:
        if wanted:
            log.warning("nothing is pruned in this run: --reconstruct and --distill_steps have no effect")
        return None, None
    if opts.reconstruct != "none" and mode == "dense" and kernel.stats == "hessian":
        raise OptionError("reconstruct", f"tunes each layer on the pruned model's activations, which {kernel.name} "
                          "with --calib_stats dense does not carry; use --calib_stats sequential")
    reconstruct = None
    if opts.reconstruct != "none":
        reconstruct = recover.ReconstructSpec(granularity=opts.reconstruct, steps=opts.reconstruct_steps,
                                              lr=float(opts.reconstruct_lr), batch=opts.reconstruct_batch,
                                              seed=opts.seed)
    distill = None
    if opts.distill_steps > 0:
        distill = recover.DistillSpec(steps=opts.distill_steps, lr=float(opts.distill_lr), batch=opts.distill_batch,
                                      seed=opts.seed)
    return reconstruct, distill


def check_offload(opts: Options, plan: Plan) -> None:
    if opts.offload not in stream.OFFLOAD:
        raise OptionError("offload", f"'{opts.offload}' is not one of {', '.join(stream.OFFLOAD)}")
    if opts.max_memory is not None:
        stream.parse_memory(opts.max_memory)
    if opts.device_map is not None:
        parse_device_map(opts.device_map)
    if opts.resume and opts.offload == "none":
        raise OptionError("resume", "continues a streamed run: use it with --offload disk (or auto)")
    if opts.offload == "disk" or opts.resume:
        stream.check_streamable(plan, opts)
        if plan.allocation == "search" and plan.allocation_file is None:
            raise OptionError("allocation", "search needs the whole model in memory; use --offload none, or "
                              "apply a map found on a larger machine with --allocation_file")
        if plan.distill is not None:
            raise OptionError("distill_steps", DISTILL_STREAMED)


DISTILL_STREAMED = ("needs the dense teacher and the pruned student in memory together, and this run streams the "
                    "model from disk; use --offload none on a machine where both fit, or --reconstruct alone")


def kv_spec(opts: Options, evaluates: bool) -> KVSparsity | None:
    """The Mustafar KV sparsity evaluation applies, if any KV option asks for one."""
    k = opts.k_sparsity if opts.k_sparsity is not None else opts.kv_sparsity
    v = opts.v_sparsity if opts.v_sparsity is not None else opts.kv_sparsity
    if opts.kv_window < 0:
        raise OptionError("kv_window", f"must be >= 0 tokens, got {opts.kv_window}")
    if opts.kv_method not in KV_METHODS:
        raise OptionError("kv_method", f"'{opts.kv_method}' is not one of {', '.join(KV_METHODS)}")
    if k is None and v is None:
        return None
    for option in ("kv_sparsity", "k_sparsity", "v_sparsity"):
        _fraction(getattr(opts, option), option)
    if not evaluates:
        raise OptionError("kv_sparsity", "KV-cache sparsity applies to evaluation: give --eval_datasets or "
                          "--eval_zero_shot")
    try:
        return KVSparsity(k_sparsity=k or 0.0, v_sparsity=v or 0.0, window=opts.kv_window, k_method=opts.kv_method,
                          v_method=opts.kv_method, reference=opts.kv_reference)
    except ValueError as err:
        option = "kv_window" if "window" in str(err) else "kv_reference" if "reference" in str(err) else "kv_method"
        raise OptionError(option, str(err)) from err


def zero_shot_tasks(spec: str, offline: bool) -> list[str]:
    """Task names, checked against the offline data, or lm-eval's own task list when online."""
    tasks = zs.parse_tasks(spec)
    try:
        zs.check_offline_tasks(tasks) if offline else zs.check_online_tasks(tasks)
    except zs.ZeroShotError as err:
        raise OptionError("eval_zero_shot", str(err).removeprefix("--eval_zero_shot: ")) from err
    return tasks


# --- load --------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """The loaded model and what every later step needs to know about it."""

    loaded: Loaded
    compute: torch.device
    n_layers: int
    dtype: torch.dtype
    calib_dtype: torch.dtype
    seqlen: int
    eval_seqlen: int
    before: dict  # parameter report of the unpruned model
    stream: stream.StreamRun | None = None  # the model streamed from disk (its weights on the meta device)

    @property
    def model(self):
        return self.loaded.model

    @property
    def adapter(self):
        return self.loaded.adapter


def load(opts: Options, plan: Plan, timer: Timer) -> Setup:
    with timer("load"):
        streamed = stream.open_run(opts, plan)
        loaded = streamed.loaded if streamed else load_model(
            opts.model, dtype=opts.dtype, device=opts.device, cache_dir=opts.cache_dir, device_map=opts.device_map,
            offline=opts.offline, work=workload(opts, plan))
        if streamed is None and opts.device_map:  # a map that offloaded layers: streamed instead, or refused
            streamed = stream.instead_of_offload(opts, plan, loaded)
            loaded = streamed.loaded if streamed else loaded
    if streamed is not None and plan.allocation == "search" and plan.allocation_file is None:
        raise OptionError("allocation", "search needs the whole model in memory, and this run streams it "
                          "(--offload); use --offload none, or apply a map found on a larger machine with "
                          "--allocation_file")
    if streamed is not None and plan.distill is not None:
        raise OptionError("distill_steps", DISTILL_STREAMED)
    if plan.distill is not None:
        check_distill_fits(loaded.model, opts)
    model, adapter = loaded.model, loaded.adapter
    check_finite(model)
    n_layers = len(adapter.layers(model))
    if plan.allocation_file is not None:
        alloc.check_layers(plan.allocation_file, opts.allocation_file, n_layers)
    compute = compute_device(model)
    ctx = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    seqlen, eval_seqlen = min(opts.seqlen, ctx), min(opts.eval_seqlen, ctx)
    if seqlen < opts.seqlen and plan.needs_calibration:
        log.warning("--seqlen %d exceeds the model's context %d; using %d", opts.seqlen, ctx, seqlen)
    dtype = next(model.parameters()).dtype
    return Setup(loaded=loaded, compute=compute, n_layers=n_layers, dtype=dtype,
                 calib_dtype=resolve_calib_dtype(opts.calib_dtype, dtype, compute), seqlen=seqlen,
                 eval_seqlen=eval_seqlen, before=streamed.before if streamed else parameter_report(model),
                 stream=streamed)


def workload(opts: Options, plan: Plan) -> fit.Workload | None:
    """The calibration knobs that decide whether the whole model fits the compute device with its working set."""
    if not plan.needs_calibration:
        return None
    calib = None if opts.calib_dtype == "auto" else resolve_calib_dtype(opts.calib_dtype, torch.float32, None)
    searches = plan.allocation == "search" and plan.allocation_file is None  # as calibration() draws its windows
    return fit.Workload(nsamples=opts.nsamples, seqlen=opts.seqlen, batch_size=opts.calib_batch_size,
                        calib_dtype=calib, kernel=plan.kernel.name if plan.kernel else None,
                        stats=plan.kernel.stats if plan.kernel else "none", mode=plan.mode,
                        reconstruct=None if opts.reconstruct == "none" else opts.reconstruct,
                        reconstruct_batch=opts.reconstruct_batch,
                        search_windows=opts.search_windows if searches else 0,
                        search_validation=searches and opts.search_budget > 0)


def check_finite(model) -> None:
    """NaN or inf in a weight poisons every statistic computed from it: refuse, naming the tensor."""
    for name, p in model.named_parameters():
        if p.device.type != "meta" and not all_finite(p):
            raise OptionError("model", f"weight {name} holds NaN or inf values; repair or re-download the checkpoint")


def evaluation_texts(setup: Setup, plan: Plan, timer: Timer) -> dict[str, torch.Tensor]:
    """Token streams for perplexity, tokenized now so that a text too short fails before pruning."""
    texts = {}
    with timer("eval_data"):
        for name in plan.eval_names:
            ids = eval_tokens(setup.loaded.tokenizer, name)
            if ids.numel() < setup.eval_seqlen:
                raise OptionError("eval_datasets", f"'{name}' has {ids.numel()} tokens, fewer than one window of "
                                  f"--eval_seqlen {setup.eval_seqlen}")
            texts[name] = ids
    return texts


# --- calibrate, profile ------------------------------------------------------------------------------

@dataclass
class Calibration:
    windows: torch.Tensor  # [nsamples, seqlen] token ids
    batch_size: int
    held_out: torch.Tensor | None = None  # allocation search: the windows drawn after these (not in statistics)
    validation: torch.Tensor | None = None  # ... and after those, to judge the refined map on unseen tokens
    distill: torch.Tensor | None = None  # distillation: training windows, none of them in the statistics
    distill_held_out: torch.Tensor | None = None  # ... and the ones that choose the state to keep

    def activations(self, setup: Setup) -> Activations:
        """Fresh layer-0 inputs (each pass over the layers consumes its own)."""
        with setup.stream.streamed.held("embed") if setup.stream else nullcontext():
            return capture(setup.model, setup.adapter, self.windows, self.batch_size)


def calibration(setup: Setup, plan: Plan, opts: Options, timer: Timer) -> Calibration | None:
    if not plan.needs_calibration:
        return None
    with timer("calibration_data"):
        extra = 0
        if plan.allocation == "search" and plan.allocation_file is None:  # held out; and validation, to refine
            extra = opts.search_windows * (2 if opts.search_budget > 0 else 1)
        distilled = distill_split(opts) if plan.distill is not None else (0, 0)
        windows = calibration_windows(setup.loaded.tokenizer, opts.calib_dataset, opts.nsamples,
                                      setup.seqlen, opts.seed, held_out=extra + sum(distilled))
    n, k = opts.nsamples, opts.search_windows
    searched = windows[n:n + extra]
    rest = windows[n + extra:]
    return Calibration(windows[:n], opts.calib_batch_size, searched[:k] if extra else None,
                       searched[k:] if extra > k else None,
                       rest[:distilled[0]] if plan.distill else None, rest[distilled[0]:] if plan.distill else None)


def distill_split(opts: Options) -> tuple[int, int]:
    """Distillation windows: (training, held out to keep the best state)."""
    return opts.distill_windows, max(2, opts.distill_windows // 8)


def profile_step(setup: Setup, calib: Calibration | None, plan: Plan, timer: Timer) -> Profile | None:
    """Outlier ratios and input statistics of the dense model, when the plan needs them."""
    if not plan.needs_profile:
        return None
    with timer("profile"):
        searches = plan.allocation == "search" and plan.allocation_file is None  # its dense Hessians, same pass
        return profile_model(setup.model, setup.adapter, calib.activations(setup), plan.hyper_m,
                             compute=setup.compute, calib_dtype=setup.calib_dtype,
                             scope=setup.stream.streamed.held if setup.stream else None, hessian=searches)


# --- allocate ----------------------------------------------------------------------------------------

@dataclass
class Allocation:
    """What every projection gets: the unstructured map, the N:M plan, and (composite) the structure."""

    sparsity: SparsityMap | None
    nm: NMPlan
    source: str | None  # the rule, or file:PATH; None when nothing is pruned
    target: float  # what the map's parameter-weighted mean should be
    params: list[dict[str, int]] | None  # the weights the map is weighted by (the kept ones, for composite)
    structure: list | None = None
    composite: dict | None = None
    search: dict | None = None  # the search's candidates and their KL (allocation search)


def allocate_step(setup: Setup, plan: Plan, profile: Profile | None, opts: Options,
                  calib: Calibration | None = None, timer: Timer | None = None) -> Allocation:
    n = setup.n_layers
    if plan.kernel is None:
        return Allocation(None, [None] * n, None, opts.sparsity_ratio, None)
    params = profile.params if profile else projection_params(setup)
    target, structure, composite = opts.sparsity_ratio, None, None
    if plan.composite:
        structure, composite = plan_composite(setup, profile, plan, opts)
        params = [kept_params(geometry(setup.adapter, layer), p)
                  for layer, p in zip(setup.adapter.layers(setup.model), structure)]
        target = composite["unstructured_target"]
    nm: NMPlan = [plan.nm] * n
    if plan.allocation_file is not None:
        sparsity, nm = plan.allocation_file.sparsity, plan.allocation_file.nm or nm
        if plan.allocation_file.nm is not None:
            sparsity = nm_map(nm)
        return Allocation(sparsity, nm, f"file:{opts.allocation_file}", target, params, structure, composite)
    if plan.allocation == "owl_nm":
        nm = alloc.owl_nm(profile.layer_ratios, plan.nm[0], plan.nm[1], plan.lamda)
        if len(set(nm)) == 1:
            log.warning("wanda_owl_structure: every layer got %d:%d (λ=%g is too small to move N by one); "
                        "raise --Lamda (the OWL reference uses 2)", *nm[0], plan.lamda)
        sparsity = nm_map(nm)
    elif plan.allocation == "uniform":
        sparsity = uniform_map(n, target)
    elif plan.allocation == "search":
        with timer("search") if timer else nullcontext():
            found = search_step(setup, plan, profile, opts, calib, params, target)
        sparsity = found.sparsity
    else:
        sparsity = alloc.allocate(plan.allocation, replace(profile, params=params), n, target, plan.lamda)
    if opts.allocation_file:
        alloc.write_file(opts.allocation_file, sparsity, nm,
                         {"model": opts.model, "method": opts.prune_method, "allocation": plan.allocation,
                          "target": opts.sparsity_ratio, "structured_ratio": opts.structured_ratio,
                          "unstructured_target": target, "Lamda": plan.lamda, "Hyper_m": plan.hyper_m})
    return Allocation(sparsity, nm, plan.allocation, target, params, structure, composite,
                      found.to_json() if plan.allocation == "search" else None)


def search_step(setup: Setup, plan: Plan, profile: Profile, opts: Options, calib: Calibration, params, target):
    """The `search` allocation, seeded with the outlier-based `mosaic` map (see mosaic/search.py)."""
    seed_map = alloc.allocate("mosaic", replace(profile, params=params), setup.n_layers, target, plan.lamda)

    def final(sparsity: SparsityMap, keep_stats: list[dict] | None = None) -> nn.Module:
        """A copy of the model pruned with ``sparsity`` exactly as this run will prune it."""
        pruned = copy.deepcopy(setup.model)
        prune_as_planned(pruned, setup, calib, sparsity, [plan.nm] * setup.n_layers, profile, plan, opts,
                         keep_stats=keep_stats)
        return pruned

    found = search(setup.model, setup.adapter, plan.kernel, profile.stats, calib.windows[:opts.search_windows],
                   calib.held_out, params, target, seed_map, batch_size=min(opts.calib_batch_size, 2),
                   seed=opts.seed, options=kernel_options(opts, plan.kernel), generations=int(opts.search_budget),
                   validation=calib.validation, final=final)
    profile.drop_hessians()
    return found


def nm_map(nm: NMPlan) -> SparsityMap:
    """What an N:M plan prunes: N/M of every projection of each layer."""
    return [dict.fromkeys(PROJECTIONS, n / m) for n, m in nm]


def projection_params(setup: Setup) -> list[dict[str, int]]:
    return [{p: proj.weight.numel() for p, proj in setup.adapter.projections(layer).items()}
            for layer in setup.adapter.layers(setup.model)]


def plan_composite(setup: Setup, profile: Profile, plan: Plan, opts: Options) -> tuple[list, dict]:
    """Choose the heads and channels to remove (about R of the projection weights), and the unstructured
    sparsity the kept weights need so that R plus it make S of the original weights."""
    n_layers = setup.n_layers
    layers = list(setup.adapter.layers(setup.model))
    held = setup.stream.streamed.held if setup.stream else lambda index: nullcontext()
    R = opts.structured_ratio
    if plan.allocation in ("uniform", "owl_nm") or R == 0:
        budget_map = uniform_map(n_layers, R)
    else:
        budget_map = alloc.allocate(plan.allocation, profile, n_layers, R, plan.lamda)
    scores = []
    for i, layer in enumerate(layers):
        with held(i):
            scores.append(unit_scores(setup.adapter, layer, profile.norms(i, ("o",)), profile.norms(i, ("down",))))
    budgets = budgets_from_allocation(budget_map, profile.params)
    structure = plan_structure(setup.adapter, layers, scores, budgets, round_to=opts.round_to,
                               uniform_widths=opts.uniform_widths)
    report = structure_summary(structure, profile.params, [geometry(setup.adapter, layer) for layer in layers])
    total, kept = report["params_before"], report["params_kept"]
    report["unstructured_target"] = max(0.0, (opts.sparsity_ratio * total - (total - kept)) / kept)
    report["requested_structured_ratio"] = R
    if report["structured_ratio"] > opts.sparsity_ratio + 1e-9:
        log.warning("structured removal %.4f exceeds --sparsity_ratio %.4f after rounding widths to multiples of %d",
                    report["structured_ratio"], opts.sparsity_ratio, opts.round_to)
    return structure, report


# --- prune -------------------------------------------------------------------------------------------

def prune_step(setup: Setup, calib: Calibration | None, allocation: Allocation, profile: Profile | None,
               plan: Plan, opts: Options, timer: Timer) -> tuple[list[dict], recover.Reconstruction | None]:
    """Prune every projection as allocated, from the statistics the plan's mode names, each layer then
    reconstructed (if asked); then remove the planned heads and channels physically (composite). Returns
    notes (e.g. extra damping) and the reconstruction's record."""
    kernel = plan.kernel
    recovery = recover.Reconstruction(setup.adapter, plan.reconstruct) if plan.reconstruct else None
    if setup.stream is not None:
        return prune_streamed(setup, calib, allocation, profile, plan, opts, timer, recovery), recovery
    if kernel is None:
        return [], None
    model, structure = setup.model, allocation.structure
    with timer("prune"):
        notes = prune_as_planned(model, setup, calib, allocation.sparsity, allocation.nm, profile, plan, opts,
                                 structure, recovery=recovery)
    if structure is not None:
        with timer("restructure"):
            restructure(model, setup.adapter, structure)
    return notes, recovery


def prune_as_planned(model: nn.Module, setup: Setup, calib: Calibration | None, sparsity: SparsityMap, nm: NMPlan,
                     profile: Profile | None, plan: Plan, opts: Options, structure: list | None = None,
                     keep_stats: list[dict] | None = None,
                     recovery: recover.Reconstruction | None = None) -> list[dict]:
    """Prune ``model`` (the run's model, or a copy of it) in place with the plan's kernel and statistics
    (with ``keep_stats``, one dict per layer, also the statistics each group was pruned with), each layer
    reconstructed by ``recovery`` right after its kernel ran."""
    kernel, adapter = plan.kernel, setup.adapter
    given = profile.stats if plan.mode == "dense" and kernel.stats == "norms" else None  # Wanda, dense statistics
    if given is not None and keep_stats is not None:
        for kept, layer_stats in zip(keep_stats, given):
            kept.update(layer_stats)
    if given is not None and recovery is None:  # the profiling pass's own statistics: no second pass
        return prune_from_stats(model, adapter, kernel, sparsity, nm, given, setup.compute, structure)
    mode = engine_mode(plan, recovery)
    acts = calib.activations(setup) if mode else None
    if mode in ("sequential", "reference"):
        check_staged(setup, acts)
    return prune_model(model, adapter, kernel, sparsity, nm, acts, mode=mode or "sequential",
                       compute=setup.compute, calib_dtype=setup.calib_dtype, options=kernel_options(opts, plan.kernel),
                       structure=structure, keep_stats=keep_stats, stats=given, recovery=recovery)


def engine_mode(plan: Plan, recovery: recover.Reconstruction | None) -> str | None:
    """The engine's mode: the plan's, except that reconstruction walks the pruned model's activations even
    where the kernel reads none (magnitude) or reads the profiling pass's (Wanda with dense statistics)."""
    if recovery is not None and plan.mode in (None, "dense"):
        return "sequential"
    return plan.mode


def kernel_options(opts: Options, kernel: Kernel | None) -> dict:
    """The knobs ``kernel`` takes, from the options (which name every kernel's)."""
    if kernel is None:
        return {}
    return select_options(kernel, {"blocksize": opts.blocksize, "percdamp": opts.percdamp,
                                   "alps_rho0": opts.alps_rho0, "alps_max_iter": opts.alps_max_iter,
                                   "alps_cg_iters": opts.alps_cg_iters})


def prune_streamed(setup: Setup, calib: Calibration | None, allocation: Allocation, profile: Profile | None,
                   plan: Plan, opts: Options, timer: Timer,
                   recovery: recover.Reconstruction | None = None) -> list[dict]:
    """The same pruning, one layer in memory at a time, each written as it is done (the dense model is
    copied through when nothing is pruned)."""
    kernel = plan.kernel
    dense_wanda = kernel is not None and plan.mode == "dense" and kernel.stats == "norms"
    with timer("prune"):
        notes = setup.stream.prune(
            kernel=kernel, sparsity=allocation.sparsity, nm=allocation.nm,
            activations=(lambda: calib.activations(setup)) if calib else None, mode=engine_mode(plan, recovery),
            compute=setup.compute, calib_dtype=setup.calib_dtype,
            options=kernel_options(opts, plan.kernel),
            run_options=asdict(opts), stats=profile.stats if dense_wanda else None,
            check=(lambda acts: check_staged(setup, acts)) if engine_mode(plan, recovery) in ("sequential", "reference")
            else None, structure=allocation.structure, recovery=recovery)
    if allocation.structure is not None:
        reconfigure(setup.model, allocation.structure)  # the layers were sliced as they were written
    return notes


# --- recover ---------------------------------------------------------------------------------------------

def teacher_step(setup: Setup, plan: Plan) -> nn.Module | None:
    """The dense model, copied before pruning changes it in place: distillation's teacher."""
    return recover.teacher_copy(setup.model) if plan.distill is not None else None


def distill_step(setup: Setup, calib: Calibration | None, teacher: nn.Module | None, plan: Plan,
                 timer: Timer) -> dict | None:
    """End-to-end distillation of the pruned model from the dense one, mask frozen (optional)."""
    if teacher is None:
        return None
    with timer("distill"):
        report = recover.distill(setup.model, teacher, setup.adapter, calib.distill, calib.distill_held_out,
                                 plan.distill)
    del teacher
    return report


def check_distill_fits(model: nn.Module, opts: Options) -> None:
    """Teacher and student together, the optimizer's state and one micro-batch's logits must fit where the
    model lives; refuse in one line before any work otherwise."""
    device = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = recover.distill_need(model, min(opts.seqlen, int(getattr(model.config, "max_position_embeddings",
                                                                    opts.seqlen) or opts.seqlen)))
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else stream.available_memory()
    if need > have:
        raise OptionError("distill_steps", f"distillation needs about {need / 2**30:.1f} GiB beside what is loaded "
                          f"(a dense teacher of {weights / 2**30:.1f} GiB, the optimizer's state and one window's "
                          f"logits) and {have / 2**30:.1f} GiB is free on {device}; use --reconstruct alone, or a "
                          "smaller --seqlen")


def recovery_report(reconstruction: recover.Reconstruction | None, distilled: dict | None) -> dict | None:
    if reconstruction is None and distilled is None:
        return None
    return {"reconstruct": reconstruction.report() if reconstruction else None, "distill": distilled}


def check_staged(setup: Setup, acts: Activations) -> None:
    """Guard the one-pass engine: the staged forward must reproduce layer 0's own forward."""
    layer = setup.adapter.layers(setup.model)[0]
    with on_device(layer, setup.compute) as device:
        work = working_copy(layer, setup.calib_dtype)
        h = acts.hidden[0].to(device, setup.calib_dtype)
        tol = 1e-4 if h.dtype == torch.float32 else 2e-2
        check_staged_forward(setup.adapter, work, h, layer_kwargs(acts, 0, h, device, {}), atol=tol)


def alps_report(notes: list[dict], opts: Options) -> dict:
    """ALPS's knobs, iterations per projection and time per phase, summed from the kernel's notes."""
    iters = [n["alps_iters"] for n in notes if "alps_iters" in n]
    return {"rho0": opts.alps_rho0, "max_iter": opts.alps_max_iter, "cg_iters": opts.alps_cg_iters,
            "iterations": {"mean": sum(iters) / max(len(iters), 1), "min": min(iters, default=0),
                           "max": max(iters, default=0), "at_cap": sum(i >= opts.alps_max_iter for i in iters)},
            "start_kept": sum(bool(n.get("alps_start_kept")) for n in notes),
            "seconds": {k: sum(n.get(f"{k}_s", 0.0) for n in notes) for k in ("eigh", "admm", "cg")}}


# --- record, export ----------------------------------------------------------------------------------

def record(setup: Setup, plan: Plan, allocation: Allocation, profile: Profile | None, notes: list[dict],
           opts: Options, recovery: dict | None = None) -> dict:
    """results.json as it stands once pruning is done; evaluation fills in the rest."""
    model, loaded = setup.model, setup.loaded
    achieved = setup.stream.achieved if setup.stream else measure(model, setup.adapter)
    sparsity = sparsity_report(opts.sparsity_ratio, allocation.sparsity, achieved, profile, allocation.composite)
    if allocation.sparsity is not None and allocation.source != "uniform":
        sparsity["allocated_overall"] = alloc.overall(allocation.sparsity, allocation.params)
        sparsity["drift"] = sparsity["allocated_overall"] - allocation.target
    nm = allocation.nm
    results = {
        "mosaic_version": __version__,
        "command": opts.extra.get("argv", sys.argv),
        "args": {k: v for k, v in asdict(opts).items() if k != "extra"},
        "versions": versions(),
        "model": {"source": loaded.source, "path": loaded.path, "family": setup.adapter.family,
                  "layers": setup.n_layers, "dtype": _name(setup.dtype), "device": str(setup.compute)},
        "settings": {"seqlen": setup.seqlen, "eval_seqlen": setup.eval_seqlen,
                     "calib_stats": opts.calib_stats if plan.mode else None, "mode": plan.mode,
                     "calib_dtype": _name(setup.calib_dtype) if plan.needs_calibration else None,
                     "allocation": allocation.source, "Lamda": plan.lamda, "Hyper_m": plan.hyper_m,
                     "nm": nm if any(nm) else None},
        "sparsity": sparsity,
        "parameters": {"before": setup.before,
                       "after": setup.stream.after if setup.stream else parameter_report(model)},
        "perplexity": {},
        "notes": notes,
        "evaluation": {"status": "pending"},
    }
    if setup.stream is not None:
        results["streaming"] = setup.stream.report()
    if allocation.composite is not None:
        results["composite"] = allocation.composite
    if allocation.search is not None:
        results["search"] = allocation.search
    if plan.kernel is not None and plan.kernel.name == "alps":
        results["alps"] = alps_report(notes, opts)
    if profile is not None:
        results["profile"] = profile.to_json()
    if recovery is not None:
        results["recovery"] = recovery
    return results


@dataclass
class Saved:
    """Where the run was written; ``update`` rewrites results.json and summary.txt in place, atomically."""

    results_dir: Path | None
    checkpoint: Path | None

    def where(self) -> list[str]:
        return [str(p) for p in (self.checkpoint, self.results_dir) if p is not None]

    def update(self, results: dict) -> None:
        if self.results_dir is not None:
            write_record(self.results_dir, results)


def write_record(directory: Path, results: dict) -> None:
    """results.json and summary.txt, each replaced atomically."""
    replace_file(directory / "results.json", lambda tmp: write_json(tmp, results))
    replace_file(directory / "summary.txt", lambda tmp: tmp.write_text(summary_text(results) + "\n"))


def export(setup: Setup, results: dict, opts: Options, timer: Timer) -> Saved:
    """Write the checkpoint and results.json (evaluation pending) atomically, before any evaluation."""
    manifest = {"mosaic_version": __version__, "source_model": setup.loaded.source, "method": opts.prune_method,
                "sparsity_type": opts.sparsity_type, "settings": results["settings"],
                "sparsity": {k: results["sparsity"][k] for k in ("target", "achieved")},
                "allocation": [{r["projection"]: r.get("allocated") for r in results["sparsity"]["per_projection"]
                                if r["layer"] == i} for i in range(setup.n_layers)]}

    def write_model(directory: Path) -> None:
        with timer("save_model"):
            if setup.stream is not None:
                size = setup.stream.finish(directory, setup.loaded.tokenizer, manifest)
            else:
                size = save_checkpoint(setup.model, setup.loaded.tokenizer, directory, manifest)
        results["checkpoint"] = {"path": str(opts.save_model), "safetensors_bytes": size}

    def write_results(directory: Path) -> None:
        stamp(results, timer)
        write_record(directory, results)
        write_plots(results, directory)

    write_outputs(opts.save, opts.save_model, opts.overwrite, write_results, write_model)
    return Saved(Path(opts.save) if opts.save else None, Path(opts.save_model) if opts.save_model else None)


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


# --- evaluate ----------------------------------------------------------------------------------------

def evaluate(setup: Setup, texts: dict[str, torch.Tensor], saved: Saved, results: dict, plan: Plan,
             opts: Options, timer: Timer) -> dict:
    """Perplexity per text, then zero-shot; results.json is updated after each part. A failure or Ctrl-C
    marks it and raises ``EvaluationError``: the checkpoint and what finished stay on disk."""
    results["evaluation"] = {"status": "running"}
    if plan.kv is not None:
        results["kv_cache"] = kv_report(setup.model.config, plan.kv)
    try:
        with kv_attention(setup.model, plan.kv):
            _evaluate(setup, texts, saved, results, plan, opts, timer)
        results["evaluation"] = {"status": "complete"}
        _progress(results, timer, saved)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        results["evaluation"] = {"status": status, "error": f"{type(err).__name__}: {err}"[:500]}
        try:
            _progress(results, timer, saved)
        except BaseException as write_err:  # e.g. the disk filled up: the checkpoint is still there
            log.error("could not update results.json: %s", write_err)
        raise EvaluationError(status, saved.where(), err) from err
    print(summary_text(results), flush=True)
    return results


def _evaluate(setup: Setup, texts: dict[str, torch.Tensor], saved: Saved, results: dict, plan: Plan,
              opts: Options, timer: Timer) -> None:
    for name, ids in texts.items():
        with timer("evaluate"):
            results["perplexity"][name] = perplexity(
                setup.model, setup.adapter, ids, setup.eval_seqlen, opts.eval_windows, opts.eval_batch_size,
                setup.compute, desc=f"ppl {name}",
                dtype=None if opts.eval_dtype == "model" else getattr(torch, opts.eval_dtype),
                scope=setup.stream.reader(saved.checkpoint) if setup.stream else None)
        _progress(results, timer, saved)
    if plan.zs_tasks is not None:
        with timer("zero_shot"):
            try:
                results["zero_shot"] = zs.evaluate(
                    setup.model, setup.loaded.tokenizer, plan.zs_tasks, limit=opts.zs_limit,
                    batch_size=opts.zs_batch_size, offline=plan.offline, data_dir=zs.default_data_dir(opts.cache_dir))
            except zs.ZeroShotError as err:
                raise OptionError("eval_zero_shot", str(err).removeprefix("--eval_zero_shot: ")) from err


def kv_attention(model, spec: KVSparsity | None):
    """Teacher-forced Mustafar attention for the evaluation forwards, or nothing."""
    return nullcontext() if spec is None else mustafar_attention(model, spec)


def kv_report(config, spec: KVSparsity, context: int = 2048) -> dict:
    """What the KV sparsity prunes and what a ``context``-token cache would hold (fp16 values, as the paper)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = kv_bytes(config, context, spec, value_bytes=2)
    per_vector = {"k": spec.keys(torch.randn(1, 1, spec.group, head_dim)),
                  "v": spec.values(torch.randn(1, 1, spec.group, head_dim))}
    return {"k_sparsity": spec.k_sparsity, "v_sparsity": spec.v_sparsity, "window": spec.window,
            "method": spec.k_method, "reference": spec.reference,
            "achieved": {kv: float((x == 0).float().mean()) for kv, x in per_vector.items()},
            "bytes": {"context": context, "value_bytes": 2, "dense": size.dense, "window": size.window,
                      "keys": list(size.keys), "values": list(size.values), "compressed": list(size.compressed),
                      "ratio": [c / size.dense for c in size.compressed]}}


def _progress(results: dict, timer: Timer, saved: Saved) -> None:
    stamp(results, timer)
    saved.update(results)


def stamp(results: dict, timer: Timer) -> None:
    """Time per phase and peak memory so far, into the record."""
    results["time_s"] = timer.seconds
    results["memory"] = peak_memory()


# --- helpers -----------------------------------------------------------------------------------------

class Timer:
    """Wall time per phase; phases never nest, so they add up to the run's time."""

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


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
