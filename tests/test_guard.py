"""The recovery guard: the reconstruction shrunk toward the kernel's weights until no guard text is worse.
Its choice equals an oracle over the shares, the mask holds, its windows are disjoint from every other role,
and bad guards are one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import run_cli, tiny_model
from test_recover import LAYERS, small, windows

from mosaic import recover
from mosaic.adapter import PROJECTIONS, adapter_for
from mosaic.calibrate import capture
from mosaic.data import draw_windows, guard_windows, source_counts
from mosaic.errors import OptionError
from mosaic.pipeline import run
from mosaic.prune import KERNELS, prune_model, uniform_map

SPEC = recover.ReconstructSpec(steps=12, lr=1e-2, batch=4)  # a rate whose tuning some layers keep, some not


def pruned_with_guard(family: str, texts: dict[str, torch.Tensor] | None, steps: int = SPEC.steps):
    """A tiny model pruned by SparseGPT at 60%, each layer reconstructed (guarded by ``texts``)."""
    model = tiny_model(family, layers=LAYERS)
    adapter = adapter_for(model)
    guard = recover.Guard.capture(model, adapter, texts) if texts else None
    rec = recover.Reconstruction(adapter, dataclasses.replace(SPEC, steps=steps), guard=guard)
    prune_model(model, adapter, KERNELS["sparsegpt"], uniform_map(LAYERS, 0.6), [None] * LAYERS,
                capture(model, adapter, windows(), 4), mode="sequential", recovery=rec)
    return model, rec


def weights(model) -> list[torch.Tensor]:
    a = adapter_for(model)
    return [a.projection(layer, p).weight.detach().clone() for layer in a.layers(model) for p in PROJECTIONS]


def test_the_share_is_the_best_that_raises_no_texts_error():
    assert recover.choose_share({0.0: {"a": 1.0, "b": 1.0}, 0.5: {"a": 0.5, "b": 0.9},
                                 1.0: {"a": 0.2, "b": 1.01}}) == 0.5  # 1.0 is better in total, worse on b
    assert recover.choose_share({0.0: {"a": 1.0, "b": 1.0}, 0.5: {"a": 0.6, "b": 0.8},
                                 1.0: {"a": 0.5, "b": 0.85}}) == 1.0  # totals 1.4 > 1.35
    assert recover.choose_share({0.0: {"a": 1.0}, 0.25: {"a": 1.2}, 1.0: {"a": 3.0}}) == 0.0
    assert recover.choose_share({0.0: {"a": 1.0}}) == 0.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_layer_keeps_the_share_its_measured_errors_choose_and_the_mask(family):
    texts = {"a": windows(4, 32, seed=5), "b": windows(4, 32, seed=6) % 64}  # two kinds of token ids
    model, rec = pruned_with_guard(family, texts)
    free, _ = pruned_with_guard(family, None)  # the same run without the guard
    kernel, _ = pruned_with_guard(family, None, steps=0)
    report = rec.report()
    assert report["guard"]["texts"] == ["a", "b"] and report["guard"]["windows"] == 4
    for row in report["layers"]:
        measured = {e["share"]: {t: e[t] for t in texts} for e in row["guard"]["nll"]}
        assert row["guard"]["share"] == recover.choose_share(measured)
        assert row["tuned"] == (row["guard"]["share"] > 0)
    # layer 0 sees the same inputs in all three runs: its weights are K + s (T - K), exactly as chosen
    s = report["layers"][0]["guard"]["share"]
    n = len(PROJECTIONS)
    for w, t, k in zip(weights(model)[:n], weights(free)[:n], weights(kernel)[:n]):
        expected = k if s == 0 else t if s == 1 else k + s * (t - k)
        assert torch.allclose(w, expected, atol=1e-7)
        assert torch.equal(w == 0, k == 0)  # the mask held
    zeros = [sum(int((w == 0).sum()) for w in weights(m)) for m in (model, kernel)]
    assert zeros[0] == zeros[1]
    shares = [row["guard"]["share"] for row in report["layers"]]
    assert any(0 < x < 1 for x in shares) or len(set(shares)) > 1, shares  # the guard chose, not a constant


def test_a_layer_whose_tuning_raises_a_texts_error_at_every_share_keeps_the_kernels_weights(monkeypatch):
    texts = {"a": windows(4, 32, seed=5)}
    monkeypatch.setattr(recover, "choose_share", lambda measured: 0.0)  # as when every share raised one
    model, rec = pruned_with_guard("llama", texts)
    kernel, _ = pruned_with_guard("llama", None, steps=0)
    assert all(torch.equal(w, k) for w, k in zip(weights(model), weights(kernel)))
    assert not any(row["tuned"] for row in rec.report()["layers"])


def test_guard_windows_are_per_text_and_disjoint_from_every_other_role(tokenizer, calib_file):
    counts = {"statistics": 6, "distill": 4, "distill_held_out": 2, "guard": 3}
    guard = f"{calib_file},code"
    w = draw_windows(tokenizer, str(calib_file), 32, 0, counts, guard=guard)
    split = guard_windows(str(calib_file), counts, None, guard, w["guard"])
    assert list(split) == [str(calib_file), "code"] and all(v.shape == (3, 32) for v in split.values())
    per = source_counts(str(calib_file), counts, None, guard)
    assert per["code"] == {**dict.fromkeys(per["code"], 0), "guard": 3}
    assert per[str(calib_file)]["guard"] == 3 and per[str(calib_file)]["statistics"] == 6
    # the calibration text's guard windows share no window with its statistics or distillation windows
    others = torch.cat([w["statistics"], w["distill"], w["distill_held_out"]])
    assert not any(bool((others == g).all(-1).any()) for g in split[str(calib_file)])
    # the other roles are the windows a run without the guard draws
    plain = draw_windows(tokenizer, str(calib_file), 32, 0, {k: v for k, v in counts.items() if k != "guard"})
    assert all(torch.equal(plain[r], w[r]) for r in ("statistics", "distill", "distill_held_out"))
    again = draw_windows(tokenizer, str(calib_file), 32, 0, counts, guard=guard)
    assert torch.equal(again["guard"], w["guard"])


def test_a_guarded_run_records_each_layers_choice_and_keeps_the_sparsity(tmp_path, tiny_dirs, calib_file):
    kw = dict(prune_method="sparsegpt", sparsity_ratio=0.5, reconstruct="layer", reconstruct_steps=6,
              reconstruct_lr=3e-2)
    plain = run(small(tiny_dirs["llama"], calib_file, **kw))
    r = run(small(tiny_dirs["llama"], calib_file, recovery_guard="auto", save=str(tmp_path / "out"), **kw))
    rc = r["recovery"]["reconstruct"]
    assert rc["guard"]["texts"] == [str(calib_file), "code", "exams"]
    assert rc["guard"]["windows"] == recover.GUARD_WINDOWS and len(rc["guard"]["shares"]) == 2
    assert r["sparsity"]["zeros"] == plain["sparsity"]["zeros"]
    sources = {s["name"]: s["windows"] for s in r["calibration"]["sources"]}
    assert sources["code"] == {"guard": recover.GUARD_WINDOWS}
    assert sources[str(calib_file)] == {"statistics": 4, "guard": recover.GUARD_WINDOWS}
    # layer 0 is pruned and tuned as without the guard, which then only chooses how much of it to keep
    assert rc["layers"][0]["error_before"] == plain["recovery"]["reconstruct"]["layers"][0]["error_before"]
    assert "guard" in (tmp_path / "out" / "summary.txt").read_text()


@pytest.mark.parametrize("kw, option", [
    (dict(recovery_guard="wiki-offline:2,code"), "recovery_guard"),  # a weight: names only
    (dict(recovery_guard="science"), "recovery_guard"),  # evaluation text only
    (dict(recovery_guard="no-such-text"), "recovery_guard"),
    (dict(recovery_guard="auto", offload="disk"), "recovery_guard"),
])
def test_bad_guards_are_refused_before_any_work(tmp_path, tiny_dirs, calib_file, kw, option):
    opts = dict(prune_method="sparsegpt", sparsity_ratio=0.5, reconstruct="layer",
                save_model=str(tmp_path / "m"))
    with pytest.raises(OptionError) as err:
        run(small(tiny_dirs["llama"], calib_file, **{**opts, **kw}))
    assert err.value.option == option
    assert not (tmp_path / "m").exists()


def test_a_bad_guard_flag_is_a_one_line_error(tmp_path, tiny_dirs, calib_file):
    proc = run_cli("--model", str(tiny_dirs["llama"]), "--calib_dataset", str(calib_file),
                   "--eval_datasets", "none", "--nsamples", "4", "--seqlen", "32", "--prune_method",
                   "sparsegpt", "--reconstruct", "layer", "--recovery_guard", "code:0.5", "--save_model",
                   str(tmp_path / "m"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "--recovery_guard" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_distillation_keeps_no_state_that_a_guard_text_finds_worse(monkeypatch):
    from conftest import tiny_model

    from mosaic.calibrate import capture
    from mosaic.prune import KERNELS, prune_model, uniform_map

    def student():
        model = tiny_model("llama", layers=LAYERS)
        a = adapter_for(model)
        prune_model(model, a, KERNELS["sparsegpt"], uniform_map(LAYERS, 0.7), [None] * LAYERS,
                    capture(model, a, windows(), 4), mode="sequential")
        return model

    teacher = recover.teacher_copy(tiny_model("llama", layers=LAYERS))
    spec = recover.DistillSpec(steps=8, lr=3e-3, batch=4, eval_every=2)
    train, held_out = windows(16, 32, seed=1), windows(4, 32, seed=2)
    free = student()
    report = recover.distill(free, teacher, adapter_for(free), train, held_out, spec)
    assert report["best_step"] > 0  # unguarded, distillation moves
    guarded, texts = student(), {"a": windows(2, 32, seed=5)}
    start = weights(guarded)
    real = recover.mean_nll

    def nll(m, ids, device):  # text "a" pays for every step away from where distillation started
        return real(m, ids, device) + sum(float((w - k).norm()) for w, k in zip(weights(m), start))

    monkeypatch.setattr(recover, "mean_nll", nll)
    report = recover.distill(guarded, teacher, adapter_for(guarded), train, held_out, spec, guard=texts)
    assert report["best_step"] == 0
    assert all(torch.equal(w, k) for w, k in zip(weights(guarded), start))
    assert all("guard_ppl" in row for row in report["curve"])
    assert all(row["guard_ppl"]["a"] > report["curve"][0]["guard_ppl"]["a"] for row in report["curve"][1:])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_shares_score_is_the_models_own_nll_from_that_layer_on(family):
    """``Guard.nll`` runs the layers after the one scored, the final norm and the head: on a dense model,
    from any layer's true output, it equals the model's own next-token NLL."""
    model = tiny_model(family, layers=LAYERS)
    a = adapter_for(model)
    ids = windows(3, 32, seed=7)
    guard = recover.Guard.capture(model, a, {"t": ids})
    expected = recover.mean_nll(model, ids, torch.device("cpu"))
    h = guard.pruned["t"]
    for index, layer in enumerate(a.layers(model)):
        with torch.no_grad():
            h = a.mlp_block(layer, a.attention_block(layer, h, guard.kwargs(index, torch.device("cpu"),
                                                                              torch.float32)))
        assert guard.nll("t", index, h, torch.device("cpu")) == pytest.approx(expected, rel=1e-5)
