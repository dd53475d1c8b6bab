"""Allocation formulas against hand computation, and profiling on tiny models with planted outliers."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from mosaic import allocate as A
from mosaic.adapter import PROJECTIONS, adapter_for
from mosaic.calibrate import capture
from mosaic.profile import layer_profile, profile_model

# a hand-made profile: 4 layers, LLaMA-like sizes (attention 1 unit, k/v 1/4 with GQA, MLP 3 units)
SIZES = {"q": 4, "k": 1, "v": 1, "o": 4, "gate": 12, "up": 12, "down": 12}
PARAMS = [dict(SIZES) for _ in range(4)]
LAYER = [1.0, 3.0, 2.0, 6.0]
RATIOS = [{"q": 1.0, "k": 2.0, "v": 0.5, "o": 1.0, "gate": 0.2, "up": 0.3, "down": 0.4},
          {"q": 3.0, "k": 2.0, "v": 0.5, "o": 2.0, "gate": 0.4, "up": 0.3, "down": 1.4},
          {"q": 2.0, "k": 5.0, "v": 0.9, "o": 1.0, "gate": 0.6, "up": 0.3, "down": 0.4},
          {"q": 1.5, "k": 2.0, "v": 0.1, "o": 4.0, "gate": 0.8, "up": 0.9, "down": 0.4}]


def mean_of(sparsity, params=PARAMS) -> float:
    return A.overall(sparsity, params)


def test_mosaic_ref_reproduces_the_released_formula():
    S, lam = 0.7, 0.08
    # algorithms.md §5.2: c_L = minmax(D_layer)·2λ, c_p = minmax(D_p)·2λ, s = S − c_L[i] + mean(c_p)
    c_layer = [(x - 1.0) / 5.0 * 2 * lam for x in LAYER]
    got = A.mosaic_ref(RATIOS, LAYER, S, lam)
    for p in PROJECTIONS:
        col = [row[p] for row in RATIOS]
        lo, hi = min(col), max(col)
        mean_c = sum((x - lo) / (hi - lo) * 2 * lam for x in col) / 4 if hi > lo else 0.0
        for i in range(4):
            assert got[i][p] == pytest.approx(S - c_layer[i] + mean_c, abs=1e-12), (i, p)
    # every projection type has the layer curve's shape: it is OWL shifted by one constant per type
    owl = A.owl(LAYER, PARAMS, S, lam)
    shifts = {p: {round(got[i][p] - owl[i][p], 12) for i in range(4)} for p in PROJECTIONS}
    assert all(len(s) == 1 for s in shifts.values())
    # and its parameter-weighted sparsity drifts away from S
    assert abs(mean_of(got) - S) > 0.005


def test_mosaic_ref_floors_non_positive_values_like_the_reference():
    got = A.mosaic_ref(RATIOS, LAYER, 0.05, 0.08)
    assert min(row[p] for row in got for p in PROJECTIONS) == 0.01


def test_owl_matches_the_reference_rule():
    S, lam = 0.6, 0.08
    c = [(x - 1.0) / 5.0 * 2 * lam for x in LAYER]
    got = A.owl(LAYER, PARAMS, S, lam)
    for i in range(4):
        assert all(got[i][p] == pytest.approx(S - (c[i] - sum(c) / 4)) for p in PROJECTIONS)
    assert mean_of(got) == pytest.approx(S, abs=1e-9)


@pytest.mark.parametrize("S", [0.3, 0.5, 0.7, 0.8, 0.95])
@pytest.mark.parametrize("lam", [0.02, 0.08, 0.2])
def test_mosaic_hits_the_target_within_bounds(S, lam):
    got = A.mosaic(RATIOS, PARAMS, S, lam)
    values = [row[p] for row in got for p in PROJECTIONS]
    assert mean_of(got) == pytest.approx(S, abs=1e-6)
    assert min(values) >= max(S - lam, 0.0) - 1e-12 and max(values) <= min(S + lam, 0.99) + 1e-12
    for p in PROJECTIONS:  # more outliers -> no more pruning, within each projection type
        pairs = sorted((RATIOS[i][p], got[i][p]) for i in range(4))
        assert all(a[1] >= b[1] - 1e-12 for a, b in zip(pairs, pairs[1:]))
    if S + lam < 0.99:  # (unless everything is pinned at the cap) each type follows its own depth curve
        assert [row["q"] for row in got] != [row["down"] for row in got]


def test_degenerate_profiles_fall_back_to_uniform(caplog):
    flat = [dict.fromkeys(PROJECTIONS, 1.0) for _ in range(4)]
    with caplog.at_level(logging.WARNING):
        for got in (A.mosaic(flat, PARAMS, 0.5, 0.08), A.owl([2.0] * 4, PARAMS, 0.5, 0.08),
                    A.mosaic_ref(flat, [2.0] * 4, 0.5, 0.08), A.mosaic(RATIOS[:1], PARAMS[:1], 0.5, 0.08)):
            assert all(v == 0.5 for row in got for v in row.values())
    assert "falling back to uniform" in caplog.text
    assert A.owl_nm([1.0] * 3, 5, 8, 2.0) == [(5, 8)] * 3


def test_owl_structure_picks_n_per_layer_as_the_reference():
    # c = minmax(LOD)·λ = [0, .8, .4, 2] (λ=2), minus its mean .8 -> [-.8, 0, -.4, 1.2] -> round
    # -> [-1, 0, 0, 1]
    assert A.owl_nm(LAYER, 5, 8, 2.0) == [(6, 8), (5, 8), (5, 8), (4, 8)]


def test_allocation_file_roundtrip_is_exact_and_validated(tmp_path):
    sparsity = A.mosaic(RATIOS, PARAMS, 0.6, 0.08)
    path = tmp_path / "map.json"
    A.write_file(path, sparsity, [None] * 4, {"target": 0.6})
    again = A.read_file(path)
    assert again.nm is None and again.meta["target"] == 0.6
    assert again.sparsity == sparsity  # full precision: applying the file prunes exactly the same counts
    A.check_file(again, str(path), 4, 0.6, None, 0.0)
    with pytest.raises(A.OptionError, match="4 layers of sparsity; this model has 6"):
        A.check_file(again, str(path), 6, 0.6, None, 0.0)
    with pytest.raises(A.OptionError, match="target sparsity of 0.6, but --sparsity_ratio is 0.7"):
        A.check_file(again, str(path), 4, 0.7, None, 0.0)
    doc = json.loads(path.read_text())
    doc["sparsity"][2]["q"] = 1.5
    path.write_text(json.dumps(doc))
    with pytest.raises(A.OptionError, match="not in"):
        A.read_file(path)


@pytest.mark.parametrize("nm, match", [
    ([[2, 4], [2, 4], [5, 4], [2, 4]], "not \\[N, M\\] with 0 <= N < M"),
    ([[2, 4], [2, 4], [2, 4]], "one \\[N, M\\]"),
    ([[2, 4], [2, 4], [4, 8], [2, 4]], "mixes group sizes"),
    ([[2, 4], "2:4", [2, 4], [2, 4]], "is not \\[N, M\\]"),
])
def test_allocation_file_nm_entries_are_validated(tmp_path, nm, match):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"target": 0.5, "sparsity": [dict.fromkeys(PROJECTIONS, 0.5)] * 4, "nm": nm}))
    with pytest.raises(A.OptionError, match=match):
        A.read_file(path)


def test_allocation_file_nm_must_match_the_sparsity_type(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"target": 0.5, "sparsity": [dict.fromkeys(PROJECTIONS, 0.5)] * 4,
                                "nm": [[2, 4], [1, 4], [3, 4], [2, 4]]}))
    f = A.read_file(path)
    assert f.nm == [(2, 4), (1, 4), (3, 4), (2, 4)]
    A.check_file(f, str(path), 4, 0.5, (2, 4), 0.0)
    with pytest.raises(A.OptionError, match="--sparsity_type N:4"):
        A.check_file(f, str(path), 4, 0.5, None, 0.0)
    with pytest.raises(A.OptionError, match="M=4, but --sparsity_type is 4:8"):
        A.check_file(f, str(path), 4, 0.5, (4, 8), 0.0)
    unstructured = A.AllocationFile([dict.fromkeys(PROJECTIONS, s) for s in (0.4, 0.6, 0.5, 0.5)], None, {})
    with pytest.raises(A.OptionError, match="per-projection sparsities, but --sparsity_type 2:4"):
        A.check_file(unstructured, str(path), 4, 0.5, (2, 4), 0.0)


def test_layer_profile_counts_scores_above_m_times_mean():
    norms = {p: torch.ones(4) for p in PROJECTIONS}
    weights = {p: torch.ones(2, 4) for p in PROJECTIONS}
    # mean 4.625: one score > 3×mean
    weights["q"] = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 30.0]])
    ratios, layer = layer_profile(weights, norms, 3.0)
    assert ratios["q"] == pytest.approx(100 / 8)
    assert ratios["k"] == 0.0
    assert layer == pytest.approx(100 / 56)  # joint mean 1.52: only the 30 is above 4.55


def plant_outliers(model, layer: int, projection: str, channels=(0, 3, 7), factor: float = 40.0):
    """Scale a few input channels of one projection's activations (a real forward pre-hook)."""
    adapter = adapter_for(model)
    target = adapter.projection(adapter.layers(model)[layer], projection)

    def hook(module, args):
        x = args[0].clone()
        x[..., list(channels)] *= factor
        return (x,)

    return target.register_forward_pre_hook(hook)


