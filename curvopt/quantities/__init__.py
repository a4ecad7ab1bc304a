"""Layer-agnostic formulas: one registered class per quantity (see :mod:`.base`).

* :mod:`.base` -- :class:`~.base.Quantity` (the request every quantity subclasses,
  registered in :data:`~.base.REGISTRY`), the captured :class:`~.base.Record`, the
  contexts quantities receive, the column-sender registry.
* :mod:`.first_order` -- BatchGrad, SumGradSquared, Variance, BatchL2Grad from the gradient.
* :mod:`.kfe` -- KFESumGradSquared: the second moment in a Kronecker eigenbasis (EKFAC's
  request; not public: ``public = False``).
* :mod:`.diag_ggn` -- exact/MC loss-Hessian square roots sent back; DiagGGNExact,
  DiagGGNMC, KFAC, KFLR from them (:mod:`._backprop` has the shared maths).
* :mod:`.kfra` -- KFRA's layer-by-layer batch-averaged Hessian.
* :mod:`.diag_hessian` -- DiagHessian: the GGN diagonal plus activation residuals.

A new quantity: a :class:`~.base.Quantity` subclass with ``savefield``, ``columns()``,
``compute()`` (and ``sync()`` unless it is linear in the loss) in a new file here,
imported below.  The engine, the distributed reduction, the optimizers' ``track=``
and the recipe schema all loop over :data:`REGISTRY`.
"""

# isort: off
# Importing registers the quantities, in this order: first order (they share work in it),
# then second order; it is also the order of track="all" and of the docs.
from . import first_order, kfe, diag_ggn, kfra, diag_hessian  # noqa: F401
# isort: on
from .base import REGISTRY, Quantity
from .diag_ggn import KFAC, KFLR, DiagGGNExact, DiagGGNMC
from .diag_hessian import DiagHessian
from .first_order import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from .kfe import KFESumGradSquared
from .kfra import KFRA

#: the ten user-facing quantity classes (BackPACK's), in registration order
PUBLIC = tuple(q for q in REGISTRY if q.public)
#: savefield -> public quantity class
BY_SAVEFIELD = {q.savefield: q for q in PUBLIC}

__all__ = ["REGISTRY", "PUBLIC", "BY_SAVEFIELD", "Quantity", "KFESumGradSquared", "BatchGrad", "SumGradSquared", "Variance",
           "BatchL2Grad", "DiagGGNExact", "DiagGGNMC", "KFAC", "KFLR", "KFRA", "DiagHessian"]
