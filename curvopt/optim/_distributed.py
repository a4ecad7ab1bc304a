"""The optimizers under ``torch.distributed``: gradient averaging, agreement, inverse sharding.

The engine already makes every curvature statistic describe the *global*
batch (:mod:`curvopt.engine.distributed`), so the optimizer state (running
factor averages, inverses, momentum) is the same on every rank.  What is left
for the optimizer:

* **gradients** -- a model wrapped in ``DistributedDataParallel`` has them
  averaged by DDP (the global-batch gradient of a mean-reduced loss when the
  ranks hold equally many samples).  For a model that is *not* DDP-wrapped
  the optimizer averages them itself (``sync_gradients="auto"``), weighted by
  each rank's batch size, so unequal shards give the global gradient exactly
  (``Σ_r N_r g_r / N`` for a mean loss, ``Σ_r g_r`` for a sum).
* **agreement on skipped steps** -- whether the loss was finite is decided
  over all ranks (one flag in the same collective), so every rank skips or
  takes the same step.
* **inverse sharding** -- on inverse-update steps each Kronecker block's
  inverse (or eigendecomposition) is assigned to one rank by cost
  (greedy, largest :math:`\\sum_i d_i^3` first, onto the least loaded rank),
  computed there only, and broadcast as one flat buffer per owner and dtype.
  Every rank ends with bit-identical caches.

Every function here is a collective: all ranks call it in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._dist import allreduce_bucketed

__all__ = ["active", "rank", "world_size", "assign_by_cost", "allreduce_flag",
           "allreduce_sum", "average_gradients", "broadcast_from_owners"]


def active() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def allreduce_flag(flag: bool, device) -> bool:
    """``True`` on every rank if ``flag`` is ``True`` on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def allreduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` summed over ranks (new tensors; one collective per dtype/device bucket)."""
    return allreduce_bucketed(list(tensors))


def average_gradients(grads: Sequence[Tensor], n_local: int | None, mean: bool,
                      flag: bool) -> bool:
    """Turn rank-local gradients (in place) into the global batch's; return the any-rank flag.

    Mean-reduced loss: :math:`\\sum_r N_r g_r / \\sum_r N_r` (``n_local=None``: equal
    weights); sum: :math:`\\sum_r g_r`.  One ``all_reduce`` per (dtype, device) bucket;
    the batch size and ``flag`` travel in the first bucket.
    """
    w = float(n_local) if (mean and n_local is not None) else 1.0
    buckets: dict = {}
    for g in grads:
        buckets.setdefault((g.dtype, g.device), []).append(g)
    if not buckets:
        dev = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend() == "nccl") else torch.device("cpu")
        return allreduce_flag(flag, dev)
    any_flag = False
    for k, ((dtype, device), gs) in enumerate(buckets.items()):
        extra = [w, 1.0 if flag else 0.0] if k == 0 else [w]
        flat = torch.cat([g.reshape(-1) for g in gs]
                         + [torch.tensor(extra, dtype=dtype, device=device)])
        n = flat.numel() - len(extra)
        if w != 1.0:
            flat[:n].mul_(w)
        dist.all_reduce(flat)
        total = flat[n]
        if k == 0:
            any_flag = bool(flat[n + 1].item() > 0)
        if mean:
            flat[:n].div_(total)
        off = 0
        for g in gs:
            m = g.numel()
            g.copy_(flat[off : off + m].view_as(g))
            off += m
    return any_flag


def assign_by_cost(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: largest cost first onto the least loaded rank (ties: lowest)."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _layout(t: Tensor) -> int:
    """0: row-major contiguous; 1: a transposed contiguous matrix (LAPACK's column-major)."""
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        return 1
    return 0


def _flat(t: Tensor) -> Tensor:
    return (t.t() if _layout(t) else t.contiguous()).reshape(-1)


def broadcast_from_owners(tensors: Sequence[Sequence[Tensor]], owners: Sequence[int],
                          world: int) -> list[list[Tensor]]:
    """Make job ``i``'s tensors those of rank ``owners[i]`` on every rank, bit for bit.

    ``tensors[i]``: the owner's results (on the owner) or same-shaped buffers (elsewhere).
    One flat ``broadcast`` per owner and (dtype, device), issued asynchronously
    together.  The memory layout travels along (one number per tensor): a matrix
    product reads a column-major and a row-major operand in different orders, so
    a copy with another layout would round differently from the owner's.  The
    owner's tensors are returned as given (made contiguous if they were neither).
    """
    me = dist.get_rank()
    out = [list(ts) for ts in tensors]
    pending = []
    for src in range(world):
        jobs = [i for i, o in enumerate(owners) if o == src]
        buckets: dict = {}
        for i in jobs:
            for j, t in enumerate(tensors[i]):
                buckets.setdefault((t.dtype, t.device), []).append((i, j))
        for (dtype, device), slots in buckets.items():
            size = sum(tensors[i][j].numel() for i, j in slots)
            if src == me:
                for i, j in slots:
                    t = out[i][j]
                    if not t.is_contiguous() and not _layout(t):
                        out[i][j] = t.contiguous()
                layout = [float(_layout(out[i][j])) for i, j in slots]
                flat = torch.cat([_flat(out[i][j]) for i, j in slots]
                                 + [torch.tensor(layout, dtype=dtype, device=device)])
            else:
                flat = torch.empty(size + len(slots), dtype=dtype, device=device)
            pending.append((src, slots, size, flat,
                            dist.broadcast(flat, src, async_op=True)))
    for src, slots, size, flat, work in pending:
        work.wait()
        if src == me:
            continue
        off = 0
        for k, (i, j) in enumerate(slots):
            t = tensors[i][j]
            part = flat[off : off + t.numel()]
            if flat[size + k].item() > 0:  # column-major, as LAPACK returns it
                out[i][j] = part.view(t.shape[::-1]).clone().t()
            else:
                out[i][j] = part.view_as(t).clone()
            off += t.numel()
    return out
