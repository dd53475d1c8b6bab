"""torchrun on CPU (gloo, 2 real processes) against one process: the same model, bit for bit where the
reductions make it so, within a stated tolerance where training sums gradients in another order.

Every comparison runs one thread per process (torchrun's default), so that each batch's forward adds in
the same order in both runs: a different thread count is a different model (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch(args: list[str], ranks: int, script: Path | None = None, timeout: int = 240
           ) -> subprocess.CompletedProcess:
    """The real entry point: ``python main.py`` for one process, ``torchrun`` for more."""
    entry = str(script or ROOT / "main.py")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*(prefix if ranks > 1 else [sys.executable]), entry, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=ENV)


def base(tiny_dirs, calib_file, family="llama", nsamples=8) -> list[str]:
    return ["--model", str(tiny_dirs[family]), "--calib_dataset", str(calib_file),
            "--nsamples", str(nsamples), "--seqlen", "64", "--calib_batch_size", "2",
            "--eval_datasets", str(calib_file), "--eval_seqlen", "64", "--eval_windows", "5", "--offline",
            "--overwrite"]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def differences(a: dict, b: dict) -> tuple[int, float, bool]:
    """Zero-pattern differences, largest weight difference, and whether every tensor is bit-identical."""
    assert a.keys() == b.keys()
    zeros = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
    largest = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    same = all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    return zeros, largest, same


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def pair(tmp_path: Path, args: list[str], script: Path | None = None) -> tuple[dict, dict]:
    """The same run in one process and on two ranks: their results.json."""
    out = {}
    for ranks in (1, 2):
        saves = ["--save", str(tmp_path / f"r{ranks}"), "--save_model", str(tmp_path / f"m{ranks}")]
        run = launch([*args, *saves], ranks, script)
        assert run.returncode == 0, run.stderr[-3000:]
        out[ranks] = json.loads((tmp_path / f"r{ranks}" / "results.json").read_text())
        out[f"stdout{ranks}"] = run.stdout
    return out[1], out[2], out


CASES = {
    "llama-sparsegpt": ("llama", ["--prune_method", "sparsegpt", "--sparsity_ratio", "0.5"]),
    "qwen2-wanda": ("qwen2", ["--prune_method", "wanda", "--sparsity_ratio", "0.5"]),
    "llama-magnitude": ("llama", ["--prune_method", "magnitude_mosaic", "--sparsity_ratio", "0.5"]),
    "llama-alps": ("llama", ["--prune_method", "alps", "--sparsity_ratio", "0.6", "--alps_max_iter", "30"]),
    "llama-2:4": ("llama", ["--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
                            "--sparsity_type", "2:4"]),
    "qwen2-composite": ("qwen2", ["--prune_method", "sparsegpt_mosaic", "--sparsity_ratio", "0.5",
                                  "--sparsity_type", "composite", "--structured_ratio", "0.25"]),
    "qwen2-composite-search": ("qwen2", ["--prune_method", "sparsegpt_search", "--sparsity_ratio", "0.5",
                                         "--sparsity_type", "composite", "--structured_ratio", "0.25",
                                         "--search_windows", "2", "--search_budget", "2"]),
    "llama-wanda-dense-stats": ("llama", ["--prune_method", "wanda_owl", "--sparsity_ratio", "0.5",
                                          "--calib_stats", "dense"]),
    # reference mode: the owners prune a layer's four groups at once (bf16 forwards: a working copy to sync)
    "llama-reference-mode": ("llama", ["--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
                                       "--no_true_sequential", "--calib_dtype", "bfloat16"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_prune_the_model_one_process_prunes(tmp_path, tiny_dirs, calib_file, case):
    family, extra = CASES[case]
    one, two, out = pair(tmp_path, [*base(tiny_dirs, calib_file, family), *extra])
    zeros, largest, same = differences(weights(tmp_path / "m1"), weights(tmp_path / "m2"))
    assert (zeros, largest, same) == (0, 0.0, True)  # tolerance 0: bit for bit
    assert two["perplexity"] == one["perplexity"]
    assert two["sparsity"]["achieved"] == one["sparsity"]["achieved"]
    # rank 0 alone writes: the same files, one summary on stdout
    for kind in "rm":
        assert names(tmp_path / f"{kind}2") == names(tmp_path / f"{kind}1")
    assert out["stdout2"].count("Mosaic —") == 1


def test_accelerate_launch_gives_the_same_model(tmp_path, tiny_dirs, calib_file):
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run = subprocess.run([*accelerate, str(ROOT / "main.py"), *args, "--save_model", str(tmp_path / "m2")],
                         capture_output=True, text=True, cwd=ROOT, timeout=240, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Mosaic —") == 1
    one = launch([*args, "--save_model", str(tmp_path / "m1")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert differences(weights(tmp_path / "m1"), weights(tmp_path / "m2")) == (0, 0.0, True)


def test_search_gives_one_process_map_and_model(tmp_path, tiny_dirs, calib_file):
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt_search", "--sparsity_ratio", "0.5",
            "--search_windows", "2", "--search_budget", "2"]
    one, two, _ = pair(tmp_path, args)
    assert two["search"]["fitness_kl"] == one["search"]["fitness_kl"]
    assert two["search"]["chosen"] == one["search"]["chosen"]
    assert differences(weights(tmp_path / "m1"), weights(tmp_path / "m2")) == (0, 0.0, True)


def test_reconstruction_sums_gradients_over_ranks(tmp_path, tiny_dirs, calib_file):
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.6",
            "--reconstruct", "layer", "--reconstruct_steps", "8", "--reconstruct_batch", "4"]
    one, two, _ = pair(tmp_path, args)
    a, b = weights(tmp_path / "m1"), weights(tmp_path / "m2")
    zeros, largest, _ = differences(a, b)
    assert zeros == 0
    assert largest < 1e-4  # Adam's normalised step magnifies the last bits of a near-zero summed gradient
    moved = differences(a, weights(tmp_path / "m1"))  # sanity of the helper
    assert moved == (0, 0.0, True)
    for r1, r2 in zip(one["recovery"]["reconstruct"]["layers"], two["recovery"]["reconstruct"]["layers"]):
        assert r2["error_after"] == pytest.approx(r1["error_after"], rel=1e-3)
        assert r2["error_after"] < r2["error_before"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp2_distillation_keeps_zeros_and_matches_one_process(tmp_path, tiny_dirs, calib_file, dtype):
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
            "--dtype", dtype, "--distill_steps", "6", "--distill_windows", "8", "--distill_batch", "4",
            "--distill_lr", "1e-3"]
    one, two, _ = pair(tmp_path, args)
    d1, d2 = one["recovery"]["distill"], two["recovery"]["distill"]
    assert d2["ranks"] == 2 and d2["sharding"] == "FSDP2"
    assert d2["held_out_kl_before"] == pytest.approx(d1["held_out_kl_before"], rel=1e-5)
    assert d2["held_out_kl_after"] == pytest.approx(d1["held_out_kl_after"], rel=1e-3)
    assert d2["held_out_kl_after"] < d2["held_out_kl_before"]
    assert d2["best_step"] == d1["best_step"]
    a, b = weights(tmp_path / "m1"), weights(tmp_path / "m2")
    zeros, largest, _ = differences(a, b)
    assert zeros == 0  # zeros stay zeros, exactly: the same pattern as one process, which keeps the kernel's
    assert two["sparsity"]["achieved"] == one["sparsity"]["achieved"]
    biggest = max(float(t.float().abs().max()) for t in a.values())
    # fp32: summation order only; bf16: at most two rounding steps of the largest weight
    assert largest <= (1e-5 if dtype == "float32" else 2 * biggest * 2 ** -8)


def test_the_guard_chooses_alike_on_one_and_two_ranks(tmp_path, tiny_dirs, calib_file):
    """Reconstruction summed over ranks, the guard's shares scored on every rank, FSDP2 distillation keeping
    only states no guard text finds worse: the same choices as one process."""
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.6",
            "--reconstruct", "layer", "--reconstruct_steps", "8", "--reconstruct_batch", "4",
            "--reconstruct_lr", "3e-2", "--recovery_guard", f"{calib_file},code", "--distill_steps", "4",
            "--distill_windows", "8",
            "--distill_batch", "4", "--distill_lr", "1e-3"]
    one, two, _ = pair(tmp_path, args)
    g1, g2 = one["recovery"]["reconstruct"]["guard"], two["recovery"]["reconstruct"]["guard"]
    assert g1["texts"] == g2["texts"] == [str(calib_file), "code"]
    assert g2["shares"] == g1["shares"]
    for r1, r2 in zip(one["recovery"]["reconstruct"]["layers"], two["recovery"]["reconstruct"]["layers"]):
        for e1, e2 in zip(r1["guard"]["nll"], r2["guard"]["nll"]):
            assert e1["share"] == e2["share"]
            assert all(e2[t] == pytest.approx(e1[t], rel=1e-3) for t in g1["texts"])
    d1, d2 = one["recovery"]["distill"], two["recovery"]["distill"]
    assert d2["best_step"] == d1["best_step"] and d2["ranks"] == 2
    for c1, c2 in zip(d1["curve"], d2["curve"]):
        assert all(c2["guard_ppl"][t] == pytest.approx(c1["guard_ppl"][t], rel=1e-3) for t in g1["texts"])
    assert differences(weights(tmp_path / "m1"), weights(tmp_path / "m2"))[0] == 0


KILLER = """
import os, sys
sys.path.insert(0, {root!r})
from mosaic import stream
from mosaic.cli import main

