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
composite widths hold. The optimizer never steps in bf16 or fp16: a tuned parameter of a half-precision
model gets an fp32 master copy that Adam updates, and the model's weight is the master rounded to its
dtype after each step (at lr 1e-5 an update is far below half a bf16 step of a weight near 0.02, and
would round away if applied to the bf16 weight itself). fp32 parameters are their own masters.

By default only the seven projections' weights move; with ``norms`` the layer's
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

from mosaic import dist, fit
from mosaic.adapter import ATTENTION, MLP, PROJECTIONS, Adapter
from mosaic.calibrate import Activations, capture, layer_kwargs, on_device
from mosaic.errors import OptionError
from mosaic.fit import FP32

log = logging.getLogger(__name__)

GRANULARITIES = ("none", "layer", "sublayer")
GUARD_WINDOWS = 4  # held-out windows per guard text (``Guard``)
GUARD_SHARES = (0.5, 1.0)  # shares of a layer's tuning the guard tries (besides none)


@dataclass(frozen=True)
class ReconstructSpec:
    """Knobs of the layer-wise reconstruction (defaults: the best measured on calibration text)."""

    granularity: str = "layer"  # layer | sublayer (layer measured better: recover.md)
    steps: int = 20
    lr: float = 1e-3  # beat 5e-4 on calib ppl with SparseGPT and ALPS at 70% (recover.md)
    batch: int = 8  # calibration windows per step
    seed: int = 0
    norms: bool = False  # also tune the layer's norm scales and biases (measured: recover.md)


def relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """‖outputs − targets‖² / ‖targets‖², over all windows (every rank's, under torchrun)."""
    num = sum(float((o.double() - t.double()).pow(2).sum()) for o, t in zip(outputs, targets))
    den = sum(float(t.double().pow(2).sum()) for t in targets)
    return dist.sum_float(num) / max(dist.sum_float(den), 1e-30)


