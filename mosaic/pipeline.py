"""One pruning run, as a chain of steps each fed by the previous one's output:

    validate → load → calibrate → profile → allocate → prune (+ reconstruct, restructure) → distill
    → record → export → evaluate

``run(Options)`` is what the CLI calls; it is also the Python API. What options mean: ``options.py``;
what a run reports: ``report.py``; where the weights live (in memory, or streamed one layer at a time):
the source (``source.py``, ``stream.py``), so no step branches on it. The pruned model is written
(``export``) before any evaluation, so a failure or Ctrl-C while evaluating never loses it.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
from torch import nn

from mosaic import allocate as alloc
from mosaic import composite_search, dist, fit, recover, report, sharded
from mosaic.calibrate import Activations, Calibration, check_staged
from mosaic.data import draw_windows, eval_texts, guard_windows
from mosaic.errors import OptionError
from mosaic.eval import zeroshot as zs
from mosaic.eval.perplexity import perplexity
from mosaic.export import write_outputs
from mosaic.kv import KVMeter, KVSparsity, mustafar_attention
from mosaic.kv import allocate as kvalloc
from mosaic.kv.report import report as kv_report
from mosaic.load import check_finite, compute_device, resolve_calib_dtype
from mosaic.options import (
    Options,
    Plan,
    allocation_meta,
    kernel_options,
    parse_memory,
    validate,
    window_counts,
)
from mosaic.profile import Profile, profile_model
from mosaic.prune import NMPlan, SparsityMap, nm_map, projection_params, prune_from_stats, uniform_map
from mosaic.restructure import describe, geometry, kept_projection_params, layer_scores, plan_composite
from mosaic.search import search
from mosaic.source import PruneJob, Setup, prune_in_memory
from mosaic.stream import open_source

log = logging.getLogger(__name__)

def run(opts: Options) -> dict:
    plan = validate(opts)
    timer = report.Timer()
    setup = load(opts, plan, timer)
    texts = evaluation_texts(setup, plan, timer)
    calib = calibration(setup, plan, opts, timer)
    profile = profile_step(setup, calib, plan, timer)
    allocation = allocate_step(setup, plan, profile, opts, calib, timer)
    teacher = teacher_step(setup, plan)
    notes, reconstruction = prune_step(setup, calib, allocation, profile, plan, opts, timer)
    distilled = distill_step(setup, calib, teacher, plan, opts, timer)
    del teacher  # the dense copy is freed before export, evaluation and zero-shot
    results = report.record(setup, plan, allocation, profile, notes, opts,
                            report.recovery_report(reconstruction, distilled))
    saved = export(setup, results, opts, timer)
    return evaluate(setup, texts, saved, results, plan, opts, timer)


def load(opts: Options, plan: Plan, timer: report.Timer) -> Setup:
    with timer("load"):
        loaded, source = open_source(opts, plan)
    model = loaded.model
    if plan.distill is not None:  # refused before any work when even the dense student cannot distil
        recover.distill_device(model, recover.model_bytes(model), compute_device(model), opts.seqlen,
                               plan.distill, host_budget(opts, model), ranks=dist.world())
    check_finite(model)
    n_layers = len(loaded.adapter.layers(model))
    if plan.allocation_file is not None:
        alloc.check_layers(plan.allocation_file, opts.allocation_file, n_layers)
        composite_search.check_plan(plan.allocation_file.meta, opts.allocation_file, model, loaded.adapter,
                                    source.held)
    if plan.kv_file is not None and not plan.composite:  # composite: after pruning, which changes KV heads
        kvalloc.check_model(plan.kv_file, opts.kv_allocation_file, plan.kv, model)
    compute = compute_device(model)
    ctx = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    seqlen, eval_seqlen = min(opts.seqlen, ctx), min(opts.eval_seqlen, ctx)
    if seqlen < opts.seqlen and plan.needs_calibration:
        log.warning("--seqlen %d exceeds the model's context %d; using %d", opts.seqlen, ctx, seqlen)
    dtype = next(model.parameters()).dtype
    return Setup(loaded=loaded, source=source, compute=compute, n_layers=n_layers, dtype=dtype,
                 calib_dtype=resolve_calib_dtype(opts.calib_dtype, dtype, compute), seqlen=seqlen,
                 eval_seqlen=eval_seqlen)


def evaluation_texts(setup: Setup, plan: Plan, timer: report.Timer) -> dict[str, torch.Tensor]:
    """Token streams for perplexity, tokenized now so that a text too short fails before pruning."""
    with timer("eval_data"):
        return eval_texts(setup.loaded.tokenizer, plan.eval_names, setup.eval_seqlen)


def calibration(setup: Setup, plan: Plan, opts: Options, timer: report.Timer) -> Calibration | None:
    """Every window role the run needs, drawn by one function (``data.draw_windows``): pairwise disjoint."""
    if not plan.needs_calibration:
        return None
    counts = window_counts(opts, plan)
    distill = opts.distill_dataset if plan.distill is not None else None
    with timer("calibration_data"):
        w = draw_windows(setup.loaded.tokenizer, opts.calib_dataset, setup.seqlen, opts.seed, counts, distill,
                         plan.guard)
    guard = guard_windows(opts.calib_dataset, counts, distill, plan.guard, w["guard"]) if plan.guard else None
    return Calibration(w["statistics"], opts.calib_batch_size,
                       *(w[role] if counts[role] else None
                         for role in ("search", "validation", "distill", "distill_held_out")), guard=guard)


def profile_step(setup: Setup, calib: Calibration | None, plan: Plan, timer: report.Timer) -> Profile | None:
    """Outlier ratios and input statistics of the dense model, when the plan needs them."""
    if not plan.needs_profile:
        return None
    with timer("profile"):
        return profile_model(setup.model, setup.adapter, setup.inputs(calib), plan.hyper_m,
                             compute=setup.compute, calib_dtype=setup.calib_dtype, scope=setup.source.held,
                             hessian=plan.searches)  # the search's dense Hessians come from the same pass


def allocate_step(setup: Setup, plan: Plan, profile: Profile | None, opts: Options,
                  calib: Calibration | None = None, timer: report.Timer | None = None) -> alloc.Allocation:
    """The map from the file, the rule or the search (written to --allocation_file when that is new)."""
    n = setup.n_layers
    if plan.kernel is None:
        return alloc.Allocation(None, [None] * n, None, opts.sparsity_ratio, None)
    params = profile.params if profile else projection_params(setup.adapter, setup.model)
    target, structure, composite, found = opts.sparsity_ratio, None, None, None
    # a composite run's S − R: the rule, or under the search the outlier-based `mosaic` rule (as its seed)
    rule = "mosaic" if plan.allocation == "search" else plan.allocation
    if plan.composite:
        given = (composite_search.read_plan(plan.allocation_file.meta, opts.allocation_file)
                 if plan.allocation_file is not None else None)
        structure, composite = plan_composite(
            setup.adapter, setup.model, profile, rule, plan.lamda, opts.structured_ratio,
            opts.sparsity_ratio, round_to=opts.round_to, uniform_widths=opts.uniform_widths,
            held=setup.source.held, structure=given)
        if plan.searches:
            with timer("search") if timer else nullcontext():
                structure, composite = composite_search_step(setup, plan, profile, opts, calib, structure)
        params = kept_projection_params(setup.adapter, setup.model, structure)
        target = composite["unstructured_target"]
    nm: NMPlan = [plan.nm] * n
    if plan.allocation_file is not None:
        sparsity, nm = plan.allocation_file.sparsity, plan.allocation_file.nm or nm
        if plan.allocation_file.nm is not None:
            sparsity = nm_map(nm)
        return alloc.Allocation(sparsity, nm, f"file:{opts.allocation_file}", target, params, structure,
                                composite)
    if plan.allocation == "owl_nm":
        nm = alloc.owl_nm(profile.layer_ratios, plan.nm[0], plan.nm[1], plan.lamda)
        sparsity = nm_map(nm)
    elif plan.allocation == "uniform":
        sparsity = uniform_map(n, target)
    elif plan.allocation == "search" and not plan.composite:
        with timer("search") if timer else nullcontext():
            found = search_step(setup, plan, profile, opts, calib, params, target)
        sparsity = found.sparsity
    else:
        sparsity = alloc.allocate(rule, replace(profile, params=params), n, target, plan.lamda)
    if opts.allocation_file:
        meta = allocation_meta(opts, plan, target)
        if plan.composite:
            removed = composite["params_before"] - composite["params_kept"]
            meta |= composite_search.plan_meta(
                structure, removed, opts.round_to, opts.uniform_widths,
                composite_search.fingerprint(setup.model, setup.adapter, setup.source.held))
        dist.from_writer(lambda: alloc.write_file(opts.allocation_file, sparsity, nm, meta))
    return alloc.Allocation(sparsity, nm, plan.allocation, target, params, structure, composite,
                            found.to_json() if found else None)


def composite_search_step(setup: Setup, plan: Plan, profile: Profile, opts: Options, calib: Calibration,
                          rule: list) -> tuple[list, dict]:
    """The searched composite plan (mosaic/composite_search.py) against the `mosaic` rule's ``rule``: the
    structure kept and results.json's ``composite`` section, with its ``search``."""
    adapter, model, n = setup.adapter, setup.model, setup.n_layers
    options = kernel_options(opts, plan.kernel)

    def plan_map(structure: list) -> SparsityMap:
        """The unstructured map (S − R by the `mosaic` rule over the kept weights) the run prunes with."""
        report_ = describe(adapter, model, structure, profile.params, opts.structured_ratio,
                           opts.sparsity_ratio, opts.round_to)
        kept = kept_projection_params(adapter, model, structure)
        return alloc.allocate("mosaic", replace(profile, params=kept), n, report_["unstructured_target"],
                              plan.lamda)

    def build(structure: list) -> nn.Module:
        """A copy of the model pruned with ``structure`` as the run prunes it, from the dense statistics."""
        pruned = copy.deepcopy(model)
        prune_from_stats(pruned, adapter, plan.kernel, plan_map(structure), [None] * n, profile.stats,
                         setup.compute, structure, options)
        return pruned

    found = composite_search.search_composite(
        model, adapter, plan.kernel, profile.stats, layer_scores(adapter, model, profile), rule,
        calib.windows[:opts.search_windows], calib.held_out, round_to=opts.round_to,
        uniform_widths=opts.uniform_widths, batch_size=min(opts.calib_batch_size, 2), seed=opts.seed,
        options=options, build=build, plan_map=plan_map, generations=int(opts.search_budget),
        validation=calib.validation)
    profile.drop_hessians()
    composite = describe(adapter, model, found.structure, profile.params, opts.structured_ratio,
                         opts.sparsity_ratio, opts.round_to)
    geos = [geometry(adapter, layer) for layer in adapter.layers(model)]
    composite["search"] = found.to_json(geos)
    return found.structure, composite