def test_planted_outliers_get_lower_sparsity_and_the_target_is_hit():
    S, lam = 0.6, 0.08
    ids = torch.randint(2, 512, (8, 48), generator=torch.Generator().manual_seed(0))

    def profile(planted: bool):
        model = tiny_model("llama", layers=4)
        handle = plant_outliers(model, 2, "o") if planted else None
        adapter = adapter_for(model)
        prof = profile_model(model, adapter, capture(model, adapter, ids, 4), hyper_m=5.0)
        if handle:
            handle.remove()
        return model, prof

    _, plain = profile(False)
    model, planted = profile(True)
    assert planted.ratios[2]["o"] > 5 * max(plain.ratios[2]["o"], 0.01)
    before = A.mosaic(plain.ratios, plain.params, S, lam)
    after = A.mosaic(planted.ratios, planted.params, S, lam)
    assert after[2]["o"] < before[2]["o"] and after[2]["o"] < S
    assert after[2]["o"] == min(after[i]["o"] for i in range(4))  # lowest of its siblings along depth
    assert A.overall(after, planted.params) == pytest.approx(S, abs=1e-6)

    # and pruning with it reaches every allocation to within one weight
    from mosaic.prune import KERNELS, prune_from_stats

    adapter = adapter_for(model)
    prune_from_stats(model, adapter, KERNELS["wanda"], after, [None] * 4, planted.stats)
    zeros = total = 0
    for i, layer in enumerate(adapter.layers(model)):
        for p, proj in adapter.projections(layer).items():
            z, n = int((proj.weight == 0).sum()), proj.weight.numel()
            assert abs(z - after[i][p] * n) <= 0.5 + 1e-6
            zeros, total = zeros + z, total + n
    assert abs(zeros - S * total) <= 0.5 * 28


def test_allocate_rejects_targets_no_projection_can_take():
    prof = SimpleNamespace(ratios=RATIOS, layer_ratios=LAYER, params=PARAMS)
    with pytest.raises(A.OptionError, match="sparsity_ratio: 0.995 is above"):
        A.allocate("mosaic", prof, 4, 0.995, 0.08)
