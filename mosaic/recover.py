"""Recovery with the mask kept: what pruning lost, won back without un-pruning a single weight.

1. ``Reconstruction`` (local, layer by layer, inside the engine): right after a decoder layer is pruned,
   its kept weights are tuned so that its output on the *pruned* model's inputs matches the *dense*
   layer's output on the *dense* model's inputs ("A Free Lunch in LLM Compression", arXiv 2510.14444).
   The layer thereby also corrects the error that accumulated upstream. ``layer`` tunes the whole block
   at once; ``sublayer`` the attention half against the dense residual stream after attention, then the
   MLP half (on the tuned attention's output) against the dense layer output.
2. ``distill`` (end to end, optional): KL from the dense teacher's next-token distribution on windows
   the statistics never saw, AdamW with warm-up and cosine decay, gradient accumulation and activation
   checkpointing; the state with the lowest held-out KL is kept.

Zeros stay zeros: gradients are masked and the mask is re-imposed after every step, so N:M patterns and
composite widths hold. By default only the seven projections' weights move; with ``norms`` the layer's
two RMSNorm scales and the projections' biases (no mask covers them) move as well. Embeddings, the final
norm and the head are always frozen. Nothing here knows kernels, allocations or streaming: it sees a
layer, inputs and targets.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from mosaic import fit
from mosaic.adapter import ATTENTION, MLP, PROJECTIONS, Adapter
from mosaic.errors import OptionError

log = logging.getLogger(__name__)

GRANULARITIES = ("none", "layer", "sublayer")


@dataclass(frozen=True)
class ReconstructSpec:
    """Knobs of the layer-wise reconstruction (defaults: the best measured on calibration text)."""

    granularity: str = "layer"  # layer | sublayer (layer measured better: recover.md)
    steps: int = 20
    lr: float = 1e-3  # beat 5e-4 on calib ppl with SparseGPT and ALPS at 70% (recover.md)
    batch: int = 8  # calibration windows per step
    seed: int = 0
    norms: bool = False  # also tune the layer's norm scales and biases (measured: recover.md)


def frozen_masks(adapter: Adapter, layer: nn.Module, names=PROJECTIONS) -> dict[str, torch.Tensor]:
    """Which weights each projection keeps: the nonzeros the kernel left."""
    return {p: adapter.projection(layer, p).weight != 0 for p in names}


def relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """‖outputs − targets‖² / ‖targets‖², over all windows."""
    num = sum(float((o.double() - t.double()).pow(2).sum()) for o, t in zip(outputs, targets))
    den = sum(float(t.double().pow(2).sum()) for t in targets)
    return num / max(den, 1e-30)


def _normalised_mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE divided by the target's mean square: every layer's loss on the same scale, whatever the size of
    the residual stream (SmolLM2's grows ~1000× with depth)."""
    return (y - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def _expand_kwargs(obj, rows: int, size: int):
    """A captured batch's layer kwargs for a batch of ``size`` windows: tensors with a batch dimension of
    ``rows`` (> 1) are per window, and calibration windows are unpadded, so every row is the same."""
    if isinstance(obj, torch.Tensor):
        if rows > 1 and obj.dim() > 0 and obj.shape[0] == rows:
            return obj[:1].expand(size, *obj.shape[1:])
        return obj
    if isinstance(obj, tuple | list):
        return type(obj)(_expand_kwargs(o, rows, size) for o in obj)
    if isinstance(obj, dict):
        return {k: _expand_kwargs(v, rows, size) for k, v in obj.items()}
    return obj


def _windows(batches: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(b, r) for b, h in enumerate(batches) for r in range(h.shape[0])]


def _gather(batches: list[torch.Tensor], index: list[tuple[int, int]], pick: torch.Tensor, device, dtype):
    return torch.cat([batches[index[k][0]][index[k][1]:index[k][1] + 1]
                      for k in pick.tolist()]).to(device, dtype)


def _tunable(adapter: Adapter, layer: nn.Module, names: tuple[str, ...], norms: bool) -> list[nn.Parameter]:
    """What reconstruction moves: the projections' weights of ``names`` first, then, with ``norms``, the
    parameters no mask covers (``Adapter.unmasked``)."""
    return [adapter.projection(layer, p).weight for p in names] + (adapter.unmasked(layer, names) if norms
                                                                   else [])


def _tune(adapter: Adapter, layer: nn.Module, names: tuple[str, ...], forward, inputs: list[torch.Tensor],
          targets: list[torch.Tensor], kwargs, spec: ReconstructSpec, generator: torch.Generator,
          bar: tqdm | None) -> None:
    """Adam steps on the kept weights of ``names`` (and, with ``spec.norms``, their unmasked parameters)
    so that ``forward(x, kw)`` matches ``targets``."""
    params = _tunable(adapter, layer, names, spec.norms)
    weights = params[:len(names)]
    masks = [p != 0 for p in weights]
    device, dtype = weights[0].device, weights[0].dtype
    index = _windows(inputs)
    size = min(spec.batch, len(index))
    kw = _expand_kwargs(kwargs[0], inputs[0].shape[0], size)
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=spec.lr)
    try:
        with torch.enable_grad():
            for _ in range(spec.steps):
                pick = torch.randperm(len(index), generator=generator)[:size]
                x = _gather(inputs, index, pick, device, dtype)
                t = _gather(targets, index, pick, device, dtype)
                loss = _normalised_mse(forward(x, kw), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, m in zip(weights, masks):
                    p.grad.mul_(m)
                opt.step()
                with torch.no_grad():
                    for p, m in zip(weights, masks):
                        p.mul_(m)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
            p.grad = None


@dataclass
class Reconstruction:
    """The engine's recovery step: carries the dense activation stream beside the pruned one and tunes
    each layer once its kernel has run. ``dense`` holds the current layer's dense inputs (the engine sets
    it from the layer-0 inputs, or from a resumed run's saved state)."""

    adapter: Adapter
    spec: ReconstructSpec
    layers: list[dict] = field(default_factory=list)  # per layer: error before/after, tuned, seconds
    dense: list[torch.Tensor] | None = None
    _targets: dict = field(default_factory=dict)

    @torch.no_grad()
    def targets(self, layer: nn.Module, kwargs: list[dict], device: torch.device) -> None:
        """The dense layer's outputs on the dense inputs (and the residual stream after attention, for
        ``sublayer``); called before the kernel prunes ``layer``."""
        a = self.adapter
        dtype = next(layer.parameters()).dtype
        mids, outs = [], []
        for h, kw in zip(self.dense, kwargs):
            mid = a.attention_block(layer, h.to(device, dtype), kw)
            outs.append(a.mlp_block(layer, mid).to(h.device, h.dtype))
            mids.append(mid.to(h.device, h.dtype) if self.spec.granularity == "sublayer" else None)
            del mid
        self._targets = {"mid": mids, "out": outs}

    def tune(self, index: int, layer: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
             device: torch.device, outputs: list[torch.Tensor], last: bool) -> list[torch.Tensor]:
        """Tune the pruned ``layer`` in place on the pruned ``inputs``; returns its outputs (the engine's own
        ``outputs`` when nothing changed, so 0 steps is bit-identical to no recovery). The dense stream
        advances to the next layer."""
        start = time.perf_counter()
        a, spec = self.adapter, self.spec
        outs = self._targets["out"]
        moved = _tunable(a, layer, PROJECTIONS, spec.norms)
        before_weights = [w.detach().clone() for w in moved]
        before = self._error(layer, inputs, kwargs, device, outs)
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + index)
        total = spec.steps * (2 if spec.granularity == "sublayer" else 1)
        with tqdm(total=total, desc=f"reconstruct layer {index}", leave=False, disable=total == 0) as bar:
            if spec.steps and spec.granularity == "layer":
                _tune(a, layer, PROJECTIONS,
                      lambda x, kw: a.mlp_block(layer, a.attention_block(layer, x, kw)),
                      inputs, outs, kwargs, spec, generator, bar)
            elif spec.steps:
                _tune(a, layer, ATTENTION, lambda x, kw: a.attention_block(layer, x, kw), inputs,
                      self._targets["mid"], kwargs, spec, generator, bar)
                mids = self._forward(layer, inputs, kwargs, device, attention_only=True)
                _tune(a, layer, MLP, lambda x, kw: a.mlp_block(layer, x), mids, outs, kwargs, spec, generator,
                      bar)
                del mids
        tuned = self._forward(layer, inputs, kwargs, device) if spec.steps else None
        after = relative_error(tuned, outs) if spec.steps else before
        improved = after < before
        if spec.steps and not improved:  # never worse than the kernel left it
            with torch.no_grad():
                for p, w in zip(moved, before_weights):
                    p.copy_(w)
            after = before
        self.layers.append({"layer": index, "error_before": before, "error_after": after, "tuned": improved,
                            "seconds": round(time.perf_counter() - start, 3)})
        self.dense = outs if not last else None
        self._targets = {}
        return tuned if improved and not last else outputs

    @torch.no_grad()
    def _forward(self, layer, inputs, kwargs, device, attention_only: bool = False) -> list[torch.Tensor]:
        a = self.adapter
        dtype = next(layer.parameters()).dtype
        out = []
        # each batch's result back where its input lives (the host, for a GPU)
        for h, kw in zip(inputs, kwargs):
            y = a.attention_block(layer, h.to(device, dtype), kw)
            out.append((y if attention_only else a.mlp_block(layer, y)).to(h.device, h.dtype))
        return out

    def _error(self, layer, inputs, kwargs, device, targets) -> float:
        return relative_error(self._forward(layer, inputs, kwargs, device), targets)

    def report(self) -> dict:
        rows = self.layers
        return {"granularity": self.spec.granularity, "steps": self.spec.steps, "lr": self.spec.lr,
                "batch": self.spec.batch, "norms": self.spec.norms, "layers": rows,
                "tuned_layers": sum(r["tuned"] for r in rows),
                "mean_error_before": sum(r["error_before"] for r in rows) / max(len(rows), 1),
                "mean_error_after": sum(r["error_after"] for r in rows) / max(len(rows), 1),
                "seconds": round(sum(r["seconds"] for r in rows), 3)}


