"""Kronecker factors as the engine returns them, and how each one scales.

A ``kfac``/``kflr``/``kfra`` result is a list of factors in row-major order
(BackPACK's convention: ``[G, A]`` for a Linear weight, ``[G]`` for a bias, a
single dense block for parameters without Kronecker structure).  The engine
hands out plain-list subclasses that also remember, per factor, what it is an
average of, because that decides how the factor combines over ranks and
micro-batches:

* ``LOSS``: a sum over samples of loss-scaled terms (``G`` of KFAC/KFLR, dense
  GGN blocks): it scales with the loss normalizer, ``Σ_r ρ_r q_r`` over ranks;
* ``BATCH``: a batch average (``A``, KFRA's ``G``): ``Σ_r (N_r/N) q_r``.

Lives below both :mod:`curvopt.quantities` and :mod:`curvopt.engine`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

LOSS, BATCH = "loss", "batch"


class Factors(list):
    """A list of Kronecker factors with one scaling kind (``LOSS``/``BATCH``) per factor."""

    scaling: tuple = ()

    @classmethod
    def of(cls, factors: Iterable[Tensor], scaling: Iterable[str]) -> Factors:
        out = cls(factors)
        out.scaling = tuple(scaling)
        if len(out.scaling) != len(out):
            raise ValueError("Factors.of: one scaling kind per factor")
        return out

    def like(self, factors: Iterable[Tensor]) -> Factors:
        """New factors with this one's scaling kinds."""
        return Factors.of(factors, self.scaling)
