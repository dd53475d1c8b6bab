"""Streaming when things go wrong: a failure while finishing, a damaged checkpoint, a leftover partial run,
a resume onto changed inputs. Finished work is never deleted, and nothing resumes onto a different run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_stream import LAYERS, assert_same_checkpoint, options, save_sharded

import mosaic
import mosaic.report as report
from mosaic import resume, shards, stream
from mosaic.cli import main
from mosaic.errors import OptionError
from mosaic.pipeline import run

SHARDS = [shards.shard_name(k, LAYERS + 2) for k in range(LAYERS + 2)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer) -> Path:
    return save_sharded(tmp_path_factory.mktemp("sharded-llama"), "llama", tokenizer)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, sharded, calib_file) -> Path:
    """The checkpoint of an uninterrupted streamed SparseGPT run."""
    out = tmp_path_factory.mktemp("whole") / "model"
    run(options(sharded, calib_file, out, prune_method="sparsegpt", offload="disk"))
    return out


class Killed(BaseException):
    """Stands for a kill: no ``except Exception`` in the run stops it."""


def interrupt_after(layer: int, opts) -> None:
    """Run ``opts`` in this process and stop it once layer ``layer`` is saved, as a kill there would."""
    def stop(index: int) -> None:
        if index == layer:
            raise Killed(index)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(stream, "_layer_saved", stop)
        with pytest.raises(Killed):
            run(opts)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_of(directory: Path, to: Path) -> Path:
    shutil.copytree(directory, to)
    return to


# --- 1. a failure while finishing keeps every shard ---------------------------------------------------

def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["tokenizer", "plots"])
def test_a_failure_while_finishing_keeps_the_shards_and_resume_finishes_bit_identically(
        tmp_path, sharded, calib_file, whole, where):
    from transformers import PreTrainedTokenizerBase

    out = tmp_path / "out"
    kw = dict(prune_method="sparsegpt", offload="disk")
    if where == "plots":  # results inside the checkpoint: one atomic directory, written after the shards
        kw["save"] = str(out / "run")
    with pytest.MonkeyPatch.context() as m:
        if where == "tokenizer":
            m.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
        else:
            m.setattr(report, "write_plots", full_disk)
        with pytest.raises(OSError, match="No space left"):
            run(options(sharded, calib_file, out, **kw))
    partial = tmp_path / ".out.partial"
    assert sorted(p.name for p in partial.glob("model-*.safetensors")) == SHARDS  # every shard is still there
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    resumed = run(options(sharded, calib_file, out, resume=True, **kw))
    assert resumed["streaming"]["resumed_from_layer"] == LAYERS  # nothing pruned again
    assert_same_checkpoint(whole, out)
    assert not partial.exists()


def test_a_streamed_run_saves_its_model_inside_its_results_directory(tmp_path, sharded, calib_file, whole):
    out = tmp_path / "run"  # the partial run used to live inside it, so the results could not replace it
    run(options(sharded, calib_file, out / "model", save=str(out), prune_method="sparsegpt", offload="disk"))
    assert_same_checkpoint(whole, out / "model")
    assert (out / "results.json").is_file() and not list(out.glob(".*")) and not list(tmp_path.glob(".*"))


# --- 2. a damaged checkpoint fails in one line, before any work ---------------------------------------

def truncate(file: Path, by: int = 100) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - by)


def test_a_truncated_shard_is_refused_in_one_line_before_any_work(tmp_path, sharded, calib_file, capsys):
    model = copy_of(sharded, tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    truncate(shard)
    out = tmp_path / "out"
    args = ["--model", str(model), "--nsamples", "4", "--seqlen", "32", "--calib_dataset", str(calib_file),
            "--eval_datasets", "none", "--save_model", str(out)]
    # in a fresh process with a time limit: reading this shard used to spin forever
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--offload", "disk"],
                          capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert main([*args, "--offload", "auto"]) == 2  # a damaged checkpoint is not loaded in memory instead
    for err in (proc.stderr.strip(), capsys.readouterr().err.strip()):
        assert (err.count("\n") == 0 and "error: --model: " in err and str(shard) in err
                and "truncated" in err), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_reading_past_the_end_of_a_shard_raises_instead_of_spinning(tmp_path, sharded):
    model = copy_of(sharded, tmp_path / "model")
    source = shards.ShardSource(model)  # whole when opened ...
    file = source.files["model.layers.2.mlp.down_proj.weight"]
    header, _ = shards._header(file)
    name = max(header, key=lambda n: header[n]["data_offsets"][1])  # the tensor at the end of the file
    truncate(file, by=64)  # ... and cut short afterwards
    got: dict = {}

    def read() -> None:
        try:
            source.read([name], torch.float32)
        except Exception as e:  # noqa: BLE001 (whatever it is, the test reports it)
            got["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the read loop spins at the end of the file"
    assert isinstance(got.get("error"), OptionError) and got["error"].option == "model"
    assert str(source.files[name]) in got["error"].message


@pytest.mark.parametrize("damage", ["missing", "header", "longer"])
def test_other_damaged_shards_are_refused_when_the_source_is_opened(tmp_path, sharded, damage):
    model = copy_of(sharded, tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    elif damage == "header":
        with open(shard, "r+b") as f:
            f.write((10**12).to_bytes(8, "little"))  # a header longer than the file
    else:
        with open(shard, "ab") as f:
            f.write(b"\0" * 8)
    with pytest.raises(OptionError) as e:
        shards.ShardSource(model)
    assert e.value.option == "model" and str(shard) in e.value.message


def test_shards_are_on_disk_before_their_name_is(tmp_path, monkeypatch):
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst) -> None:
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    path = tmp_path / "model-00001-of-00001.safetensors"
    shards.write_shard(path, {"w": torch.ones(3, 4)})
    (_, tmp), (_, src, dst), (_, directory) = events
    assert tmp == src and dst == str(path)  # the data, then the rename ...
    assert directory == str(tmp_path)  # ... then the directory entry


# --- 3. a leftover partial run is neither resumed nor discarded silently ------------------------------

def test_rerunning_without_resume_refuses_to_discard_finished_layers(tmp_path, sharded, calib_file, whole,
                                                                     capsys):
    out = tmp_path / "out"
    interrupt_after(1, options(sharded, calib_file, out, prune_method="sparsegpt", offload="disk"))
    partial = tmp_path / ".out.partial"
    before = snapshot(partial)
    assert json.loads((partial / "stream-state" / "progress.json").read_text())["next_layer"] == 2

    args = ["--model", str(sharded), "--prune_method", "sparsegpt", "--nsamples", "8", "--seqlen", "48",
            "--calib_batch_size", "3", "--calib_dataset", str(calib_file), "--eval_datasets", "none",
            "--seed", "1", "--offload", "disk", "--save_model", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert (err.count("\n") == 0 and "--resume" in err and "--overwrite" in err
            and "2 finished layers" in err), err
    assert snapshot(partial) == before and not out.exists()  # nothing deleted

    assert main([*args, "--overwrite"]) == 0  # discards them, on request, and starts over
    assert_same_checkpoint(whole, out)
    assert not partial.exists()


# --- 8. resume continues only the very same run -------------------------------------------------------

def change_weights(model: Path) -> None:
    """Other values in one layer's weight: the shard's size and header stay."""
    name = "model.layers.1.mlp.up_proj.weight"
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][name]
    header, base = shards._header(shard)
    start = base + header[name]["data_offsets"][0]
    with open(shard, "r+b") as f:
        f.seek(start)
        f.write(torch.full((16,), 0.5).numpy().tobytes())


def change_calibration(calib: Path) -> None:
    text = calib.read_text()
    calib.write_text(text.replace("the", "The", 1))  # same size, other text


@pytest.mark.parametrize("change", ["weights", "calibration", "version"])
def test_resume_refuses_when_the_checkpoint_calibration_text_or_version_changed(
        tmp_path, sharded, calib_file, monkeypatch, change):
    model = copy_of(sharded, tmp_path / "model")
    calib = Path(shutil.copy(calib_file, tmp_path / "calib.txt"))
    out = tmp_path / "out"
    interrupt_after(0, options(model, calib, out, prune_method="wanda", offload="disk"))
    partial = tmp_path / ".out.partial"
    before = snapshot(partial)
    if change == "weights":
        change_weights(model)
    elif change == "calibration":
        change_calibration(calib)
    else:
        monkeypatch.setattr(mosaic, "__version__", mosaic.__version__ + ".post1")
    with pytest.raises(OptionError) as e:
        run(options(model, calib, out, prune_method="wanda", offload="disk", resume=True))
    assert e.value.option == "resume" and "--overwrite" in e.value.message
    assert snapshot(partial) == before and not out.exists()


@pytest.mark.parametrize("change", ["dtype", "calib_dtype", "torch"])
def test_resume_refuses_when_auto_settings_resolve_otherwise_or_torch_changed(tmp_path, sharded, calib_file,
                                                                             monkeypatch, change):
    """The options say "auto" both times; what they resolved to did not match: a run killed on a GPU (bf16
    weights) resumed on a CPU (fp32), one calibrated in bf16 continued in fp32, or another torch."""
    from mosaic import pipeline

    model = copy_of(sharded, tmp_path / "model")
    out = tmp_path / "out"
    kw = dict(prune_method="wanda", offload="disk", dtype="auto", calib_dtype="auto")
    with pytest.MonkeyPatch.context() as first:
        if change == "dtype":  # as on a GPU: auto loads bf16
            first.setattr(stream, "resolve_dtype", lambda spec, device: torch.bfloat16)
        elif change == "calib_dtype":  # bf16 forwards where the resumed run has fp32 ones
            first.setattr(pipeline, "resolve_calib_dtype", lambda spec, dtype, device: torch.bfloat16)
        interrupt_after(0, options(model, calib_file, out, **kw))
    partial = tmp_path / ".out.partial"
    before = snapshot(partial)
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    with pytest.raises(OptionError) as e:
        run(options(model, calib_file, out, resume=True, **kw))
    assert e.value.option == "resume" and "\n" not in str(e.value) and "resolved dtype" in str(e.value)
    assert snapshot(partial) == before and not out.exists()


def test_the_identity_of_a_large_file_reads_its_ends_and_all_of_a_safetensors_header(tmp_path):
    file = tmp_path / "big.safetensors"
    header = b'{"w":{"dtype":"U8","shape":[4000],"data_offsets":[0,4000]}}'
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4000))
    first = resume.file_identity(file, sample=16)  # the header is longer than the sample: all of it counts
    with open(file, "r+b") as f:
        f.seek(8 + len(header) - 10)
        f.write(b"[0,4001]}}")
    assert resume.file_identity(file, sample=16) != first
