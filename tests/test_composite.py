"""Composite pruning: structured removal that keeps the model's function, and checkpoints that reload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from mosaic.adapter import adapter_for
from mosaic.calibrate import capture
from mosaic.cli import main
from mosaic.export import atomic_dir, save_checkpoint
from mosaic.profile import profile_model
from mosaic.restructure import (
    LayerPlan,
    attention_options,
    geometry,
    kept_params,
    plan_structure,
    restructure,
    unit_scores,
)


def ids(n=4, length=24, seed=0):
    return torch.randint(2, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def zero_units(model, layer_index: int, heads: list[int], channels: list[int]) -> None:
    """Zero what connects some heads and channels to the output, so removing them changes nothing."""
    adapter = adapter_for(model)
    layer = adapter.layers(model)[layer_index]
    d = adapter.head_dim(layer)
    with torch.no_grad():
        for h in heads:
            adapter.projection(layer, "q").weight[h * d:(h + 1) * d] = 0
            adapter.projection(layer, "o").weight[:, h * d:(h + 1) * d] = 0
        for c in channels:
            adapter.projection(layer, "gate").weight[c] = 0
            adapter.projection(layer, "up").weight[c] = 0
            adapter.projection(layer, "down").weight[:, c] = 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_removing_all_zero_units_leaves_the_output_unchanged(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    # layer 0: drop query heads 1 and 3 (one per kv group: 4 heads, 2 kv heads) and 40 MLP channels
    dropped_channels = list(range(0, 120, 3))
    zero_units(model, 0, heads=[1, 3], channels=dropped_channels)
    with torch.no_grad():
        expected = model(ids()).logits
    g = geometry(adapter, adapter.layers(model)[0])
    plans = [LayerPlan([0, 2], [0, 1], [c for c in range(g.intermediate) if c not in dropped_channels]),
             LayerPlan(list(range(4)), [0, 1], list(range(g.intermediate)))]
    restructure(model, adapter, plans)
    layer0 = adapter.layers(model)[0]
    assert adapter.projection(layer0, "q").out_features == 2 * g.head_dim
    assert adapter.projection(layer0, "down").in_features == g.intermediate - 40
    if family == "qwen2":  # q/k/v biases are sliced with their rows
        assert adapter.projection(layer0, "q").bias.shape == (2 * g.head_dim,)
    with torch.no_grad():
        got = model(ids()).logits
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_removing_a_whole_gqa_group_slices_k_and_v_consistently(family):
    """Keeping kv group 1 only (not the first rows): k/v weights and Qwen2's k/v biases must be its rows."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers(model)[1]
    d = adapter.head_dim(layer)
    before = {p: adapter.projection(layer, p) for p in ("q", "k", "v")}
    before = {p: (lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
              for p, lin in before.items()}
    with torch.no_grad():  # kv group 0 serves query heads 0 and 1
        adapter.projection(layer, "o").weight[:, 0:2 * d] = 0
        expected = model(ids()).logits
    g = geometry(adapter, layer)
    full = LayerPlan(list(range(4)), [0, 1], list(range(g.intermediate)))
    restructure(model, adapter, [full, LayerPlan([2, 3], [1], list(range(g.intermediate)))])
    assert (adapter.projection(layer, "k").out_features == d
            and adapter.projection(layer, "v").out_features == d)
    assert adapter.attention(layer).num_key_value_groups == 2
    rows = {"q": slice(2 * d, 4 * d), "k": slice(d, 2 * d), "v": slice(d, 2 * d)}
    for p, (w, b) in before.items():
        lin = adapter.projection(layer, p)
        assert torch.equal(lin.weight, w[rows[p]]), p
        if family == "qwen2":
            assert b.abs().sum() > 0 and torch.equal(lin.bias, b[rows[p]]), p
    with torch.no_grad():
        assert torch.allclose(model(ids()).logits, expected, atol=1e-5)


def test_attention_options_keep_gqa_integral():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    g = geometry(adapter, adapter.layers(model)[0])  # 4 heads, 2 kv heads
    options = {(groups, r) for groups, r, _ in attention_options(g)}
    assert options == {(1, 1), (1, 2), (2, 1), (2, 2)}
    removed = {(groups, r): n for groups, r, n in attention_options(g)}
    assert removed[(2, 2)] == 0 and removed[(1, 2)] == 2 * 16 * 64 * 2 + 1 * 16 * 64 * 2


def test_plan_prefers_low_energy_units_and_hits_the_budget():
    model = tiny_model("llama", layers=4)
    adapter = adapter_for(model)
    acts = capture(model, adapter, ids(8, 32), 4)
    prof = profile_model(model, adapter, acts, 5.0)
    layers = list(adapter.layers(model))
    scores = [unit_scores(adapter, layer, prof.norms(i, ("o",)), prof.norms(i, ("down",)))
              for i, layer in enumerate(layers)]
    full = sum(prof.params[0].values())
    budgets = [(0.3 * full * 0.25, 0.3 * full * 0.75)] * 4
    plans = plan_structure(adapter, layers, scores, budgets, round_to=8)
    kept = sum(sum(kept_params(geometry(adapter, layer), p).values()) for layer, p in zip(layers, plans))
    assert abs((1 - kept / (4 * full)) - 0.3) < 0.06  # within the granularity of heads and 8 channels
    for s, p in zip(scores, plans):
        assert len(p.channels) % 8 == 0
        dropped = [c for c in range(128) if c not in p.channels]
        assert (max(float(s["channels"][c]) for c in dropped)
                <= min(float(s["channels"][c]) for c in p.channels))
    uniform = plan_structure(adapter, layers, scores, budgets, round_to=8, uniform_widths=True)
    assert len({(len(p.heads), len(p.kv_heads), len(p.channels)) for p in uniform}) == 1


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_composite_checkpoint_reloads_in_a_fresh_process_with_identical_logits(tmp_path, tokenizer, family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    g = geometry(adapter, adapter.layers(model)[0])
    plans = [LayerPlan([0, 2], [0, 1], list(range(0, 128, 2))),
             LayerPlan([0, 1, 2, 3], [0, 1], list(range(64, 128)))]
    restructure(model, adapter, plans)
    assert model.config.model_type == f"mosaic_{family}"
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    with atomic_dir(tmp_path / "ckpt") as d:
        save_checkpoint(model, tokenizer, d, {})
    assert (tmp_path / "ckpt" / "modeling_mosaic.py").is_file()
    torch.save(x, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)

    import mosaic

    again = mosaic.load_pretrained(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(again(x).logits, expected)
    assert [a.self_attn.num_key_value_groups for a in again.model.layers] == [1, 2]
    assert g.intermediate == 128


def test_a_config_that_does_not_match_the_weights_is_a_clear_error(tmp_path, tokenizer):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    restructure(model, adapter, [LayerPlan([0, 1, 2, 3], [0, 1], list(range(64))),
                                 LayerPlan([0, 1, 2, 3], [0, 1], list(range(128)))])
    with atomic_dir(tmp_path / "ckpt") as d:
        save_checkpoint(model, tokenizer, d, {})
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["layer_intermediate_size"] = [72, 128]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    import mosaic

    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate_proj\.weight is stored as \[64, 64\]"):
        mosaic.load_pretrained(str(tmp_path / "ckpt"))


def test_uniform_widths_give_a_plain_family_checkpoint(tmp_path, tokenizer):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    restructure(model, adapter, [LayerPlan([0, 2], [0, 1], list(range(64))),
                                 LayerPlan([1, 3], [0, 1], list(range(8, 72)))])
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.intermediate_size) == (2, 2, 64)
    with atomic_dir(tmp_path / "ckpt") as d:
        save_checkpoint(model, tokenizer, d, {})
    assert not (tmp_path / "ckpt" / "modeling_mosaic.py").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, model(ids()).logits)


@pytest.mark.parametrize("method", ["wanda_mosaic", "sparsegpt_mosaic", "sparsegpt", "alps"])
def test_composite_run_removes_s_in_total_and_r_structurally(tmp_path, tiny_dirs, calib_file, method):
    out = tmp_path / "run"
    rc = main(["--model", str(tiny_dirs["qwen2"]), "--prune_method", method, "--sparsity_type", "composite",
               "--sparsity_ratio", "0.6", "--structured_ratio", "0.3", "--nsamples", "8", "--seqlen", "64",
               "--calib_dataset", str(calib_file), "--eval_datasets", str(calib_file), "--eval_seqlen", "128",
               "--eval_windows", "2", "--save", str(out), "--save_model", str(out / "model")])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert r["sparsity"]["achieved"] == pytest.approx(0.6, abs=2e-3)
    assert r["composite"]["structured_ratio"] == pytest.approx(0.3, abs=0.1)
    before = r["composite"]["params_before"]
    assert r["sparsity"]["projection_params"] == r["composite"]["params_kept"] < before
    assert r["checkpoint"]["safetensors_bytes"] < Path(tiny_dirs["qwen2"], "model.safetensors").stat().st_size
    assert r["parameters"]["after"]["total"] < r["parameters"]["before"]["total"]