def die(index, _saved=stream._layer_saved):
    _saved(index)
    if index == 0 and os.environ.get("RANK") == "1":
        os._exit(1)  # rank 1 dies once layer 0 and its record are on disk

stream._layer_saved = die
raise SystemExit(main(prog="main.py"))
"""


def test_streamed_run_with_a_killed_rank_resumes_to_the_same_model(tmp_path, tiny_dirs, calib_file):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=str(ROOT)))
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
            "--offload", "disk", "--save_model", str(tmp_path / "m"), "--dist_timeout", "30"]
    started = time.monotonic()
    killed = launch(args, 2, killer)
    assert killed.returncode != 0 and time.monotonic() - started < 120
    assert not (tmp_path / "m").exists()
    partial = tmp_path / ".m.partial" / "stream-state"
    assert (partial / "inputs-00001.pt").is_file() and (partial / "inputs-00001.pt.rank1").is_file()
    other = launch([*args, "--resume"], 1)  # another rank count cannot continue it
    assert other.returncode == 2 and "--resume" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    resumed = launch([*args, "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    memory = launch([*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
                     "--offload", "none", "--save_model", str(tmp_path / "ref")], 1)
    assert memory.returncode == 0, memory.stderr[-3000:]
    assert differences(weights(tmp_path / "m"), weights(tmp_path / "ref")) == (0, 0.0, True)


HANGER = """
import os, sys, time
sys.path.insert(0, {root!r})
from mosaic import calibrate
from mosaic.cli import main

