"""What a run's options mean: ``Options`` (every knob), the checks that run before any work, and the
``Plan`` they derive. Besides ``cli.py``'s parser this is the only place that knows what an option means;
each check raises ``OptionError`` naming the option (the CLI turns it into its flag), and a valid option
that has no effect in a run gets one warning line (``warn_unused``)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mosaic import allocate as alloc
from mosaic import composite_search, corpora, dist, fit, recover
from mosaic.data import KNOWN, guard_sources, parse_mixture
from mosaic.errors import OptionError
from mosaic.eval import zeroshot as zs
from mosaic.export import check_writable
from mosaic.hub import hub_reachable
from mosaic.kv import KVSparsity
from mosaic.kv import allocate as kvalloc
from mosaic.kv.prune import METHODS as KV_METHODS
from mosaic.load import DEFAULT_MODEL, parse_device_map, resolve_calib_dtype
from mosaic.prune import KERNELS, METHODS, Kernel

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
    calib_dataset: str = "wiki-offline"  # a text, or a weighted mixture NAME[:WEIGHT],NAME[:WEIGHT]
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
    # --allocation search: Fisher windows, and as many held out to score allocations
    search_windows: int = 8
    # --allocation search: generations of evolutionary refinement (0: the curve solve only)
    search_budget: int = 16
    # recovery: tune each pruned layer (or its attention and MLP) to the dense output
    reconstruct: str = "none"
    reconstruct_steps: int = recover.ReconstructSpec.steps
    reconstruct_lr: float = recover.ReconstructSpec.lr
    reconstruct_batch: int = recover.ReconstructSpec.batch
    reconstruct_norms: bool = recover.ReconstructSpec.norms
    distill_steps: int = 0  # recovery: end-to-end distillation from the dense model afterwards (0: none)
    distill_lr: float = recover.DistillSpec.lr
    distill_batch: int = recover.DistillSpec.batch
    distill_windows: int = 64  # calibration windows to distil on, none of them used for statistics
    distill_device: str = "auto"  # auto: the compute device when all fits there; cpu: the host
    distill_dataset: str | None = None  # another text or mixture to distil on (default: --calib_dataset)
    recovery_guard: str = "none"  # texts recovery must not make worse: none, auto or NAME,NAME,...
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
    kv_allocation: str = "uniform"  # Mustafar: one K and V sparsity per run, per layer or per KV head
    kv_allocation_file: str | None = None  # ... written after the KV sensitivity; applied if it exists
    save: str | None = None
    save_model: str | None = None
    overwrite: bool = False
    offload: str = "auto"  # none: in memory; disk: stream layer by layer; auto: disk when it would not fit
    max_memory: str | None = None  # host memory budget for offload auto and host distillation (default: free)
    resume: bool = False  # continue a killed streamed run from its last finished layer
    dist_timeout: float = 600.0  # torchrun: seconds a collective waits for the other ranks before failing
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
    kv_file: kvalloc.KVAllocationFile | None = None  # an existing --kv_allocation_file, applied instead
    reconstruct: recover.ReconstructSpec | None = None  # recovery: layer-wise reconstruction
    distill: recover.DistillSpec | None = None  # recovery: end-to-end distillation
    guard: str | None = None  # the texts recovery must not make worse (``guard_spec``)

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
    def searches(self) -> bool:
        """The search allocation runs (and is not replaced by an --allocation_file)."""
        return self.allocation == "search" and self.allocation_file is None

    @property
    def recovers(self) -> bool:
        return self.reconstruct is not None or self.distill is not None


def parse_sparsity_type(kind: str, sparsity: float) -> tuple[int, int] | None:
    """None for unstructured or composite, (N, M) for an N:M pattern whose ratio matches the sparsity."""
    if kind in ("unstructured", "composite"):
        return None
    parts = kind.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise OptionError("sparsity_type", f"'{kind}' is not a type; use unstructured, composite or N:M "
                          "such as 2:4")
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
        suite = ", suite (all four of its texts)" if option == "eval_datasets" else ""
        raise OptionError(option, f"unknown dataset '{name}' (and no such file); use one of "
                          f"{', '.join(KNOWN)}{suite} or a path to a .txt/.jsonl file")


def _mixture(spec: str, option: str) -> None:
    """A text or a weighted mixture of texts, every name known or an existing file."""
    for source in parse_mixture(spec, option):
        _dataset(source.name, option)
        if source.name in corpora.EVAL_ONLY:
            corpora.refuse_calibration(source.name, "calib", option)


def eval_names(opts: Options) -> list[str]:
    names = [n.strip() for n in opts.eval_datasets.split(",") if n.strip()]
    return [] if names in ([], ["none"]) else corpora.expand(names)


INTEGERS = ("round_to", "nsamples", "seqlen", "seed", "calib_batch_size", "eval_windows", "eval_seqlen",
            "eval_batch_size", "blocksize", "zs_limit", "zs_batch_size", "alps_max_iter", "alps_cg_iters",
            "search_windows", "search_budget", "kv_window", "reconstruct_steps", "reconstruct_batch",
            "distill_steps", "distill_batch", "distill_windows")
NUMBERS = ("sparsity_ratio", "structured_ratio", "Hyper_m", "Lamda", "percdamp", "alps_rho0", "kv_sparsity",
           "k_sparsity", "v_sparsity", "reconstruct_lr", "distill_lr")
BOOLEANS = ("offline", "uniform_widths", "true_sequential", "kv_reference", "overwrite", "resume",
            "reconstruct_norms")


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
    for option in BOOLEANS:
        if not isinstance(getattr(opts, option), bool):
            raise OptionError(option, f"must be True or False, got {getattr(opts, option)!r}")


def validate(opts: Options) -> Plan:
    """Check every option before any work and derive the plan: one check per concern, in this order."""
    check_types(opts)
    method, nm, allocation = check_method(opts)
    composite = check_structure(opts, method.kernel, nm, allocation)
    check_knobs(opts, nm)
    kernel = KERNELS[method.kernel] if method.kernel and opts.sparsity_ratio > 0 else None
    if method.kernel and kernel is None:
        log.info("--sparsity_ratio 0: nothing to prune; the dense model is evaluated and saved")
    if kernel is not None:
        _mixture(opts.calib_dataset, "calib_dataset")
    if kernel is not None and opts.distill_dataset is not None:
        _mixture(opts.distill_dataset, "distill_dataset")
    names, tasks, offline = check_evaluation(opts)
    check_writable(opts.save, "save", opts.overwrite)
    check_writable(opts.save_model, "save_model", opts.overwrite)
    file = allocation_file(opts, kernel, nm)
    mode = statistics_mode(opts, kernel)
    reconstruct, distill = recovery_specs(opts, kernel, mode)
    lamda, hyper_m = alloc.hyper_defaults(allocation)
    kv = kv_spec(opts, bool(names) or tasks is not None)
    plan = Plan(kernel=kernel, allocation=allocation, allocation_file=file, nm=nm, composite=composite,
                mode=mode, lamda=lamda if opts.Lamda is None else opts.Lamda,
                hyper_m=hyper_m if opts.Hyper_m is None else opts.Hyper_m,
                eval_names=names, zs_tasks=tasks, offline=offline,
                kv=kv, kv_file=kv_allocation_file(opts, kv),
                reconstruct=reconstruct, distill=distill,
                guard=guard_spec(opts, reconstruct is not None or distill is not None))
    check_offload(opts, plan)
    check_search(opts, plan)
    check_ranks(opts, plan)
    warn_unused(opts, plan)
    return plan


def check_ranks(opts: Options, plan: Plan) -> None:
    """What a launched run (torchrun, more than one rank) needs, refused before any work: every rank holds
    the whole model on its own device, and gets at least one batch of every split role."""
    ranks = dist.world()
    if ranks == 1:
        return
    if opts.device_map is not None:
        raise OptionError("device_map", f"spreads one model over several devices, and under torchrun each of "
                          f"the {ranks} ranks holds the whole model on its own device: drop --device_map, or "
                          "run one process")
    batches = -(-opts.nsamples // opts.calib_batch_size)
    if plan.needs_calibration and batches < ranks:
        raise OptionError("nsamples", f"{opts.nsamples} windows make {batches} calibration batches of "
                          f"--calib_batch_size {opts.calib_batch_size} for {ranks} ranks, and each rank "
                          f"needs one: use --nsamples {ranks * opts.calib_batch_size} or more, or a smaller "
                          "--calib_batch_size")
    if plan.searches and opts.search_windows < ranks:
        raise OptionError("search_windows", f"{opts.search_windows} scoring windows for {ranks} ranks, and "
                          f"each rank needs one: use --search_windows {ranks} or more")
    if plan.distill is not None and opts.distill_batch % ranks:
        raise OptionError("distill_batch", f"{opts.distill_batch} windows per step do not split evenly over "
                          f"{ranks} ranks (FSDP2 needs as many passes on each): use a multiple of {ranks}")
    if plan.distill is not None and plan.distill.host and torch.cuda.is_available():
        raise OptionError("distill_device", f"cpu keeps distillation on the host, and under torchrun the "
                          f"{ranks} ranks shard it over their GPUs (FSDP2): drop --distill_device cpu")


def check_method(opts: Options):
    """The method, the sparsity and its type, and the allocation they imply: (method, N:M, allocation)."""
    if opts.prune_method not in METHODS:
        raise OptionError("prune_method", f"unknown method '{opts.prune_method}'; choose from "
                          f"{', '.join(METHODS)}")
    _fraction(opts.sparsity_ratio, "sparsity_ratio")
    nm = parse_sparsity_type(opts.sparsity_type, opts.sparsity_ratio)
    method = METHODS[opts.prune_method]
    if opts.allocation is not None and opts.allocation not in alloc.ALLOCATIONS:
        raise OptionError("allocation", f"unknown allocation '{opts.allocation}'; use one of "
                          f"{', '.join(alloc.ALLOCATIONS)}")
    allocation = opts.allocation or method.allocation
    if allocation == "owl_nm" and nm is None:
        raise OptionError("sparsity_type", f"{opts.prune_method} chooses N per layer: give an N:M type "
                          "such as 5:8")
    if nm is not None and allocation not in ("uniform", "owl_nm"):
        raise OptionError("sparsity_type", f"N:M gives every projection the same pattern, so allocation "
                          f"'{allocation}' cannot apply; use unstructured, or wanda_owl_structure for "
                          "per-layer N:M")
    return method, nm, allocation


def check_structure(opts: Options, kernel: str | None, nm, allocation: str) -> bool:
    """Composite pruning's knobs; True when the run removes heads and channels."""
    composite = opts.sparsity_type == "composite"
    _number(opts.structured_ratio, "structured_ratio", positive=False)
    if composite:
        if kernel not in ("wanda", "sparsegpt", "alps"):
            raise OptionError("sparsity_type", f"composite needs a Wanda, SparseGPT or ALPS method, "
                              f"not {opts.prune_method}")
        if not 0 <= opts.structured_ratio <= opts.sparsity_ratio:
            raise OptionError("structured_ratio",
                              f"must be in [0, --sparsity_ratio {opts.sparsity_ratio:g}], "
                              f"got {opts.structured_ratio:g}")
    elif opts.structured_ratio:
        raise OptionError("structured_ratio", "removes whole heads and channels: add --sparsity_type "
                          "composite")
    if opts.uniform_widths and not composite:
        raise OptionError("uniform_widths", "applies to --sparsity_type composite only")
    return composite


