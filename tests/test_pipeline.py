"""Trustworthy runs: one statistics source for every method, the checkpoint written before evaluation,
and the defects that once slipped through (each test fails on the code that had them)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from mosaic.pipeline import Options, run


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def small(model_dir: Path, calib: Path, **kw) -> Options:
    base = dict(model=str(model_dir), nsamples=8, seqlen=48, calib_batch_size=4, calib_dataset=str(calib),
                eval_datasets="none", seed=1)
    return Options(**{**base, **kw})


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize("stats", ["sequential", "dense"])
@pytest.mark.parametrize("kernel", ["wanda", "sparsegpt", "alps"])
def test_the_same_map_gives_bit_identical_weights_whichever_method_name_applies_it(
        tmp_path, tiny_dirs, calib_file, kernel, stats):
    """{kernel}_mosaic writes its map; {kernel} applying that file must give the very same model, and so
    must {kernel}_mosaic with λ = 0 and plain {kernel} (both uniform). The statistics source follows the
    knob in every case."""
    model, S = tiny_dirs["qwen2"], 0.6
    mapped = tmp_path / "map.json"
    run(small(model, calib_file, prune_method=f"{kernel}_mosaic", sparsity_ratio=S, calib_stats=stats,
              allocation_file=str(mapped), save_model=str(tmp_path / "mosaic")))
    doc = json.loads(mapped.read_text())
    assert len({v for row in doc["sparsity"] for v in row.values()}) > 1  # a real non-uniform map
    run(small(model, calib_file, prune_method=kernel, sparsity_ratio=S, calib_stats=stats,
              allocation_file=str(mapped), save_model=str(tmp_path / "file")))
    assert_same_weights(tmp_path / "mosaic", tmp_path / "file")

    run(small(model, calib_file, prune_method=kernel, sparsity_ratio=S, calib_stats=stats,
              save_model=str(tmp_path / "uniform")))
    run(small(model, calib_file, prune_method=f"{kernel}_mosaic", sparsity_ratio=S, calib_stats=stats,
              Lamda=0.0, save_model=str(tmp_path / "lamda0")))
    assert_same_weights(tmp_path / "uniform", tmp_path / "lamda0")
    assert not torch.equal(weights(tmp_path / "uniform")["model.layers.1.mlp.up_proj.weight"],
                           weights(tmp_path / "file")["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("kernel", ["wanda", "sparsegpt"])
def test_the_statistics_source_is_what_prunes_the_weights(tmp_path, tiny_dirs, calib_file, kernel):
    """Layer 0 sees the same (dense) inputs either way; layer 1 sees pruned inputs only under sequential
    statistics. (Reference mode, so that layer 0's groups all see the dense layer input too.)"""
    model = tiny_dirs["llama"]
    results = {}
    for stats in ("sequential", "dense"):
        out = tmp_path / stats
        results[stats] = run(small(model, calib_file, prune_method=kernel, sparsity_ratio=0.5,
                                   calib_stats=stats, true_sequential=False, save_model=str(out)))
    assert results["dense"]["settings"]["mode"] == "dense"
    assert results["sequential"]["settings"]["mode"] == "reference"
    seq, dense = weights(tmp_path / "sequential"), weights(tmp_path / "dense")
    for name in seq:
        if ".layers.0." in name:
            if kernel == "wanda":  # same statistics and mask; SparseGPT's update is the same math too
                assert torch.equal(seq[name], dense[name]), name
            else:
                assert torch.allclose(seq[name], dense[name], atol=1e-5), name
    assert not torch.equal(seq["model.layers.1.self_attn.q_proj.weight"],
                           dense["model.layers.1.self_attn.q_proj.weight"])


def test_sparsity_zero_computes_no_statistics(tiny_dirs, calib_file):
    r = run(small(tiny_dirs["llama"], calib_file, prune_method="sparsegpt", sparsity_ratio=0.0))
    assert "calibration_data" not in r["time_s"] and "prune" not in r["time_s"]
    assert r["settings"]["mode"] is None and r["sparsity"]["achieved"] == 0.0


def test_magnitude_reports_no_engine_mode_and_phases_do_not_double_count(tiny_dirs, calib_file):
    r = run(small(tiny_dirs["llama"], calib_file, prune_method="magnitude", sparsity_ratio=0.5))
    assert r["settings"]["mode"] is None and r["settings"]["calib_stats"] is None
    assert "calibration_data" not in r["time_s"]
    r = run(small(tiny_dirs["llama"], calib_file, prune_method="sparsegpt_mosaic", sparsity_ratio=0.5))
    assert {"profile", "prune"} <= set(r["time_s"])
    assert r["settings"]["calib_stats"] == "sequential" and r["settings"]["mode"] == "sequential"


def test_owl_structure_defaults_do_something_and_a_uniform_plan_warns(tiny_dirs, calib_file, tmp_path,
                                                                       caplog):
    base = dict(prune_method="wanda_owl_structure", sparsity_type="5:8", sparsity_ratio=0.625)
    model = tiny_dirs["llama"]
    r = run(small(model, calib_file, **base, Hyper_m=1.5))  # tiny random models have few outliers
    assert r["settings"]["Lamda"] == 2.0
    assert len({tuple(x) for x in r["settings"]["nm"]}) > 1  # N differs between layers
    for row in r["sparsity"]["per_projection"]:
        n, m = r["settings"]["nm"][row["layer"]]
        assert row["achieved"] == pytest.approx(n / m)
    with caplog.at_level("WARNING"):
        r = run(small(model, calib_file, **base, Hyper_m=1.5, Lamda=0.08))
    assert len({tuple(x) for x in r["settings"]["nm"]}) == 1
    assert "raise --Lamda" in caplog.text


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, tiny_dirs, calib_file, capsys):
    from transformers import AutoModelForCausalLM

    from mosaic.cli import main

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "bad")
    for f in Path(tiny_dirs["llama"]).glob("tokenizer*"):
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    rc = main(["--model", str(tmp_path / "bad"), "--calib_dataset", str(calib_file), "--nsamples", "2",
               "--seqlen", "32", "--eval_datasets", "none", "--save", str(tmp_path / "out")], prog="main.py")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("main.py: error: --model: weight model.layers.1.mlp.up_proj.weight "
                                      "holds NaN")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--Lamda", "--Hyper_m", "--percdamp", "--structured_ratio"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_knobs_are_refused(capsys, tmp_path, flag, value):
    from mosaic.cli import main

    rc = main([flag, value, "--save", str(tmp_path / "out")], prog="main.py")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith(f"main.py: error: {flag}: must be a finite number"), err