def _squared_error(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ (y − t)², in fp32 whatever the model's dtype. Divided by the step's Σ t² (over all ranks) it is the
    step's loss: every layer's loss on the same scale, whatever the size of the residual stream (SmolLM2's
    grows ~1000× with depth)."""
    return (y.float() - t.float()).pow(2).sum()


def master_copies(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """What the optimizer updates: an fp32 copy of each half-precision parameter, the parameter itself when
    it is fp32 already (so fp32 runs are unchanged, bit for bit)."""
    return [p if p.dtype == torch.float32 else p.detach().float() for p in params]


def masked_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], masters: list[torch.Tensor],
                masks: list[torch.Tensor | None]) -> None:
    """One optimizer step on the fp32 ``masters`` from the gradients of ``params``: gradients masked before
    the step, zeros re-imposed after it, then each parameter set to its master rounded to its dtype.
    ``masks[i]`` None: the parameter has no mask (norm scales, biases)."""
    for p, w, m in zip(params, masters, masks):
        if p.grad is None:
            w.grad = None
            continue
        g = p.grad if w is p else p.grad.float()
        w.grad = g.mul_(m) if m is not None else g
    opt.step()
    with torch.no_grad():
        for p, w, m in zip(params, masters, masks):
            if m is not None:
                w.mul_(m)
            if w is not p:
                p.copy_(w)
                w.grad = None


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


def _global_windows(batches: list[torch.Tensor]) -> tuple[list[tuple[int, int]], dict]:
    """Every rank's calibration windows as (global batch, row), in the order one process holds them, and
    those this rank holds: (global batch, row) -> (its batch, row). Batches are dealt round robin
    (``dist.my_batches``); one process holds them all."""
    sizes = dist.gathered([h.shape[0] for h in batches])  # per rank, its batches' sizes
    world, me = len(sizes), dist.rank()
    index, local = [], {}
    for g in range(sum(len(s) for s in sizes)):
        owner, j = g % world, g // world
        for row in range(sizes[owner][j]):
            index.append((g, row))
            if owner == me:
                local[(g, row)] = (j, row)
    return index, local


def _gather(batches: list[torch.Tensor], rows: list[tuple[int, int]], device, dtype) -> torch.Tensor:
    return torch.cat([batches[b][r:r + 1] for b, r in rows]).to(device, dtype)


def _step_loss(forward, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs, rows, device,
               dtype) -> float:
    """This rank's part of one step's loss, Σ (y − t)² over its ``rows`` divided by the step's Σ t² over
    all ranks, and its backward; the gradients are then summed over ranks (``_tune``)."""
    t = _gather(targets, rows, device, dtype) if rows else None
    scale = dist.sum_float(float(t.float().pow(2).sum()) if rows else 0.0)
    if not rows:
        return 0.0
    x = _gather(inputs, rows, device, dtype)
    kw = _expand_kwargs(kwargs[0], inputs[0].shape[0], len(rows))
    loss = _squared_error(forward(x, kw), t) / max(scale, 1e-12)
    loss.backward()
    return float(loss.detach())


def _tunable(adapter: Adapter, layer: nn.Module, names: tuple[str, ...], norms: bool) -> list[nn.Parameter]:
    """What reconstruction moves: the projections' weights of ``names`` first, then, with ``norms``, the
    parameters no mask covers (``Adapter.unmasked``)."""
    return [adapter.projection(layer, p).weight for p in names] + (adapter.unmasked(layer, names) if norms
                                                                   else [])


def _tune(adapter: Adapter, layer: nn.Module, names: tuple[str, ...], forward, inputs: list[torch.Tensor],
          targets: list[torch.Tensor], kwargs, spec: ReconstructSpec, generator: torch.Generator,
          bar: tqdm | None) -> None:
    """Adam steps (on fp32 masters) on the kept weights of ``names`` (and, with ``spec.norms``, their
    unmasked parameters) so that ``forward(x, kw)`` matches ``targets``. Nothing else in ``layer`` takes a
    gradient, and no ``.grad`` is left behind."""
    params = _tunable(adapter, layer, names, spec.norms)
    weights = params[:len(names)]
    masks = [p != 0 for p in weights] + [None] * (len(params) - len(names))
    masters = master_copies(params)
    device, dtype = weights[0].device, weights[0].dtype
    # every step draws its windows from all ranks' (the draw one process makes); each rank runs those it
    # holds, the loss is normalised by the step's Σ t² over all ranks, and the gradients are summed
    index, local = _global_windows(inputs)
    size = min(spec.batch, len(index))
    everything = list(layer.parameters())
    was = [p.requires_grad for p in everything]
    for p in everything:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(masters, lr=spec.lr)
    try:
        with torch.enable_grad():
            for _ in range(spec.steps):
                pick = torch.randperm(len(index), generator=generator)[:size]
                rows = [local[index[k]] for k in pick.tolist() if index[k] in local]
                opt.zero_grad(set_to_none=True)
                for p in params:
                    p.grad = None
                loss = _step_loss(forward, inputs, targets, kwargs, rows, device, dtype)
                if dist.world() > 1:
                    for p in params:
                        p.grad = dist.sum_(p.grad if p.grad is not None else torch.zeros_like(p))
                masked_step(opt, params, masters, masks)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    finally:
        for p, w in zip(everything, was):
            p.requires_grad_(w)
            p.grad = None
        for w in masters:
            w.grad = None


def choose_share(measured: dict[float, dict[str, float]]) -> float:
    """``measured[share][text]``: a guard text's NLL with that share of a layer's tuning (0: none). The share
    with the lowest total NLL (geometric mean perplexity) among those that raise no text's NLL above share
    0's; 0 if none does."""
    base = measured[0.0]
    safe = [s for s in measured if s > 0 and all(measured[s][t] <= base[t] for t in base)]
    return min(safe, key=lambda s: sum(measured[s].values())) if safe else 0.0


@dataclass
class Guard:
    """Held-out windows of the texts reconstruction must not make worse, carried through the layers beside
    the calibration windows: each text's token ids, its inputs to the current layer in the pruned model (after
    the shares kept so far), and every layer's kwargs for a batch of them. ``nll`` scores a layer's candidate
    weights end to end: the layer, then the layers after it (not yet pruned), the final norm and the head."""

    model: nn.Module
    adapter: Adapter
    ids: dict[str, torch.Tensor]  # text -> [windows, seqlen] token ids
    pruned: dict[str, torch.Tensor]  # text -> [windows, seqlen, hidden], on the host
    layer_kwargs: dict[int, list[dict]]  # as Activations.layer_kwargs

    @classmethod
    def capture(cls, model: nn.Module, adapter: Adapter, texts: dict[str, torch.Tensor]) -> Guard:
        """Layer-0 inputs of every text's windows (one batch per text), before anything is pruned."""
        sizes = {w.shape[0] for w in texts.values()}
        if len(sizes) != 1:
            raise ValueError("every guard text needs the same number of windows")
        acts = capture(model, adapter, torch.cat(list(texts.values())), sizes.pop())
        return cls(model, adapter, dict(texts), dict(zip(texts, acts.hidden)), acts.layer_kwargs)

    def kwargs(self, index: int, device: torch.device, dtype: torch.dtype) -> dict:
        size = next(iter(self.ids.values())).shape[0]
        like = torch.empty(size, 0, dtype=dtype)
        return layer_kwargs(Activations([], self.layer_kwargs), index, like, device, {})

    @torch.no_grad()
    def nll(self, text: str, index: int, hidden: torch.Tensor, device: torch.device) -> float:
        """Mean next-token NLL of ``text``'s windows from ``hidden``, the output of layer ``index``."""
        a, layers = self.adapter, self.adapter.layers(self.model)
        x = hidden
        for j in range(index + 1, len(layers)):
            with on_device(layers[j], device) as at:
                dtype = next(layers[j].parameters()).dtype
                kw = self.kwargs(j, at, dtype)
                x = a.mlp_block(layers[j], a.attention_block(layers[j], x.to(at, dtype), kw))
        norm, head = a.final_norm(self.model), a.lm_head(self.model)
        total = 0.0
        with on_device(norm, device) as at, on_device(head, at):
            for row, ids in zip(x, self.ids[text]):  # one window's logits at a time
                logits = head(norm(row[None].to(at, next(head.parameters()).dtype)))[0, :-1].float()
                total += float(F.cross_entropy(logits, ids[1:].to(at)))
        return total / x.shape[0]


@dataclass
class Reconstruction:
    """The engine's recovery step: carries the dense activation stream beside the pruned one and tunes
    each layer once its kernel has run. ``dense`` holds the current layer's dense inputs (the engine sets
    it from the layer-0 inputs, or from a resumed run's saved state)."""

    adapter: Adapter
    spec: ReconstructSpec
    layers: list[dict] = field(default_factory=list)  # per layer: error before/after, tuned, seconds
    dense: list[torch.Tensor] | None = None
    guard: Guard | None = None  # texts whose NLL no layer's tuning may raise (``_guard``)
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
        row = {"layer": index}
        if self.guard is not None:
            share, row["guard"] = self._guard(index, layer, moved, before_weights, device, improved)
            if improved and share < 1:  # a smaller share (or none) of the tuning: the outputs change with it
                improved = share > 0
                tuned = self._forward(layer, inputs, kwargs, device) if improved else None
                after = relative_error(tuned, outs) if improved else before
        self.layers.append({**row, "error_before": before, "error_after": after, "tuned": improved,
                            "seconds": round(time.perf_counter() - start, 3)})
        self.dense = outs if not last else None
        self._targets = {}
        return tuned if improved and not last else outputs

    @torch.no_grad()
    def _guard(self, index: int, layer: nn.Module, moved: list[nn.Parameter], kernel: list[torch.Tensor],
               device: torch.device, changed: bool) -> tuple[float, dict]:
        """Keep the share ``s`` of this layer's tuning, W = K + s (T − K) (K: the kernel's weights, T: the
        tuned ones; they share their zeros), with the lowest NLL on the guard texts among the shares that
        raise *no* text's NLL above the kernel's (s = 0), each scored end to end through the layers after this
        one (``Guard.nll``): the layer-wise loss only sees the calibration text, and on other kinds of text
        its gain can turn into harm downstream (a lower layer error on code does not mean a lower code NLL).
        The guard's inputs then advance through the layer as kept. Returns the share and every share's NLL."""
        g = self.guard
        kw = g.kwargs(index, device, next(layer.parameters()).dtype)
        tuned = [w.detach().clone() for w in moved]

        def keep(share: float) -> None:
            for p, k, t in zip(moved, kernel, tuned):
                p.copy_(k if share == 0 else t if share == 1 else k.float() + share * (t.float() - k.float()))

        measured = {}
        for share in (0.0, *(GUARD_SHARES if changed else ())):
            keep(share)
            measured[share] = {t: g.nll(t, index, self._forward(layer, [h], [kw], device)[0], device)
                               for t, h in g.pruned.items()}
        share = choose_share(measured)
        keep(share)
        g.pruned = {t: self._forward(layer, [h], [kw], device)[0] for t, h in g.pruned.items()}
        return share, {"share": share, "nll": [{"share": s, **e} for s, e in measured.items()]}

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
        guard = None
        if self.guard is not None:
            shares = [r["guard"]["share"] for r in rows]
            windows = next(iter(self.guard.pruned.values())).shape[0]
            guard = {"texts": list(self.guard.pruned), "windows": windows, "shares": shares,
                     "mean_share": sum(shares) / max(len(shares), 1)}
        return {"granularity": self.spec.granularity, "steps": self.spec.steps, "lr": self.spec.lr,
                "batch": self.spec.batch, "norms": self.spec.norms, "guard": guard, "layers": rows,
                "tuned_layers": sum(r["tuned"] for r in rows),
                "mean_error_before": sum(r["error_before"] for r in rows) / max(len(rows), 1),
                "mean_error_after": sum(r["error_after"] for r in rows) / max(len(rows), 1),
                "seconds": round(sum(r["seconds"] for r in rows), 3)}


# --- the guard's end-to-end measure (distillation) ------------------------------------------------------

@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor, device: torch.device) -> float:
    """Mean next-token negative log-likelihood of ``model`` on ``windows`` [n, seqlen], one at a time."""
    total = 0.0
    for row in windows:
        ids = row[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:]))
    return total / windows.shape[0]


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
    host: bool = False  # distil on the host even when a GPU computes (slow; for students it cannot hold)


