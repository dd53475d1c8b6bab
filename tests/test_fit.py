"""The fit check: whether the whole model goes to the compute device counts the calibration working set
(layer inputs/outputs, every batch's paused MLP intermediate, Hessians, the kernel's matrices) and the
allocation search's scorers with the weights; the host decision (--offload auto) counts the same;
hand-computed numbers for the tiny config, and place() on CPU leaves the model alone."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_config, tiny_model

from mosaic.fit import HOST_PARTS, Workload, device_need, host_need
from mosaic.load import place

# tiny config: hidden 64, intermediate 128, 4 heads (2 kv) of 16 -> groups (out, in):
# qkv (128, 64), o (64, 64), gate/up (256, 64), down (64, 128)
WEIGHTS = 1000


def need(**kw):
    work = dict(nsamples=8, seqlen=48, batch_size=3)
    dtype = kw.pop("dtype", torch.float32)
    return device_need(tiny_config("llama"), WEIGHTS, Workload(**{**work, **kw}), dtype)


def test_activations_by_hand():
    n = need(kernel="wanda", stats="norms")
    tokens, batch = 8 * 48, 3 * 48
    assert n == {"weights": WEIGHTS, "layer_io": 2 * tokens * 64 * 4, "paused": tokens * 128 * 4,
                 "batch_temp": 3 * batch * 128 * 4, "layer_copy": 0, "hessian": 0, "kernel": 0,
                 "reconstruct": 0, "search_reference": 0, "search_inputs": 0, "search_copies": 0,
                 "search_hessians": 0}
    assert n["layer_io"] == 196608 and n["paused"] == 196608 and n["batch_temp"] == 221184


def test_reconstruction_counts_the_dense_stream_and_one_steps_autograd_by_hand():
    tokens, step = 8 * 48, 4 * 48
    layer = 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128
    autograd = step * (12 * 64 + 4 * 128) * 4
    layer_wise = need(reconstruct="layer", reconstruct_batch=4)["reconstruct"]
    # dense inputs, targets, pruned inputs
    assert layer_wise == 3 * tokens * 64 * 4 + autograd + 3 * layer * 4
    # + mids
    assert need(reconstruct="sublayer", reconstruct_batch=4)["reconstruct"] == layer_wise + tokens * 64 * 4


def test_the_search_counts_its_reference_distributions_inputs_copies_and_hessians_by_hand():
    """refine.Fitness holds p [tokens, vocab] fp32 per scored window (held out, and validation when it
    refines), each layer's inputs (on the held-out windows also a candidate's), two pruned copies and the
    dense Hessians."""
    refining = need(kernel="sparsegpt", stats="hessian", search_windows=4, search_validation=True)
    scored, layer_inputs = 4 + 4, 3 * 48 * 64 * 4  # held out + validation; 2 layers + the final hidden
    assert refining["search_reference"] == scored * 48 * 512 * 4 == 786432
    assert refining["search_inputs"] == (scored + 4) * layer_inputs
    assert refining["search_copies"] == 2 * WEIGHTS
    assert refining["search_hessians"] == 2 * (3 * 64 * 64 + 128 * 128) * 4  # every layer's four groups
    # --search_budget 0: no validation
    curve_only = need(kernel="sparsegpt", stats="hessian", search_windows=4)
    assert (curve_only["search_reference"] == 4 * 48 * 512 * 4
            and curve_only["search_inputs"] == 8 * layer_inputs)
    plain = need(kernel="sparsegpt", stats="hessian")  # the calibration pass's parts do not change
    assert all(refining[k] == v for k, v in plain.items() if not k.startswith("search"))
    # layers come to the device one at a time: the search stays home
    one = device_need(tiny_config("llama"), WEIGHTS,
                      Workload(nsamples=8, seqlen=48, batch_size=3, search_windows=4), torch.float32,
                      one_batch=True)
    assert not any(v for k, v in one.items() if k.startswith("search"))
    config = tiny_config("llama")
    config.vocab_size, config.max_position_embeddings = 128256, 2048
    big = device_need(config, WEIGHTS, Workload(nsamples=8, seqlen=2048, batch_size=8, search_windows=8),
                      torch.float32)
    assert big["search_reference"] == 8 * 2048 * 128256 * 4 and 7.8 < big["search_reference"] / 2**30 < 7.9


def test_the_host_decision_counts_the_device_working_set():
    """On CPU the host is the compute device: --offload auto counts exactly what place() counts; with a GPU
    the host-side parts (weights, every batch's activations, reconstruction streams, the search)."""
    config, work = tiny_config("llama"), Workload(nsamples=8, seqlen=48, batch_size=3, kernel="sparsegpt",
                                                  stats="hessian", search_windows=4, search_validation=True)
    full = device_need(config, WEIGHTS, work, torch.float32)
    assert host_need(config, WEIGHTS, work, torch.float32, torch.device("cpu")) == full
    gpu = host_need(config, WEIGHTS, work, torch.float32, torch.device("cuda"))
    assert gpu == {k: full[k] for k in HOST_PARTS} and gpu["search_reference"] > 0 and "paused" not in gpu
    assert host_need(config, WEIGHTS, None, torch.float32, torch.device("cpu")) == {"weights": WEIGHTS}


def test_hessians_and_kernels_by_hand():
    sparsegpt = need(kernel="sparsegpt", stats="hessian")
    assert sparsegpt["hessian"] == 128 * 128 * 4  # the down_proj Hessian, one group at a time
    assert sparsegpt["kernel"] == 64 * 128 * 5 + 2 * 128 * 128 * 4 == 172032  # down: W fp32 + mask, H, U
    alps = need(kernel="alps", stats="hessian")
    assert alps["kernel"] == 9 * 64 * 128 * 4 + 128 * 128 * 28 == 753664
    dense = need(kernel="sparsegpt", stats="hessian", mode="dense")
    assert dense["hessian"] == (3 * 64 * 64 + 128 * 128) * 4  # all four groups' statistics at once


def test_calibration_dtype_and_context():
    bf16 = need(calib_dtype=torch.bfloat16)
    assert bf16["layer_io"] == 2 * 8 * 48 * 64 * 2
    assert bf16["layer_copy"] == (128 * 64 + 64 * 64 + 256 * 64 + 64 * 128) * 2  # a bf16 copy of the layer
    assert need(calib_dtype=torch.float32)["layer_copy"] == 0
    assert need(seqlen=4096)["layer_io"] == 2 * 8 * 512 * 64 * 4  # clipped to max_position_embeddings


def test_place_on_cpu_is_a_no_op():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    place(model, torch.device("cpu"), work=Workload(nsamples=8, seqlen=48, batch_size=3))
    assert not hasattr(model, "compute_device")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("free_mib,moved", [(1000, True), (2, False)])
def test_place_counts_the_working_set(monkeypatch, caplog, free_mib, moved):
    """The weights (~0.6 MiB) fit 2 MiB, the weights and 4096 windows' activations do not."""
    model = tiny_model("llama")
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_mib * 2**20, 80 * 2**30))
    monkeypatch.setattr(model, "to", lambda device: calls.append(device))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights < 0.8 * 2 * 2**20
    with caplog.at_level(logging.WARNING, logger="mosaic.load"):
        place(model, torch.device("cuda"),
              work=Workload(nsamples=256, seqlen=128, batch_size=8, kernel="alps", stats="hessian"))
    assert (calls == [torch.device("cuda")]) == moved
    assert model.compute_device == torch.device("cuda")
    assert ("layer_io" in caplog.text and "paused" in caplog.text
            and "one layer at a time" in caplog.text) != moved


def test_one_layer_at_a_time_counts_one_batch_whatever_nsamples():
    """Layer by layer from the host, sequential mode keeps one batch on the device (calibrate's one_batch
    path): the activation terms are one batch's, flat in nsamples; dense mode still holds every batch."""
    few, many = (need(nsamples=n, kernel="sparsegpt", stats="hessian") for n in (8, 800))
    one_few, one_many = (device_need(tiny_config("llama"), WEIGHTS,
                                     Workload(nsamples=n, seqlen=48, batch_size=3), torch.float32,
                                     one_batch=True) for n in (8, 800))
    assert one_few == one_many
    assert one_few["layer_io"] == 2 * 3 * 48 * 64 * 4 and one_few["paused"] == 3 * 48 * 128 * 4
    assert many["layer_io"] == 100 * few["layer_io"]
    dense = Workload(nsamples=8, seqlen=48, batch_size=3, mode="dense")
    assert device_need(tiny_config("llama"), WEIGHTS, dense, torch.float32, one_batch=True)["layer_io"] \
        == few["layer_io"]