POSITIVE = ("round_to", "nsamples", "seqlen", "calib_batch_size", "eval_windows", "eval_seqlen",
            "eval_batch_size", "blocksize", "percdamp", "Hyper_m", "zs_batch_size", "zs_limit", "alps_rho0",
            "alps_max_iter", "alps_cg_iters", "search_windows")


def check_knobs(opts: Options, nm) -> None:
    """Ranges of the kernels', calibration's and evaluation's numbers, and the names of their choices."""
    for option in POSITIVE:
        _number(getattr(opts, option), option)
    _number(opts.Lamda, "Lamda", positive=False)
    _number(opts.search_budget, "search_budget", positive=False)
    if nm and opts.blocksize % nm[1]:
        raise OptionError("blocksize", f"must be a multiple of M={nm[1]} for {opts.sparsity_type}")
    if opts.calib_stats not in CALIB_STATS:
        raise OptionError("calib_stats", f"'{opts.calib_stats}' is not one of {', '.join(CALIB_STATS)}")
    if opts.eval_dtype not in ("model", "float32", "bfloat16", "float16"):
        raise OptionError("eval_dtype", f"'{opts.eval_dtype}' is not one of model, float32, bfloat16, "
                          "float16")
    if opts.calib_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise OptionError("calib_dtype", f"'{opts.calib_dtype}' is not one of auto, float32, bfloat16, "
                          "float16")


