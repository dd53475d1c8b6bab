"""Recovery with the mask kept: reconstruction inside the layer-wise engine, and distillation afterwards.
Zeros stay zeros, 0 steps changes nothing, errors fall as theory says, bad knobs are one-line errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import run_cli, tiny_model
from safetensors.torch import load_file

from mosaic import recover
from mosaic.adapter import PROJECTIONS, adapter_for
from mosaic.calibrate import capture
from mosaic.errors import OptionError
from mosaic.pipeline import Options, run
from mosaic.prune import KERNELS, prune_model, uniform_map

LAYERS = 3


def windows(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def pruned(family: str, spec: recover.ReconstructSpec | None, *, kernel: str = "sparsegpt",
           mode: str = "sequential", nm=None, sparsity: float = 0.6):
    model = tiny_model(family, layers=LAYERS)
    adapter = adapter_for(model)
    recovery = recover.Reconstruction(adapter, spec) if spec is not None else None
    prune_model(model, adapter, KERNELS[kernel], uniform_map(LAYERS, sparsity), [nm] * LAYERS,
                capture(model, adapter, windows(), 4), mode=mode, recovery=recovery)
    return model, recovery


def kl_to_dense(model, dense, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(recover._kl(model(input_ids=ids).logits, dense(input_ids=ids).logits))


@pytest.mark.parametrize("mode", ["sequential", "reference"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_zero_steps_is_bit_identical_to_no_recovery(family, mode):
    """The whole plumbing runs (dense stream, targets, guard), yet nothing may move."""
    plain, _ = pruned(family, None, mode=mode)
    zero, recovery = pruned(family, recover.ReconstructSpec("sublayer", steps=0), mode=mode)
    assert len(recovery.layers) == LAYERS
    for (name, a), b in zip(plain.named_parameters(), zero.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("granularity", ["layer", "sublayer"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reconstruction_lowers_each_layers_error_and_the_models_kl(family, granularity):
    spec = recover.ReconstructSpec(granularity, steps=30, lr=1e-3, batch=4)
    plain, _ = pruned(family, None)
    tuned, recovery = pruned(family, spec)
    rows = recovery.layers
    assert [r["layer"] for r in rows] == list(range(LAYERS))
    assert all(r["error_after"] <= r["error_before"] for r in rows)
    # a real improvement, not noise
    assert sum(r["error_after"] < 0.95 * r["error_before"] for r in rows) >= 2
    dense = tiny_model(family, layers=LAYERS)
    held_out = windows(4, 32, seed=7)  # not the calibration windows
    assert kl_to_dense(tuned, dense, held_out) < kl_to_dense(plain, dense, held_out)


def test_reconstruction_is_deterministic_for_a_seed_and_differs_for_another():
    a, _ = pruned("llama", recover.ReconstructSpec("layer", steps=5, seed=3))
    b, _ = pruned("llama", recover.ReconstructSpec("layer", steps=5, seed=3))
    c, _ = pruned("llama", recover.ReconstructSpec("layer", steps=5, seed=4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("norms", [False, True])
def test_a_layer_that_tuning_would_make_worse_is_reset(norms):
    """With an absurd learning rate every step overshoots: the guard must give back the kernel's weights
    (and, with ``norms``, the norm scales and biases it also moved)."""
    plain, _ = pruned("qwen2", None)
    wild, recovery = pruned("qwen2", recover.ReconstructSpec("layer", steps=3, lr=10.0, norms=norms))
    assert not any(r["tuned"] for r in recovery.layers)
    for (name, p), q in zip(plain.named_parameters(), wild.parameters()):
        assert torch.equal(p, q), name


def unmasked(model) -> dict[str, torch.Tensor]:
    """Every layer's norm scales and projection biases, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if ".layers." in n and (n.endswith("layernorm.weight") or n.endswith("bias"))}


