"""The layer-wise engine on tiny real LLaMA / Mistral / Qwen2 models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model

from mosaic.adapter import PROJECTIONS, adapter_for
from mosaic.calibrate import capture, check_staged_forward, run_layers
from mosaic.errors import OptionError
from mosaic.eval.perplexity import perplexity
from mosaic.prune import KERNELS, measure, prune_model, uniform_map
from mosaic.prune.masks import target_count


def token_batch(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 512, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_forward_reproduces_each_familys_own_layer_forward(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    acts = capture(model, adapter, token_batch(4, 48), batch_size=2)
    for index, layer in enumerate(adapter.layers(model)):
        kwargs = acts.layer_kwargs[2][index]
        err = check_staged_forward(adapter, layer, acts.hidden[0], kwargs, atol=1e-6)
        assert err < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_perplexity_equals_a_plain_forward(family):
    model = tiny_model(family)
    ids = token_batch(1, 5 * 64 + 17).view(-1)  # 5 windows and a remainder that is dropped
    got = perplexity(model, adapter_for(model), ids, seqlen=64, batch_size=2)
    with torch.no_grad():
        windows = ids[: 5 * 64].view(5, 64)
        logits = model(windows).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                              reduction="none").view(5, -1).mean(1)
    assert got["windows"] == 5 and got["tokens"] == 320
    assert got["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "alps"])
@pytest.mark.parametrize("kind", ["unstructured", "2:4", "4:8"])
def test_every_method_and_type_reaches_the_exact_target(family, method, kind):
    model = tiny_model(family)
    adapter = adapter_for(model)
    nm = None if kind == "unstructured" else tuple(map(int, kind.split(":")))
    sparsity = 0.37 if nm is None else nm[0] / nm[1]
    acts = capture(model, adapter, token_batch(8, 32), batch_size=4)
    prune_model(model, adapter, KERNELS[method], uniform_map(2, sparsity), [nm, nm], acts)
    for layer in adapter.layers(model):
        for name, proj in adapter.projections(layer).items():
            w = proj.weight
            if nm is None:
                assert int((w == 0).sum()) == target_count(w.numel(), sparsity), name
            else:
                groups = (w == 0).view(w.shape[0], -1, nm[1]).sum(-1)
                assert bool((groups == nm[0]).all()), name
    got = measure(model, adapter)
    assert got["overall"] == pytest.approx(sparsity, abs=1e-3)


@pytest.mark.parametrize("calib_dtype", [None, torch.bfloat16])
def test_sequential_mode_sees_pruned_inputs_and_reference_mode_dense_ones(calib_dtype):
    """In sequential mode o_proj statistics come after q/k/v were pruned; in reference mode from
    the dense layer; the two therefore differ, and the reference mode's equal a dense pass."""
    seen = {}
    for mode in ("sequential", "reference", "dense"):
        model = tiny_model("llama")
        adapter = adapter_for(model)
        acts = capture(model, adapter, token_batch(4, 32), batch_size=2)
        norms = {}

        def on_group(i, layer, group, stats, norms=norms, adapter=adapter, mode=mode):
            norms[(i, group)] = stats.norms().clone()
            if mode != "dense":
                KERNELS["wanda"].prune([adapter.projection(layer, p).weight.data for p in group], stats,
                                       [0.5] * len(group))

        run_layers(model, adapter, acts, on_group, mode=mode, calib_dtype=calib_dtype)
        seen[mode] = norms
    o = (0, ("o",))
    qkv = (0, ("q", "k", "v"))
    tol = 1e-5 if calib_dtype is None else 2e-2
    assert torch.allclose(seen["sequential"][qkv], seen["reference"][qkv], rtol=tol)
    assert not torch.allclose(seen["sequential"][o], seen["reference"][o], rtol=1e-3)
    assert torch.allclose(seen["reference"][o], seen["dense"][o], rtol=tol)


def test_bf16_calibration_keeps_fp32_master_weights_exactly_pruned():
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    acts = capture(model, adapter, token_batch(8, 32), batch_size=4)
    prune_model(model, adapter, KERNELS["sparsegpt"], uniform_map(2, 0.5), [None, None], acts,
                calib_dtype=torch.bfloat16)
    for layer in adapter.layers(model):
        for proj in adapter.projections(layer).values():
            assert proj.weight.dtype == torch.float32
            assert int((proj.weight == 0).sum()) == proj.weight.numel() // 2


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(OptionError, match="not supported.*llama"):
        adapter_for(GPT2Config())


def test_adapter_names_all_seven_projections():
    model = tiny_model("mistral")
    adapter = adapter_for(model)
    projections = adapter.projections(adapter.layers(model)[0])
    assert list(projections) == list(PROJECTIONS)
    assert projections["k"].out_features == 2 * 16  # 2 kv heads × head_dim 16 (GQA)


def test_sequential_hands_each_output_over_as_it_finishes_and_frees_the_inputs():
    """The hook that, with a GPU computing, moves each batch's layer output to pinned host memory at once
    (``keep``): on CPU the outputs are the very same values with or without it, and the staged forwards
    own the inputs (the caller's list is emptied, so the device can free each batch's input early)."""
    from mosaic.calibrate import _sequential

    model = tiny_model("llama")
    adapter = adapter_for(model)
    acts = capture(model, adapter, token_batch(6, 32), batch_size=2)
    layer = adapter.layers(model)[0]
    kwargs = [acts.layer_kwargs[2][0]] * len(acts.hidden)
    results, kept = [], []
    for keep in (None, lambda out: kept.append(out) or out.clone()):
        inputs = list(acts.hidden)
        results.append(_sequential(adapter, layer, 0, inputs, kwargs, lambda *a: None, False, keep))
        assert inputs == []
    assert len(kept) == 3 and all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_batch_on_device_gives_the_paused_forwards_results_bit_for_bit(family):
    """The bounded-memory sequential pass (one batch's intermediates at a time, each group's input
    recomputed from the layer input with the earlier groups pruned) sees the same Hessians, prunes the same
    weights and hands the next layer the same inputs as the paused staged forwards of all batches."""
    seen, models = [], []
    for one_batch in (False, True):
        model = tiny_model(family, layers=3)
        adapter = adapter_for(model)
        acts = capture(model, adapter, token_batch(6, 32), batch_size=2)
        hessians = {}

        def on_group(i, layer, group, stats, hessians=hessians, adapter=adapter):
            hessians[(i, group)] = stats.hessian().clone()
            KERNELS["sparsegpt"].prune([adapter.projection(layer, p).weight.data for p in group], stats,
                                       [0.6] * len(group))

        run_layers(model, adapter, acts, on_group, mode="sequential", hessian=True, one_batch=one_batch)
        seen.append(hessians)
        models.append(model)
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) == 12
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