def check_evaluation(opts: Options) -> tuple[list[str], list[str] | None, bool]:
    """Perplexity texts and zero-shot tasks: (texts, tasks or None, offline)."""
    names = eval_names(opts)
    for name in names:
        _dataset(name, "eval_datasets")
    tasks, offline = None, opts.offline
    if opts.eval_zero_shot is not None:
        offline = offline or not hub_reachable()
        tasks = zero_shot_tasks(opts.eval_zero_shot, offline)
    return names, tasks, offline


def existing_file(text: str | None, option: str) -> Path | None:
    """A map file to apply: its path if it exists (None: not given, or to be written), never a directory."""
    if not text:
        return None
    path = Path(text)
    if path.is_dir():
        raise OptionError(option, f"{text} is a directory; give a .json file path")
    return path if path.is_file() else None


def allocation_file(opts: Options, kernel: Kernel | None, nm) -> alloc.AllocationFile | None:
    """An existing --allocation_file, read and checked against the run (None: the rule allocates)."""
    if kernel is None or existing_file(opts.allocation_file, "allocation_file") is None:
        return None
    file = alloc.read_file(opts.allocation_file)
    alloc.check_file(file, opts.allocation_file, None, opts.sparsity_ratio, nm, opts.structured_ratio)
    composite_search.check_options(file.meta, opts.allocation_file, opts.round_to, opts.uniform_widths,
                                   opts.sparsity_type == "composite")
    return file


