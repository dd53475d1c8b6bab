"""The process group: who this rank is, which rank writes, and the few collectives the run needs.

A run launched by ``torchrun`` (or ``accelerate launch``) joins the group that the launcher's environment
describes (NCCL on CUDA, gloo on CPU); a plain process is world size 1, where every function here is the
identity or a no-op, so no caller has a second code path.

What the run splits and how it stays equal to one process:
- calibration batches go round robin (``my_batches``): each rank captures and forwards its own;
- sums over tokens (statistics, Fisher) are all-reduced in fp64 (``sum_``), so the order in which ranks
  add their partial sums changes only bits far below what the kernels read in fp32;
- sums of per-window scores (KL, NLL) are gathered and added in the windows' global order (``ordered``),
  so they are the same floats one process adds;
- each projection group is pruned by one owner (``Owners``: least loaded by the kernel's cost) and its
  weights broadcast byte for byte (``broadcast_``), so every rank holds the same layer;
- only rank 0 writes (``is_writer``); what it reads or writes reaches the others through ``from_writer``,
  errors included, so a failure there never leaves a rank waiting.
A collective that fails (a rank died, or the group timed out) raises ``RankFailure``.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as td

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A collective failed: another rank died or the group timed out."""


def launched() -> bool:
    """Started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float) -> None:
    """Join the launcher's group (NCCL on CUDA, gloo on CPU); nothing for a single process."""
    if not launched() or td.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def close() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if active() else 0


def world() -> int:
    return td.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """Processes sharing this machine (its host memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def is_writer() -> bool:
    return rank() == 0


def mine(n: int) -> list[int]:
    """The indices of ``n`` items (batches, windows) this rank takes: round robin."""
    return list(range(rank(), n, world()))


def my_batches(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's calibration batches, concatenated: whole batches round robin, so the last (possibly
    short) batch stays last and re-splitting by ``batch_size`` gives the very batches one process runs."""
    if world() == 1:
        return windows
    batches = windows.split(batch_size)
    return torch.cat([batches[i] for i in mine(len(batches))])


def _checked(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RankFailure:
        raise
    except RuntimeError as err:  # gloo/NCCL: a peer closed its connection, or the timeout passed
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise RankFailure(f"a collective failed ({first}); another rank died or the group timed out") from err


def _on_backend(tensor: torch.Tensor, op: Callable[[torch.Tensor], object]) -> None:
    """``op`` on ``tensor`` where the backend reaches it (NCCL: the rank's GPU), the result kept in place."""
    device = _device()
    if tensor.device == device:
        _checked(lambda: op(tensor))
        return
    moved = tensor.to(device)
    _checked(lambda: op(moved))
    tensor.copy_(moved)


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce ``tensor`` in place (a sum) and return it."""
    if active():
        _on_backend(tensor, td.all_reduce)
    return tensor


def sum_float(value: float) -> float:
    """A float summed over ranks, in fp64."""
    if not active():
        return value
    return float(sum_(torch.tensor([value], dtype=torch.float64, device=_device())).item())


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """``tensor`` made equal to rank ``src``'s, byte for byte (any dtype: sent as raw bytes)."""
    if active():
        flat = tensor.data if tensor.is_contiguous() else tensor.data.contiguous()
        raw = flat.view(-1).view(torch.uint8)
        _on_backend(raw, lambda t: td.broadcast(t, src))
        if flat is not tensor.data:
            tensor.data.copy_(flat)
    return tensor


def broadcast_object(obj: Any, src: int) -> Any:
    if not active():
        return obj
    box = [obj]
    _checked(lambda: td.broadcast_object_list(box, src, device=_device()))
    return box[0]


def gathered(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list = [None] * world()
    _checked(lambda: td.all_gather_object(out, obj))
    return out


def ordered(pairs: list[tuple[int, Any]]) -> list[Any]:
    """Every rank's (global index, value) pairs, as one list of values in index order."""
    return [v for _, v in sorted((p for part in gathered(pairs) for p in part), key=lambda p: p[0])]


def ordered_sum(pairs: list[tuple[int, float]]) -> float:
    """Σ of every rank's values added in the global index order: the float one process adds."""
    return sum(ordered(pairs))


def barrier() -> None:
    if active():
        _checked(lambda: td.barrier())


def run_on(src: int, fn: Callable[[], T]) -> T:
    """``fn()`` on rank ``src``, its value (or its error) on every rank: no rank waits on a failed one."""
    if not active():
        return fn()
    value, error, original = None, None, None
    if rank() == src:
        try:
            value = fn()
        except Exception as err:  # raised on every rank, below
            original, error = err, _portable(err)
    value, error = broadcast_object((value, error), src)
    if original is not None:
        raise original
    if error is not None:
        raise error
    return value


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (to reach the other ranks), else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def from_writer(fn: Callable[[], T]) -> T:
    """``fn()`` run by the writer (rank 0) alone; its value or error on every rank."""
    return run_on(0, fn)


def rank_file(name: str) -> str:
    """The name of this rank's copy of a per-rank file (its own calibration inputs): ``name`` on rank 0."""
    return name if rank() == 0 else f"{name}.rank{rank()}"


class Owners:
    """Which rank prunes each projection group: the least loaded so far, by the kernel's cost (computed
    alike on every rank, so all agree without talking)."""

    def __init__(self) -> None:
        self.load = [0.0] * world()

    def owner(self, cost: float) -> int:
        chosen = min(range(len(self.load)), key=lambda r: (self.load[r], r))
        self.load[chosen] += cost
        return chosen


def _device() -> torch.device:
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
