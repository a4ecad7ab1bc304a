"""Batch-level statistics of the *global* batch under ``torch.distributed``.

Each rank computes its quantities from its own ``N_r`` samples, scaled by its
own loss normalizer ``f_r``; the single-process result on the concatenated
batch of ``N = Σ_r N_r`` samples has ``f``.  With :math:`\\rho_r = f/f_r`
(``N_r/N`` for a mean-reduced loss, 1 for a sum):

* per-sample gradients scale by :math:`\\rho_r`, so ``grad_batch`` and
  ``batch_l2`` (which stay on their rank, optionally gathered) are rescaled by
  :math:`\\rho_r` and :math:`\\rho_r^2`;
* ``sum_grad_squared`` :math:`= \\sum_r \\rho_r^2 s_r`; ``variance`` from the
  global second moment and the global mean gradient :math:`\\sum_r \\rho_r t_r`;
* quantities linear in the loss (GGN/Hessian diagonals, Kronecker ``G``) :math:`\\sum_r \\rho_r q_r`;
* batch averages (Kronecker ``A``, KFRA's ``G``) :math:`\\sum_r (N_r/N)\\, q_r`.

All reductions of one backward pass are bucketed into a single flat
``all_reduce`` per dtype/device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SCALE_G, SCALE_A = "G", "A"


class Factors(list):
    """A list of Kronecker factors that remembers each factor's role ("G" or "A")."""

    roles: tuple = ()

    @classmethod
    def of(cls, factors, roles):
        out = cls(factors)
        out.roles = tuple(roles)
        return out


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _allreduce_bucketed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
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


def global_batch(n_local: int, device) -> int:
    t = torch.tensor([float(n_local)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def reduce_results(results: dict, totals: dict, n_local: int, rho: float, n_global: int,
                   gather: bool = False) -> None:
    """Turn rank-local ``results`` (in place) into the global batch's."""
    w = n_local / n_global
    jobs = []  # (name, key, index or None, tensor)
    for name, res in results.items():
        if "grad_batch" in res:
            res["grad_batch"] = res["grad_batch"] * rho
        if "batch_l2" in res:
            res["batch_l2"] = res["batch_l2"] * rho**2
        if "sum_grad_squared" in res or "variance" in res:
            s = res.get("sum_grad_squared", res.get("_sgs"))
            jobs.append((name, "_sgs", None, s * rho**2))
            if "variance" in res:
                jobs.append((name, "_total", None, totals[name] * rho))
        for key in ("diag_ggn_exact", "diag_ggn_mc", "diag_h"):
            if key in res:
                jobs.append((name, key, None, res[key] * rho))
        for key in ("kfac", "kflr", "kfra"):
            if key in res:
                f = res[key]
                roles = getattr(f, "roles", ("G",) * len(f))
                for i, (fac, role) in enumerate(zip(f, roles)):
                    jobs.append((name, key, i, fac * (rho if role == SCALE_G else w)))
    reduced = _allreduce_bucketed([j[3] for j in jobs]) if jobs else []
    acc: dict = {}
    for (name, key, i, _), t in zip(jobs, reduced):
        res = results[name]
        if key in ("_sgs", "_total"):
            acc.setdefault(name, {})[key] = t
        elif i is None:
            res[key] = t
        else:
            res[key][i] = t
    for name, d in acc.items():
        res = results[name]
        res.pop("_sgs", None)
        if "sum_grad_squared" in res:
            res["sum_grad_squared"] = d["_sgs"]
        if "variance" in res:
            res["variance"] = (d["_sgs"] / n_global - (d["_total"] / n_global) ** 2).clamp_min(0)
    if gather:
        for res in results.values():
            for key in ("grad_batch", "batch_l2"):
                if key in res:
                    res[key] = all_gather_batch(res[key])


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


def allreduce_mean_(H: torch.Tensor, n_local: int, n_global: int) -> torch.Tensor:
    """Batch-weighted average of ``H`` over ranks (KFRA's recursion)."""
    H = H * (n_local / n_global)
    dist.all_reduce(H)
    return H
