"""What a pruning run holds at once, estimated from the config before any work: one memory model for both
decisions that depend on it.

``load.place`` moves the whole model to the GPU only if the weights *and* this working set fit
(``device_need``); otherwise the model stays on the host and the layer-wise engine brings one decoder layer
at a time. ``stream.choose`` (``--offload auto``) loads the model into host memory only if what the host then
holds fits the budget (``host_need``: on CPU the same working set, the host being the compute device);
otherwise it streams the model from disk one layer at a time.

The working set follows the engine (``calibrate.run_layers``): while a layer runs, the inputs of every
calibration batch and their residual stream (later the layer outputs) are on the device, and the staged
true-sequential forward keeps every batch paused at the same projection group, so the largest group input
(the MLP intermediate, nsamples × seqlen × intermediate_size) exists for all batches at once. On top come
one batch's MLP temporaries, the statistics of the group being pruned (a Hessian, fp32, in² entries; all
four groups' at once in the dense and reference modes), the kernel's own matrices, and a copy of the layer
in the calibration dtype when it differs from the model's. Attention scores are not counted (SDPA).

The allocation search (``search.search``, ``refine.Fitness``) holds, for every window it scores by true KL
(``search_windows`` held out, and as many validation windows when it refines), the dense model's next-token
distribution (fp32, seqlen × vocab per window: about 8 GiB per scorer for a 128k vocabulary at 8 × 2048
windows) and every layer's inputs (on the held-out windows twice: the committed ones and a candidate's);
beside the dense model it keeps two pruned copies (the best candidate and the one being built) and every
layer's dense Hessians (the profile's statistics it prunes candidates from, fp32). When it refines, the
run's own pruning pass (``final``) runs on such a copy while all of this is held, so the search's parts add
to the calibration pass's rather than alternate with them.

When the model stays on the host and layers come to the device one at a time, the activations stay on the
host too and sequential mode keeps one batch on the device (``one_batch``): then only one batch's inputs,
outputs and paused intermediate count, whatever ``nsamples``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mosaic import dist

FP32 = 4


@dataclass(frozen=True)
class Workload:
    """The calibration knobs that decide the device working set (see ``device_need``)."""

    nsamples: int
    seqlen: int
    batch_size: int
    calib_dtype: torch.dtype | None = None  # None: the model's dtype
    kernel: str | None = None  # kernel name (magnitude, wanda, sparsegpt, alps); None: nothing pruned
    stats: str = "none"  # what the kernel reads: none | norms | hessian
    mode: str | None = "sequential"  # engine mode; dense and reference hold all groups' statistics at once
    # recovery granularity (layer | sublayer): a second, dense activation stream
    reconstruct: str | None = None
    reconstruct_batch: int = 8  # windows per reconstruction step
    search_windows: int = 0  # allocation search: held-out windows scored by true KL; 0: no search
    # ... and as many validation windows (the search refines: --search_budget > 0)
    search_validation: bool = False


def _widest(config, per_layer: str, name: str) -> int:
    return max(getattr(config, per_layer, None) or [getattr(config, name)])


def groups(config) -> list[tuple[int, int]]:
    """(out_features, in_features) of the four projection groups of the widest layer."""
    h = config.hidden_size
    heads = _widest(config, "layer_num_attention_heads", "num_attention_heads")
    kv = _widest(config, "layer_num_key_value_heads", "num_key_value_heads") or heads
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    inter = _widest(config, "layer_intermediate_size", "intermediate_size")
    return [((heads + 2 * kv) * head_dim, h), (h, heads * head_dim), (2 * inter, h), (h, inter)]


def device_need(config, weights: int, work: Workload, dtype: torch.dtype,
                one_batch: bool = False) -> dict[str, int]:
    """Bytes the compute device holds at the peak of a layer's turn (with the allocation search, of the
    search's final pruning pass), by part, for a model whose parameters take ``weights`` bytes in ``dtype``
    (one layer's bytes with ``one_batch``: the search then runs on the host, where the model is)."""
    calib = work.calib_dtype or dtype
    c = calib.itemsize
    seqlen = min(work.seqlen, int(getattr(config, "max_position_embeddings", work.seqlen) or work.seqlen))
    tokens, batch = work.nsamples * seqlen, min(work.batch_size, work.nsamples) * seqlen
    if one_batch and work.mode == "sequential":
        tokens = batch
    shapes = groups(config)
    h, inter = config.hidden_size, shapes[3][1]
    widest_input = max(i for _, i in shapes)
    need = {
        "weights": weights,
        "layer_io": 2 * tokens * h * c,  # every batch's layer inputs, and its residual stream / outputs
        "paused": tokens * widest_input * c,  # every batch paused at the MLP intermediate (down_proj input)
        "batch_temp": 3 * batch * inter * c,  # one batch's gate, up and act(gate)·up
        "layer_copy": 0,
        "hessian": 0,
        "kernel": 0,
        "reconstruct": 0,
        "search_reference": 0,
        "search_inputs": 0,
        "search_copies": 0,
        "search_hessians": 0,
    }
    if calib != dtype:  # forwards run on a copy of the layer in the calibration dtype
        need["layer_copy"] = sum(o * i for o, i in shapes) * c
    if work.stats == "hessian":
        sizes = [i * i * FP32 for _, i in shapes]
        need["hessian"] = max(sizes) if work.mode == "sequential" else sum(sizes)
    if work.kernel == "alps":  # B0, target, D0, D, V, B, rhs, Z, W: out×in fp32; H, H⁻¹, Q fp32 and fp64 eigh
        need["kernel"] = max(9 * o * i * FP32 + i * i * (3 * FP32 + 2 * 8) for o, i in shapes)
    elif work.kernel == "sparsegpt":  # W fp32 and its mask; H and its inverse Cholesky factor
        need["kernel"] = max(o * i * (FP32 + 1) + 2 * i * i * FP32 for o, i in shapes)
    if work.reconstruct is not None:
        need["reconstruct"] = reconstruct_need(config, work, seqlen, tokens, calib, dtype)
    if work.search_windows and not one_batch:  # the search runs on the whole model where it lives
        need.update(search_need(config, weights, work, seqlen, dtype))
    return need


def search_need(config, weights: int, work: Workload, seqlen: int, dtype: torch.dtype) -> dict[str, int]:
    """The allocation search's scorers: the dense next-token distribution [seqlen, vocab] fp32 on every
    scored window (held out and validation), each layer's inputs in the model's dtype on every scored window
    and once more on the held-out ones (a candidate's beside the committed ones), two pruned copies of the
    model beside the dense one, and every layer's four dense Hessians (fp32)."""
    held = work.search_windows
    scored = held * (2 if work.search_validation else 1)
    layer_inputs = (config.num_hidden_layers + 1) * seqlen * config.hidden_size * dtype.itemsize
    return {"search_reference": scored * seqlen * config.vocab_size * FP32,
            "search_inputs": (scored + held) * layer_inputs,
            "search_copies": 2 * weights,
            "search_hessians": config.num_hidden_layers * sum(i * i for _, i in groups(config)) * FP32}


# what stays in host memory when a GPU computes: the model loads there first, and when it does not fit the
# device every batch's activations, the reconstruction's streams and the search stay there with it
HOST_PARTS = ("weights", "layer_io", "reconstruct", "search_reference", "search_inputs", "search_copies",
              "search_hessians")


def host_need(config, weights: int, work: Workload | None, dtype: torch.dtype,
              compute: torch.device) -> dict[str, int]:
    """Host bytes of a run that loads the model (``weights`` bytes in ``dtype``) into memory: on CPU the
    whole ``device_need``; with a GPU its host-side parts (``HOST_PARTS``). ``work`` None: nothing is
    calibrated, the weights alone."""
    if work is None:
        return {"weights": weights}
    need = device_need(config, weights, work, dtype)
    if compute.type == "cpu":
        return need
    return {k: v for k, v in need.items() if k in HOST_PARTS}


def reconstruct_need(config, work: Workload, seqlen: int, tokens: int, calib: torch.dtype,
                     dtype: torch.dtype) -> int:
    """What reconstruction adds to a layer's turn: the dense stream's inputs and the dense layer's outputs
    (and, sublayer, its residual stream after attention) for every window; the pruned inputs kept for
    training; and one step's autograd: ~12 hidden-wide and 4 intermediate-wide activations per token of
    the step's batch, the layer's gradients and Adam's two moments (fp32)."""
    h, c = config.hidden_size, calib.itemsize
    inter = groups(config)[3][1]
    streams = (4 if work.reconstruct == "sublayer" else 3) * tokens * h * c
    step_tokens = min(work.reconstruct_batch, work.nsamples) * seqlen
    autograd = step_tokens * (12 * h + 4 * inter) * FP32
    layer = sum(o * i for o, i in groups(config))
    return streams + autograd + 3 * layer * max(dtype.itemsize, FP32)


def describe(need: dict[str, int]) -> str:
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in need.items() if v)
    return f"{sum(need.values()) / 2**30:.2f} GiB{' per rank' if dist.world() > 1 else ''} ({parts})"


HEADROOM = 0.8  # share of the available host memory the default budget allows
DEVICE_HEADROOM = 0.8  # share of a GPU's free memory a run plans to fill (``load.place``, distillation)


def device_free(device: torch.device) -> int:
    """Free bytes on GPU ``device`` now."""
    return torch.cuda.mem_get_info(device)[0]


def available_memory() -> int:
    """Host memory this run may use by default: what is available now, with headroom."""
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(HEADROOM * free) // dist.local_world()  # ranks on one machine share its memory
