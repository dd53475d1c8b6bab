"""Do the tests fail on broken code? Each mutation breaks one promised behaviour of the KV allocation, the
recovery, resuming, the calibration windows or the reductions across ranks in a scratch copy of HEAD; the
tests named beside it must then fail ("CAUGHT").

    .venv/bin/python scripts/mutation_check.py          # ~10 minutes on 2 cores; time nothing beside it
    .venv/bin/python scripts/mutation_check.py 7 9      # only those mutations

The scratch copy is a detached ``git worktree`` in a temporary folder, removed at the end; the checkout
itself is never touched.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KV, RECOVER = ["tests/test_kv_alloc.py", "tests/test_kv_run.py"], ["tests/test_recover.py"]
PRECISION = ["tests/test_recover_precision.py"]
DIST = "tests/test_distributed.py"
CS = "tests/test_composite_search.py"
# (what breaks, file, [(old, new), ...], tests that must catch it)
MUTATIONS = [
    ("the KV solve ignores the measured curves (flat costs)", "mosaic/kv/allocate.py",
     [("[(prune_count(size, s), e) for s, e in zip(levels, costs)]",
       "[(prune_count(size, s), 0.0) for s, e in zip(levels, costs)]")], KV),
    ("kv_cache.achieved reports the target, not the evaluated caches", "mosaic/kv/report.py",
     [('"achieved": meter.achieved() if meter else None,',
       '"achieved": {"k": spec.k_sparsity, "v": spec.v_sparsity},')], KV),
    ("a --kv_allocation_file for another layer count is accepted", "mosaic/kv/allocate.py",
     [("if heads is not None and len(heads) != len(f.kv_heads):", "if False:")], KV),
    ("MustafarCache prunes every layer with layer 0's sparsity", "mosaic/kv/cache.py",
     [("self.spec.keys(x, self.layer)", "self.spec.keys(x, 0)")], KV),
    ("recovery masks neither gradients nor weights", "mosaic/recover.py",
     [("        w.grad = g.mul_(m) if m is not None else g", "        w.grad = g"),
      ("            if m is not None:\n                w.mul_(m)",
       "            if False:\n                w.mul_(m)")],
     RECOVER),
    ("distillation keeps its last step instead of the held-out best", "mosaic/recover.py",
     [("if best_step != spec.steps:", "if False:")], RECOVER),
    ("the optimizer steps bf16 weights directly (no fp32 masters)", "mosaic/recover.py",
     [("return [p if p.dtype == torch.float32 else p.detach().float() for p in params]",
       "return list(params)")], PRECISION),
    ("a new best state is copied beside the old one (two copies at once)", "mosaic/recover.py",
     [("for kept, p in zip(best_state, params):\n                        kept.copy_(p.detach())",
       "best_state = [p.detach().to(\"cpu\", copy=True) for p in params]")],
     PRECISION),
    ("the dense teacher lives on through export and evaluation", "mosaic/pipeline.py",
     [("    del teacher  # the dense copy is freed before export, evaluation and zero-shot\n", "")],
     PRECISION),
    ("reconstruction leaves .grad on the norms and biases it does not tune", "mosaic/recover.py",
     [("    everything = list(layer.parameters())", "    everything = list(params)")], PRECISION),
    ("distillation ignores the device's free memory", "mosaic/recover.py",
     [("if device_total > headroom * free or on_host > host_budget:", "if False:")], PRECISION),
    ("--distill_batch above --distill_windows is accepted", "mosaic/options.py",
     [("if opts.distill_batch > opts.distill_windows:", "if False:")], RECOVER),
    ("--resume ignores what auto resolved to and the torch version", "mosaic/stream.py",
     [('"resolved": resolved_settings(self.streamed.dtype, job.compute, job.calib_dtype),', "")],
     ["tests/test_stream_faults.py::test_resume_refuses_when_auto_settings_resolve_otherwise_or_torch_changed"]),
    ("a KV file measured with another --kv_window is applied", "mosaic/kv/allocate.py",
     [('if "window" in f.meta and f.meta["window"] != spec.window:', "if False:")], KV),
    ("held-out windows may overlap earlier windows", "mosaic/data.py",
     [("if all(abs(start - s) >= seqlen for s in starts):", "if True:")], ["tests/test_data.py"]),
    ("--calib_dtype auto is bf16 for fp32 models again", "mosaic/load.py",
     [('    if spec == "auto":\n        return model_dtype',
       '    if spec == "auto":\n        return torch.bfloat16')], ["tests/test_data.py"]),
    ("the ranks' statistics are not summed before a kernel runs", "mosaic/stats.py",
     [("            dist.sum_(t)", "            pass")],
     [f"{DIST}::test_two_ranks_prune_the_model_one_process_prunes[llama-sparsegpt]"]),
    ("an owner's pruned weights are not broadcast", "mosaic/prune/__init__.py",
     [("            dist.broadcast_(proj.weight.data, owner)", "            pass")],
     [f"{DIST}::test_two_ranks_prune_the_model_one_process_prunes[llama-sparsegpt]"]),
    ("scores are added in rank order, not the windows' order", "mosaic/dist.py",
     [("return [v for _, v in sorted((p for part in gathered(pairs) for p in part), key=lambda p: p[0])]",
       "return [v for part in gathered(pairs) for _, v in part]")],
     [f"{DIST}::test_statistics_and_ordered_sums_do_not_depend_on_the_split"]),
    ("statistics accumulate in fp32", "mosaic/stats.py",
     [("ACCUMULATOR = torch.float64", "ACCUMULATOR = torch.float32")],
     [f"{DIST}::test_statistics_and_ordered_sums_do_not_depend_on_the_split"]),
    ("FSDP2 distillation steps without masking gradients or weights", "mosaic/sharded.py",
     [("            masked_step(opt, params, params, masks)", "            opt.step()")],
     [f"{DIST}::test_fsdp2_distillation_keeps_zeros_and_matches_one_process[float32]"]),
    ("reconstruction steps on each rank's own gradients", "mosaic/recover.py",
     [("p.grad = dist.sum_(p.grad if p.grad is not None else torch.zeros_like(p))",
       "p.grad = p.grad if p.grad is not None else torch.zeros_like(p)")],
     [f"{DIST}::test_reconstruction_sums_gradients_over_ranks"]),
    ("the composite search's knapsack maximises the predicted KL", "mosaic/composite_search.py",
     [("cand = best[:cap + 1 - w] + x.kl", "cand = best[:cap + 1 - w] - x.kl")],
     [f"{CS}::test_knapsack_is_exact_and_least"]),
    ("the composite search removes one MLP step less than the rule's R", "mosaic/composite_search.py",
     [("att, mm = solve(attention, mlp, total, uniform_widths)",
       "att, mm = solve(attention, mlp, total - 8 * 3 * geos[0].hidden, uniform_widths)"),
      ("    assert sum(removed_params(g, p) for g, p in zip(geos, searched)) == total\n", "")],
     [f"{CS}::test_searched_plan_removes_exactly_r_structurally_and_s_in_total"]),
    ("the composite search's curves are flat (no predicted KL)", "mosaic/composite_search.py",
     [("    return float(0.5 * (g * (d @ H) * d).sum())", "    return 0.0")],
     [f"{CS}::test_a_sensitive_layer_keeps_more_heads_under_the_search_than_under_the_uniform_rule"]),
    ("the composite guard keeps the worse plan", "mosaic/composite_search.py",
     [('chosen = "search" if kl["search"] < kl["rule"] else "rule"',
       'chosen = "search" if kl["search"] > kl["rule"] else "rule"')],
     [f"{CS}::test_the_guard_keeps_the_rules_plan_when_the_curves_mislead"]),
    ("a composite plan file's structure is ignored (the rule re-plans)", "mosaic/pipeline.py",
     [("held=setup.source.held, structure=given)", "held=setup.source.held, structure=None)")],
     [f"{CS}::test_the_written_plan_reapplies_bit_for_bit_and_another_models_is_refused"]),
    ("a composite plan for another model is applied", "mosaic/composite_search.py",
     [("    if theirs != mine:", "    if False:")],
     [f"{CS}::test_the_written_plan_reapplies_bit_for_bit_and_another_models_is_refused"]),
    ("a composite plan for another --round_to is applied", "mosaic/composite_search.py",
     [('    if meta.get("round_to") != round_to:', "    if False:")],
     [f"{CS}::test_the_written_plan_reapplies_bit_for_bit_and_another_models_is_refused"]),
    ("--uniform_widths is ignored by the composite search", "mosaic/composite_search.py",
     [("    if not uniform:\n        parts", "    if True:\n        parts")],
     [f"{CS}::test_uniform_widths_search_gives_a_stock_checkpoint_with_the_in_memory_logits"]),
    ("a streamed run re-plans instead of applying the plan file", "mosaic/composite_search.py",
     [('    rows = meta.get("structure")\n    if rows is None:',
       '    rows = meta.get("structure")\n    if True:')],
     [f"{CS}::test_streaming_refuses_the_search_in_one_line_and_applies_its_plan_bit_for_bit"]),
    ("the refined widths are kept without beating their start on validation", "mosaic/composite_search.py",
     [('            if judged["evolved"] < judged[chosen]:', "            if True:")],
     [f"{CS}::test_the_refinement_keeps_r_exact_and_is_kept_only_if_it_beats_its_start_on_validation"]),
    ("the refinement's MLP move is not exact (one layer gains 8 channels, another loses 16)",
     "mosaic/composite_search.py",
     [("wi, wj = len(parent[i].channels) + round_to, len(parent[j].channels) - round_to",
       "wi, wj = len(parent[i].channels) + round_to, len(parent[j].channels) - 2 * round_to"),
      ("        assert sum(removed_params(g, p) for g, p in zip(geos, structure)) == total\n", "")],
     [f"{CS}::test_the_refinement_keeps_r_exact_and_is_kept_only_if_it_beats_its_start_on_validation"]),
    ("a refinement generation keeps a child that does not beat its parent", "mosaic/refine.py",
     [("    if kl < fitness:\n        scorer.commit(first, kept)",
       "    if True:\n        scorer.commit(first, kept)")],
     ["tests/test_refine.py::test_evolution_never_loses_to_its_start_and_is_reproducible"]),
    ("a losing child's weights stay in the model (the parent's are not restored)", "mosaic/refine.py",
     [("        return child, kl\n    restore(before)\n", "        return child, kl\n")],
     ["tests/test_refine.py::test_evolution_never_loses_to_its_start_and_is_reproducible",
      f"{CS}::test_the_refinement_keeps_r_exact_and_is_kept_only_if_it_beats_its_start_on_validation"]),
    ("the guard keeps the share with the lowest mean even where one text got worse", "mosaic/recover.py",
     [("    safe = [s for s in measured if s > 0 and all(measured[s][t] <= base[t] for t in base)]",
       "    safe = [s for s in measured if s > 0]")],
     ["tests/test_guard.py"]),
    ("the guard role is also split over the calibration mixture (its texts get two shares)", "mosaic/data.py",
     [("        if role == GUARD_ROLE:\n            continue\n", "")],
     ["tests/test_guard.py::test_guard_windows_are_per_text_and_disjoint_from_every_other_role"]),
    ("distillation keeps a state a guard text finds worse", "mosaic/recover.py",
     [("                if kl < best and no_worse(nll, start_nll):", "                if kl < best:")],
     ["tests/test_guard.py::test_distillation_keeps_no_state_that_a_guard_text_finds_worse"]),
    ("the guard scores a share by its layer and the head only (not the layers after it)", "mosaic/recover.py",
     [("        for j in range(index + 1, len(layers)):", "        for j in range(0):")],
     ["tests/test_guard.py::test_a_shares_score_is_the_models_own_nll_from_that_layer_on"]),
    ("the per-item zero-shot record is kept in lm-eval's sample order, not by doc id",
     "mosaic/eval/zeroshot.py",
     [('"1" if acc else "0" for _, acc in sorted(items))', '"1" if acc else "0" for _, acc in items)')],
     ["tests/test_zeroshot.py::test_aggregate_pairs_each_run_with_the_first_item_by_item"]),
    ("the paired standard error divides by n, not n − 1 (a population sd)", "mosaic/eval/zeroshot.py",
     [("* n / (n - 1) if n > 1", "* n / n if n > 1")],
     ["tests/test_zeroshot.py::test_paired_difference_equals_the_per_item_oracle"]),
]


def pytest(tree: Path, files: list[str]) -> tuple[int, float, str]:
    """Exit code, seconds and the first failure (or the summary line) of ``pytest -x`` on ``files``."""
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files],
                       cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("FAILED")]
    return r.returncode, time.time() - start, (failed or lines or [r.stderr[-300:]])[0 if failed else -1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            return check(tree)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def check(tree: Path) -> int:
    escaped = 0
    chosen = {int(a) for a in sys.argv[1:]}
    for i, (what, path, edits, files) in enumerate(MUTATIONS, 1):
        if chosen and i not in chosen:
            continue
        source = (tree / path).read_text()
        mutated = source
        for old, new in edits:
            if mutated.count(old) != 1:
                raise SystemExit(f"mutation {i} no longer applies: {path} has {mutated.count(old)} copies of "
                                 f"{old.strip()!r}; update {__file__}")
            mutated = mutated.replace(old, new)
        (tree / path).write_text(mutated)
        try:
            rc, seconds, line = pytest(tree, files)
        finally:
            (tree / path).write_text(source)
        verdict = {1: "CAUGHT", 0: "NOT CAUGHT"}.get(rc, f"error (exit {rc})")
        escaped += rc != 1
        print(f"{i}. {what}: {verdict} ({seconds:.0f} s) -- {line}", flush=True)
    if chosen:
        return 1 if escaped else 0
    rc, seconds, line = pytest(tree, sorted({f for m in MUTATIONS for f in m[3]}))
    print(f"unmutated: {'pass' if rc == 0 else f'FAIL (exit {rc})'} ({seconds:.0f} s) -- {line}", flush=True)
    return 1 if escaped or rc else 0


if __name__ == "__main__":
    sys.exit(main())
