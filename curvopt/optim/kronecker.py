"""Curvature blocks of one parameter: Kronecker-factored, or diagonal as a fallback.

A block is a thin *view* over the parameter's optimizer state (a ``dict``,
``optimizer.state[p]``): it owns no storage, so ``state_dict()`` /
``load_state_dict()`` of the optimizer save and restore it completely.  The
maths lives in :mod:`curvopt.optim.functional`; a block only decides what is
cached (kfac-jax's "curvature block").

State keys of a :class:`KroneckerBlock`:

=====================  ==========================================================
``factors``            running averages :math:`[\\bar F_1, \\dots]` (row-major ``[G, A]``;
                       ``[*B, d, d]`` with group dimensions ``B``, see
                       :func:`~curvopt.optim.functional.kronecker_dims`)
``factor_updates``     number of factor updates so far (int)
``inverses``           cached :math:`(\\bar F_i + \\delta_i I)^{-1}` (``damping_mode="pi"``)
``eigenvectors``       cached :math:`Q_i` (``damping_mode="eigen"``)
``eigenvalues``        cached :math:`d_i` (``damping_mode="eigen"``)
``inverse_damping``    the λ the cached inverses were computed with
``inverse_updates``    number of inverse/eigendecomposition computations (int)
=====================  ==========================================================

An :class:`EKFACBlock` keeps the factors and eigenbases as a ``"eigen"``
:class:`KroneckerBlock`, and

=====================  ==========================================================
``kfe_scale``          running average of the curvature's diagonal in the
                       eigenbasis, :math:`s` (shaped like the parameter)
``kfe_updates``        number of :math:`s` estimates so far (int)
=====================  ==========================================================

A :class:`DiagonalBlock` keeps ``diag_avg`` (running average of the GGN
diagonal) and ``factor_updates``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..quantities.kfe import project_sum_sq
from . import functional as F

__all__ = ["KroneckerBlock", "EKFACBlock", "DiagonalBlock", "DAMPING_MODES"]

DAMPING_MODES = ("pi", "eigen")


class KroneckerBlock:
    """Kronecker-factored curvature of a parameter, :math:`\\bar F_1 \\otimes \\dots`.

    Args:
        state: the parameter's optimizer state dict (read and written in place).
        damping_mode: ``"pi"``: Tikhonov damping of each factor with the π
            correction, cached explicit inverses (two matrix products per
            step); ``"eigen"``: exact damping :math:`(C + \\lambda I)^{-1}` in
            the factors' eigenbasis, cached eigendecompositions (four matrix
            products per step; λ may change between decompositions).
    """

    def __init__(self, state: dict, damping_mode: str = "pi"):
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        self.state = state
        self.damping_mode = damping_mode

    # -------------------------------------------------------------------- factors
    @property
    def factors(self) -> list[Tensor] | None:
        return self.state.get("factors")

    def update_factors(self, raw: Sequence[Tensor], decay: float) -> None:
        """Update :math:`\\bar F_i \\leftarrow \\varepsilon \\bar F_i + (1-\\varepsilon) F_i`.

        The first call copies the raw factors.
        """
        old = self.state.get("factors")
        if old is not None and len(old) != len(raw):
            raise ValueError(f"got {len(raw)} factors, the running average has {len(old)}")
        self.state["factors"] = [
            F.ema(None if old is None else o, r.detach(), decay)
            for o, r in zip(old if old is not None else [None] * len(raw), raw, strict=True)
        ]
        self.state["factor_updates"] = self.state.get("factor_updates", 0) + 1

    # -------------------------------------------------------------------- inverses
    @property
    def has_inverse(self) -> bool:
        key = "inverses" if self.damping_mode == "pi" else "eigenvectors"
        return key in self.state

    def update_inverse(self, damping: float) -> None:
        """Recompute the cache from the current running averages (float64 inside)."""
        factors = self.factors
        if factors is None:
            raise RuntimeError("update_inverse called before any factor update")
        if self.damping_mode == "pi":
            self.state["inverses"] = F.damped_inverses(factors, damping)
        else:
            Qs, ds = F.eigendecomposition(factors)
            self.state["eigenvectors"], self.state["eigenvalues"] = Qs, ds
        self.state["inverse_damping"] = float(damping)
        self.state["inverse_updates"] = self.state.get("inverse_updates", 0) + 1

    @property
    def inverse_cost(self) -> float:
        """:math:`\\sum_i |B|\\, d_i^3`: the relative cost of :meth:`update_inverse`."""
        return float(sum(f.numel() * f.shape[-1] for f in self.factors))

    def cache(self) -> list[Tensor]:
        """The cached tensors, flat: inverses, or eigenvectors then eigenvalues."""
        if self.damping_mode == "pi":
            return list(self.state["inverses"])
        return list(self.state["eigenvectors"]) + list(self.state["eigenvalues"])

    def cache_buffers(self) -> list[Tensor]:
        """Uninitialised tensors shaped like :meth:`cache` would be after an update."""
        fs = self.factors
        if fs is None:
            raise RuntimeError("cache_buffers called before any factor update")
        mats = [f.new_empty(f.shape) for f in fs]
        if self.damping_mode == "pi":
            return mats
        return mats + [f.new_empty(f.shape[:-1]) for f in fs]

    def set_cache(self, tensors: Sequence[Tensor], damping: float,
                  computed_here: bool = False) -> None:
        """Install a cache computed elsewhere (another rank) as :meth:`update_inverse` would.

        ``computed_here``: :meth:`update_inverse` ran on these factors already (only the
        tensors are replaced, the counters are left alone).
        """
        tensors = list(tensors)
        if self.damping_mode == "pi":
            self.state["inverses"] = tensors
        else:
            k = len(tensors) // 2
            self.state["eigenvectors"], self.state["eigenvalues"] = tensors[:k], tensors[k:]
        if computed_here:
            return
        self.state["inverse_damping"] = float(damping)
        self.state["inverse_updates"] = self.state.get("inverse_updates", 0) + 1

    def multiply(self, grad: Tensor, damping: float) -> Tensor:
        """The damped inverse curvature times ``grad`` (``grad``'s shape and dtype).

        ``"pi"`` uses the cached inverses (computed with the λ of the last
        :meth:`update_inverse`); ``"eigen"`` applies ``damping`` exactly.
        """
        if self.damping_mode == "pi":
            return F.precondition_inverses(grad, self.state["inverses"])
        return F.precondition_eigen(
            grad, self.state["eigenvectors"], self.state["eigenvalues"], damping
        )

    def curvature_matvec(self, v: Tensor) -> Tensor:
        """:math:`(\\bar F_1 \\otimes \\dots)\\, v` with the running averages (quadratic model)."""
        return F.kronecker_matvec([f.to(v.dtype) for f in self.factors], v)


class EKFACBlock(KroneckerBlock):
    """Eigenvalue-corrected K-FAC (George et al. 2018): the factors' eigenbasis, a fitted diagonal.

    The eigenbases :math:`Q_i` of the running-average factors are recomputed by
    :meth:`update_inverse` (float64); the diagonal :math:`s` in that basis is
    re-estimated from per-sample gradients by :meth:`update_scale` and
    averaged like the factors.  When the basis changes, the running average is
    carried over (:func:`~curvopt.optim.functional.kfe_carry_over`: the old
    curvature's diagonal in the new basis).  Direction:
    :math:`V = Q[(Q^\\top \\nabla) \\oslash (s + \\lambda)]Q^\\top`
    (:func:`~curvopt.optim.functional.precondition_kfe`).  Until the first
    estimate of :math:`s` the K-FAC eigenvalues :math:`d_G d_A^\\top` stand in.
    """

    def __init__(self, state: dict):
        super().__init__(state, "eigen")

    def update_inverse(self, damping: float) -> None:
        old = self.state.get("eigenvectors")
        super().update_inverse(damping)
        self._carry_over(old)

    def set_cache(self, tensors: Sequence[Tensor], damping: float,
                  computed_here: bool = False) -> None:
        old = self.state.get("eigenvectors")
        super().set_cache(tensors, damping, computed_here)
        if not computed_here:
            self._carry_over(old)

    def _carry_over(self, old: Sequence[Tensor] | None) -> None:
        s = self.state.get("kfe_scale")
        if s is None or old is None:
            return
        view = F.kronecker_dims(s.shape, self.state["eigenvectors"])
        moved = F.kfe_carry_over(s.reshape(view), old, self.state["eigenvectors"])
        self.state["kfe_scale"] = moved.reshape(s.shape)

    def projected_sum(self, grad_batch: Tensor) -> Tensor:
        """:math:`\\sum_n (Q^\\top g_n Q)^{\\odot2}` of ``grad_batch`` ``[N, *p.shape]`` in the
        current basis (:func:`~curvopt.quantities.kfe.project_sum_sq`, what the engine's
        ``kfe_sum_grad_squared`` computes in the basis it is given)."""
        s = project_sum_sq(grad_batch.detach(), self.state["eigenvectors"])
        return s.reshape(grad_batch.shape[1:])

    def update_scale(self, partial: Tensor, z, decay: float) -> None:
        """:math:`s \\leftarrow \\varepsilon s + (1-\\varepsilon)\\, z \\cdot` ``partial``
        (first estimate: copied); ``partial`` from :meth:`projected_sum` (summed over
        ranks), :math:`z` the loss normalizer of the batch."""
        self.state["kfe_scale"] = F.ema(self.state.get("kfe_scale"), partial * z, decay)
        self.state["kfe_updates"] = self.state.get("kfe_updates", 0) + 1

    def _scale(self) -> Tensor:
        s = self.state.get("kfe_scale")
        return s if s is not None else F.eigenvalue_products(self.state["eigenvalues"])

    def multiply(self, grad: Tensor, damping: float) -> Tensor:
        return F.precondition_kfe(grad, self.state["eigenvectors"], self._scale(), damping)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        """:math:`Q\\,\\mathrm{diag}(s)\\,Q^\\top v` (the EKFAC curvature; quadratic model)."""
        return F.kfe_matvec(v, self.state["eigenvectors"], self._scale())


class DiagonalBlock:
    """Diagonal curvature (running average of the GGN diagonal): curvopt's K-FAC fallback.

    Used for parameters the engine gives no Kronecker factors for.  The
    direction is :math:`\\nabla \\oslash (\\bar h + \\lambda)`, the exact damped
    inverse of a diagonal curvature (no cache needed).
    """

    def __init__(self, state: dict):
        self.state = state

    def update_factors(self, diag: Tensor, decay: float) -> None:
        self.state["diag_avg"] = F.ema(self.state.get("diag_avg"), diag.detach(), decay)
        self.state["factor_updates"] = self.state.get("factor_updates", 0) + 1

    @property
    def has_inverse(self) -> bool:
        return "diag_avg" in self.state

    def update_inverse(self, damping: float) -> None:  # nothing to cache
        pass

    def multiply(self, grad: Tensor, damping: float) -> Tensor:
        return F.precondition_diagonal(grad, self.state["diag_avg"].to(grad.dtype), damping)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        return self.state["diag_avg"].to(v.dtype) * v