def search_step(setup: Setup, plan: Plan, profile: Profile, opts: Options, calib: Calibration, params,
                target):
    """The `search` allocation, seeded with the outlier-based `mosaic` map (see mosaic/search.py)."""
    seed_map = alloc.allocate("mosaic", replace(profile, params=params), setup.n_layers, target, plan.lamda)

    def final(sparsity: SparsityMap, seen_stats: list[dict] | None = None) -> nn.Module:
        """A copy of the model pruned with ``sparsity`` exactly as this run will prune it."""
        pruned = copy.deepcopy(setup.model)
        job = prune_job(setup, calib, sparsity, [plan.nm] * setup.n_layers, profile, plan, opts)
        prune_in_memory(pruned, setup.adapter, replace(job, seen_stats=seen_stats))
        return pruned

    found = search(setup.model, setup.adapter, plan.kernel, profile.stats,
                   calib.windows[:opts.search_windows], calib.held_out, params, target, seed_map,
                   batch_size=min(opts.calib_batch_size, 2), seed=opts.seed,
                   options=kernel_options(opts, plan.kernel), generations=int(opts.search_budget),
                   validation=calib.validation, final=final)
    profile.drop_hessians()
    return found


def prune_step(setup: Setup, calib: Calibration | None, allocation: alloc.Allocation, profile: Profile | None,
               plan: Plan, opts: Options,
               timer: report.Timer) -> tuple[list[dict], recover.Reconstruction | None]:
    """Prune every projection as allocated (each layer then reconstructed, if asked), and remove the
    planned heads and channels (composite). Returns the kernel's notes and the reconstruction."""
    recovery = None
    if plan.reconstruct:
        guard = recover.Guard.capture(setup.model, setup.adapter, calib.guard) if calib.guard else None
        recovery = recover.Reconstruction(setup.adapter, plan.reconstruct, guard=guard)
    job = prune_job(setup, calib, allocation.sparsity, allocation.nm, profile, plan, opts,
                    allocation.structure, recovery)
    return setup.source.prune(job, timer), recovery


