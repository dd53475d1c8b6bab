"""Composite planned by search (--allocation search --sparsity_type composite): exact counts, a sensitive
layer spared, the plan as a file, and a stock checkpoint with --uniform_widths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

import mosaic.pipeline as pipeline
from mosaic.cli import main
from mosaic.composite_search import Option, knapsack
from mosaic.pipeline import Options, run
from mosaic.restructure import Geometry, LayerPlan, kept_params

LAYERS = 4
GEO = Geometry(heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per op
    made this file ~5x slower (oversubscription); the previous count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny 4-layer models: LLaMA, Qwen2 (biases, GQA), Mistral; and a LLaMA whose layer-2 o_proj writes 6×
    more into the residual stream (its heads matter most), and another LLaMA (another seed)."""
    out = {}
    for name, family, seed in (("llama", "llama", 0), ("qwen2", "qwen2", 0), ("mistral", "mistral", 0),
                               ("sensitive", "llama", 0), ("other", "llama", 1)):
        model = tiny_model(family, seed=seed, layers=LAYERS)
        if name == "sensitive":
            with torch.no_grad():
                model.model.layers[2].self_attn.o_proj.weight.mul_(6.0)
        d = tmp_path_factory.mktemp(f"cs-{name}")
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[name] = d
    return out


def opts(model: Path, calib: Path, **kw) -> Options:
    base = dict(model=str(model), prune_method="sparsegpt", allocation="search", sparsity_type="composite",
                sparsity_ratio=0.6, structured_ratio=0.4, nsamples=8, seqlen=64, calib_batch_size=4,
                calib_dataset=str(calib), eval_datasets="none", search_windows=4, search_budget=0, seed=1)
    return Options(**{**base, **kw})


def argv(o: Options) -> list[str]:
    out = []
    for key in ("model", "prune_method", "allocation", "sparsity_type", "sparsity_ratio", "structured_ratio",
                "nsamples", "seqlen", "calib_batch_size", "calib_dataset", "eval_datasets", "search_windows",
                "search_budget", "seed", "round_to", "allocation_file", "save", "save_model"):
        value = getattr(o, key)
        if value is not None:
            out += [f"--{key}", str(value)]
    return out


def removed(widths: list[dict]) -> int:
    full = sum(kept_params(GEO, LayerPlan(list(range(4)), list(range(2)), list(range(128)))).values())
    return sum(full - sum(kept_params(GEO, LayerPlan(list(range(w["heads"])), list(range(w["kv_heads"])),
                                                      list(range(w["intermediate"])))).values())
               for w in widths)


def test_knapsack_is_exact_and_least():
    parts = [[Option(0, (), 0.0), Option(6, (), 0.5), Option(12, (), 3.0)],
             [Option(0, (), 0.0), Option(6, (), 0.2), Option(12, (), 1.0)]]
    assert knapsack(parts, 12) == [1, 1]  # 6 + 6 (KL 0.7), not 0 + 12 (1.0) or 12 + 0 (3.0)
    assert knapsack(parts, 18) == [1, 2]  # 6 + 12 (1.5), not 12 + 6 (3.2)
    assert knapsack(parts, 24) == [2, 2]
    assert knapsack(parts, 9) is None  # no exact solution


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_searched_plan_removes_exactly_r_structurally_and_s_in_total(tmp_path, models, calib_file, family):
    r = run(opts(models[family], calib_file, save_model=str(tmp_path / "ckpt")))
    c = r["composite"]
    s = c["search"]
    assert set(s["kl"]) == {"rule", "search"} and s["chosen"] in ("rule", "search")
    assert s["kl"][s["chosen"]] == min(s["kl"].values())  # the guard keeps the better on held-out KL
    R = removed(s["widths"]["rule"])
    assert removed(s["widths"]["search"]) == R == s["structured_params_removed"]  # exactly the rule's R
    assert c["params_before"] - c["params_kept"] == R
    chosen = s["widths"]["search"]  # the plan the search kept (the rule's, if the guard kept that)
    if s["chosen"] == "rule":
        assert chosen == s["widths"]["rule"]
    assert [{k: w[k] for k in ("heads", "kv_heads", "intermediate")} for w in c["layers"]] == chosen
    assert all(w["heads"] % w["kv_heads"] == 0 for w in chosen)  # GQA integral
    assert all(w["intermediate"] % 8 == 0 for w in chosen)  # --round_to
    # S in total: removed + zeros in what is kept, within half a weight per projection of S·N
    zeros = r["sparsity"]["zeros"]
    assert abs(R + zeros - 0.6 * c["params_before"]) <= 0.5 * 7 * LAYERS + 1
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    for i, w in enumerate(c["layers"]):
        assert tensors[f"model.layers.{i}.mlp.up_proj.weight"].shape[0] == w["intermediate"]
        assert tensors[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] == w["heads"] * 16


