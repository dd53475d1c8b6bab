"""The recovery guard: the reconstruction shrunk toward the kernel's weights until no guard text is worse.
Its choice equals an oracle over the shares, the mask holds, its windows are disjoint from every other role,
and bad guards are one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_recover import LAYERS, small, windows

from mosaic import recover
from mosaic.adapter import PROJECTIONS, adapter_for
from mosaic.data import draw_windows, guard_windows, source_counts
from mosaic.errors import OptionError
from mosaic.pipeline import run

SPEC = recover.ReconstructSpec(steps=12, lr=3e-2, batch=4)  # a rate that overshoots: some text gets worse


def pruned_keeping_kernel(family: str):
    from conftest import tiny_model

    from mosaic.calibrate import capture
    from mosaic.prune import KERNELS, prune_model, uniform_map

    model = tiny_model(family, layers=LAYERS)
    adapter = adapter_for(model)
    rec = recover.Reconstruction(adapter, SPEC, keep_kernel=True)
    prune_model(model, adapter, KERNELS["sparsegpt"], uniform_map(LAYERS, 0.6), [None] * LAYERS,
                capture(model, adapter, windows(), 4), mode="sequential", recovery=rec)
    return model, rec


def weights(model) -> list[torch.Tensor]:
    a = adapter_for(model)
    return [a.projection(layer, p).weight.detach().clone() for layer in a.layers(model) for p in PROJECTIONS]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_guard_keeps_the_best_share_that_leaves_no_text_worse(family):
    model, rec = pruned_keeping_kernel(family)
    tuned = weights(model)
    kernel = [k for layer in rec.kernel for k in layer]
    texts = {"a": windows(3, 32, seed=5), "b": windows(3, 32, seed=6) % 64}  # two kinds of token ids
    report = recover.guard(model, rec, texts)
    ppl = {row["share"]: row for row in report["ppl"]}
    assert sorted(ppl) == [0.0, *recover.GUARD_SHARES]
    # the oracle: every share's perplexities measured again from K + a (T - K)
    safe = [s for s in recover.GUARD_SHARES if all(ppl[s][n] <= ppl[0.0][n] for n in texts)]
    best = min(safe, key=lambda s: math.log(ppl[s]["a"]) + math.log(ppl[s]["b"])) if safe else 0.0
    assert report["share"] == best
    expected = [k if best == 0 else t if best == 1 else k + best * (t - k) for k, t in zip(kernel, tuned)]
    assert all(torch.allclose(w, e, atol=1e-7) for w, e in zip(weights(model), expected))
    assert all(torch.equal(w == 0, k == 0) for w, k in zip(weights(model), kernel))  # the mask held
    for name, ids in texts.items():  # the kept model's perplexity is the one reported for its share
        assert math.exp(recover.mean_nll(model, ids, torch.device("cpu"))) == pytest.approx(ppl[best][name],
                                                                                            rel=1e-5)


def test_a_reconstruction_that_hurts_a_text_at_every_share_is_undone_exactly(monkeypatch):
    model, rec = pruned_keeping_kernel("llama")
    kernel = [k for layer in rec.kernel for k in layer]
    texts = {"a": windows(2, 32, seed=5), "b": windows(2, 32, seed=6)}
    real = recover.mean_nll

    def nll(m, ids, device):  # text "b" pays for every step away from the kernel's weights
        far = sum(float((w - k).norm()) for w, k in zip(weights(m), kernel))
        return real(m, ids, device) + (far if ids is texts["b"] else 0.0)

    monkeypatch.setattr(recover, "mean_nll", nll)
    report = recover.guard(model, rec, texts)
    ppl = {row["share"]: row for row in report["ppl"]}
    assert all(ppl[s]["b"] > ppl[0.0]["b"] for s in recover.GUARD_SHARES)
    assert report["share"] == 0.0
    assert all(torch.equal(w, k) for w, k in zip(weights(model), kernel))


def weights_of(model) -> list[torch.nn.Parameter]:
    a = adapter_for(model)
    return [a.projection(layer, p).weight for layer in a.layers(model) for p in PROJECTIONS]


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


def test_a_guarded_run_saves_the_shrunk_model_and_records_every_share(tmp_path, tiny_dirs, calib_file):
    kw = dict(prune_method="sparsegpt", sparsity_ratio=0.5, reconstruct="layer", reconstruct_steps=6,
              reconstruct_lr=3e-2)
    plain = run(small(tiny_dirs["llama"], calib_file, save_model=str(tmp_path / "plain"), **kw))
    r = run(small(tiny_dirs["llama"], calib_file, save_model=str(tmp_path / "g"), recovery_guard="auto",
                  save=str(tmp_path / "out"), **kw))
    g = r["recovery"]["guard"]
    assert g["texts"] == [str(calib_file), "code", "exams"]
    assert g["windows"] == dict.fromkeys(g["texts"], recover.GUARD_WINDOWS)
    assert r["sparsity"]["zeros"] == plain["sparsity"]["zeros"]
    sources = {s["name"]: s["windows"] for s in r["calibration"]["sources"]}
    assert sources["code"] == {"guard": recover.GUARD_WINDOWS}
    # the reconstruction itself is the unguarded run's: the guard only chooses how much of it to keep
    assert [(x["error_before"], x["error_after"]) for x in r["recovery"]["reconstruct"]["layers"]] == \
        [(x["error_before"], x["error_after"]) for x in plain["recovery"]["reconstruct"]["layers"]]
    if g["share"] == 1.0:
        a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("g", "plain"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert "guard" in (tmp_path / "out" / "summary.txt").read_text()


@pytest.mark.parametrize("kw, option", [
    (dict(recovery_guard="wiki-offline:2,code"), "recovery_guard"),  # a weight: names only
    (dict(recovery_guard="science"), "recovery_guard"),  # evaluation text only
    (dict(recovery_guard="no-such-text"), "recovery_guard"),
    (dict(recovery_guard="auto", prune_method="sparsegpt_mosaic", sparsity_type="composite",
          structured_ratio=0.25), "recovery_guard"),
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