def prune_job(setup: Setup, calib: Calibration | None, sparsity: SparsityMap | None, nm: NMPlan,
              profile: Profile | None, plan: Plan, opts: Options, structure: list | None = None,
              recovery: recover.Reconstruction | None = None) -> PruneJob:
    """The pruning pass as the plan sets it: statistics from the engine's walk in the plan's mode, or given
    up front (Wanda with dense statistics reads the profiling pass's own)."""
    kernel = plan.kernel
    given = profile.stats if kernel is not None and plan.mode == "dense" and kernel.stats == "norms" else None
    # recovery walks
    mode = "sequential" if recovery is not None and plan.mode in (None, "dense") else plan.mode

    def check(acts: Activations) -> None:
        check_staged(setup.model, setup.adapter, acts, setup.compute, setup.calib_dtype)

    return PruneJob(kernel, sparsity, nm, activations=(lambda: setup.inputs(calib)) if calib else None,
                    mode=mode, compute=setup.compute, calib_dtype=setup.calib_dtype,
                    options=kernel_options(opts, kernel), stats=given,
                    check=check if mode in ("sequential", "reference") else None, structure=structure,
                    recovery=recovery, run_options=asdict(opts))


def teacher_step(setup: Setup, plan: Plan) -> nn.Module | None:
    """The dense model, copied before pruning changes it in place: distillation's teacher."""
    return recover.teacher_copy(setup.model) if plan.distill is not None else None