@pytest.mark.parametrize("granularity", ["layer", "sublayer"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_norms_and_biases_move_only_when_asked_and_zeros_stay_zeros(family, granularity, checked_tune):
    spec = recover.ReconstructSpec(granularity, steps=30, lr=1e-3, batch=4)
    untouched = unmasked(pruned(family, None)[0])
    assert any(n.endswith("bias") for n in untouched) == (family == "qwen2")  # the fixture has what it claims
    weights_only, _ = pruned(family, spec)
    assert all(torch.equal(untouched[n], p) for n, p in unmasked(weights_only).items())
    both, recovery = pruned(family, dataclasses.replace(spec, norms=True))
    moved = unmasked(both)
    tuned = {r["layer"] for r in recovery.layers if r["tuned"]}
    assert len(tuned) >= 2
    for name, before in untouched.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert torch.equal(before, moved[name]) == (layer not in tuned), name
    assert all(checked_tune) and len(checked_tune) == 2 * LAYERS
    assert all(r["error_after"] <= r["error_before"] for r in recovery.layers)
    assert recovery.report()["norms"] is True


def nonzero_sets(model) -> dict[str, torch.Tensor]:
    a = adapter_for(model)
    return {f"{i}.{p}": a.projection(layer, p).weight != 0 for i, layer in enumerate(a.layers(model))
            for p in PROJECTIONS}


@pytest.fixture
def checked_tune(monkeypatch):
    """Wraps the engine's reconstruction step: the nonzeros the kernel left must be exactly those after
    tuning."""
    calls = []
    original = recover.Reconstruction.tune

    def kept(adapter, layer) -> dict[str, torch.Tensor]:
        return {p: adapter.projection(layer, p).weight != 0 for p in PROJECTIONS}

    def tune(self, index, layer, *args, **kwargs):
        before = kept(self.adapter, layer)
        out = original(self, index, layer, *args, **kwargs)
        after = kept(self.adapter, layer)
        calls.append(all(torch.equal(before[p], after[p]) for p in PROJECTIONS))
        return out

    monkeypatch.setattr(recover.Reconstruction, "tune", tune)
    return calls


def small(model_dir, calib, **kw) -> Options:
    base = dict(model=str(model_dir), nsamples=4, seqlen=32, calib_batch_size=2, calib_dataset=str(calib),
                eval_datasets="none", seed=1)
    return Options(**{**base, **kw})


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "composite"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_zeros_stay_zeros_through_reconstruction_and_distillation(tmp_path, tiny_dirs, calib_file,
                                                                   checked_tune, family, kind):
    kw = dict(prune_method="sparsegpt", sparsity_ratio=0.5, sparsity_type=kind)
    if kind == "composite":
        kw.update(prune_method="sparsegpt_mosaic", structured_ratio=0.25)
    plain = run(small(tiny_dirs[family], calib_file, save_model=str(tmp_path / "plain"), **kw))
    recovered = run(small(tiny_dirs[family], calib_file, save_model=str(tmp_path / "rec"),
                          reconstruct="sublayer", reconstruct_steps=4, reconstruct_batch=2, distill_steps=2,
                          distill_windows=4, distill_batch=2, **kw))
    assert len(checked_tune) == 2 and all(checked_tune)  # each layer's nonzeros unchanged by its tuning
    assert recovered["recovery"]["reconstruct"]["tuned_layers"] >= 1
    # the kernel prunes exact counts whatever its inputs, and composite widths are planned before pruning
    assert recovered["sparsity"]["achieved"] == plain["sparsity"]["achieved"]
    assert recovered["sparsity"]["zeros"] == plain["sparsity"]["zeros"]
    if kind == "composite":
        assert recovered["composite"]["layers"] == plain["composite"]["layers"]
    weights = load_file(tmp_path / "rec" / "model.safetensors")
    if kind == "2:4":
        for name, w in weights.items():
            if name.endswith("proj.weight"):
                assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), name
    assert weights.keys() == load_file(tmp_path / "plain" / "model.safetensors").keys()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_distillation_keeps_the_mask_and_lowers_held_out_kl(family):
    student, _ = pruned(family, None, sparsity=0.7)
    teacher = recover.teacher_copy(tiny_model(family, layers=LAYERS))
    before = nonzero_sets(student)
    train, held_out = windows(16, 32, seed=1), windows(4, 32, seed=2)
    start = recover.held_out_kl(student, teacher, held_out, torch.device("cpu"))
    report = recover.distill(student, teacher, adapter_for(student), train, held_out,
                             recover.DistillSpec(steps=12, lr=3e-3, batch=4, eval_every=4))
    after = nonzero_sets(student)
    assert all(torch.equal(before[k], after[k]) for k in before)
    end = recover.held_out_kl(student, teacher, held_out, torch.device("cpu"))
    assert report["held_out_kl_before"] == pytest.approx(start)
    assert end == pytest.approx(report["held_out_kl_after"], rel=1e-5) and end < 0.95 * start
    assert not any(p.requires_grad for p in teacher.parameters())


def test_distillation_keeps_the_start_when_no_step_helps():
    student, _ = pruned("llama", None, sparsity=0.7)
    teacher = recover.teacher_copy(tiny_model("llama", layers=LAYERS))
    start = copy.deepcopy(student)
    report = recover.distill(student, teacher, adapter_for(student), windows(8, 32, seed=1),
                             windows(2, 32, seed=2),
                             recover.DistillSpec(steps=2, lr=50.0, batch=2, eval_every=1))
    assert report["best_step"] == 0
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), student.parameters()))