def statistics_mode(opts: Options, kernel: Kernel | None) -> str | None:
    """The engine's mode: sequential | reference | dense; None when the kernel reads no statistics."""
    if kernel is None or kernel.stats == "none":
        return None
    if opts.calib_stats == "dense":
        return "dense"
    return "sequential" if opts.true_sequential else "reference"


def check_search(opts: Options, plan: Plan) -> None:
    if plan.searches and plan.kernel is not None and opts.search_windows > opts.nsamples:
        raise OptionError("search_windows", f"the Fisher reads the first --search_windows of the --nsamples "
                          f"{opts.nsamples} statistics windows, so it must be at most {opts.nsamples}, got "
                          f"{opts.search_windows}")


def warn_unused(opts: Options, plan: Plan) -> None:
    """One warning line for each option set away from its default that this run does not use."""
    kernel = plan.kernel.name if plan.kernel else None
    searches = kernel is not None and plan.searches
    used = {"search_budget": searches and not (plan.composite and opts.uniform_widths),
            "search_windows": searches,
            "blocksize": kernel == "sparsegpt",
            "percdamp": kernel in ("sparsegpt", "alps"), "alps_rho0": kernel == "alps",
            "alps_max_iter": kernel == "alps", "alps_cg_iters": kernel == "alps",
            "max_memory": opts.offload == "auto" or opts.distill_steps > 0, "kv_window": plan.kv is not None,
            "kv_method": plan.kv is not None, "kv_reference": plan.kv is not None,
            "kv_allocation": plan.kv is not None, "kv_allocation_file": plan.kv is not None}
    why = {"search_budget": "the allocation is not a search" if not searches else "the composite search "
           "refines per-layer widths only, not --uniform_widths",
           "search_windows": "the allocation is not a search",
           "blocksize": "only SparseGPT reads it", "percdamp": "only SparseGPT and ALPS read it",
           "alps_rho0": "only ALPS reads it", "alps_max_iter": "only ALPS reads it",
           "alps_cg_iters": "only ALPS reads it",
           "max_memory": "it budgets --offload auto and distillation only",
           "kv_window": "no KV-cache sparsity is set",
           "kv_method": "no KV-cache sparsity is set", "kv_reference": "no KV-cache sparsity is set",
           "kv_allocation": "no KV-cache sparsity is set",
           "kv_allocation_file": "no KV-cache sparsity is set"}
    for option in ("reconstruct_steps", "reconstruct_lr", "reconstruct_batch", "reconstruct_norms"):
        used[option], why[option] = opts.reconstruct != "none", "--reconstruct is none"
    used["recovery_guard"] = opts.reconstruct != "none" or opts.distill_steps > 0
    why["recovery_guard"] = "neither --reconstruct nor --distill_steps is set"
    for option in ("distill_lr", "distill_batch", "distill_windows", "distill_device", "distill_dataset"):
        used[option], why[option] = opts.distill_steps > 0, "--distill_steps is 0"
    defaults = Options()
    for option, is_used in used.items():
        if not is_used and getattr(opts, option) != getattr(defaults, option):
            log.warning("--%s has no effect in this run: %s", option, why[option])