def _lr_factor(step: int, spec: DistillSpec) -> float:
    warm = max(1, int(spec.warmup * spec.steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, spec.steps - warm)))


def optimizer(masters: list[torch.Tensor], spec: DistillSpec):
    """What distillation steps the fp32 ``masters`` with: AdamW (no weight decay), warm-up, cosine decay."""
    opt = torch.optim.AdamW(masters, lr=spec.lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, spec))


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


def distilled_weights(adapter: Adapter, model: nn.Module) -> list[nn.Parameter]:
    """What distillation moves: every decoder layer's seven projection weights."""
    return [adapter.projection(layer, p).weight for layer in adapter.layers(model) for p in PROJECTIONS]


def guard_nll(model: nn.Module, guard: dict[str, torch.Tensor] | None, device: torch.device) -> dict:
    """Mean NLL of ``model`` on each guard text's windows ({} without a guard)."""
    return {name: mean_nll(model, w, device) for name, w in (guard or {}).items()}


def no_worse(nll: dict[str, float], start: dict[str, float]) -> bool:
    """No guard text's NLL above its value at the start."""
    return all(nll[name] <= start[name] for name in start)


def distill(student: nn.Module, teacher: nn.Module, adapter: Adapter, train: torch.Tensor,
            held_out: torch.Tensor, spec: DistillSpec, guard: dict[str, torch.Tensor] | None = None) -> dict:
    """End-to-end distillation of ``student`` (in place, mask frozen) from ``teacher`` on ``train`` windows,
    where the student lives; the state with the lowest KL on ``held_out`` windows is kept (one copy, on the
    host), among those that leave every ``guard`` text's NLL at or below its value at the start. AdamW updates
    fp32 masters of half-precision weights. Returns the curve and the time."""
    start = time.perf_counter()
    device = next(student.parameters()).device
    params = distilled_weights(adapter, student)
    masks = [p != 0 for p in params]
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    masters = master_copies(params)
    opt, sched = optimizer(masters, spec)
    generator = torch.Generator().manual_seed(spec.seed)
    enable, disable = _checkpointing(student) if spec.checkpointing else (None, None)
    if enable is not None:
        enable()
    best = held_out_kl(student, teacher, held_out, device, spec.micro_batch)
    start_nll = guard_nll(student, guard, device)
    curve = [{"step": 0, "held_out_kl": best, **guard_row(start_nll)}]
    best_state = [p.detach().to("cpu", copy=True) for p in params]  # overwritten in place by a new best
    best_step = 0
    micro = max(1, min(spec.micro_batch, spec.batch))
    try:
        # activation checkpointing is active in training mode only; these models have no dropout
        student.train()
        bar = tqdm(range(spec.steps), desc="distill", leave=False)
        for step in bar:
            pick = torch.randperm(train.shape[0], generator=generator)[:spec.batch]
            opt.zero_grad(set_to_none=True)
            for p in params:
                p.grad = None
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
                del t_logits, loss
            masked_step(opt, params, masters, masks)
            sched.step()
            bar.set_postfix(kl=f"{total:.4f}")
            if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
                student.eval()
                kl = held_out_kl(student, teacher, held_out, device, spec.micro_batch)
                nll = guard_nll(student, guard, device)
                student.train()
                curve.append({"step": step + 1, "train_kl": total, "held_out_kl": kl, **guard_row(nll)})
                if kl < best and no_worse(nll, start_nll):
                    best, best_step = kl, step + 1
                    for kept, p in zip(best_state, params):
                        kept.copy_(p.detach())
    finally:
        student.eval()
        if disable is not None:
            disable()
        for p, was in frozen:
            p.requires_grad_(was)
            p.grad = None
        for w in masters:
            w.grad = None
        del opt, sched, masters
    if best_step != spec.steps:  # the held-out best came earlier (or was the start): go back to it
        with torch.no_grad():
            for p, w in zip(params, best_state):
                p.copy_(w.to(p.device))
    return {"steps": spec.steps, "lr": spec.lr, "batch": spec.batch, "best_step": best_step,
            "held_out_kl_before": curve[0]["held_out_kl"], "held_out_kl_after": best, "curve": curve,
            "device": str(device), "dtype": str(params[0].dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - start, 3)}