def distill_step(setup: Setup, calib: Calibration | None, teacher: nn.Module | None, plan: Plan,
                 opts: Options, timer: report.Timer) -> dict | None:
    """End-to-end distillation of the pruned model from the dense one, mask frozen (optional). Where it runs
    is decided again now that the student is pruned: on the compute device when both models and the
    training state fit there (the student and teacher move to it), else on the host if asked, else refused."""
    if teacher is None:
        return None
    with timer("distill"):
        device = recover.distill_device(setup.model, recover.model_bytes(teacher), setup.compute,
                                        setup.seqlen, plan.distill, host_budget(opts, setup.model),
                                        ranks=dist.world())
        if dist.world() > 1:  # FSDP2: the shards, not the models, go to the device
            return sharded.distill(setup.model, teacher, setup.adapter, calib.distill, calib.distill_held_out,
                                   plan.distill, device, calib.guard)
        setup.model.to(device)
        teacher.to(device)
        return recover.distill(setup.model, teacher, setup.adapter, calib.distill, calib.distill_held_out,
                               plan.distill, calib.guard)


def host_budget(opts: Options, model: nn.Module) -> int:
    """Host bytes a run may still fill: --max_memory less what the model holds there, or what is free."""
    if opts.max_memory is None:
        return fit.available_memory()
    on_host = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    return parse_memory(opts.max_memory) - on_host


def export(setup: Setup, results: dict, opts: Options, timer: report.Timer) -> report.Saved:
    """Write the checkpoint and results.json (evaluation pending) atomically, before any evaluation."""
    manifest = report.checkpoint_manifest(results, setup.loaded.source, setup.n_layers)

    def write_model(directory) -> None:
        with timer("save_model"):
            size = setup.source.save(directory, setup.loaded.tokenizer, manifest)
        results["checkpoint"] = {"path": str(opts.save_model), "safetensors_bytes": size}

    def write_results(directory) -> None:
        report.stamp(results, timer)
        report.write_record(directory, results)
        report.write_plots(results, directory)

    # rank 0 writes; the others learn that it did (or its error), and keep no directory to update
    dist.from_writer(lambda: write_outputs(opts.save, opts.save_model, opts.overwrite, write_results,
                                           write_model))
    saved = report.Saved.of(opts.save, opts.save_model)
    return saved if dist.is_writer() else report.Saved(None, saved.checkpoint)  # the checkpoint to read