run_layer = calibrate._run_layer

def broken(adapter, layers, index, *args, **kwargs):
    if index == 1 and os.environ.get("RANK") == "1":
        if {hang}:
            time.sleep(600)  # a rank that hangs: the others give up after --dist_timeout
        os._exit(3)  # a rank that dies as layer 1 starts
    return run_layer(adapter, layers, index, *args, **kwargs)

calibrate._run_layer = broken
raise SystemExit(main(prog="main.py"))
"""


@pytest.mark.parametrize("hang", [False, True])
def test_a_dead_or_hung_rank_ends_the_run_with_one_line(tmp_path, tiny_dirs, calib_file, hang):
    script = tmp_path / "broken.py"
    script.write_text(HANGER.format(root=str(ROOT), hang=hang))
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
            "--save", str(tmp_path / "r"), "--dist_timeout", "10"]
    started = time.monotonic()
    run = launch(args, 2, script, timeout=200)
    assert run.returncode != 0
    assert time.monotonic() - started < 150
    ours = [line for line in run.stderr.splitlines() if line.startswith("main.py: error:")]
    assert len(ours) == 1 and "another rank died or the group timed out" in ours[0], run.stderr[-3000:]
    assert not (tmp_path / "r").exists()


FULL_DISK = """
import errno, os, sys
sys.path.insert(0, {root!r})
from mosaic import report
from mosaic.cli import main

def full(directory, results):
    raise OSError(errno.ENOSPC, "No space left on device")

if os.environ.get("RANK") == "0":
    report.write_record = full  # the writer fails in the last step; rank 1 must not wait for it
