"""--config FILE (YAML or JSON): options keyed by the flag names, the command line over the file, bad files
and bad values as one-line errors; every --save directory holds a config.yaml that repeats its run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from mosaic.cli import build_parser, parse_options
from mosaic.options import Options


def small(model_dir: Path, calib: Path, *extra: str) -> list[str]:
    """A tiny run's flags: 4 windows of 32 tokens, no evaluation."""
    return ["--model", str(model_dir), "--nsamples", "4", "--seqlen", "32", "--calib_batch_size", "2",
            "--calib_dataset", str(calib), "--eval_datasets", "none", *extra]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def one_error_line(proc, *contains: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("main.py: error: "), lines[0]
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


def nothing_written(parent: Path, *names: str) -> bool:
    return not any((parent / n).exists() or list(parent.glob(f".{n}.*")) for n in names)


def test_saved_config_repeats_the_run_bit_for_bit(tmp_path, tiny_dirs, calib_file):
    flags = small(tiny_dirs["llama"], calib_file, "--prune_method", "sparsegpt_owl",
                  "--sparsity_ratio", "0.6", "--Lamda", "0.1", "--seed", "3", "--reconstruct", "layer",
                  "--reconstruct_steps", "2", "--reconstruct_lr", "1e-4", "--no_true_sequential")
    first = run_cli(*flags, "--save", str(tmp_path / "a"), "--save_model", str(tmp_path / "a-model"))
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "a" / "config.yaml"
    config = yaml.safe_load(saved.read_text())  # plain YAML 1.1 readers see the same values
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert config == results["args"]
    assert set(config) == {f for f in Options.__dataclass_fields__ if f != "extra"}
    assert config["save"] == str(tmp_path / "a") and config["reconstruct_lr"] == 1e-4
    assert config["true_sequential"] is False and config["eval_windows"] is None

    second = run_cli("--config", str(saved), "--save", str(tmp_path / "b"),
                     "--save_model", str(tmp_path / "b-model"))
    assert second.returncode == 0, second.stderr
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["args"] == {**results["args"], "save": str(tmp_path / "b"),
                             "save_model": str(tmp_path / "b-model")}
    assert again["sparsity"]["achieved"] == results["sparsity"]["achieved"]
    assert again["sparsity"]["per_projection"] == results["sparsity"]["per_projection"]
    a, b = tensors(tmp_path / "a-model"), tensors(tmp_path / "b-model")
    assert a and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == again["args"]


def test_command_line_overrides_the_file(tmp_path, tiny_dirs, calib_file):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_dirs['qwen2']}\nprune_method: magnitude\n"
                      f"sparsity_ratio: 0.5\nnsamples: 4\nseqlen: 32\neval_datasets: none\n"
                      f"calib_dataset: {calib_file}\nsave: {tmp_path / 'from-file'}\n")
    proc = run_cli("--config", str(config), "--sparsity_ratio", "0.25", "--save", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    args = json.loads((tmp_path / "out" / "results.json").read_text())["args"]
    assert args["sparsity_ratio"] == 0.25  # the flag
    assert args["prune_method"] == "magnitude" and args["model"] == str(tiny_dirs["qwen2"])  # the file
    assert not (tmp_path / "from-file").exists()


def test_json_config(tmp_path, tiny_dirs, calib_file):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": str(tiny_dirs["mistral"]), "prune_method": "wanda",
                                  "sparsity_ratio": 0.5, "sparsity_type": "2:4", "nsamples": 4, "seqlen": 32,
                                  "calib_batch_size": 2, "calib_dataset": str(calib_file),
                                  "eval_datasets": "none", "offline": True}))
    proc = run_cli("--config", str(config), "--save", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["args"]["sparsity_type"] == "2:4" and results["args"]["offline"] is True
    assert results["settings"]["nm"] == [[2, 4]] * 2  # per layer


def test_unknown_key_is_one_line_naming_it(tmp_path, tiny_dirs):
    config = tmp_path / "x.yaml"
    config.write_text(f"model: {tiny_dirs['llama']}\nsparsty_ratio: 0.5\n")
    proc = run_cli("--config", str(config), "--save", str(tmp_path / "out"))
    line = one_error_line(proc, f"--config {config}: unknown option 'sparsty_ratio'", "sparsity_ratio")
    assert line.endswith("(see --help)")
    assert nothing_written(tmp_path, "out")


def test_wrong_type_is_one_line_naming_the_key(tmp_path, tiny_dirs):
    config = tmp_path / "x.yaml"
    config.write_text(f"model: {tiny_dirs['llama']}\nnsamples: lots\n")
    proc = run_cli("--config", str(config), "--save", str(tmp_path / "out"))
    one_error_line(proc, "--nsamples", "'lots'", f"--config {config}")
    assert nothing_written(tmp_path, "out")


def test_malformed_yaml_is_one_line(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("nsamples: [4\nseqlen: 32\n")
    one_error_line(run_cli("--config", str(config), "--save", str(tmp_path / "out")),
                   f"--config {config}: not valid YAML", "line ")
    assert nothing_written(tmp_path, "out")


# --- in process: what the file's values become ------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_yaml_values_take_the_options_types(tmp_path):
    path = write(tmp_path, "sparsity_type: 2:4\nreconstruct_lr: 1e-4\noffline: true\nuniform_widths: no\n"
                           "true_sequential: false\neval_windows: all\nzs_limit: 5\nHyper_m: 6\n"
                           "device_map: {model.layers.0: 0}\n")
    opts = parse_options(["--config", path])
    assert opts.sparsity_type == "2:4"  # not 124, YAML 1.1's base 60
    assert opts.reconstruct_lr == 1e-4  # not the text '1e-4', as YAML 1.1 reads it
    assert opts.offline is True and opts.uniform_widths is False and opts.true_sequential is False
    assert opts.eval_windows is None and opts.zs_limit == 5 and opts.Hyper_m == 6
    assert json.loads(opts.device_map) == {"model.layers.0": 0}
    # flags win, both ways for a flag pair; and the file's store_true can be set on the command line
    assert parse_options(["--config", path, "--true_sequential", "--nsamples", "3"]).true_sequential is True
    assert parse_options(["--config", path, "--uniform_widths"]).uniform_widths is True


@pytest.mark.parametrize("text, flag, contains", [
    ("nsamples: '32'\n", "--nsamples", "whole number"),
    ("sparsity_ratio: half\n", "--sparsity_ratio", "must be a number"),
    ("offline: 'true'\n", "--offline", "True or False"),
    ("prune_method: 5\n", "--prune_method", "must be text"),
    ("seqlen: null\n", "--seqlen", "cannot be null"),
    ("offload: sometimes\n", "--offload", "not one of"),
])
def test_wrong_values_name_their_flag(capsys, tmp_path, text, flag, contains):
    from mosaic.cli import main

    path = write(tmp_path, text)
    assert main(["--config", path, "--save", str(tmp_path / "out")], prog="main.py") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"main.py: error: {flag}: ") and contains in line, line
    assert line.endswith(f"(from --config {path})"), line
    assert nothing_written(tmp_path, "out")


@pytest.mark.parametrize("name, text, contains", [
    ("missing.yaml", None, "no such file"),
    ("c.toml", "nsamples = 4\n", ".yaml, .yml or .json"),
    ("c.yaml", "- nsamples\n", "mapping of option names"),
    ("c.yaml", "nsamples: 4\nnsamples: 8\n", "'nsamples' is given twice"),
    ("c.yaml", "model: a\nmodel_name_or_path: b\n", "name the same option"),
    ("c.json", '{"nsamples": 4,}', "not valid JSON"),
    ("c.yaml", "config: other.yaml\n", "unknown option 'config'"),
])
def test_bad_files_are_one_usage_line(capsys, tmp_path, name, text, contains):
    path = str(tmp_path / name) if text is None else write(tmp_path, text, name)
    with pytest.raises(SystemExit) as exit_:
        parse_options(["--config", path])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"main.py: error: --config {path}: ") and contains in err[0]


def test_every_option_states_its_default_and_help_points_to_the_docs():
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text, d = action.help, action.default
        shown = ("on" if d else "off") if isinstance(d, bool) else "none" if d is None else \
            f"{d:g}" if isinstance(d, float) else str(d)
        assert "default" in text or f"({shown}" in text, (action.option_strings, text)
    assert "Choose a pipeline" in parser.epilog and "docs/" in parser.epilog
