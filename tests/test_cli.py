"""Bad input: one line naming the flag and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from mosaic.cli import main


def expect_usage_error(capsys, argv: list[str], flag: str, *, contains: str = "") -> str:
    rc = main(argv, prog="main.py")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"main.py: error: {flag}"), last
    assert contains in last
    return last


def small_run(model_dir: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--nsamples", "4", "--seqlen", "32", "--calib_dataset", str(calib),
            "--eval_datasets", str(calib), "--eval_seqlen", "64", "--eval_windows", "2", "--save", str(out),
            *extra]


def nothing_written(parent: Path, name: str = "out") -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


@pytest.mark.parametrize("argv, flag, contains", [
    (["--prune_method", "wandaa"], "--prune_method", "choose from"),
    (["--sparsity_ratio", "1.0"], "--sparsity_ratio", "[0, 1)"),
    (["--sparsity_ratio", "-0.1"], "--sparsity_ratio", "[0, 1)"),
    (["--sparsity_type", "2:4", "--sparsity_ratio", "0.6"], "--sparsity_type", "--sparsity_ratio 0.5"),
    (["--sparsity_type", "blocky"], "--sparsity_type", "N:M"),
    (["--sparsity_type", "4:2"], "--sparsity_type", "0 < N < M"),
    (["--prune_method", "sparsegpt_mosaic", "--sparsity_type", "2:4"], "--sparsity_type",
     "wanda_owl_structure"),
    (["--prune_method", "wanda_owl_structure", "--sparsity_type", "unstructured"], "--sparsity_type", "N:M"),
    (["--nsamples", "0"], "--nsamples", "> 0"),
    (["--seqlen", "-5"], "--seqlen", "> 0"),
    (["--eval_windows", "0"], "--eval_windows", "> 0"),
    (["--calib_dataset", "no-such-dataset"], "--calib_dataset", "unknown dataset"),
    (["--eval_datasets", "wiki-offline,nope.txt"], "--eval_datasets", "unknown dataset"),
    (["--allocation", "random"], "--allocation", "owl"),
    (["--calib_dtype", "int8"], "--calib_dtype", "bfloat16"),
    (["--model", "./no/such/model"], "--model", "does not exist"),
    (["--model", "/tmp/definitely-missing.gguf"], "--model", "does not exist"),
    (["--structured_ratio", "0.2"], "--structured_ratio", "--sparsity_type composite"),
    (["--prune_method", "wanda", "--sparsity_type", "composite", "--sparsity_ratio", "0.3",
      "--structured_ratio", "0.5"],
     "--structured_ratio", "[0, --sparsity_ratio 0.3]"),
    (["--prune_method", "magnitude", "--sparsity_type", "composite"], "--sparsity_type",
     "Wanda, SparseGPT or ALPS"),
    (["--uniform_widths"], "--uniform_widths", "composite"),
    (["--eval_dtype", "int4"], "--eval_dtype", "bfloat16"),
    (["--eval_zero_shot", "boolq,nope", "--offline"], "--eval_zero_shot", "offline tasks are"),
    (["--zs_limit", "0"], "--zs_limit", "> 0"),
])
def test_bad_flags_fail_fast_with_one_line(capsys, tmp_path, argv, flag, contains):
    expect_usage_error(capsys, [*argv, "--save", str(tmp_path / "out")], flag, contains=contains)
    assert nothing_written(tmp_path)


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2")
    expect_usage_error(capsys, ["--model", str(tmp_path / "gpt2"), "--save", str(tmp_path / "out")],
                       "--model", contains="not supported")
    assert nothing_written(tmp_path)


def test_existing_output_needs_overwrite(capsys, tmp_path, tiny_dirs, calib_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], calib_file, tmp_path / "out"), "--save",
                       contains="--overwrite")
    assert (tmp_path / "out" / "results.json").read_text() == "{}"  # untouched
    expect_usage_error(capsys, ["--save_model", str(tmp_path / "out")], "--save_model",
                       contains="--overwrite")


def test_unreadable_and_too_short_calibration_data(capsys, tmp_path, tiny_dirs, calib_file):
    def small_run(model_dir, calib, out):  # a good evaluation text: it is read (and checked) first
        return globals()["small_run"](model_dir, calib, out, "--eval_datasets", str(calib_file))

    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 100)
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], binary, tmp_path / "out"), "--calib_dataset",
                       contains="cannot read")
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one window.")
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], short, tmp_path / "out"), "--calib_dataset",
                       contains="--seqlen")
    bad_jsonl = tmp_path / "rows.jsonl"
    bad_jsonl.write_text('{"title": "no text field"}\n')
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], bad_jsonl, tmp_path / "out"), "--calib_dataset",
                       contains="'text'")
    assert nothing_written(tmp_path)


def test_a_run_failing_after_pruning_leaves_no_output(capsys, tmp_path, tiny_dirs, calib_file):
    short = tmp_path / "short.txt"
    short.write_text("A few words only. " * 3)
    argv = small_run(tiny_dirs["llama"], calib_file, tmp_path / "out", "--save_model",
                     str(tmp_path / "model"))
    argv[argv.index("--eval_datasets") + 1] = str(short)
    expect_usage_error(capsys, argv, "--eval_datasets", contains="fewer than one window")
    assert nothing_written(tmp_path) and nothing_written(tmp_path, "model")


def test_allocation_file_for_another_model_is_rejected(capsys, tmp_path, tiny_dirs, calib_file):
    bad = tmp_path / "alloc.json"
    row = dict.fromkeys(["q", "k", "v", "o", "gate", "up", "down"], 0.5)
    bad.write_text(json.dumps({"target": 0.5, "sparsity": [row] * 5}))
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], calib_file, tmp_path / "out", "--prune_method",
                                         "wanda_mosaic", "--allocation_file", str(bad)),
                       "--allocation_file", contains="5 layers")
    assert nothing_written(tmp_path)
    bad.write_text(json.dumps({"target": 0.6, "sparsity": [row] * 2}))  # made for another target
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], calib_file, tmp_path / "out", "--prune_method",
                                         "wanda", "--sparsity_ratio", "0.5", "--allocation_file", str(bad)),
                       "--allocation_file", contains="--sparsity_ratio 0.6")
    # N:M per layer
    bad.write_text(json.dumps({"target": 0.5, "sparsity": [row] * 2, "nm": [[3, 4], [1, 4]]}))
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], calib_file, tmp_path / "out", "--prune_method",
                                         "wanda", "--sparsity_ratio", "0.5", "--allocation_file", str(bad)),
                       "--allocation_file", contains="--sparsity_type N:4")
    expect_usage_error(capsys, small_run(tiny_dirs["llama"], calib_file, tmp_path / "out", "--prune_method",
                                         "wanda", "--sparsity_ratio", "0.5", "--sparsity_type", "4:8",
                                         "--allocation_file", str(bad)),
                       "--allocation_file", contains="M=4, but --sparsity_type is 4:8")
    assert nothing_written(tmp_path)


def test_real_entry_point_reports_argparse_errors_on_one_line(tmp_path):
    proc = run_cli("--sparsity_ratio", "half")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--sparsity_ratio" in proc.stderr
    proc = run_cli("--prune_method", "nope", "--save", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "main.py: error: --prune_method: unknown method 'nope'; choose from " + ", ".join(
            __import__("mosaic.prune", fromlist=["METHODS"]).METHODS) )


def test_true_sequential_flag_spellings():
    from mosaic.cli import parse_options

    assert parse_options([]).true_sequential is True
    assert parse_options(["--no_true_sequential"]).true_sequential is False  # the reference code's spelling
    assert parse_options(["--no-true_sequential"]).true_sequential is False
