"""--kv_allocation through a whole run: measured on calibration text, written to and re-applied from
--kv_allocation_file bit for bit, refused in one line for another target, model or option clash, and
reported from the caches evaluation really built."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from mosaic.errors import OptionError
from mosaic.options import validate
from mosaic.pipeline import Options, run


def kv_opts(model_dir, calib, **kw) -> Options:
    base = dict(model=str(model_dir), prune_method="dense", eval_datasets=str(calib), eval_seqlen=128,
                eval_windows=3, calib_dataset=str(calib), kv_sparsity=0.5, kv_window=16)
    return Options(**{**base, **kw})


def test_a_head_allocation_is_measured_written_and_reapplied_bit_for_bit(tiny_dirs, calib_file, tmp_path):
    model, mapped = tiny_dirs["qwen2"], tmp_path / "kv.json"  # GQA: 2 KV heads, head_dim 16
    first = run(kv_opts(model, calib_file, kv_allocation="head", kv_allocation_file=str(mapped),
                        save=str(tmp_path / "first")))
    kv = first["kv_cache"]
    assert kv["allocation"] == "head" and kv["source"] == "head" and kv["sensitivity_s"] > 0
    doc = json.loads(mapped.read_text())
    assert len(doc["k"]) == 2 and all(len(row) == 2 for row in doc["k"])  # layers × KV heads
    assert len({s for row in doc["k"] + doc["v"] for s in row}) > 1  # a real, non-uniform map
    assert kv["planned"]["k"] == pytest.approx(0.5, abs=1 / 32)  # within half an entry of 2 × 2 × 16
    assert kv["achieved"]["k"] == pytest.approx(kv["planned"]["k"], abs=1e-9)  # every old token pruned
    again = run(kv_opts(model, calib_file, kv_allocation_file=str(mapped)))
    assert again["kv_cache"]["source"] == f"file:{mapped}" and again["kv_cache"]["map"] == kv["map"]
    name = str(calib_file)
    assert again["perplexity"][name]["ppl"] == first["perplexity"][name]["ppl"]  # bit for bit
    assert "kv learned" in (tmp_path / "first" / "summary.txt").read_text()


def test_achieved_is_measured_on_the_evaluated_caches_not_assumed(tiny_dirs, calib_file):
    """A window that covers every token prunes nothing: the record says so instead of the target."""
    r = run(kv_opts(tiny_dirs["llama"], calib_file, kv_window=128))
    assert r["kv_cache"]["planned"]["k"] == 0.5 and r["kv_cache"]["achieved"]["k"] == 0.0


def test_kv_allocation_files_for_another_run_are_refused_in_one_line(tiny_dirs, calib_file, tmp_path):
    mapped = tmp_path / "kv.json"
    run(kv_opts(tiny_dirs["llama"], calib_file, kv_allocation="layer", kv_allocation_file=str(mapped)))
    other_target = run_cli("--model", str(tiny_dirs["llama"]), "--prune_method", "dense", "--eval_datasets",
                           str(calib_file), "--eval_seqlen", "128", "--eval_windows", "2",
                           "--kv_sparsity", "0.7", "--kv_allocation_file", str(mapped),
                           "--save", str(tmp_path / "no"))
    assert other_target.returncode == 2 and not (tmp_path / "no").exists()
    assert "--kv_allocation_file" in other_target.stderr and "Traceback" not in other_target.stderr
    doc = json.loads(mapped.read_text())
    doc["kv_heads"], doc["k"], doc["v"] = doc["kv_heads"] * 2, doc["k"] * 2, doc["v"] * 2  # 4 layers
    (tmp_path / "deeper.json").write_text(json.dumps(doc))
    with pytest.raises(OptionError, match="has 4 layers; this model has 2") as refused:
        run(kv_opts(tiny_dirs["llama"], calib_file, kv_allocation_file=str(tmp_path / "deeper.json")))
    assert refused.value.option == "kv_allocation_file"


@pytest.mark.parametrize(("kw", "option"), [
    (dict(kv_allocation="bogus"), "kv_allocation"),
    (dict(kv_allocation="bogus", kv_sparsity=None), "kv_allocation"),  # invalid even where unused
    (dict(kv_allocation="head", kv_reference=True), "kv_reference"),
    (dict(kv_allocation="layer", kv_sparsity=0.97), "kv_sparsity"),
])
def test_bad_kv_allocation_options_are_refused_before_any_work(tiny_dirs, calib_file, kw, option):
    with pytest.raises(OptionError) as refused:
        validate(kv_opts(tiny_dirs["llama"], calib_file, **kw))
    assert refused.value.option == option


def test_kv_allocation_without_kv_sparsity_warns_once(tiny_dirs, calib_file, caplog):
    with caplog.at_level("WARNING"):
        validate(kv_opts(tiny_dirs["llama"], calib_file, kv_sparsity=None, kv_allocation="layer"))
    assert any("--kv_allocation has no effect" in r.message for r in caplog.records)


def test_a_kv_file_for_another_granularity_or_window_is_refused_and_an_unused_one_warns(tiny_dirs, calib_file,
                                                                                       tmp_path, caplog):
    """The file used to be applied whatever --kv_allocation and --kv_window said, and a uniform run given a
    new file path wrote nothing and said nothing."""
    mapped = tmp_path / "kv.json"
    run(kv_opts(tiny_dirs["qwen2"], calib_file, kv_allocation="head", kv_allocation_file=str(mapped)))
    assert json.loads(mapped.read_text())["window"] == 16
    base = ["--model", str(tiny_dirs["qwen2"]), "--prune_method", "dense", "--eval_datasets", str(calib_file),
            "--eval_seqlen", "128", "--eval_windows", "2", "--kv_sparsity", "0.5", "--kv_allocation_file",
            str(mapped), "--save", str(tmp_path / "no")]
    for extra, says in ((["--kv_allocation", "layer", "--kv_window", "16"], "--kv_allocation head"),
                        (["--kv_allocation", "head", "--kv_window", "32"], "--kv_window 16")):
        proc = run_cli(*base, *extra)
        assert proc.returncode == 2 and not (tmp_path / "no").exists(), proc.stderr[-1000:]
        assert proc.stderr.strip().count("\n") == 0 and says in proc.stderr, proc.stderr
    with caplog.at_level("WARNING"):
        validate(kv_opts(tiny_dirs["qwen2"], calib_file, kv_allocation_file=str(tmp_path / "new.json")))
    assert any("--kv_allocation_file has no effect" in r.message for r in caplog.records)
