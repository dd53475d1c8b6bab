"""Mustafar KV sparsity in evaluation: the layer-wise perplexity sees what decoding would see, and the
CLI applies it to a dense or pruned model with one-line errors for bad values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from mosaic.adapter import adapter_for
from mosaic.eval.perplexity import perplexity
from mosaic.kv import KVSparsity, mustafar_attention
from mosaic.pipeline import Options, run


def plain_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                          reduction="none").view(n, -1).mean(1)
    return math.exp(nll.mean().item())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layerwise_perplexity_under_kv_sparsity_equals_a_plain_teacher_forced_forward(family):
    model = tiny_model(family)
    ids = torch.randint(2, 512, (4 * 96,), generator=torch.Generator().manual_seed(0))
    spec = KVSparsity(k_sparsity=0.7, v_sparsity=0.5, window=8)
    dense = perplexity(model, adapter_for(model), ids, seqlen=96)["ppl"]
    with mustafar_attention(model, spec):
        layerwise = perplexity(model, adapter_for(model), ids, seqlen=96)["ppl"]
        plain = plain_ppl(model, ids, 96)
    assert layerwise == pytest.approx(plain, rel=1e-5)
    assert abs(layerwise / dense - 1) > 1e-3  # the pruned history really is what the queries saw


def small(model_dir, calib, **kw) -> Options:
    return Options(model=str(model_dir), eval_datasets=str(calib), eval_seqlen=128, eval_windows=3, **kw)


def test_cli_kv_sparsity_on_a_dense_model_reports_the_cache(tiny_dirs, calib_file, tmp_path):
    dense = run(small(tiny_dirs["llama"], calib_file, prune_method="dense"))
    zero = run(small(tiny_dirs["llama"], calib_file, prune_method="dense", kv_sparsity=0.0))
    assert zero["perplexity"][str(calib_file)]["ppl"] == pytest.approx(
        dense["perplexity"][str(calib_file)]["ppl"], rel=1e-5)
    r = run(small(tiny_dirs["llama"], calib_file, prune_method="dense", k_sparsity=0.75, v_sparsity=0.5,
                  kv_window=16, save=str(tmp_path / "out")))
    kv = r["kv_cache"]
    assert kv["achieved"] == {"k": 0.75, "v": 0.5}  # head_dim 16: 12 and 8 entries of every vector
    assert kv["window"] == 16 and kv["bytes"]["context"] == 2048
    lo, hi = kv["bytes"]["compressed"]
    assert kv["bytes"]["window"] < lo <= hi < kv["bytes"]["dense"]
    # a random tiny model gets no worse or better in a known direction, but it must be a different model
    assert abs(r["perplexity"][str(calib_file)]["ppl"] / dense["perplexity"][str(calib_file)]["ppl"]
               - 1) > 1e-4
    assert "kv cache" in (tmp_path / "out" / "summary.txt").read_text()


@pytest.mark.parametrize("argv, flag, contains", [
    (["--kv_sparsity", "1.2"], "--kv_sparsity", "[0, 1)"),
    (["--k_sparsity", "nan"], "--k_sparsity", "[0, 1)"),
    (["--kv_sparsity", "0.5", "--eval_datasets", "none"], "--kv_sparsity", "applies to evaluation"),
    (["--kv_sparsity", "0.5", "--kv_method", "per_head"], "--kv_method", "per_token"),
    (["--kv_sparsity", "0.5", "--kv_window", "-1"], "--kv_window", "window"),
])
def test_bad_kv_flags_fail_fast_with_one_line(capsys, tmp_path, argv, flag, contains):
    from mosaic.cli import main

    rc = main(["--prune_method", "dense", *argv, "--save", str(tmp_path / "out")], prog="main.py")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(f"main.py: error: {flag}: ") and contains in last, last
    assert not (tmp_path / "out").exists()


def test_zero_shot_runs_through_the_kv_attention(tiny_dirs, tmp_path):
    """lm-eval scores through the KV attention (its mask and forward work under HFLM) and the run
    completes."""
    base = dict(model=str(tiny_dirs["llama"]), prune_method="dense", eval_datasets="none",
                eval_zero_shot="arc_easy", zs_limit=6, zs_batch_size=6, offline=True)
    plain = run(Options(**base))
    pruned = run(Options(**base, kv_sparsity=0.7, kv_window=4))
    assert pruned["kv_cache"]["achieved"]["k"] == pytest.approx(11 / 16)
    assert pruned["zero_shot"]["tasks"]["arc_easy"]["n"] == plain["zero_shot"]["tasks"]["arc_easy"]["n"] == 6
    assert pruned["evaluation"]["status"] == "complete"


def test_kv_bytes_count_the_official_prune_count_in_reference_mode():
    from types import SimpleNamespace

    from mosaic.kv import kv_bytes

    config = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64, hidden_size=576,
                             num_attention_heads=9)
    official = kv_bytes(config, 2048, KVSparsity(0.7, 0.7, 32, reference=True))  # prunes 43 of 64, not 45
    assert official == kv_bytes(config, 2048, KVSparsity(43 / 64, 43 / 64, 32))
    assert official.keys[0] > kv_bytes(config, 2048, KVSparsity(0.7, 0.7, 32)).keys[0]