def test_a_run_records_per_layer_errors_time_and_a_plot(tmp_path, tiny_dirs, calib_file):
    out = tmp_path / "run"
    r = run(small(tiny_dirs["llama"], calib_file, prune_method="wanda", reconstruct="layer",
                  reconstruct_steps=3, save=str(out)))
    rec = r["recovery"]["reconstruct"]
    assert len(rec["layers"]) == 2 and rec["seconds"] > 0 and rec["granularity"] == "layer"
    assert {"error_before", "error_after", "tuned"} <= set(rec["layers"][0])
    assert "reconstruct" in (out / "summary.txt").read_text()
    assert (out / "reconstruction.png").is_file()
    assert json.loads((out / "results.json").read_text())["recovery"]["reconstruct"]["steps"] == 3


@pytest.mark.parametrize("kw", [dict(prune_method="magnitude"),
                                dict(prune_method="wanda", calib_stats="dense"),
                                dict(prune_method="wanda", true_sequential=False)],
                         ids=["magnitude", "wanda-dense", "reference"])
def test_reconstruction_works_with_kernels_that_read_no_engine_statistics(tmp_path, tiny_dirs, calib_file,
                                                                          kw):
    plain = run(small(tiny_dirs["qwen2"], calib_file, **kw))
    zero = run(small(tiny_dirs["qwen2"], calib_file, reconstruct="layer", reconstruct_steps=0, **kw))
    tuned = run(small(tiny_dirs["qwen2"], calib_file, reconstruct="layer", reconstruct_steps=8,
                      reconstruct_lr=1e-3, **kw))
    assert zero["sparsity"] == plain["sparsity"]
    assert tuned["sparsity"]["zeros"] == plain["sparsity"]["zeros"]
    assert (tuned["recovery"]["reconstruct"]["mean_error_after"]
            < tuned["recovery"]["reconstruct"]["mean_error_before"])


def test_reconstruction_prunes_the_searched_map_and_its_file_reapplies_it(tmp_path, tiny_dirs, calib_file,
                                                                         checked_tune):
    """The search scores maps without recovery, then the chosen map is pruned and reconstructed; the map
    written to --allocation_file, re-applied with reconstruction, gives the same zeros and the same
    per-layer reconstruction."""
    mapped = tmp_path / "map.json"
    recon = dict(reconstruct="layer", reconstruct_steps=4, reconstruct_batch=2, reconstruct_lr=1e-3)
    searched = run(small(tiny_dirs["llama"], calib_file, prune_method="sparsegpt_search", sparsity_ratio=0.6,
                         search_budget=2, search_windows=2, allocation_file=str(mapped), **recon))
    sparsity = json.loads(mapped.read_text())["sparsity"]
    assert len({round(s, 6) for row in sparsity for s in row.values()}) > 1  # a real, non-uniform map
    plain = run(small(tiny_dirs["llama"], calib_file, prune_method="sparsegpt", sparsity_ratio=0.6,
                      allocation_file=str(mapped)))
    filed = run(small(tiny_dirs["llama"], calib_file, prune_method="sparsegpt", sparsity_ratio=0.6,
                      allocation_file=str(mapped), **recon))
    assert all(checked_tune) and len(checked_tune) == 4  # two runs × two layers, nonzeros unchanged
    assert searched["sparsity"]["zeros"] == filed["sparsity"]["zeros"] == plain["sparsity"]["zeros"]
    rows = [r["recovery"]["reconstruct"]["layers"] for r in (searched, filed)]
    assert [x["error_after"] for x in rows[0]] == pytest.approx([x["error_after"] for x in rows[1]], rel=1e-5)
    assert all(x["error_after"] < x["error_before"] for x in rows[1])


