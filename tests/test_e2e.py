"""End to end on the real SmolLM2-135M with small settings (pytest -m e2e runs these alone)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

pytestmark = pytest.mark.e2e

SMALL = ["--nsamples", "8", "--seqlen", "256", "--eval_windows", "2"]


@pytest.fixture(scope="module")
def dense_ppl(tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("dense") / "run"
    proc = run_cli("--prune_method", "dense", *SMALL, "--save", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "results.json").read_text())["perplexity"]["wiki-offline"]["ppl"]


def test_wanda_prunes_smollm2_and_the_checkpoint_is_what_was_evaluated(tmp_path, dense_ppl):
    out = tmp_path / "run"
    proc = run_cli("--prune_method", "wanda", "--sparsity_ratio", "0.5", *SMALL, "--save", str(out),
                   "--save_model", str(out / "model"))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["model"]["family"] == "llama" and r["model"]["layers"] == 30
    assert r["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-5)
    ppl = r["perplexity"]["wiki-offline"]["ppl"]
    assert dense_ppl < ppl < 10 * dense_ppl  # pruning costs something, but the model still works
    assert r["perplexity"]["wiki-offline"]["windows"] == 2 and r["settings"]["eval_seqlen"] == 2048

    import torch
    from transformers import AutoModelForCausalLM

    from mosaic.adapter import adapter_for
    from mosaic.data import eval_tokens
    from mosaic.eval.perplexity import perplexity
    from mosaic.load import load_model

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    tokenizer = load_model("smollm2-135m").tokenizer
    again = perplexity(reloaded, adapter_for(reloaded), eval_tokens(tokenizer, "wiki-offline"), 2048, 2)
    assert again["ppl"] == pytest.approx(ppl, rel=1e-5)


def test_sparsegpt_mosaic_hits_the_target_and_reports_the_allocation(tmp_path, dense_ppl):
    out = tmp_path / "run"
    proc = run_cli("--prune_method", "sparsegpt_mosaic", "--sparsity_ratio", "0.6", *SMALL, "--save",
                   str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    rows = r["sparsity"]["per_projection"]
    assert len(rows) == 30 * 7
    assert r["sparsity"]["allocated_overall"] == pytest.approx(0.6, abs=1e-3)
    assert r["sparsity"]["achieved"] == pytest.approx(0.6, abs=1e-3)
    allocated = {row["allocated"] for row in rows}
    assert min(allocated) >= 0.6 - 0.08 - 1e-9 and max(allocated) <= 0.6 + 0.08 + 1e-9 and len(allocated) > 10
    for row in rows:  # each projection got what was allocated, to one weight
        assert row["achieved"] == pytest.approx(row["allocated"], abs=1e-4)
    assert math.isfinite(r["perplexity"]["wiki-offline"]["ppl"])
    assert (out / "allocation_heatmap.png").stat().st_size > 0 and (out / "outlier_ratios.png").exists()


def test_zero_shot_on_smollm2(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--prune_method", "dense", "--eval_datasets", "none", "--eval_zero_shot",
                   "arc_easy,rte,hellaswag", "--zs_limit", "8", "--zs_batch_size", "8", "--save", str(out))
    assert proc.returncode == 0, proc.stderr
    z = json.loads((out / "results.json").read_text())["zero_shot"]
    assert set(z["tasks"]) == {"arc_easy", "rte", "hellaswag"} and z["limit"] == 8
    for row in z["tasks"].values():
        assert row["n"] == 8 and 0 <= row["acc"] <= 1 and math.isfinite(row["acc_stderr"])
    assert 0 <= z["mean_acc"] <= 1