def recovery_specs(opts: Options, kernel: Kernel | None, mode: str | None):
    """Reconstruction and distillation as the options ask: every knob's range checked whether or not it is
    used (``warn_unused`` names the knobs a run ignores)."""
    if opts.reconstruct not in recover.GRANULARITIES:
        raise OptionError("reconstruct", f"'{opts.reconstruct}' is not one of "
                          f"{', '.join(recover.GRANULARITIES)}")
    # types: check_types, which runs first
    for option, least in (("reconstruct_steps", 0), ("reconstruct_batch", 1), ("distill_steps", 0),
                          ("distill_batch", 1), ("distill_windows", 2)):
        if getattr(opts, option) < least:
            raise OptionError(option, f"must be >= {least}, got {getattr(opts, option)}")
    for option in ("reconstruct_lr", "distill_lr"):
        _number(getattr(opts, option), option)
    if opts.distill_batch > opts.distill_windows:
        raise OptionError("distill_batch", f"draws {opts.distill_batch} distinct windows per step from "
                          f"--distill_windows {opts.distill_windows}; raise --distill_windows or lower "
                          "--distill_batch")
    if opts.distill_device not in ("auto", "cpu"):
        raise OptionError("distill_device", f"'{opts.distill_device}' is not one of auto, cpu")
    wanted = opts.reconstruct != "none" or opts.distill_steps > 0
    if kernel is None:
        if wanted:
            log.warning("nothing is pruned in this run: --reconstruct and --distill_steps have no effect")
        return None, None
    if opts.reconstruct != "none" and mode == "dense" and kernel.stats == "hessian":
        raise OptionError("reconstruct", f"tunes each layer on the pruned model's activations, which "
                          f"{kernel.name} with --calib_stats dense does not carry; use --calib_stats "
                          "sequential")
    reconstruct = None
    if opts.reconstruct != "none":
        reconstruct = recover.ReconstructSpec(granularity=opts.reconstruct, steps=opts.reconstruct_steps,
                                              lr=float(opts.reconstruct_lr), batch=opts.reconstruct_batch,
                                              seed=opts.seed, norms=opts.reconstruct_norms)
    distill = None
    if opts.distill_steps > 0:
        distill = recover.DistillSpec(steps=opts.distill_steps, lr=float(opts.distill_lr),
                                      batch=opts.distill_batch, seed=opts.seed,
                                      host=opts.distill_device == "cpu")
    return reconstruct, distill