@pytest.mark.parametrize("field, value", [
    ("reconstruct", "everything"), ("reconstruct_steps", -1), ("reconstruct_steps", 2.5),
    ("reconstruct_lr", 0.0), ("reconstruct_lr", -1e-3), ("reconstruct_lr", math.nan),
    ("reconstruct_batch", 0), ("distill_steps", -3), ("distill_lr", math.inf), ("distill_windows", 1),
    ("reconstruct_norms", "yes"), ("reconstruct_norms", 1),
    ("distill_batch", 65),  # more windows per step than --distill_windows (64) has: fewer were used silently
    ("distill_device", "gpu"),
])
def test_bad_recovery_knobs_are_refused_before_any_work(tmp_path, tiny_dirs, calib_file, field, value):
    with pytest.raises(OptionError) as err:
        run(small(tiny_dirs["llama"], calib_file, save=str(tmp_path / "out"),
                  **{"reconstruct": "layer", field: value}))
    assert err.value.option == field
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, flag", [
    (["--reconstruct", "layer", "--reconstruct_steps", "-2"], "--reconstruct_steps"),
    (["--reconstruct", "layer", "--reconstruct_lr", "0"], "--reconstruct_lr"),
    (["--reconstruct", "sublayer", "--reconstruct_lr", "nan"], "--reconstruct_lr"),
    (["--distill_steps", "5", "--offload", "disk"], "--distill_steps"),
    (["--distill_steps", "5", "--distill_windows", "4", "--distill_batch", "8"], "--distill_batch"),
    (["--reconstruct", "layer", "--prune_method", "sparsegpt", "--calib_stats", "dense"], "--reconstruct"),
])
def test_bad_recovery_flags_are_one_line_errors(tmp_path, tiny_dirs, calib_file, args, flag):
    proc = run_cli("--model", str(tiny_dirs["llama"]), "--calib_dataset", str(calib_file), "--eval_datasets",
                   "none", "--nsamples", "4", "--seqlen", "32", "--save_model", str(tmp_path / "m"), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and flag in proc.stderr
    assert not (tmp_path / "m").exists()


def test_distillation_that_cannot_fit_is_refused_before_any_work(tmp_path, tiny_dirs, calib_file,
                                                                  monkeypatch):
    from mosaic import fit

    monkeypatch.setattr(fit, "available_memory", lambda: 1000)
    with pytest.raises(OptionError, match="GiB") as err:
        run(small(tiny_dirs["llama"], calib_file, distill_steps=3, offload="none",
                  save=str(tmp_path / "out")))
    assert err.value.option == "distill_steps"
    assert not (tmp_path / "out").exists()


def test_knobs_without_their_switch_warn_in_one_line(tmp_path, tiny_dirs, calib_file, caplog):
    run(small(tiny_dirs["llama"], calib_file, reconstruct_steps=7, distill_lr=1e-4, reconstruct_norms=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--reconstruct_steps has no effect" in w for w in warnings)
    assert any("--reconstruct_norms has no effect" in w for w in warnings)
    assert any("--distill_lr has no effect" in w for w in warnings)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    from test_stream import save_sharded

    return save_sharded(tmp_path_factory.mktemp("sharded-recover"), "qwen2", tokenizer)


def test_streamed_reconstruction_equals_in_memory_and_a_killed_run_resumes_to_it(tmp_path, sharded,
                                                                                  calib_file):
    """The dense stream is saved with the pruned one after every layer: a run killed after layer 1 and
    resumed writes the very checkpoint (and reconstruction record) of an uninterrupted run, which is the
    in-memory run's."""
    from test_stream import assert_same_checkpoint, killed_after, options

    kw = dict(prune_method="sparsegpt", reconstruct="sublayer", reconstruct_steps=3, reconstruct_batch=2)
    memory = run(options(sharded, calib_file, tmp_path / "memory", offload="none", **kw))
    whole = run(options(sharded, calib_file, tmp_path / "whole", offload="disk", **kw))
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "whole")

    out = tmp_path / "resumed"
    killed = killed_after(1, "--model", str(sharded), "--prune_method", "sparsegpt", "--nsamples", "8",
                          "--seqlen", "48", "--calib_batch_size", "3", "--calib_dataset", str(calib_file),
                          "--eval_datasets", "none", "--seed", "1", "--offload", "disk", "--reconstruct",
                          "sublayer", "--reconstruct_steps", "3", "--reconstruct_batch", "2", "--save_model",
                          str(out))
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((tmp_path / ".resumed.partial" / "stream-state" / "progress.json").read_text())
    assert state["next_layer"] == 2 and state["dense_inputs"] == "dense-00002.pt"
    resumed = run(options(sharded, calib_file, out, offload="disk", resume=True, **kw))
    assert resumed["streaming"]["resumed_from_layer"] == 2
    assert_same_checkpoint(tmp_path / "whole", out)

    def record(r):
        return [{k: v for k, v in row.items() if k != "seconds"}
                for row in r["recovery"]["reconstruct"]["layers"]]

    assert record(resumed) == record(whole) == record(memory) and len(record(whole)) == 3


def test_reconstruct_norms_is_a_cli_switch_off_by_default():
    from mosaic.cli import parse_options

    assert parse_options(["--reconstruct", "layer", "--reconstruct_norms"]).reconstruct_norms is True
    assert parse_options([]).reconstruct_norms is False
    assert recover.ReconstructSpec().norms is False
