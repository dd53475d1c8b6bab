"""Saved checkpoints reload in a fresh process with identical logits; results.json tells the truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_model

from mosaic.adapter import adapter_for
from mosaic.calibrate import capture
from mosaic.export import atomic_dir, save_checkpoint
from mosaic.prune import KERNELS, prune_model, uniform_map

RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


def logits_in_fresh_process(directory: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    torch.save(ids, tmp / "ids.pt")
    subprocess.run([sys.executable, "-c", RELOAD, str(directory), str(tmp / "ids.pt"),
                    str(tmp / "logits.pt")], check=True, capture_output=True, timeout=300)
    return torch.load(tmp / "logits.pt")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_checkpoint_reloads_with_identical_logits(tmp_path, tokenizer, family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(2, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    prune_model(model, adapter, KERNELS["sparsegpt"], uniform_map(2, 0.6), [None, None],
                capture(model, adapter, ids, 2))
    with torch.no_grad():
        expected = model(ids).logits
    with atomic_dir(tmp_path / "ckpt") as d:
        size = save_checkpoint(model, tokenizer, d, {"method": "sparsegpt"})
    assert size == (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert json.loads((tmp_path / "ckpt" / "mosaic.json").read_text())["method"] == "sparsegpt"
    got = logits_in_fresh_process(tmp_path / "ckpt", ids, tmp_path)
    assert torch.equal(got, expected)


def test_cli_run_writes_results_and_a_reloadable_model(tmp_path, tiny_dirs, calib_file):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "model"
    proc = run_cli("--model", str(tiny_dirs["mistral"]), "--prune_method", "wanda", "--sparsity_ratio",
                   "0.45", "--nsamples", "8", "--seqlen", "64", "--calib_dataset", str(calib_file),
                   "--eval_datasets", str(calib_file), "--eval_seqlen", "128", "--eval_windows", "3",
                   "--save", str(out), "--save_model", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "45.00" in proc.stdout  # the summary
    results = json.loads((out / "results.json").read_text())
    assert results["sparsity"]["achieved"] == pytest.approx(0.45, abs=1e-4)
    assert all(abs(r["achieved"] - 0.45) < 1e-3 for r in results["sparsity"]["per_projection"])
    assert results["perplexity"][str(calib_file)]["windows"] == 3
    assert results["args"]["prune_method"] == "wanda" and results["args"]["seed"] == 0
    assert set(results["time_s"]) >= {"load", "calibration_data", "prune", "evaluate", "save_model"}
    assert results["versions"]["torch"] == torch.__version__
    assert results["memory"]["peak_rss_gib"] > 0
    assert results["checkpoint"]["safetensors_bytes"] > 0
    assert (out / "summary.txt").read_text().startswith("Mosaic")
    manifest = json.loads((ckpt / "mosaic.json").read_text())
    assert (manifest["method"] == "wanda"
            and manifest["sparsity"]["achieved"] == results["sparsity"]["achieved"])
    # the checkpoint holds exactly the achieved zeros
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    adapter = adapter_for(reloaded)
    zeros = sum(int((p.weight == 0).sum()) for layer in adapter.layers(reloaded)
                for p in adapter.projections(layer).values())
    assert zeros == results["sparsity"]["zeros"]
    # and --overwrite replaces the earlier run atomically
    proc = run_cli("--model", str(tiny_dirs["mistral"]), "--prune_method", "dense", "--eval_datasets", "none",
                   "--save", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "results.json").read_text())["args"]["prune_method"] == "dense"
    assert not (out / "model").exists() and not list(tmp_path.glob(".run.*"))


def test_after_commit_waits_for_the_directory_to_be_in_place(tmp_path):
    from mosaic.export import after_commit

    seen = []
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "model").mkdir()
        after_commit(tmp / "model", lambda: seen.append((tmp_path / "out" / "model").is_dir()))
        assert seen == []
    assert seen == [True]  # ran once the directory was renamed into place

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "failed") as tmp:
        after_commit(tmp, lambda: seen.append("failed"))
        raise RuntimeError("disk full")
    assert seen == [True] and not (tmp_path / "failed").exists()  # dropped with the failed directory

    after_commit(tmp_path / "elsewhere", lambda: seen.append("now"))  # no atomic_dir holds it: at once
    assert seen == [True, "now"]