# --- distillation ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillSpec:
    steps: int
    lr: float = 1e-5
    batch: int = 8  # windows per step, accumulated one micro-batch at a time
    micro_batch: int = 1
    eval_every: int = 10
    warmup: float = 0.1  # share of the steps with a linear warm-up
    checkpointing: bool = True
    seed: int = 0


def _lr_factor(step: int, spec: DistillSpec) -> float:
    warm = max(1, int(spec.warmup * spec.steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, spec.steps - warm)))


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def _checkpointing(model: nn.Module):
    """transformers' switches for activation checkpointing (renamed in v5; non-reentrant), or none."""
    if hasattr(model, "activation_checkpointing_enable"):
        return model.activation_checkpointing_enable, model.activation_checkpointing_disable
    if hasattr(model, "gradient_checkpointing_enable"):
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        return lambda: model.gradient_checkpointing_enable(**kwargs), model.gradient_checkpointing_disable
    return None, None


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, device: torch.device,
                micro_batch: int = 1) -> float:
    """Mean per-token KL(teacher ‖ student) on ``windows``."""
    total = 0.0
    for start in range(0, windows.shape[0], micro_batch):
        ids = windows[start:start + micro_batch].to(device)
        with _autocast(device):
            kl = _kl(student(input_ids=ids, use_cache=False).logits,
                     teacher(input_ids=ids, use_cache=False).logits)
        total += float(kl) * ids.shape[0]
    return total / windows.shape[0]


