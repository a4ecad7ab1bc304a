"""Batch-level statistics of the *global* batch under ``torch.distributed``.

Each rank computes its quantities from its own ``N_r`` samples, scaled by its
own loss normalizer ``f_r``; the single-process result on the concatenated
batch of ``N = Σ_r N_r`` samples has ``f``.  With :math:`\\rho_r = f/f_r`
(``N_r/N`` for a mean-reduced loss, 1 for a sum), each quantity says how it
combines (:meth:`curvopt.quantities.base.Quantity.sync`):

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

from .._dist import GlobalBatch, active, allreduce_bucketed
from ..quantities.first_order import PER_SAMPLE, gather

__all__ = ["active", "reduce_results", "GlobalBatch"]


def reduce_results(results: dict, jobs: list, gb: GlobalBatch, gather_per_sample: bool) -> None:
    """Turn rank-local ``results`` (in place) into the global batch's.

    ``jobs``: ``[(name, quantity, param context)]`` for every value in ``results``.
    """
    pending = []  # (name, savefield, parts slice, finish)
    parts: list = []
    for name, q, ctx in jobs:
        value = results[name][q.savefield]
        mine, finish = q.sync(value, ctx, gb)
        pending.append((name, q, len(parts), len(mine), finish))
        parts.extend(mine)
    reduced = allreduce_bucketed(parts) if parts else []
    for name, q, i, n, finish in pending:
        value = finish(reduced[i : i + n])
        if gather_per_sample and isinstance(q, PER_SAMPLE):
            value = gather(value)
        results[name][q.savefield] = value
