"""Distillation across ranks with FSDP2: student and teacher sharded, the mask kept on every shard.

``recover.distill`` holds the dense teacher, the student and AdamW's state in one process. Under torchrun
with more than one rank this does the same with each rank holding a 1/N share of all of it:

- the student is copied in fp32 (its own master weights) and sharded layer by layer with ``fully_shard``;
  mixed precision computes in the model's dtype (bf16 on a GPU) and reduces gradients in fp32;
- the teacher is sharded the same way (no gradients);
- each weight's mask is ``weight != 0`` on the sharded weight: a DTensor sharded exactly like it, so the
  gradients are masked before AdamW and the zeros re-imposed after it on every shard
  (``recover.masked_step``);
- each step draws the windows one process draws; every rank runs its share (FSDP averages the gradients
  over ranks, so each rank's loss is scaled by the world size);
- the held-out KL is every window's KL added in the windows' order, so all ranks agree on the best step,
  whose shards are kept and finally gathered into the run's model (in its dtype) on every rank.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm.auto import tqdm

from mosaic import dist
from mosaic.adapter import Adapter
from mosaic.recover import (
    DistillSpec,
    _checkpointing,
    _kl,
    distilled_weights,
    guard_nll,
    guard_row,
    masked_step,
    no_worse,
    optimizer,
)


def shard(model: nn.Module, adapter: Adapter, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``model`` sharded over the ranks in place, each decoder layer a unit of its own, then the rest; the
    shards then move to ``device`` (the unsharded model stays where it was loaded, never on the GPU)."""
    mesh = init_device_mesh(device.type, (dist.world(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in adapter.layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model.to(device)


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, device: torch.device) -> float:
    """Mean per-token KL(teacher ‖ student) on ``windows``, each rank its share; every rank runs the same
    number of forwards (FSDP gathers weights in each), the last ones repeated where the share is short."""
    n, world = windows.shape[0], dist.world()
    mine, kls = dist.mine(n), []
    for k in range(-(-n // world)):
        w = mine[k] if k < len(mine) else mine[-1] if mine else 0
        ids = windows[w:w + 1].to(device)
        kl = float(_kl(student(input_ids=ids, use_cache=False).logits,
                       teacher(input_ids=ids, use_cache=False).logits))
        if k < len(mine):
            kls.append((w, kl))
    return dist.ordered_sum(kls) / n


def distill(student: nn.Module, teacher: nn.Module, adapter: Adapter, train: torch.Tensor,
            held_out: torch.Tensor, spec: DistillSpec, device: torch.device,
            guard: dict[str, torch.Tensor] | None = None) -> dict:
    """``recover.distill`` across ranks, on ``device``: the run's ``student`` ends with the best state found,
    on every rank. ``spec.batch`` must be a multiple of ranks × ``spec.micro_batch`` (every rank runs as many
    micro-batches as the others; checked with the options). The teacher is sharded in place (it is
    freed after this). Every rank scores all ``guard`` windows (the same forwards, so the same choice)."""
    start = time.perf_counter()
    dtype = next(student.parameters()).dtype
    # what one process's autocast computes in: bf16 on a GPU, the model's dtype elsewhere
    compute = torch.bfloat16 if device.type == "cuda" else dtype
    world = dist.world()
    work = shard(copy.deepcopy(student).float(), adapter, compute, device)  # fp32: its own masters
    teacher = shard(teacher, adapter, compute, device)
    params = distilled_weights(adapter, work)
    masks = [p != 0 for p in params]  # DTensors, sharded like their weights
    for p in work.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt, sched = optimizer(params, spec)  # the fp32 shards are their own masters
    generator = torch.Generator().manual_seed(spec.seed)
    enable, disable = _checkpointing(work) if spec.checkpointing else (None, None)
    if enable is not None:
        enable()
    work.eval()
    best = held_out_kl(work, teacher, held_out, device)
    start_nll = guard_nll(work, guard, device)
    curve = [{"step": 0, "held_out_kl": best, **guard_row(start_nll)}]
    best_state = [p.to_local().detach().clone() for p in params]  # this rank's shards
    best_step = 0
    micro = max(1, min(spec.micro_batch, spec.batch))
    try:
        work.train()
        bar = tqdm(range(spec.steps), desc=f"distill ({world} ranks, FSDP2)", leave=False)
        for step in bar:
            pick = torch.randperm(train.shape[0], generator=generator)[:spec.batch]
            share = pick[dist.rank()::world]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for k in range(0, share.numel(), micro):
                ids = train[share[k:k + micro]].to(device)
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
                # FSDP averages the ranks' gradients: each rank's part of the mean is scaled by the ranks
                kl = _kl(work(input_ids=ids, use_cache=False).logits, t_logits)
                loss = kl * ids.shape[0] / pick.numel()
                (loss * world).backward()
                total += loss.item()
                del t_logits, kl, loss
            masked_step(opt, params, params, masks)
            sched.step()
            total = dist.sum_float(total)
            bar.set_postfix(kl=f"{total:.4f}")
            if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
                work.eval()
                kl = held_out_kl(work, teacher, held_out, device)
                nll = guard_nll(work, guard, device)
                work.train()
                curve.append({"step": step + 1, "train_kl": total, "held_out_kl": kl, **guard_row(nll)})
                if kl < best and no_worse(nll, start_nll):
                    best, best_step = kl, step + 1
                    for kept, p in zip(best_state, params):
                        kept.copy_(p.to_local().detach())
    finally:
        work.eval()
        if disable is not None:
            disable()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        del opt, sched
    with torch.no_grad():
        for p, kept, target in zip(params, best_state, distilled_weights(adapter, student)):
            p.to_local().copy_(kept)
            target.copy_(p.full_tensor().to(target.dtype))  # a collective: every rank gathers
    del work
    return {"steps": spec.steps, "lr": spec.lr, "batch": spec.batch, "best_step": best_step,
            "held_out_kl_before": curve[0]["held_out_kl"], "held_out_kl_after": best, "curve": curve,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "ranks": world,
            "sharding": "FSDP2", "seconds": round(time.perf_counter() - start, 3)}