def distill(student: nn.Module, teacher: nn.Module, adapter: Adapter, train: torch.Tensor,
            held_out: torch.Tensor, spec: DistillSpec) -> dict:
    """End-to-end distillation of ``student`` (in place, mask frozen) from ``teacher`` on ``train`` windows;
    the state with the lowest KL on ``held_out`` windows is kept. Returns the curve and the time."""
    start = time.perf_counter()
    device = next(student.parameters()).device
    params = [adapter.projection(layer, p).weight for layer in adapter.layers(student) for p in PROJECTIONS]
    masks = [p != 0 for p in params]
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, spec))
    generator = torch.Generator().manual_seed(spec.seed)
    enable, disable = _checkpointing(student) if spec.checkpointing else (None, None)
    if enable is not None:
        enable()
    best = held_out_kl(student, teacher, held_out, device, spec.micro_batch)
    curve = [{"step": 0, "held_out_kl": best}]
    best_state, best_step = [p.detach().to("cpu", copy=True) for p in params], 0
    micro = max(1, min(spec.micro_batch, spec.batch))
    try:
        # activation checkpointing is active in training mode only; these models have no dropout
        student.train()
        bar = tqdm(range(spec.steps), desc="distill", leave=False)
        for step in bar:
            pick = torch.randperm(train.shape[0], generator=generator)[:spec.batch]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for k in range(0, pick.numel(), micro):
                ids = train[pick[k:k + micro]].to(device)
                with torch.no_grad(), _autocast(device):
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
                with torch.enable_grad(), _autocast(device):
                    loss = (_kl(student(input_ids=ids, use_cache=False).logits, t_logits) * ids.shape[0]
                            / pick.numel())
                    loss.backward()
                total += loss.item()
                del t_logits
            for p, m in zip(params, masks):
                if p.grad is not None:
                    p.grad.mul_(m)
            opt.step()
            sched.step()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    p.mul_(m)
            bar.set_postfix(kl=f"{total:.4f}")
            if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
                student.eval()
                kl = held_out_kl(student, teacher, held_out, device, spec.micro_batch)
                student.train()
                curve.append({"step": step + 1, "train_kl": total, "held_out_kl": kl})
                if kl < best:
                    best, best_step = kl, step + 1
                    best_state = [p.detach().to("cpu", copy=True) for p in params]
    finally:
        student.eval()
        if disable is not None:
            disable()
        for p, was in frozen:
            p.requires_grad_(was)
            p.grad = None
    if best_step != spec.steps:  # the held-out best came earlier (or was the start): go back to it
        with torch.no_grad():
            for p, w in zip(params, best_state):
                p.copy_(w.to(p.device))
    return {"steps": spec.steps, "lr": spec.lr, "batch": spec.batch, "best_step": best_step,
            "held_out_kl_before": curve[0]["held_out_kl"], "held_out_kl_after": best, "curve": curve,
            "seconds": round(time.perf_counter() - start, 3)}