def guard_row(nll: dict[str, float]) -> dict:
    return {"guard_ppl": {name: math.exp(v) for name, v in nll.items()}} if nll else {}


def teacher_copy(model: nn.Module) -> nn.Module:
    """The dense model, kept as the distillation teacher before pruning changes ``model`` in place."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def distill_need(student: nn.Module, teacher_bytes: int, seqlen: int, micro_batch: int = 1, ranks: int = 1
                 ) -> dict[str, dict[str, int]]:
    """Bytes distillation holds beside the loaded student, by where they live. ``device`` (where the student
    computes): the teacher; for the projections' weights the gradients (and, for a half-precision model,
    their fp32 copies), the fp32 masters of a half-precision model, AdamW's two fp32 moments and the
    temporary of one moment's size its step builds, and the masks;
    one micro-batch's logits (teacher, student, their log-softmax and its gradient, fp32), the
    checkpointed layer inputs and one layer's attention scores. ``host``: the best state kept (the weights
    in their own dtype).

    With ``ranks`` > 1 (FSDP2, ``sharded.distill``) each rank's device holds a 1/ranks share of the fp32
    student (its own masters), the teacher, the gradients, AdamW's moments and the masks, plus the whole
    weights of the layers being gathered (two, of the student and of the teacher), and its share of the
    best state on the host."""
    tuned = [p for n, p in student.named_parameters() if n.endswith("proj.weight")]
    numel = sum(p.numel() for p in tuned)
    size = tuned[0].element_size() if tuned else FP32
    half = size < FP32
    config = student.config
    if ranks > 1:
        layer_bytes = model_bytes(student) // max(config.num_hidden_layers, 1)
        shares = {"student": model_bytes(student) * FP32 // size // ranks, "teacher": teacher_bytes // ranks,
                  "gradients": numel * FP32 // ranks, "adam": 3 * numel * FP32 // ranks,
                  "masks": numel // ranks, "gathered_layers": 2 * 2 * layer_bytes * FP32 // size}
    else:
        shares = {"teacher": teacher_bytes, "gradients": numel * (size + (FP32 if half else 0)),
                  "masters": numel * FP32 if half else 0, "adam": 3 * numel * FP32, "masks": numel}
    device = {
        **shares,
        "logits": micro_batch * seqlen * config.vocab_size * FP32 * 5,
        "checkpoints": micro_batch * seqlen * config.hidden_size * FP32 * (config.num_hidden_layers + 8),
        # one layer's attention scores and probabilities, when SDPA falls back to the math path (which kernel
        # runs depends on the CPU or GPU; the fused ones need far less)
        "attention": micro_batch * config.num_attention_heads * seqlen * seqlen * FP32 * 2,
    }
    return {"device": device, "host": {"best_state": numel * (FP32 if ranks > 1 else size) // ranks}}



def distill_device(student: nn.Module, teacher_bytes: int, compute: torch.device, seqlen: int,
                   spec: DistillSpec, host_budget: int, headroom: float = fit.HEADROOM, ranks: int = 1
                   ) -> torch.device:
    """Where distillation runs: on the compute device when the student (if it is not there yet), the teacher
    and the training state fit in ``headroom`` of its free memory (as ``load.place`` decides), on the host
    when the run computes there or ``spec.host`` asks for it. Refuses in one line, naming the memory needed,
    when the chosen place cannot hold it (``host_budget``: the host bytes the run may use). With ``ranks``
    > 1 each rank's share is counted (FSDP2), and the student never moves whole to the device."""
    context = int(getattr(student.config, "max_position_embeddings", seqlen) or seqlen)
    need = distill_need(student, teacher_bytes, min(seqlen, context), spec.micro_batch, ranks)
    on_device, on_host = sum(need["device"].values()), sum(need["host"].values())
    where = next(student.parameters()).device
    if compute.type == "cpu" or spec.host:
        total = on_device + on_host + (model_bytes(student) if where.type != "cpu" else 0)
        if total > host_budget:
            raise OptionError("distill_steps", f"distillation needs about {total / 2**30:.1f} GiB of host "
                              f"memory beside what is loaded (a dense teacher of {teacher_bytes / 2**30:.1f} "
                              f"GiB, the optimizer's state and one window's logits) and the budget is "
                              f"{host_budget / 2**30:.1f} GiB; use --reconstruct alone, a smaller --seqlen, "
                              "or a larger --max_memory")
        return torch.device("cpu")
    device_total = on_device + (model_bytes(student) if where != compute and ranks == 1 else 0)
    free = fit.device_free(compute)
    if device_total > headroom * free or on_host > host_budget:
        per_rank = f" per rank ({ranks} ranks, FSDP2)" if ranks > 1 else ""
        remedy = "more ranks, " if ranks > 1 else "--distill_device cpu to distil on the host (slow), "
        raise OptionError("distill_steps", f"distillation on {compute} needs about "
                          f"{device_total / 2**30:.1f} GiB there{per_rank} (student, dense teacher, "
                          f"optimizer state, logits) and {on_host / 2**30:.1f} GiB of host memory for the "
                          "best state; "
                          f"{headroom:.0%} of the {free / 2**30:.1f} GiB free on {compute} is too little; "
                          f"use {remedy}--reconstruct alone, or a smaller --seqlen")
    return compute