raise SystemExit(main(prog="main.py"))
"""


def test_a_failure_of_the_writer_reaches_every_rank(tmp_path, tiny_dirs, calib_file):
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK.format(root=str(ROOT)))
    args = [*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
            "--save", str(tmp_path / "r"), "--dist_timeout", "60"]
    started = time.monotonic()
    run = launch(args, 2, script, timeout=200)
    assert run.returncode != 0 and time.monotonic() - started < 50  # far below the timeout: no rank waited
    assert "No space left on device" in run.stderr
    assert "rank 1" in run.stderr  # rank 1 stopped with rank 0's error, not a timeout
    assert "timed out" not in run.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--nsamples", "2"], "--nsamples"),
    (["--distill_steps", "2", "--distill_batch", "3", "--distill_windows", "4"], "--distill_batch"),
    (["--device_map", "auto"], "--device_map"),
])
def test_bad_launch_settings_are_one_line(tmp_path, tiny_dirs, calib_file, extra, flag):
    run = launch([*base(tiny_dirs, calib_file), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
                  "--save", str(tmp_path / "r"), *extra], 2)
    ours = [line for line in run.stderr.splitlines() if line.startswith("main.py")]
    assert ours == [ours[0]] and ours[0].startswith(f"main.py: error: {flag}:"), run.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def _reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from mosaic import dist
    from mosaic.stats import InputStats

    torch.manual_seed(0)
    scales = torch.logspace(-3, 3, 32)
    batches = [torch.randn(3, 16, 32) * scales for _ in range(5)]
    stats = InputStats(32, torch.device("cpu"), hessian=True)
    for b in dist.mine(len(batches)):
        stats.add(batches[b])
    stats.reduced()
    # an order-sensitive float sum: 1e16 + 1 + ... depends on the order of the additions
    values = [(3, 1.0), (0, 1e16), (1, 1.0), (2, -1e16)]
    total = dist.ordered_sum([v for v in values if v[0] % world == rank])
    if rank == 0:
        torch.save({"sq": stats.sq, "h": stats.hessian(), "tokens": stats.tokens, "total": total}, out)
    torch.distributed.destroy_process_group()


def test_statistics_and_ordered_sums_do_not_depend_on_the_split(tmp_path):
    import socket

    from mosaic.stats import InputStats

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_reduce_worker, args=(2, port, str(out)), nprocs=2, join=True)
    two = torch.load(out)
    torch.manual_seed(0)
    scales = torch.logspace(-3, 3, 32)
    batches = [torch.randn(3, 16, 32) * scales for _ in range(5)]
    one = InputStats(32, torch.device("cpu"), hessian=True)
    for b in batches:
        one.add(b)
    one.reduced()
    assert two["tokens"] == one.tokens
    assert torch.equal(two["sq"], one.sq) and torch.equal(two["h"], one.hessian())
    assert two["total"] == sum(v for _, v in sorted([(3, 1.0), (0, 1e16), (1, 1.0), (2, -1e16)]))


def test_fsdp2_memory_check_counts_each_ranks_share_and_refuses_in_one_line(monkeypatch, tiny_dirs):
    from conftest import tiny_model

    from mosaic import fit, recover
    from mosaic.errors import OptionError

    model = tiny_model("llama", layers=8)  # gathering two layers at a time is a small share of eight
    one = recover.distill_need(model, recover.model_bytes(model), 64)
    two = recover.distill_need(model, recover.model_bytes(model), 64, ranks=2)
    assert two["device"]["teacher"] * 2 == one["device"]["teacher"]
    assert two["device"]["adam"] * 2 == one["device"]["adam"]
    assert sum(two["device"].values()) < sum(one["device"].values())
    spec = recover.DistillSpec(steps=2)
    monkeypatch.setattr(fit, "device_free", lambda device: 1)
    with pytest.raises(OptionError) as err:
        recover.distill_device(model, recover.model_bytes(model), torch.device("cuda"), 64, spec, 2**40,
                               ranks=2)
    assert "per rank (2 ranks, FSDP2)" in err.value.message and "more ranks" in err.value.message
    assert "\n" not in err.value.message


def test_the_launch_docs_name_what_the_tests_check():
    doc = (ROOT / "docs" / "distributed.md").read_text()
    for words in ("torchrun", "FSDP2", "--dist_timeout", "bit for bit"):
        assert words in doc


def test_the_fit_check_counts_the_largest_ranks_share(monkeypatch):
    from mosaic import dist
    from mosaic.options import Options, validate, workload

    opts = Options(prune_method="sparsegpt_search", nsamples=20, calib_batch_size=4, search_windows=5)
    plan = validate(opts)
    one = workload(opts, plan)
    monkeypatch.setattr(dist, "world", lambda: 2)
    two = workload(opts, plan)
    assert (one.nsamples, one.search_windows) == (20, 5)
    assert (two.nsamples, two.search_windows) == (12, 3)  # 5 batches of 4: 3 on rank 0; 5 windows: 3