def teacher_copy(model: nn.Module) -> nn.Module:
    """The dense model, kept as the distillation teacher before pruning changes ``model`` in place."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_need(model: nn.Module, seqlen: int, micro_batch: int = 1) -> int:
    """Bytes distillation adds to the loaded model: the teacher, the projections' gradients, AdamW's two
    moments and the best state kept (fp32), one micro-batch's logits (teacher, student, their log-softmax
    and its gradient) and the checkpointed layer inputs."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    config = model.config
    logits = micro_batch * seqlen * config.vocab_size * 4 * 5
    checkpoints = micro_batch * seqlen * config.hidden_size * 4 * (config.num_hidden_layers + 8)
    return weights + adapter_params * 4 * 4 + logits + checkpoints


def check_distill_fits(model: nn.Module, seqlen: int) -> None:
    """Teacher and student together, the optimizer's state and one micro-batch's logits must fit where the
    model lives; refuse in one line before any work otherwise."""
    device = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    context = int(getattr(model.config, "max_position_embeddings", seqlen) or seqlen)
    need = distill_need(model, min(seqlen, context))
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else fit.available_memory()
    if need > have:
        raise OptionError("distill_steps", f"distillation needs about {need / 2**30:.1f} GiB beside what is "
                          f"loaded (a dense teacher of {weights / 2**30:.1f} GiB, the optimizer's state and "
                          f"one window's logits) and {have / 2**30:.1f} GiB is free on {device}; use "
                          "--reconstruct alone, or a smaller --seqlen")

