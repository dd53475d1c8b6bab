"""The `search` allocation: the solver against a hand-computed oracle, the exact global target, a
projection made far more sensitive than its siblings, the guard against uniform and the seed map,
reproducibility and the allocation file round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_pipeline import assert_same_weights, small

from mosaic.adapter import PROJECTIONS
from mosaic.allocate import overall
from mosaic.pipeline import run
from mosaic.search import water_fill


def test_solver_takes_the_cheapest_kl_per_weight_first_and_hits_the_budget_exactly():
    levels = [0.3, 0.5, 0.7]
    params = [dict.fromkeys(PROJECTIONS, 100)]
    row = {p: [0.0, 1.0, 2.0] for p in PROJECTIONS}  # linear: 1 per 20 weights
    row["down"] = [0.0, 10.0, 20.0]  # ten times as costly per weight
    row["q"] = [0.0, 0.1, 5.0]  # cheap to 0.5, then dear
    sparsity = water_fill([row], levels, params, 0.5)
    assert overall(sparsity, params) == pytest.approx(0.5, abs=1e-12)
    assert sparsity[0]["down"] == pytest.approx(0.3)  # the dearest keeps the most
    # q's second segment costs 0.245/weight: dearer than the rest's 0.05
    assert sparsity[0]["q"] == pytest.approx(0.5)
    rest = [sparsity[0][p] for p in ("k", "v", "o", "gate", "up")]
    assert sum(rest) == pytest.approx(0.5 * 7 - 0.3 - 0.5)
    assert all(0.3 <= s <= 0.7 for s in rest)


def test_solver_uses_the_convex_hull():
    levels = [0.3, 0.5, 0.7]
    params = [dict.fromkeys(PROJECTIONS, 100)]
    row = {p: [0.0, 1.0, 2.0] for p in PROJECTIONS}
    row["k"] = [0.0, 3.0, 3.2]  # not convex: the hull goes straight from 0.3 to 0.7 at 8 per unit
    sparsity = water_fill([row], levels, params, 0.5)
    assert overall(sparsity, params) == pytest.approx(0.5, abs=1e-12)
    assert sparsity[0]["k"] == pytest.approx(0.3)  # 8 per 0.4 = 0.2 per weight: dearer than the rest's 0.05


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.85])
def test_solver_hits_the_target_exactly_for_mixed_sizes_and_clipped_levels(target):
    from mosaic.search import levels_around

    g = torch.Generator().manual_seed(int(target * 100))
    levels = levels_around(target)  # clipped at 0 (S = 0.1) and at 0.99 (S = 0.85)
    sizes = {"q": 4096, "k": 1024, "v": 1024, "o": 4096, "gate": 11008, "up": 11008, "down": 11008}
    for _ in range(300):  # the old walk went over the target in 1 of these 1200 (S = 0.3)
        params = [dict(sizes) for _ in range(6)]
        rows = []
        for _layer in params:
            row = {}
            for p in PROJECTIONS:
                steps = torch.rand(len(levels), generator=g).sort().values  # convex-ish, random scale
                row[p] = (steps.cumsum(0) * float(torch.rand(1, generator=g)) * 10).tolist()
            rows.append(row)
        sparsity = water_fill(rows, levels, params, target)
        assert overall(sparsity, params) == pytest.approx(target, abs=1e-12)
        assert all(levels[0] <= s <= levels[-1] for row in sparsity for s in row.values())


def test_the_exact_target_is_the_maps_and_the_pruned_count_is_within_half_a_weight_per_projection():
    """What the docstring says: Σ n·s = S·N to float precision, while what is pruned, Σ round(n·s), is only
    within P/2 of S·N and need not be round(S·N)."""
    from mosaic.search import levels_around

    g = torch.Generator().manual_seed(7)
    levels = levels_around(0.7)
    sizes = {"q": 4097, "k": 1031, "v": 1031, "o": 4097, "gate": 11003, "up": 11003, "down": 11003}
    params = [dict(sizes) for _ in range(6)]
    off = 0
    for _ in range(50):
        rows = [{p: (torch.rand(len(levels), generator=g).sort().values.cumsum(0) * 10).tolist()
                 for p in PROJECTIONS}
                for _layer in params]
        sparsity = water_fill(rows, levels, params, 0.7)
        total = sum(n for row in params for n in row.values())
        assert overall(sparsity, params) == pytest.approx(0.7, abs=1e-12)
        pruned = sum(round(s * params[i][p]) for i, row in enumerate(sparsity) for p, s in row.items())
        assert abs(pruned - 0.7 * total) <= 0.5 * 7 * len(params)
        off += pruned != round(0.7 * total)
    assert off > 0


@pytest.fixture(scope="module")
def sensitive_dir(tmp_path_factory, tokenizer):
    """A 4-layer tiny LLaMA whose layer-2 down_proj writes 4× more into the residual stream. (Unscaled,
    the search gives that down_proj 0.65, more than layer 1's 0.61: the test below then fails.)"""
    model = tiny_model("llama", layers=4)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(4.0)
    d = tmp_path_factory.mktemp("sensitive")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_search_spares_the_sensitive_projection_and_never_loses_to_its_start(tmp_path, sensitive_dir,
                                                                             calib_file):
    mapped = tmp_path / "map.json"
    r = run(small(sensitive_dir, calib_file, prune_method="sparsegpt_search", sparsity_ratio=0.6,
                  allocation_file=str(mapped), save_model=str(tmp_path / "search"),
                  save=str(tmp_path / "out")))
    doc = json.loads(mapped.read_text())
    sparsity = doc["sparsity"]
    assert sparsity[2]["down"] < min(sparsity[1]["down"], sparsity[3]["down"])  # spared among its siblings
    params = [dict.fromkeys(("q", "o"), 64 * 64) | dict.fromkeys(("k", "v"), 32 * 64)
              | dict.fromkeys(("gate", "up", "down"), 64 * 128) for _ in range(4)]
    assert overall(sparsity, params) == pytest.approx(0.6, abs=1e-12)
    zeros = sum(round(s * params[i][p]) for i, row in enumerate(sparsity) for p, s in row.items())
    assert r["sparsity"]["zeros"] == zeros  # each projection exactly round(s·n)
    fit = r["search"]["fitness_kl"]
    assert set(fit) == {"search", "uniform", "seed"}
    assert fit["search"] < min(fit["uniform"], fit["seed"])  # the curve solve beats both starts
    evolution = r["search"]["evolution"]
    assert evolution["from"] == "search" and evolution["generations"] == 16
    assert evolution["statistics"] == "as shipped" and "evolved" not in fit  # not the guard's surrogate
    assert evolution["kl"] < evolution["start_kl"]  # the refinement fits its own windows ...
    judged = evolution["validation_kl_final"]  # ... so the choice is made on the final models, unseen windows
    assert set(judged) == {"search", "evolved"} and judged[r["search"]["chosen"]] == min(judged.values())
    assert judged["search"] != fit["search"]

    again = tmp_path / "again.json"
    run(small(sensitive_dir, calib_file, prune_method="sparsegpt_search", sparsity_ratio=0.6,
              allocation_file=str(again)))
    assert json.loads(again.read_text())["sparsity"] == sparsity  # same seed, same allocation

    run(small(sensitive_dir, calib_file, prune_method="sparsegpt", sparsity_ratio=0.6,
              allocation_file=str(mapped), save_model=str(tmp_path / "file")))
    assert_same_weights(tmp_path / "search", tmp_path / "file")


def test_the_profiling_pass_gives_the_search_the_same_hessians_and_then_only_norms():
    """The search takes its dense Hessians from the run's profiling pass instead of a pass of its own: the
    very same numbers; its norms (Wanda's, the outlier ratios') are those of a pass without Hessians, bit for
    bit, so a map found by the search re-applies to the same model (--allocation_file, --calib_stats
    dense)."""
    from test_engine import token_batch

    from mosaic.adapter import adapter_for
    from mosaic.calibrate import capture
    from mosaic.profile import profile_model
    from mosaic.search import dense_hessians

    model = tiny_model("llama", layers=2)
    adapter = adapter_for(model)
    ids = token_batch(4, 32, seed=3)
    own = dense_hessians(model, adapter, capture(model, adapter, ids, 2))
    prof = profile_model(model, adapter, capture(model, adapter, ids, 2), 5.0, hessian=True)
    norms = [{g: s.norms() for g, s in row.items()} for row in prof.stats]
    for mine, theirs in zip(own, prof.stats):
        assert mine.keys() == theirs.keys()
        for g in mine:
            assert torch.equal(mine[g].hessian(), theirs[g].hessian())
    prof.drop_hessians()
    for row, kept in zip(prof.stats, norms):
        for g, s in row.items():
            assert s.xtx is None and torch.equal(s.norms(), kept[g])
    plain = profile_model(model, adapter, capture(model, adapter, ids, 2), 5.0)
    assert plain.ratios == prof.ratios
    for row, kept in zip(plain.stats, norms):
        for g, s in row.items():
            assert s.xtx is None and torch.equal(s.norms(), kept[g])


def test_held_out_windows_share_no_token_with_the_statistics_windows_or_each_other():
    """The search scores (and distillation trains) on windows drawn after the statistics windows; they
    must be text the statistics never saw. The statistics windows themselves stay the reference draw."""
    import random

    from mosaic.data import window_starts

    tokens, seqlen, n, k = 200_000, 2048, 16, 8
    starts = window_starts(tokens, n, k, seqlen, random.Random(0))
    reference = random.Random(0)
    assert starts[:n] == [reference.randint(0, tokens - seqlen - 1) for _ in range(n)]
    ranges = [set(range(s, s + seqlen)) for s in starts]
    for i in range(n, n + k):
        for j in range(n + k):
            if j != i:
                assert not ranges[i] & ranges[j], (i, j)
    # no room: refused, not overlapped
    assert window_starts(3 * seqlen, 2, 8, seqlen, random.Random(0)) is None


def test_held_out_document_windows_never_reuse_a_document(tokenizer):
    import random

    from mosaic.data import Text, _document_windows

    letters = "abcdefghijklmnopqrstuvwxyz"
    # one letter per document: a window tells which it came from
    docs = [(c * 3 + " ") * 120 for c in letters]
    windows = _document_windows(tokenizer, Text("docs", docs, documents=True), 12, 10, 32, random.Random(0),
                                "calib_dataset")
    sources = [set(tokenizer.decode(w)) - {" "} for w in windows]
    assert windows.shape == (22, 32) and all(len(src) == 1 for src in sources)
    sources = [src.pop() for src in sources]
    held_out, earlier = sources[12:], sources[:12]
    assert len(set(held_out)) == 10 and not set(held_out) & set(earlier)
