"""The second moment of the per-sample gradients in a Kronecker eigenbasis (EKFAC's diagonal).

George, Laurent, Bouthillier, Ballas & Vincent (2018), "Fast Approximate Natural
Gradient Descent in a Kronecker-factored Eigenbasis", eq. (8): with
:math:`g_n = f\\nabla\\ell_n` the per-sample gradients (``grad_batch``'s scaling) and
:math:`Q_1, Q_2` the eigenvectors of a parameter's Kronecker factors (row-major
order, as the layout returns the factors),

.. math:: \\texttt{kfe\\_sum\\_grad\\_squared} = \\sum_n \\big(Q_1^\\top g_n Q_2\\big)^{\\odot 2}
          \\qquad (\\text{one factor: } \\textstyle\\sum_n (Q_1^\\top g_n)^{\\odot2}),

per group for grouped factors (``[*B, d, d]``), shaped like the parameter.

Computed without the per-sample gradients where the layout can rotate its parts
(:meth:`~curvopt.rules.layout.Bound.rotated`): a dense layer's rows by :math:`Q_G` and
inputs by :math:`Q_A`, then the sum of squares of :mod:`.first_order` (one row per
sample: :math:`(R'^{\\odot2})^\\top X'^{\\odot2}`, :math:`N(d_G^2 + d_A^2 + d_G d_A)`
multiply-adds instead of :math:`N d_G d_A (d_G + d_A)`); a bias's rows by :math:`Q_G`.
Everything else (Embedding, ConvTranspose, norm affine, fallback modules, a weight shared
by layers of different types) projects the materialised per-sample gradients
(:func:`project_sum_sq`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from .base import ParamContext, Quantity
from .first_order import SumGradSquared, _per_sample


def project_sum_sq(per_sample: Tensor, eigenvectors: Sequence[Tensor]) -> Tensor:
    """:math:`\\sum_n (Q_1^\\top g_n Q_2)^{\\odot2}` of materialised per-sample gradients.

    Args:
        per_sample: ``[N, *shape]``, any shape whose ``numel`` tiles the factors.
        eigenvectors: :math:`[Q_1]` or :math:`[Q_1, Q_2]`, ``[*B, d_i, d_i]``.

    Returns:
        ``[*B, d_1(, d_2)]`` in ``per_sample``'s dtype.
    """
    Qs = [Q.to(per_sample.dtype) for Q in eigenvectors]
    batch, sides = tuple(Qs[0].shape[:-2]), [Q.shape[-1] for Q in Qs]
    if len(Qs) > 2 or any(tuple(Q.shape[:-2]) != batch for Q in Qs):
        raise ValueError(f"kfe_sum_grad_squared: expected one or two eigenbases with equal "
                         f"group dimensions, got shapes {[tuple(Q.shape) for Q in Qs]}")
    t = per_sample.reshape(per_sample.shape[0], *batch, *sides)
    if len(Qs) == 1:
        t = (t.unsqueeze(-2) @ Qs[0]).squeeze(-2)  # row n: g_nᵀ Q = (Qᵀ g_n)ᵀ
    else:
        t = Qs[0].mT @ t @ Qs[1]
    return (t * t).sum(0)


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity (the callable is state)
class KFESumGradSquared(Quantity):
    """:math:`\\sum_n (Q_1^\\top g_n Q_2)^{\\odot 2}` for each parameter ``bases`` gives a basis.

    Args:
        bases: ``param -> [Q_1(, Q_2)]`` (the eigenvectors of its Kronecker factors, in
            the layout's factor order) or ``None`` (nothing is computed for it).  Read
            at the end of backward.

    Scales like ``sum_grad_squared`` (:math:`f^2`; power 2 over micro-batches,
    :math:`\\sum_r \\rho_r^2 q_r` over ranks).  Not one of BackPACK's ten: an
    optimizer's request (``KFACOptimizer(eigen_correction=True)``), absent from
    :data:`curvopt.extensions.ALL`, ``track=`` and the recipes (``public = False``).
    """

    bases: Callable[[Tensor], Sequence[Tensor] | None] | None = None

    savefield = "kfe_sum_grad_squared"
    power = 2
    public = False

    def compute(self, ctx: ParamContext):
        Qs = None if self.bases is None else self.bases(ctx.param)
        if Qs is None:
            return None
        Qs = list(Qs)
        bounds = ctx.grad_bounds()
        rot = bounds[0].rotated(Qs) if len(bounds) == 1 else None
        if rot is not None:
            return rot.sum_sq().reshape(ctx.param.shape)
        return project_sum_sq(_per_sample(ctx), Qs).reshape(ctx.param.shape)

    sync = SumGradSquared.sync  # the same scaling over ranks
