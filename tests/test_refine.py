"""Evolutionary refinement of the search: the cached-input scorer against plain forwards, level switches
that keep the global target exact, never worse than the start, reproducible with the seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_engine import token_batch

from mosaic import refine
from mosaic.adapter import PROJECTIONS, adapter_for
from mosaic.allocate import overall
from mosaic.calibrate import capture
from mosaic.prune import KERNELS, uniform_map
from mosaic.search import dense_hessians, stitched


def sensitive_model():
    model = tiny_model("llama", layers=4)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(4.0)
    return model


def params_of(model, adapter):
    return [{p: q.weight.numel() for p, q in adapter.projections(layer).items()}
            for layer in adapter.layers(model)]


@pytest.fixture(scope="module")
def setting():
    model = sensitive_model()
    adapter = adapter_for(model)
    stats = dense_hessians(model, adapter, capture(model, adapter, token_batch(8, 48, seed=1), 4))
    return model, adapter, stats, token_batch(6, 48, seed=2)


def test_scorer_equals_plain_forwards_and_its_cache_equals_a_rescore(setting):
    model, adapter, stats, held_out = setting
    kernel = KERNELS["sparsegpt"]
    scorer = refine.fitness(model, adapter, held_out, 2)
    assert scorer.score() == pytest.approx(0.0, abs=1e-6)  # the dense model against itself
    pruned = stitched(model, adapter, kernel, stats, uniform_map(4, 0.6), {})
    kl = scorer.reset(pruned)
    with torch.no_grad():
        logp = F.log_softmax(model(held_out).logits[:, :-1].float(), -1).flatten(0, 1)
        logq = F.log_softmax(pruned(held_out).logits[:, :-1].float(), -1).flatten(0, 1)
    assert kl == pytest.approx(float(F.kl_div(logq, logp, log_target=True, reduction="batchmean")), rel=1e-4)
    assert kl > 0.01
    for start in (1, 3):  # from the cached inputs of layer `start`: the very same number
        assert scorer.score(start) == kl
    assert scorer.score(2, batches=1) != kl  # one batch of three is another sample


def test_mutations_move_a_fixed_weight_count_so_the_target_stays_exact():
    params = [{"q": 4096, "k": 1024, "v": 1024, "o": 4096, "gate": 11008, "up": 11008, "down": 11008}] * 5
    parent = uniform_map(5, 0.7)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        child, changed = refine.mutate(parent, params, gen, 0.05)
        assert overall(child, params) == pytest.approx(0.7, abs=1e-12)
        assert all(0.0 <= s <= 0.99 for row in child for s in row.values())
        moved = {(i, p) for i, row in enumerate(child) for p in PROJECTIONS if row[p] != parent[i][p]}
        # (a switch may undo one)
        assert len(moved) <= 4 and {(i, refine.GROUP_OF[p]) for i, p in moved} <= changed
        parent = child


def test_evolution_never_loses_to_its_start_and_is_reproducible(setting):
    model, adapter, stats, held_out = setting
    kernel, params = KERNELS["sparsegpt"], params_of(model, adapter)
    start = uniform_map(4, 0.6)
    runs = []
    for _ in range(2):
        scorer = refine.fitness(model, adapter, held_out, 2)
        start_kl = scorer.reset(stitched(model, adapter, kernel, stats, start, {}))
        runs.append(refine.evolve(model, scorer, kernel, stats, start, start_kl, params, 12, seed=3,
                                  options={}))
        final_model, cache = scorer.model, scorer.inputs
    a, b = runs
    assert a.sparsity == b.sparsity and a.history == b.history  # same seed, same search
    assert a.accepted > 0 and a.fitness < a.start_fitness
    assert all(x >= y for x, y in zip(a.history, a.history[1:]))  # the parent only ever improves
    assert overall(a.sparsity, params) == pytest.approx(0.6, abs=1e-12)
    # the incrementally updated model and cache equal the final map applied and scored from scratch
    fresh = stitched(model, adapter, kernel, stats, a.sparsity, {})
    for p, q in zip(final_model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    rescored = refine.fitness(model, adapter, held_out, 2)
    assert rescored.reset(fresh) == pytest.approx(a.fitness, rel=1e-6)
    assert all(torch.equal(x, y) for xs, ys in zip(cache, rescored.inputs) for x, y in zip(xs, ys))


def test_kept_statistics_reproduce_the_sequential_pruning(setting):
    """The refinement re-prunes a group with the statistics its start was pruned with, so those must be the
    sequential pass's own (taken after the earlier groups were pruned), not the dense model's."""
    import copy

    from mosaic.prune import prune_from_stats, prune_model

    model, adapter, stats, _ = setting
    kernel, sparsity = KERNELS["sparsegpt"], uniform_map(4, 0.6)
    shipped, kept = copy.deepcopy(model), [{} for _ in range(4)]
    prune_model(shipped, adapter, kernel, sparsity, [None] * 4,
                capture(model, adapter, token_batch(8, 48, seed=1), 4), mode="sequential", seen_stats=kept)
    again = stitched(model, adapter, kernel, kept, sparsity, {})
    for p, q in zip(shipped.parameters(), again.parameters()):
        assert torch.equal(p, q)
    dense = copy.deepcopy(model)
    prune_from_stats(dense, adapter, kernel, sparsity, [None] * 4, stats)
    assert not torch.equal(adapter.projection(adapter.layers(dense)[3], "down").weight,
                           adapter.projection(adapter.layers(again)[3], "down").weight)


@pytest.mark.parametrize("target", [0.005, 0.97])
def test_evolution_near_zero_and_near_the_cap_skips_offspring_without_a_switch(setting, target):
    """At 0.5% no switch of 5% of a projection fits (each would take a projection below 0), so no offspring
    exists and every generation is a no-op; at 97% only a switch from k/v (n = 2048) onto gate/up/down (8192)
    stays under the 0.99 cap, so some offspring come back empty. Neither may crash (the old code took the
    min over an empty set of changed layers)."""
    model, adapter, stats, held_out = setting
    kernel, params = KERNELS["sparsegpt"], params_of(model, adapter)
    start = uniform_map(4, target)
    gen = torch.Generator().manual_seed(5)
    empty = sum(not refine.mutate(start, params, gen, 0.05)[1] for _ in range(200))
    assert empty == 200 if target < 0.05 else 0 < empty < 200
    scorer = refine.fitness(model, adapter, held_out, 2)
    start_kl = scorer.reset(stitched(model, adapter, kernel, stats, start, {}))
    weights = [q.clone() for q in scorer.model.parameters()]
    out = refine.evolve(model, scorer, kernel, stats, start, start_kl, params, 6, seed=1, options={})
    assert len(out.history) == 6 and out.fitness <= out.start_fitness == start_kl
    assert overall(out.sparsity, params) == pytest.approx(target, abs=1e-12)
    assert all(0.0 <= s <= 0.99 for row in out.sparsity for s in row.values())
    if target < 0.05:
        assert out.accepted == 0 and out.sparsity == start and out.history == [start_kl] * 6
        # nothing was touched
        assert all(torch.equal(p, q) for p, q in zip(weights, scorer.model.parameters()))
