"""Shared maths of the second-order quantities: sending columns back, diagonals, Kronecker factors.

At the start of backward the loss-Hessian square root (exact or sampled) at the
model output ``o`` is sent back to every recorded layer output with
``torch.autograd.grad(o, edges, s_k, retain_graph=True)`` (:func:`send_back`);
per parameter the layouts then reduce the columns:

* diagonal: :math:`\\sum_{k,n} (\\nabla\\ell_{kn})^{\\odot2}`
  (``Bound.sum_sq``, no per-sample tensor for one-row-per-sample layers);
* Kronecker: ``[G, A]`` with :math:`G = \\sum_{k,n,s} r r^\\top`,
  :math:`A = \\tfrac1N\\sum_{n,s} x x^\\top`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UnsupportedModuleError
from ..factors import BATCH, LOSS, Factors
from ..rules.layout import MAX_DENSE_BLOCK, DenseBound, ElementwiseBound, EmbeddingBound


def _batched_ok(recs) -> bool:
    """How K columns travel back: one ``is_grads_batched`` call (vmap over the backward
    formulas) for row outputs (MLPs: one large matmul instead of K small ones), one call
    per column when any output has spatial extent (convolutions: measured faster)."""
    return all(r.output.dim() <= 2 for r in recs)


def grads(output, edges, columns, batched):
    """``[per edge: [K, *edge shape] or None]`` for columns ``[K, *output.shape]``."""
    if batched and len(columns) > 1:
        return list(
            torch.autograd.grad(
                output, edges, columns, retain_graph=True, allow_unused=True,
                is_grads_batched=True,
            )
        )
    per = [[] for _ in edges]
    for s in columns:
        gs = torch.autograd.grad(output, edges, s, retain_graph=True, allow_unused=True)
        for lst, gi in zip(per, gs):
            lst.append(gi)
    return [None if all(x is None for x in lst) else lst for lst in per]


def send_back(output, recs, columns, store: Callable) -> None:
    """``columns: [K, *output.shape]`` → ``store(record, [K, *record.output.shape])`` for
    every record the columns reach."""
    if not recs:
        return
    columns = columns.to(output.dtype if torch.is_tensor(output) else columns.dtype)
    res = grads(output, [r.edge for r in recs], columns, _batched_ok(recs))
    for r, g in zip(recs, res):
        if g is None:
            continue
        if isinstance(g, list):
            g = torch.stack([torch.zeros_like(r.output) if x is None else x for x in g])
        store(r, g.to(r.dtype))  # float32 (or wider) even for low-precision activations


def diagonal(ctx, pick, weights: Callable | None = None):
    """:math:`\\sum_{k,n} w_{kn} (\\nabla\\ell_{kn})^{\\odot2}` over the columns ``pick`` selects.

    ``weights`` (DiagHessian residuals) picks signed per-column, per-sample weights ``[K, N]``.
    """
    p = ctx.param
    bounds = ctx.bounds(pick)
    if not bounds:
        return torch.zeros_like(p)
    w = None
    if weights is not None:
        w = next(weights(r.columns) for r, _ in ctx.items if pick(r.columns) is not None)
    if len(bounds) == 1:
        return bounds[0].sum_sq(w)
    # A weight shared across layer types: sum the per-sample gradients before squaring.
    sq = sum(b.per_sample() for b in bounds).pow(2)
    if w is not None:
        sq = sq * w.reshape(*w.shape, *([1] * p.dim()))
    return sq.sum((0, 1))


def kronecker(ctx, pick) -> Factors | None:
    """Kronecker factors in row-major order (BackPACK's), or ``[dense block]``."""
    bounds = ctx.bounds(pick)
    p = ctx.param
    if not bounds:
        return None
    if len(bounds) == 1:
        b = bounds[0]
        if isinstance(b, DenseBound):
            # In the layout's kron_order: [G, A] (Linear, Conv; ConvTranspose as BackPACK,
            # [G, Ω] of weight.transpose(0, 1)) or [A, G] (HF Conv1D, weight [in, out]).
            fs, order = b.kron_factors()
            return Factors.of(fs, [LOSS if r == "G" else BATCH for r in order])
        if isinstance(b, ElementwiseBound) and b.Xhat is None:
            return Factors.of([b.kron_G()], (LOSS,))
        if isinstance(b, EmbeddingBound):
            return Factors.of([b.kron_A(), b.kron_G()], (BATCH, LOSS))
        return Factors.of([b.dense_block()], (LOSS,))
    ps = sum(b.per_sample() for b in bounds).flatten(2).flatten(0, 1)
    if ps.shape[1] > MAX_DENSE_BLOCK:
        raise UnsupportedModuleError(
            f"a dense curvature block of a parameter with {p.numel()} entries (shared by "
            f"layers of different types) exceeds {MAX_DENSE_BLOCK} per side; use the diagonal."
        )
    return Factors.of([ps.T @ ps], (LOSS,))


def sync_factors(value: Factors, gb):
    """Kronecker factors over ranks: loss-scaled ones ``Σ ρ_r q_r``, batch averages ``Σ w_r q_r``."""
    parts = [f * (gb.rho if s == LOSS else gb.w) for f, s in zip(value, value.scaling)]
    return parts, value.like


class KroneckerQuantity:
    """Micro-batches of Kronecker factors: loss-scaled factors ``Σ q z / Z``, batch
    averages ``Σ q n / N`` (mixed into the quantity classes that return :class:`Factors`)."""

    def unnormalize(self, value, ctx, z, n):
        return value.like([f * (z if s == LOSS else n) for f, s in zip(value, value.scaling)])

    def merge(self, a, b):
        if len(a) != len(b) or a.scaling != b.scaling:
            raise ValueError("Kronecker factors of different structure cannot be merged")
        return a.like([x + y for x, y in zip(a, b)])

    def normalize(self, state, Z, N):
        return state.like([f / (Z if s == LOSS else N) for f, s in zip(state, state.scaling)])
