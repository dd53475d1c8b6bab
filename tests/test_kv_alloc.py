"""KV allocation (one K and one V sparsity per layer or per KV head), its files, and the report measured on
the cache an evaluation really built."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from torch import nn

from mosaic.adapter import adapter_for
from mosaic.errors import OptionError
from mosaic.eval.perplexity import perplexity
from mosaic.kv import KVMeter, KVSparsity, MustafarCache, kv_bytes, mustafar_attention, report
from mosaic.kv import allocate as kvalloc
from mosaic.kv.prune import heads_of, prune_count
from mosaic.kv.report import kv_heads, planned, summary_lines

HEAD_DIM = 16  # tiny models
SMOLLM2 = SimpleNamespace(layers=30, heads=3, head_dim=64)


def ids(batch: int = 2, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor, spec: KVSparsity, meter: KVMeter | None = None) -> torch.Tensor:
    with torch.no_grad(), mustafar_attention(model, spec, observe=meter):
        return model(tokens).logits


@pytest.fixture(scope="module")
def qwen2():
    """A GQA Qwen2 (4 query heads on 2 KV heads, biases on q/k/v), 4 layers, its head curves and a map."""
    model = tiny_model("qwen2", layers=4)
    spec = KVSparsity(0.625, 0.5, window=8)  # 80 and 64 of the 128 entries of a token's K (V) over the layers
    curves = kvalloc.sensitivity(model, ids(), spec, "head")
    return SimpleNamespace(model=model, spec=spec, curves=curves, allocated=kvalloc.solve(curves, spec))


# ---------------------------------------------------------------- the solve

def synthetic(layers: int, heads: int, levels, seed: int) -> list[list[list[float]]]:
    """Convex-ish increasing costs, a random scale per unit."""
    rng = random.Random(seed)
    return [[[rng.uniform(0.1, 10) * s ** rng.uniform(1.5, 4) for s in levels] for _ in range(heads)]
            for _ in range(layers)]


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.8, 0.33, 0.6123])
def test_solve_meets_the_target_in_exact_counts_on_smollm2_shapes(granularity, target):
    levels = list(kvalloc.LEVELS)
    units = 1 if granularity == "layer" else SMOLLM2.heads
    curves = kvalloc.Curves(levels, synthetic(SMOLLM2.layers, units, levels, 1),
                            synthetic(SMOLLM2.layers, units, levels, 2),
                            granularity, [SMOLLM2.heads] * SMOLLM2.layers, SMOLLM2.head_dim, 1, 0.0, "fisher")
    spec = kvalloc.solve(curves, KVSparsity(target, target / 2))
    heads = [SMOLLM2.heads] * SMOLLM2.layers
    achieved = planned(spec, heads, SMOLLM2.head_dim)
    assert abs(achieved["k"] - target) <= 1e-4 and abs(achieved["v"] - target / 2) <= 1e-4
    for layers in (spec.k_layers, spec.v_layers):
        per_head = [s for i, entry in enumerate(layers) for s in heads_of(entry, SMOLLM2.heads)]
        assert all(s * 64 == round(s * 64) for s in per_head)  # whole entries per vector
        assert max(per_head) * 64 <= prune_count(64, max(levels))  # never beyond the highest level's count
        if granularity == "layer":  # one number per layer, but for at most one layer that splits a remainder
            assert sum(isinstance(entry, tuple) for entry in layers) <= 1


def test_solve_is_optimal_on_the_convexified_curves():
    """Against exhaustive search over every integer count (8-entry vectors, 3 units)."""
    levels, size = [0.25, 0.5, 0.75], 8
    curves = [[[0.1, 0.5, 2.0]], [[0.4, 0.6, 0.9]], [[0.05, 1.5, 1.6]]]

    def cost(unit: list[float], c: int) -> float:  # the hull's linear interpolation
        hull = kvalloc._hull([(0, 0.0)] + [(prune_count(size, s), e) for s, e in zip(levels, unit)])
        for (a, ea), (b, eb) in zip(hull, hull[1:]):
            if a <= c <= b:
                return ea + (eb - ea) * (c - a) / (b - a)
        raise AssertionError(c)

    for target in (0.25, 0.375, 0.5, 0.625):
        counts = kvalloc.solve_counts(curves, levels, [[1]] * 3, size, target)
        got = sum(cost(curves[i][0], counts[i][0][0]) for i in range(3))
        best = min(sum(cost(curves[i][0], c[i]) for i in range(3))
                   for c in itertools.product(range(7), repeat=3) if sum(c) == round(target * size * 3))
        assert sum(c[0][0] for c in counts) == round(target * size * 3)
        assert got == pytest.approx(best, abs=1e-12)


def test_a_target_above_the_measured_levels_is_refused():
    curves = kvalloc.Curves([0.5], [[[1.0]]], [[[1.0]]], "layer", [2], 16, 1, 0.0, "fisher")
    with pytest.raises(ValueError, match="highest measured level"):
        kvalloc.solve(curves, KVSparsity(0.6, 0.5))


# ---------------------------------------------------------------- end to end on a GQA Qwen2

def test_allocated_map_meets_the_target_and_every_vector_keeps_its_own_count(qwen2):
    heads = kv_heads(qwen2.model)
    assert heads == [2, 2, 2, 2] and qwen2.curves.granularity == "head"
    spec = qwen2.allocated
    achieved = planned(spec, heads, HEAD_DIM)
    assert abs(achieved["k"] - 0.625) <= 1e-4 and abs(achieved["v"] - 0.5) <= 1e-4
    assert len({s for entry in spec.k_layers for s in entry}) > 1  # really not uniform
    x = torch.randn(2, 2, 40, HEAD_DIM)
    for layer in range(4):
        for side, prune in (("k", spec.keys), ("v", spec.values)):
            zeros = (prune(x, layer) == 0).sum(-1)  # [batch, heads, tokens]
            own = heads_of(spec.k_at(layer) if side == "k" else spec.v_at(layer), 2)
            for h, s in enumerate(own):
                assert (zeros[:, h] == prune_count(HEAD_DIM, s)).all()
    # and what the evaluation's cache really held: each head's vectors lose exactly their own count
    meter = KVMeter()
    logits(qwen2.model, ids(seed=5), spec, meter)
    for row in meter.per_layer():
        assert row["k"] == [prune_count(HEAD_DIM, s) / HEAD_DIM for s in heads_of(spec.k_at(row["layer"]), 2)]
        assert row["v"] == [prune_count(HEAD_DIM, s) / HEAD_DIM for s in heads_of(spec.v_at(row["layer"]), 2)]
    assert meter.achieved() == pytest.approx({"k": 0.625, "v": 0.5}, abs=1e-12)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_the_fisher_estimate_tracks_the_exact_kl(qwen2, granularity):
    """The fast second-order estimate against the true KL of each single-unit pruning (one forward each)."""
    fisher = kvalloc.sensitivity(qwen2.model, ids(), qwen2.spec, granularity)
    exact = kvalloc.sensitivity(qwen2.model, ids(), qwen2.spec, granularity, method="exact")
    assert fisher.granularity == exact.granularity == granularity
    for side in ("k", "v"):
        f = torch.tensor(getattr(fisher, side)).flatten()
        e = torch.tensor(getattr(exact, side)).flatten()
        assert ((f / e).log().abs() < torch.tensor(3.0).log()).all(), (side, f / e)  # within a factor 3
        rank = torch.corrcoef(torch.stack([f.argsort().argsort(), e.argsort().argsort()]).double())[0, 1]
        assert rank > 0.95, (side, rank)
    # more pruning costs more
    assert all(a < b for side in (fisher.k, fisher.v) for row in side for unit in row
               for a, b in zip(unit, unit[1:]))


def sensitive(scale: float):
    """A 4-layer llama whose layer 2 keys are scaled (its attention logits ×scale: its cache matters more)."""
    model = tiny_model("llama", seed=1, layers=4)
    with torch.no_grad():
        model.model.layers[2].self_attn.k_proj.weight.mul_(scale)
    return model


@pytest.mark.parametrize("method", ["fisher", "exact"])
def test_the_layer_with_a_sensitive_cache_is_spared_and_not_otherwise(method):
    spec = KVSparsity(0.5, 0.5, window=8)
    for scale, spared in ((4.0, True), (1.0, False)):
        model = sensitive(scale)
        curves = kvalloc.sensitivity(model, ids(length=96), spec, "layer", method=method)
        allocated = kvalloc.solve(curves, spec)
        assert ((allocated.k_at(2) < 0.5) is spared
                and (allocated.k_at(2) > 0.5) is not spared), (scale, allocated)
        assert ("2 (0.31)" in kvalloc.describe(allocated, kv_heads(model))[0]
                .split("; pruned most")[0]) is spared


# ---------------------------------------------------------------- files

def test_a_written_map_reapplied_gives_bit_identical_logits(qwen2, tmp_path):
    path = tmp_path / "kv.json"
    heads = kv_heads(qwen2.model)
    kvalloc.write(path, qwen2.allocated, heads, HEAD_DIM,
                  {"granularity": "head", "curves": qwen2.curves.to_json()})
    back = kvalloc.read(path, qwen2.spec, heads, HEAD_DIM)
    assert back == qwen2.allocated
    tokens = ids(seed=9)
    assert torch.equal(logits(qwen2.model, tokens, back), logits(qwen2.model, tokens, qwen2.allocated))
    assert not torch.equal(logits(qwen2.model, tokens, back), logits(qwen2.model, tokens, qwen2.spec))


@pytest.mark.parametrize("change, spec_change, heads, dim, says", [
    (None, dict(k_sparsity=0.5), None, None, "made for K/V sparsity 0.625/0.5"),
    (None, dict(k_method="per_channel"), None, None, "k_method per_token"),
    (None, {}, [2, 2, 2], None, "has 4 layers; this model has 3"),
    (None, {}, [2, 2, 1, 2], None, "2 KV heads in layer 2; this model has 1"),
    (None, {}, None, 64, "head_dim 16"),
    (lambda d: d.update(k=d["k"][:3]), {}, None, None, "one entry per layer"),
    (lambda d: d["v"].__setitem__(1, [0.5, 0.5, 0.5]), {}, None, None, "layer 1 V entry"),
    (lambda d: d["k"].__setitem__(0, 1.5), {}, None, None, "layer 0 K entry"),
    (lambda d: d.pop("format"), {}, None, None, "not a KV allocation file"),
])
def test_a_file_for_another_run_is_refused_in_one_line(
        qwen2, tmp_path, change, spec_change, heads, dim, says):
    path = tmp_path / "kv.json"
    kvalloc.write(path, qwen2.allocated, kv_heads(qwen2.model), HEAD_DIM)
    if change:
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    with pytest.raises(OptionError) as err:
        kvalloc.read(path, replace(qwen2.spec, **spec_change), heads or [2, 2, 2, 2], dim or HEAD_DIM)
    assert err.value.option == "kv_allocation_file" and says in err.value.message, err.value.message
    assert "\n" not in str(err.value)


def test_an_unreadable_file_is_refused(tmp_path):
    path = tmp_path / "kv.json"
    path.write_text("{not json")
    with pytest.raises(OptionError, match="cannot read"):
        kvalloc.read_file(path)


# ---------------------------------------------------------------- the cache and the report

def test_the_cache_prunes_each_layer_and_head_with_its_own_sparsity(qwen2):
    spec = qwen2.allocated
    cache = MustafarCache(qwen2.model.config, spec, chunk=64)
    tokens = ids(length=90, seed=2)
    with torch.no_grad():
        qwen2.model(tokens[:, :20], past_key_values=cache, use_cache=True)
        for t in range(20, 90):
            qwen2.model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
    for i, layer in enumerate(cache.layers):
        keys, values = layer.dense()
        pruned = 89 - spec.window
        for h, s in enumerate(heads_of(spec.k_at(i), 2)):
            assert ((keys[:, h, :pruned] == 0).sum(-1) == prune_count(HEAD_DIM, s)).all()
        for h, s in enumerate(heads_of(spec.v_at(i), 2)):
            assert ((values[:, h, :pruned] == 0).sum(-1) == prune_count(HEAD_DIM, s)).all()
    with pytest.raises(ValueError, match="4 layers"):
        MustafarCache(tiny_model("qwen2").config, spec)


def test_generate_with_an_allocated_map_matches_teacher_forcing_on_its_output(qwen2):
    """``model.generate(past_key_values=MustafarCache(...))`` with a per-head map: the logits it decoded
    equal the teacher-forced attention's on the same tokens (dense prompt), and differ from uniform's."""
    spec, prompt = qwen2.allocated, ids(length=14, seed=3)
    assert isinstance(spec.k_layers[0], tuple)  # one sparsity per KV head, not a single number

    def decoded(s: KVSparsity):
        out = qwen2.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                   do_sample=False, past_key_values=MustafarCache(qwen2.model.config, s),
                                   output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits, dim=1)

    sequences, generated = decoded(spec)
    with torch.no_grad(), mustafar_attention(qwen2.model, spec, prompt.shape[1]):
        forced = qwen2.model(sequences[:, :-1]).logits[:, prompt.shape[1] - 1:]
    assert torch.allclose(forced, generated, rtol=0, atol=2e-5)
    assert (decoded(qwen2.spec)[1] - generated).abs().amax() > 1e-4  # the map, not uniform, was applied


def test_achieved_is_measured_on_the_real_cache_not_the_target():
    """A window that covers every token prunes nothing: the report says 0, not the asked 0.75."""
    model, tokens = tiny_model("llama"), ids(length=48)
    covering = KVSparsity(0.75, 0.5, window=48)
    meter = KVMeter()
    logits(model, tokens, covering, meter)
    record = report(model, covering, meter)
    assert record["achieved"] == {"k": 0.0, "v": 0.0}
    assert record["planned"] == {"k": 0.75, "v": 0.5}  # what each pruned vector would lose
    assert record["measured"]["compressed"] == record["measured"]["dense"] == record["measured"]["window"]

    spec = replace(covering, window=8)
    meter = KVMeter()
    logits(model, tokens, spec, meter)
    record = report(model, spec, meter)
    assert record["achieved"] == {"k": 0.75, "v": 0.5}  # random data: no natural zeros
    # the bytes of the caches it held, from their real tiles: V exactly the formula's, K within its range
    formula = kv_bytes(model.config, 48, spec, value_bytes=2, batch=2)
    measured = record["measured"]
    assert measured["sequences"] == 2 and measured["tokens"] == 2 * 48
    assert measured["dense"] == formula.dense and measured["window"] == formula.window
    assert measured["values"] == formula.values[0] == formula.values[1]
    assert formula.keys[0] <= measured["keys"] <= formula.keys[1]
    # layers · K, V · heads · head_dim · fp16
    assert measured["per_token"]["dense"] == 2 * 2 * 2 * HEAD_DIM * 2
    lines = summary_lines(record)
    assert ("K 75.0% / V 50.0% of each pruned vector zero (measured)" in lines[0]
            and "evaluated caches" in lines[1])


def test_the_meter_leaves_padding_out():
    model, tokens = tiny_model("llama"), ids(length=40)
    mask = torch.ones_like(tokens)
    mask[1, 30:] = 0  # row 1: 30 real tokens, right-padded
    meter = KVMeter()
    with torch.no_grad(), mustafar_attention(model, KVSparsity(0.75, 0.75, window=8), observe=meter):
        model(tokens, attention_mask=mask)
    assert meter.bytes()["tokens"] == 40 + 30
    assert meter.layers[0].k.entries == ((40 - 8) + (30 - 8)) * HEAD_DIM


def test_the_meter_counts_through_the_layerwise_perplexity_and_its_working_copies():
    """Evaluation runs layer by layer, bf16 forwards in per-layer copies: the one meter still sees it all."""
    model, tokens, spec = tiny_model("llama"), ids(4, 48).flatten(), KVSparsity(0.75, 0.5, window=8)
    plain, layerwise = KVMeter(), KVMeter()
    logits(model, tokens.view(4, 48), spec, plain)
    with mustafar_attention(model, spec, observe=layerwise):
        perplexity(model, adapter_for(model), tokens, 48, dtype=torch.bfloat16)
    assert layerwise.sequences == plain.sequences == 4
    assert layerwise.achieved() == plain.achieved() == {"k": 0.75, "v": 0.5}
    assert {k: layerwise.bytes()[k] for k in ("dense", "window", "values", "tokens")} == \
        {k: plain.bytes()[k] for k in ("dense", "window", "values", "tokens")}


def test_the_report_counts_each_layers_own_kv_heads():
    """A composite checkpoint: layer 1 kept one of its two KV heads (and two of four query heads)."""
    model = tiny_model("llama")
    attn = model.model.layers[1].self_attn
    attn.q_proj, attn.k_proj, attn.v_proj = nn.Linear(64, 32, bias=False), nn.Linear(64, 16, bias=False), \
        nn.Linear(64, 16, bias=False)
    attn.o_proj, attn.num_key_value_groups = nn.Linear(32, 64, bias=False), 2
    assert model.config.num_key_value_heads == 2 and kv_heads(model) == [2, 1]
    spec = KVSparsity(0.75, 0.75, window=8)
    meter = KVMeter()
    logits(model, ids(length=40), spec, meter)
    record = report(model, spec, meter)
    assert record["bytes"]["dense"] == 2 * 2048 * (2 + 1) * HEAD_DIM * 2
    assert record["measured"]["dense"] == 2 * 2 * 40 * (2 + 1) * HEAD_DIM * 2  # 2 sequences
    assert record["kv_heads"] == [2, 1]


def test_describe_says_what_the_map_learned():
    spec = KVSparsity(0.5, 0.5, k_layers=(0.125, 0.5, 0.875, (0.25, 0.75)), v_layers=(0.5,) * 4)
    lines = kvalloc.describe(spec, [2, 2, 2, 2])
    assert lines[0].startswith("K: 0.5000 of entries pruned") and "densest 0 (0.12), 3.0 (0.25)" in lines[0]
    assert "pruned most 2 (0.88), 3.1 (0.75)" in lines[0] and lines[0].endswith("kept at ≤ 20%: 0")
    assert lines[1].startswith("V: 0.5000") and lines[2].startswith("K vs V")