def test_unwritable_output_is_refused_before_any_work(capsys, tmp_path):
    from mosaic.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # /proc: not even root writes
    for argv, flag in ((["--save", str(blocker / "out")], "--save"),
                       (["--save_model", "/proc/mosaic-test/model"], "--save_model")):
        rc = main(["--prune_method", "dense", *argv], prog="main.py")
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and err.startswith(f"main.py: error: {flag}: "), err


def test_damping_escalations_are_in_the_summary():
    from mosaic.report import summary_text

    r = {"args": {"model": "m", "prune_method": "sparsegpt", "sparsity_type": "unstructured", "save": None},
         "settings": {"mode": "sequential", "allocation": "uniform"},
         "sparsity": {"target": 0.5, "achieved": 0.5, "zeros": 5, "projection_params": 10},
         "parameters": {"before": {"total": 10, "nonzero": 10, "bytes": 40},
                        "after": {"total": 10, "nonzero": 5, "bytes": 40}},
         "perplexity": {}, "notes": [{"layer": 3, "projection": "down", "damp": 0.1},
                                     {"layer": 4, "projection": "q", "damp": 1.0}]}
    text = summary_text(r)
    assert "damping" in text and "2 projections" in text and "1 × mean diag" in text


# --- a finished pruning is never lost ---------------------------------------------------------------

def long_text(tmp_path: Path, calib_file: Path) -> Path:
    path = tmp_path / "long.txt"
    path.write_text(calib_file.read_text() * 12)
    return path


def test_ctrl_c_during_evaluation_keeps_a_loadable_checkpoint(tmp_path, tiny_dirs, calib_file):
    out, ckpt = tmp_path / "run", tmp_path / "model"
    cmd = [sys.executable, str(ROOT / "main.py"), "--model", str(tiny_dirs["llama"]), "--prune_method",
           "sparsegpt", "--sparsity_ratio", "0.5", "--nsamples", "4", "--seqlen", "32", "--calib_dataset",
           str(calib_file), "--eval_datasets", f"{calib_file},{long_text(tmp_path, calib_file)}",
           "--eval_seqlen", "128", "--save", str(out), "--save_model", str(ckpt)]
    # SIGINT back to default in the child: a test run started in the background (`cmd &`) ignores SIGINT,
    # and an ignored signal is inherited, so Python would never raise KeyboardInterrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    results = out / "results.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until the first text's perplexity is recorded
        if results.exists() and json.loads(results.read_text())["perplexity"]:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("main.py: error: evaluation interrupted; the pruned run is saved in"), last
    r = json.loads(results.read_text())
    assert r["evaluation"]["status"] == "interrupted"
    assert list(r["perplexity"]) == [str(calib_file)]  # what finished is kept
    assert math.isfinite(r["perplexity"][str(calib_file)]["ppl"])
    check = ("import sys; from transformers import AutoModelForCausalLM as A; "
             "m = A.from_pretrained(sys.argv[1]); "
             "w = m.model.layers[0].self_attn.q_proj.weight; print(int((w == 0).sum()), w.numel())")
    done = subprocess.run([sys.executable, "-c", check, str(ckpt)], capture_output=True, text=True,
                          timeout=300)
    zeros, numel = map(int, done.stdout.split())
    assert zeros == numel // 2


def test_a_failed_evaluation_keeps_the_checkpoint_and_says_so_in_one_line(tmp_path, tiny_dirs, calib_file):
    """The zero-shot data cannot be written (under /proc, which not even root may write): the zero-shot part
    fails after perplexity is done."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main.py"), "--model", str(tiny_dirs["llama"]), "--prune_method",
           "wanda", "--nsamples", "4", "--seqlen", "32", "--calib_dataset", str(calib_file),
           "--eval_datasets", str(calib_file), "--eval_seqlen", "64", "--eval_windows", "2",
           "--eval_zero_shot", "arc_easy", "--zs_limit", "2", "--offline", "--save", str(out),
           "--save_model", str(out / "model")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "MOSAIC_ZS_DATA": "/proc/mosaic-test/zs"})
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("main.py: error: evaluation failed (") and str(out) in last, last
    r = json.loads((out / "results.json").read_text())
    assert r["evaluation"]["status"] == "failed" and r["perplexity"][str(calib_file)]["windows"] == 2
    assert (out / "model" / "model.safetensors").exists()
