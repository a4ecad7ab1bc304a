"""The few ``torch.distributed`` collectives curvopt uses (below engine and quantities)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_batch(n_local: int, device) -> int:
    """``Σ_r N_r`` over ranks."""
    t = torch.tensor([float(n_local)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def allreduce_bucketed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``tensors`` over ranks with one collective per (dtype, device) bucket."""
    out = list(tensors)
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat)
        off = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[off : off + n].view_as(tensors[i])
            off += n
    return out


def all_gather_batch(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-sample tensor ``[N_r, ...]`` over ranks in rank order."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros(m, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class GlobalBatch:
    """This rank's place in the global batch of one backward pass.

    ``n_local``/``n_global``: sample counts; ``rho = f_global / f_local`` (this rank's
    share of the loss normalizer: ``N_r/N`` for a plain mean, the loss's own denominator
    with class weights or ignored targets, 1 for a sum); ``w = n_local / n_global``.
    """

    def __init__(self, n_local: int, n_global: int, rho: float):
        self.n_local, self.n_global, self.rho = n_local, n_global, rho
        self.w = n_local / n_global

    @classmethod
    def of(cls, n_local: int, device, local_normalizer: torch.Tensor | None, summed: bool):
        n_global = global_batch(n_local, device)
        if summed:
            rho = 1.0
        elif local_normalizer is None:
            rho = n_local / n_global
        else:
            local = local_normalizer.detach().double().reshape(1).clone()
            glob = local.clone()
            dist.all_reduce(glob)
            rho = float(local / glob)
        return cls(n_local, n_global, rho)

    def mean_(self, H: torch.Tensor) -> torch.Tensor:
        """Batch-weighted average of ``H`` over ranks (KFRA's recursion)."""
        H = H * self.w
        dist.all_reduce(H)
        return H

    def loss_sum_(self, H: torch.Tensor) -> torch.Tensor:
        """``Σ_r ρ_r H_r``: a quantity linear in the loss, summed over ranks."""
        H = H * self.rho
        dist.all_reduce(H)
        return H