def evaluate(setup: Setup, texts: dict[str, torch.Tensor], saved: report.Saved, results: dict, plan: Plan,
             opts: Options, timer: report.Timer) -> dict:
    """Perplexity per text, then zero-shot; results.json is updated after each part. A failure or Ctrl-C
    marks it and raises ``EvaluationError``: the checkpoint and what finished stay on disk."""
    with saved.evaluation(results, timer):
        kv, meter = kv_cache_step(setup, plan, opts, timer, results)
        with nullcontext() if kv is None else mustafar_attention(setup.model, kv, observe=meter):
            perplexities(setup, texts, saved, results, opts, timer)
            if dist.is_writer():  # lm-eval runs in one process: rank 0's
                zero_shot(setup, results, plan, opts, timer)
        if kv is not None:  # what the evaluated caches really held
            results["kv_cache"] = {**results["kv_cache"], **kv_report(setup.model, kv, meter)}
    if dist.is_writer():
        print(report.summary_text(results), flush=True)
    return results


def kv_cache_step(setup: Setup, plan: Plan, opts: Options, timer: report.Timer,
                  results: dict) -> tuple[KVSparsity | None, KVMeter | None]:
    """The KV cache's sparsity per layer (or KV head) for evaluation: uniform, the --kv_allocation_file, or
    solved from a sensitivity measured on calibration text on the model as evaluated (after pruning)."""
    if plan.kv is None:
        return None, None
    measures = plan.kv_file is None and opts.kv_allocation != "uniform"
    with timer("kv_sensitivity") if measures else nullcontext():
        windows = draw_windows(setup.loaded.tokenizer, opts.calib_dataset, min(kvalloc.SEQLEN, setup.seqlen),
                               opts.seed, {"statistics": kvalloc.WINDOWS})["statistics"] if measures else None
        spec, learned = kvalloc.allocate(setup.model, plan.kv, opts.kv_allocation, windows, plan.kv_file,
                                         opts.kv_allocation_file, {"model": opts.model}, seed=opts.seed)
    results["kv_cache"] = {**kv_report(setup.model, spec), **learned}
    return spec, KVMeter()


def perplexities(setup: Setup, texts: dict[str, torch.Tensor], saved: report.Saved, results: dict,
                 opts: Options, timer: report.Timer) -> None:
    for name, ids in texts.items():
        with timer("evaluate"):
            results["perplexity"][name] = perplexity(
                setup.model, setup.adapter, ids, setup.eval_seqlen, opts.eval_windows, opts.eval_batch_size,
                setup.compute, desc=f"ppl {name}",
                dtype=None if opts.eval_dtype == "model" else getattr(torch, opts.eval_dtype),
                scope=setup.source.evaluation_scope(saved.checkpoint))
        if len(results["perplexity"]) > 1:  # one number across kinds of text
            results["perplexity_geomean"] = report.geometric_mean(results["perplexity"])
        saved.progress(results, timer)


def zero_shot(setup: Setup, results: dict, plan: Plan, opts: Options, timer: report.Timer) -> None:
    if plan.zs_tasks is None:
        return
    with timer("zero_shot"):
        try:
            result = zs.evaluate(
                setup.model, setup.loaded.tokenizer, plan.zs_tasks, limit=opts.zs_limit,
                batch_size=opts.zs_batch_size, offline=plan.offline,
                data_dir=zs.default_data_dir(opts.cache_dir), log_samples=True)
            result.pop("predictions")  # each item's acc stays (``items``): two runs compare item by item
            results["zero_shot"] = result
        except zs.ZeroShotError as err:
            raise OptionError("eval_zero_shot", str(err).removeprefix("--eval_zero_shot: ")) from err
