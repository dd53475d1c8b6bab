"""Options accepted and ignored: an invalid value is an error whether or not the run uses it, a valid one
the run ignores gets one warning, numbers are checked for type at the Python API too, and a kernel never
swallows an option it does not take."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import run_cli

from mosaic.cli import build_parser
from mosaic.errors import OptionError
from mosaic.options import Options, kernel_options, validate
from mosaic.prune import KERNELS
from mosaic.stats import InputStats


@pytest.mark.parametrize("kw, option", [
    (dict(kv_window=-1), "kv_window"),  # no KV sparsity asked for: still invalid
    (dict(kv_method="bogus"), "kv_method"),
    (dict(prune_method="sparsegpt_search", search_windows=1000, nsamples=4), "search_windows"),
    (dict(prune_method="alps", alps_max_iter=2.5), "alps_max_iter"),
    (dict(nsamples="8"), "nsamples"),
    (dict(sparsity_ratio="0.5"), "sparsity_ratio"),
    (dict(search_budget=True), "search_budget"),
])
def test_invalid_values_are_refused_whether_or_not_the_run_uses_them(kw, option):
    with pytest.raises(OptionError) as err:
        validate(Options(eval_datasets="none", **kw))
    assert err.value.option == option


@pytest.mark.parametrize("kw, option", [
    (dict(prune_method="sparsegpt", search_budget=5), "search_budget"),
    (dict(prune_method="sparsegpt", search_windows=4), "search_windows"),
    (dict(prune_method="sparsegpt", alps_rho0=0.3), "alps_rho0"),
    (dict(prune_method="wanda", blocksize=64), "blocksize"),
    (dict(prune_method="wanda", offload="none", max_memory="4GB"), "max_memory"),
    (dict(prune_method="wanda", kv_window=8), "kv_window"),
])
def test_valid_options_this_run_ignores_get_one_warning_naming_them(caplog, kw, option):
    with caplog.at_level(logging.WARNING):
        validate(Options(eval_datasets="none", **kw))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [line for line in lines if f"--{option} has no effect" in line] and len(lines) == 1


def test_options_a_run_uses_get_no_warning(caplog):
    with caplog.at_level(logging.WARNING):
        validate(Options(prune_method="alps_search", search_budget=5, alps_rho0=0.3, eval_datasets="none"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_kernel_rejects_an_option_it_does_not_take_and_the_run_passes_only_its_own():
    stats = InputStats(8, torch.device("cpu"), hessian=True)
    stats.add(torch.randn(32, 8))
    w = torch.randn(4, 8)
    with pytest.raises(TypeError):
        KERNELS["sparsegpt"].prune([w], stats, [0.5], None, blocksiz=4)  # misspelt: no longer swallowed
    with pytest.raises(TypeError):
        KERNELS["wanda"].prune([w], stats, [0.5], None, percdamp=0.1)
    opts = Options(blocksize=64, alps_max_iter=7)
    assert kernel_options(opts, KERNELS["sparsegpt"]) == {"blocksize": 64, "percdamp": 0.01}
    assert kernel_options(opts, KERNELS["wanda"]) == {}
    assert kernel_options(opts, KERNELS["alps"])["alps_max_iter"] == 7


def test_the_engine_refuses_a_misspelt_kernel_option_before_pruning_any_layer():
    """Through the Python API too: the registry knows each kernel's options (a typo never reaches layer 0)."""
    from conftest import tiny_model

    from mosaic.adapter import adapter_for
    from mosaic.prune import prune_model, uniform_map

    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="sparsegpt takes no option blocksiz"):
        prune_model(model, adapter_for(model), KERNELS["sparsegpt"], uniform_map(2, 0.5), [None, None], None,
                    mode="sequential", compute=torch.device("cpu"), calib_dtype=torch.float32,
                    options={"blocksiz": 64})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_cli_states_the_defaults_the_code_uses():
    text = build_parser().format_help()
    assert f"({Options().search_budget}; 0: the curve solve only)" in " ".join(text.split())


def test_an_invalid_unused_value_is_one_line_from_the_cli(tmp_path):
    proc = run_cli("--prune_method", "dense", "--kv_window", "-1", "--eval_datasets", "none",
                   "--save", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--kv_window" in proc.stderr
    assert not (tmp_path / "out").exists()
