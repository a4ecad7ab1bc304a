"""The ten quantities a user can ask :func:`curvopt.collect` for (BackPACK's names).

Each class is a small, immutable request: it names the attribute the result is
stored under (``savefield``, identical to BackPACK 1.7) and carries the options
of the request (``mc_samples``).  Each is defined, with its formula, in
:mod:`curvopt.quantities`; this module is the user-facing namespace.

Scaling (identical to BackPACK): let the loss be
:math:`\\mathcal{L} = f \\sum_{n=1}^N \\ell_n` with :math:`f = 1/N'` for
``reduction='mean'`` (:math:`N'` counts every averaged element, e.g.
:math:`N \\cdot D` for ``MSELoss``) and :math:`f = 1` for ``reduction='sum'``.
Per-sample quantities are those of :math:`f \\ell_n`.
"""

from __future__ import annotations

from .quantities import (
    KFAC,
    KFLR,
    KFRA,
    PUBLIC,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SumGradSquared,
    Variance,
)
from .quantities import Quantity as Extension

#: every public quantity class (the ten), in registration order
ALL = PUBLIC
FIRST_ORDER = tuple(q for q in ALL if not q.needs_loss)
SECOND_ORDER = tuple(q for q in ALL if q.needs_loss)

__all__ = [
    "Extension",
    "BatchGrad",
    "SumGradSquared",
    "Variance",
    "BatchL2Grad",
    "DiagGGNExact",
    "DiagGGNMC",
    "KFAC",
    "KFLR",
    "KFRA",
    "DiagHessian",
    "ALL",
    "FIRST_ORDER",
    "SECOND_ORDER",
]