def test_a_sensitive_layer_keeps_more_heads_under_the_search_than_under_the_uniform_rule(
        tmp_path, models, calib_file, capsys):
    uniform = run(opts(models["sensitive"], calib_file, allocation="uniform"))
    searched = run(opts(models["sensitive"], calib_file, save=str(tmp_path / "out")))
    s = searched["composite"]["search"]
    assert s["chosen"] == "search" and s["kl"]["search"] < s["kl"]["rule"]
    heads = [w["heads"] for w in searched["composite"]["layers"]]
    assert heads[2] > uniform["composite"]["layers"][2]["heads"]
    assert heads[2] == max(heads)
    # what each layer gave up against the rule: the sensitive layer's attention gave up less
    assert s["gave_up"][2]["attention"] < 0
    assert sum(row["attention"] + row["mlp"] for row in s["gave_up"]) == 0  # the same R
    assert (tmp_path / "out" / "widths.png").is_file()
    assert "search plan kept: held-out KL" in capsys.readouterr().out


def test_the_written_plan_reapplies_bit_for_bit_and_another_models_is_refused(tmp_path, models, calib_file,
                                                                              capsys):
    plan = tmp_path / "plan.json"
    first = opts(models["llama"], calib_file, allocation_file=str(plan), save_model=str(tmp_path / "a"))
    assert main(argv(first)) == 0
    doc = json.loads(plan.read_text())
    assert doc["round_to"] == 8 and doc["uniform_widths"] is False and len(doc["structure"]) == LAYERS
    assert doc["structured_params_removed"] > 0 and doc["fingerprint"]["family"] == "llama"
    again = opts(models["llama"], calib_file, allocation_file=str(plan), save_model=str(tmp_path / "b"))
    assert main(argv(again)) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    for kw, words in ((dict(model=str(models["other"])), "another model"),
                      (dict(structured_ratio=0.3), "--structured_ratio 0.4"),
                      (dict(round_to=16), "--round_to 8")):
        out = tmp_path / "refused"
        bad = opts(**{"model": models["llama"], "calib": calib_file, "allocation_file": str(plan),
                      "save": str(out), **kw})
        assert main(argv(bad)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--allocation_file" in err and words in err, err
        assert not out.exists()


def test_uniform_widths_search_gives_a_stock_checkpoint_with_the_in_memory_logits(tmp_path, models,
                                                                                  calib_file, monkeypatch):
    kept = {}
    export = pipeline.export

    def capture(setup, *args):
        kept["model"] = setup.model
        return export(setup, *args)

    monkeypatch.setattr(pipeline, "export", capture)
    r = run(opts(models["qwen2"], calib_file, uniform_widths=True, save_model=str(tmp_path / "ckpt")))
    widths = r["composite"]["search"]["widths"]
    for plan in widths.values():
        assert len({(w["heads"], w["kv_heads"], w["intermediate"]) for w in plan}) == 1
    assert removed(widths["search"]) == removed(widths["rule"])
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config
    assert not (tmp_path / "ckpt" / "modeling_mosaic.py").exists()
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(stock).__name__ == "Qwen2ForCausalLM"
    x = torch.randint(2, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stock(x).logits, kept["model"](x).logits)


def test_streaming_refuses_the_search_in_one_line_and_applies_its_plan_bit_for_bit(tmp_path, tokenizer,
                                                                                   calib_file, capsys):
    from test_stream import save_sharded, tensors

    sharded = save_sharded(tmp_path / "sharded", "llama", tokenizer)
    plan = tmp_path / "plan.json"
    memory = opts(sharded, calib_file, allocation_file=str(plan), save_model=str(tmp_path / "memory"),
                  offload="none")
    run(memory)
    assert "structure" in json.loads(plan.read_text())
    streamed = opts(sharded, calib_file, allocation_file=str(plan), save_model=str(tmp_path / "streamed"),
                    offload="disk")
    r = run(streamed)
    assert r["streaming"]["peak_layers_in_memory"] == 1
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("memory", "streamed")]
    assert config[0] == config[1]
    refused = opts(sharded, calib_file, save_model=str(tmp_path / "refused"))
    capsys.readouterr()
    assert main([*argv(refused), "--offload", "disk"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--allocation: search needs the whole model in memory" in err
    assert not (tmp_path / "refused").exists()


def test_recovery_and_kv_sparsity_run_after_a_searched_plan(tmp_path, models, calib_file):
    r = run(opts(models["qwen2"], calib_file, reconstruct="layer", reconstruct_steps=2, distill_steps=2,
                 distill_windows=4, distill_batch=2, eval_datasets=str(calib_file), eval_windows=2,
                 eval_seqlen=64, kv_sparsity=0.5))
    assert "search" in r["composite"]
    rec = r["recovery"]
    assert rec["reconstruct"]["tuned_layers"] > 0 and rec["distill"]["steps"] == 2
    assert r["kv_cache"] and r["perplexity"]


def test_the_refinement_keeps_r_exact_and_is_kept_only_if_it_beats_its_start_on_validation(
        tmp_path, models, calib_file):
    r = run(opts(models["llama"], calib_file, search_budget=6, save_model=str(tmp_path / "ckpt")))
    s = r["composite"]["search"]
    evolution = s["evolution"]
    assert evolution["from"] in ("search", "rule") and evolution["generations"] == 6
    assert evolution["kl"] <= evolution["start_kl"]  # never worse than its start on its own windows
    assert evolution["accepted"] > 0  # (on this model and seed: the refinement moves ...)
    assert evolution["structured_params_removed"] == s["structured_params_removed"]  # ... by exact counts
    assert evolution["history"] == sorted(evolution["history"], reverse=True)
    if evolution["accepted"]:
        judged = evolution["validation_kl"]
        assert (s["chosen"] == "evolved") == (judged["evolved"] < judged[evolution["from"]])
    else:
        assert "validation_kl" not in evolution and s["chosen"] == evolution["from"]
    assert removed(s["widths"]["search"]) == removed(s["widths"]["rule"]) == s["structured_params_removed"]
    assert [{k: w[k] for k in ("heads", "kv_heads", "intermediate")} for w in r["composite"]["layers"]] \
        == s["widths"]["search"]


@pytest.mark.parametrize("method", ["wanda", "alps"])
def test_wanda_and_alps_plan_searched_widths_with_their_own_structured_step(tmp_path, models, calib_file,
                                                                            method):
    r = run(opts(models["qwen2"], calib_file, prune_method=method, alps_max_iter=20))
    s = r["composite"]["search"]
    assert removed(s["widths"]["search"]) == removed(s["widths"]["rule"]) == s["structured_params_removed"]
    assert s["kl"][s["chosen"]] == min(s["kl"].values())
    assert r["sparsity"]["achieved"] == pytest.approx(0.6, abs=2e-3)


def test_the_guard_keeps_the_rules_plan_when_the_curves_mislead(tmp_path, models, calib_file, monkeypatch):
    import mosaic.composite_search as cs

    true_kl = cs._structured_kl
    monkeypatch.setattr(cs, "_structured_kl", lambda *a, **k: -true_kl(*a, **k))  # the worst plan looks best
    r = run(opts(models["sensitive"], calib_file))
    s = r["composite"]["search"]
    assert s["kl"]["search"] > s["kl"]["rule"] and s["chosen"] == "rule"
    assert s["widths"]["search"] == s["widths"]["rule"]
    assert [{k: w[k] for k in ("heads", "kv_heads", "intermediate")} for w in r["composite"]["layers"]] \
        == s["widths"]["rule"]
    assert all(row == {"attention": 0, "mlp": 0} for row in s["gave_up"])