OFFLOAD = ("auto", "none", "disk")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of a size such as ``64GB``, ``500MiB`` or ``1e9``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise OptionError("max_memory", f"'{text}' is not a size; use e.g. 64GB, 500MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def check_offload(opts: Options, plan: Plan) -> None:
    if opts.offload not in OFFLOAD:
        raise OptionError("offload", f"'{opts.offload}' is not one of {', '.join(OFFLOAD)}")
    if opts.max_memory is not None:
        parse_memory(opts.max_memory)
    if opts.device_map is not None:
        parse_device_map(opts.device_map)
    if opts.resume and opts.offload == "none":
        raise OptionError("resume", "continues a streamed run: use it with --offload disk (or auto)")
    if opts.offload == "disk" or opts.resume:
        check_streamable(opts, plan)


def check_streamable(opts: Options, plan: Plan) -> None:
    """What streaming cannot do (yet), refused before any work: with --offload disk at validation, with
    --offload auto once it chooses to stream."""
    if plan.zs_tasks is not None:
        raise OptionError("eval_zero_shot", "zero-shot evaluation needs the whole model in memory, and this "
                          "run streams it; evaluate the saved checkpoint on a larger machine, or drop "
                          "--eval_zero_shot")
    if plan.kv is not None:
        raise OptionError("kv_sparsity", "KV-cache sparsity evaluation is not streamed; run it in memory")
    if not opts.save_model:
        raise OptionError("save_model", "streaming writes each pruned layer to disk as it goes: give "
                          "--save_model")
    if plan.searches:
        raise OptionError("allocation", "search needs the whole model in memory, and this run streams it "
                          "(--offload); use --offload none, or apply a map found on a larger machine with "
                          "--allocation_file")
    if plan.guard is not None:
        raise OptionError("recovery_guard", "carries the guard texts' windows beside the calibration "
                          "windows, which streaming does not save for --resume yet; use --recovery_guard "
                          "none, or --offload none")
    if plan.distill is not None:
        raise OptionError("distill_steps", "needs the dense teacher and the pruned student in memory "
                          "together, and this run streams the model from disk; use --offload none on a "
                          "machine where both fit, or --reconstruct alone")


GUARD_AUTO = ("code", "exams")  # added to the calibration texts by --recovery_guard auto: other kinds of text


def guard_spec(opts: Options, recovers: bool) -> str | None:
    """The texts recovery must not make worse (``recover.Guard``: each layer keeps only as much of its tuning
    as raises no text's error; distillation keeps no state worse on any), as ``NAME,NAME,...``; None for
    none. ``auto``: every calibration text, then code and exam questions (their calibration-side splits)."""
    if opts.recovery_guard == "none" or not recovers:
        return None
    if opts.recovery_guard == "auto":
        names = [s.name for s in parse_mixture(opts.calib_dataset)]
        names += [n for n in GUARD_AUTO if n not in names]
    else:
        names = guard_sources(opts.recovery_guard)
    for name in names:
        _dataset(name, "recovery_guard")
        if name in corpora.EVAL_ONLY:
            corpora.refuse_calibration(name, "calib", "recovery_guard")
    return ",".join(names)


def kv_spec(opts: Options, evaluates: bool) -> KVSparsity | None:
    """The Mustafar KV sparsity evaluation applies, if any KV option asks for one."""
    k = opts.k_sparsity if opts.k_sparsity is not None else opts.kv_sparsity
    v = opts.v_sparsity if opts.v_sparsity is not None else opts.kv_sparsity
    if opts.kv_window < 0:
        raise OptionError("kv_window", f"must be >= 0 tokens, got {opts.kv_window}")
    if opts.kv_method not in KV_METHODS:
        raise OptionError("kv_method", f"'{opts.kv_method}' is not one of {', '.join(KV_METHODS)}")
    if opts.kv_allocation not in ("uniform", *kvalloc.GRANULARITIES):
        raise OptionError("kv_allocation", f"'{opts.kv_allocation}' is not one of uniform, "
                          f"{', '.join(kvalloc.GRANULARITIES)}")
    if k is None and v is None:
        return None
    for option in ("kv_sparsity", "k_sparsity", "v_sparsity"):
        _fraction(getattr(opts, option), option)
    if not evaluates:
        raise OptionError("kv_sparsity", "KV-cache sparsity applies to evaluation: give --eval_datasets or "
                          "--eval_zero_shot")
    allocated = opts.kv_allocation != "uniform" or opts.kv_allocation_file is not None
    if allocated and opts.kv_reference:
        raise OptionError("kv_reference", "counts pruned entries as the official code does for one uniform "
                          "sparsity; drop it with --kv_allocation layer/head or --kv_allocation_file")
    if opts.kv_allocation != "uniform":
        _mixture(opts.calib_dataset, "calib_dataset")  # the sensitivity reads calibration text
    if opts.kv_allocation != "uniform" and max(k or 0.0, v or 0.0) > kvalloc.LEVELS[-1]:
        raise OptionError("kv_sparsity", f"--kv_allocation {opts.kv_allocation} measures levels up to "
                          f"{kvalloc.LEVELS[-1]:g}, so the target must be at most that")
    try:
        return KVSparsity(k_sparsity=k or 0.0, v_sparsity=v or 0.0, window=opts.kv_window,
                          k_method=opts.kv_method, v_method=opts.kv_method, reference=opts.kv_reference)
    except ValueError as err:
        option = ("kv_window" if "window" in str(err) else "kv_reference" if "reference" in str(err)
                  else "kv_method")
        raise OptionError(option, str(err)) from err


def kv_allocation_file(opts: Options, spec: KVSparsity | None) -> kvalloc.KVAllocationFile | None:
    """An existing --kv_allocation_file, read and checked against the run's K/V targets and criteria (its
    layers and heads are checked once the model is loaded); None: the run measures and solves its own."""
    path = existing_file(opts.kv_allocation_file, "kv_allocation_file") if spec is not None else None
    if path is None:
        if spec is not None and opts.kv_allocation_file and opts.kv_allocation == "uniform":
            log.warning("--kv_allocation_file has no effect in this run: --kv_allocation uniform measures no "
                        "map to write to %s; pass --kv_allocation layer or head to measure one",
                        opts.kv_allocation_file)
        return None
    file = kvalloc.read_file(path)
    kvalloc.check_file(file, path, spec, granularity=opts.kv_allocation)
    return file


def zero_shot_tasks(spec: str, offline: bool) -> list[str]:
    """Task names, checked against the offline data, or lm-eval's own task list when online."""
    tasks = zs.parse_tasks(spec)
    try:
        zs.check_offline_tasks(tasks) if offline else zs.check_online_tasks(tasks)
    except zs.ZeroShotError as err:
        raise OptionError("eval_zero_shot", str(err).removeprefix("--eval_zero_shot: ")) from err
    return tasks


def workload(opts: Options, plan: Plan) -> fit.Workload | None:
    """The calibration knobs that decide whether the whole model fits the compute device with its working
    set: under torchrun the largest rank's share of the batches and scoring windows (each rank holds its
    own; the need is per rank)."""
    if not plan.needs_calibration:
        return None
    calib = None if opts.calib_dtype == "auto" else resolve_calib_dtype(opts.calib_dtype, torch.float32, None)
    searches = plan.searches  # as calibration() draws its windows
    ranks = dist.world()
    batches = -(-opts.nsamples // opts.calib_batch_size)
    nsamples = min(opts.nsamples, -(-batches // ranks) * opts.calib_batch_size)
    return fit.Workload(nsamples=nsamples, seqlen=opts.seqlen, batch_size=opts.calib_batch_size,
                        calib_dtype=calib, kernel=plan.kernel.name if plan.kernel else None,
                        stats=plan.kernel.stats if plan.kernel else "none", mode=plan.mode,
                        reconstruct=None if opts.reconstruct == "none" else opts.reconstruct,
                        reconstruct_batch=opts.reconstruct_batch,
                        search_windows=-(-opts.search_windows // ranks) if searches else 0,
                        search_validation=searches and opts.search_budget > 0
                        and not (plan.composite and opts.uniform_widths))


def distill_split(opts: Options) -> tuple[int, int]:
    """Distillation windows: (training, held out to keep the best state)."""
    return opts.distill_windows, max(2, opts.distill_windows // 8)


def window_counts(opts: Options, plan: Plan) -> dict[str, int]:
    """How many calibration windows each role of this run draws (``data.ROLES``)."""
    k = opts.search_windows if plan.searches else 0
    train, held = distill_split(opts) if plan.distill is not None else (0, 0)
    # the composite search refines per-layer widths, not --uniform_widths
    refines = opts.search_budget > 0 and not (plan.composite and opts.uniform_widths)
    return {"statistics": opts.nsamples, "search": k, "validation": k if refines else 0,
            "distill": train, "distill_held_out": held, "guard": recover.GUARD_WINDOWS if plan.guard else 0}


def kernel_options(opts: Options, kernel: Kernel | None) -> dict:
    """The knobs ``kernel`` takes, from the options (which name every kernel's)."""
    if kernel is None:
        return {}
    return {name: getattr(opts, name) for name in kernel.options if hasattr(opts, name)}


def allocation_meta(opts: Options, plan: Plan, target: float) -> dict:
    """What an --allocation_file records beside its map: the run that made it."""
    return {"model": opts.model, "method": opts.prune_method, "allocation": plan.allocation,
            "target": opts.sparsity_ratio, "structured_ratio": opts.structured_ratio,
            "unstructured_target": target, "Lamda": plan.lamda, "Hyper_m": plan.hyper_m}

