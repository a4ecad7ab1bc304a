"""The ten quantities a user can ask :func:`curvopt.collect` for.

Each class is a small, immutable request: it names the attribute the result is
stored under (``savefield``, identical to BackPACK 1.7) and carries the
options of the request (``mc_samples``).  The computation lives in
:mod:`curvopt.quantities`; these classes only describe *what* is wanted.

Scaling (identical to BackPACK): let the loss be
:math:`\\mathcal{L} = f \\sum_{n=1}^N \\ell_n` with :math:`f = 1/N'` for
``reduction='mean'`` (:math:`N'` counts every averaged element, e.g.
:math:`N \\cdot D` for ``MSELoss``) and :math:`f = 1` for ``reduction='sum'``.
Per-sample quantities are those of :math:`f \\ell_n`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "FIRST_ORDER",
    "SECOND_ORDER",
]


@dataclass(frozen=True)
class Extension:
    """Base class: a request for one quantity, stored as ``param.<savefield>``."""

    savefield = ""
    #: whether the quantity needs the loss function (second order) or only the gradient.
    needs_loss = False

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------- first order
@dataclass(frozen=True)
class BatchGrad(Extension):
    """Individual gradients, ``grad_batch`` of shape ``[N, *p.shape]``.

    .. math:: \\texttt{grad\\_batch}[n] = f\\, \\nabla_\\theta \\ell_n

    With a mean-reduced loss these are :math:`\\tfrac1N g_n` (BackPACK's
    convention), so ``grad_batch.sum(0)`` equals ``p.grad``.  Only meaningful
    when samples are independent (no BatchNorm in train mode).
    """

    savefield = "grad_batch"


@dataclass(frozen=True)
class SumGradSquared(Extension):
    """Second moment of the individual gradients, ``sum_grad_squared`` (``p.shape``).

    .. math:: \\texttt{sum\\_grad\\_squared} = \\sum_n (f\\, \\nabla_\\theta \\ell_n)^{\\odot 2}

    Computed without materialising ``[N, *p.shape]`` where the layer allows it
    (dense layers with one row per sample: :math:`(G^{\\odot2})^\\top X^{\\odot2}`).
    """

    savefield = "sum_grad_squared"


@dataclass(frozen=True)
class Variance(Extension):
    """Population variance (``unbiased=False``) of ``grad_batch`` over the batch, ``variance``.

    .. math:: \\texttt{variance} = \\tfrac1N \\texttt{sum\\_grad\\_squared}
              - \\big(\\tfrac1N \\sum_n f \\nabla_\\theta \\ell_n\\big)^{\\odot 2}

    Clamped at zero against round-off.
    """

    savefield = "variance"


@dataclass(frozen=True)
class BatchL2Grad(Extension):
    """Squared L2 norm of each individual gradient, ``batch_l2`` of shape ``[N]``.

    .. math:: \\texttt{batch\\_l2}[n] = \\lVert f\\, \\nabla_\\theta \\ell_n \\rVert_2^2

    For layers with several rows per sample (sequences, convolutions) it uses
    the Gram identity :math:`\\lVert G_n^\\top X_n\\rVert_F^2 =
    \\langle G_n G_n^\\top, X_n X_n^\\top\\rangle` when that is cheaper.
    """

    savefield = "batch_l2"


# -------------------------------------------------------------------------- second order
@dataclass(frozen=True)
class DiagGGNExact(Extension):
    """Diagonal of the generalized Gauss-Newton matrix, ``diag_ggn_exact`` (``p.shape``).

    .. math:: \\operatorname{diag}\\Big(f \\sum_n J_n^\\top H_n J_n\\Big),
              \\quad H_n = \\nabla^2_{o}\\ell_n,\\; J_n = \\partial o_n / \\partial\\theta

    Uses a symmetric factorisation :math:`H_n = S_n S_n^\\top` of the loss
    Hessian; its columns travel back through autograd.
    """

    savefield = "diag_ggn_exact"
    needs_loss = True


@dataclass(frozen=True)
class DiagGGNMC(Extension):
    """Monte-Carlo estimate of the GGN diagonal, ``diag_ggn_mc`` (``p.shape``).

    .. math:: \\frac{f}{M}\\sum_{m=1}^M \\sum_n \\big(J_n^\\top \\nabla_o \\ell(o_n, \\tilde y_{n,m})\\big)^{\\odot2},
              \\quad \\tilde y_{n,m} \\sim p(y \\mid o_n)

    Targets are drawn from the loss's likelihood with torch's global RNG
    (CrossEntropy: categorical; MSE: :math:`\\mathcal N(o, 1/2)`;
    BCEWithLogits: Bernoulli), so ``torch.manual_seed`` reproduces them.

    Args:
        mc_samples: number of sampled targets :math:`M` per input.
    """

    mc_samples: int = 1
    savefield = "diag_ggn_mc"
    needs_loss = True

    def __post_init__(self):
        if int(self.mc_samples) < 1:
            raise ValueError(f"DiagGGNMC: mc_samples must be >= 1, got {self.mc_samples}")


@dataclass(frozen=True)
class KFAC(Extension):
    """Kronecker-factored GGN with Monte-Carlo loss Hessian, ``kfac`` (list of factors).

    Factors in row-major order (BackPACK's): weight of Linear/Conv:
    ``[G, A]`` with :math:`A = \\tfrac1N\\sum_n X_n^\\top X_n` (inputs or
    unfolded patches, uncentred, no bias column) and
    :math:`G = \\sum_n \\sum_s v_{n,s} v_{n,s}^\\top` from the backpropagated
    MC square root; biases: ``[G]``. A single factor is the dense block.
    Martens & Grosse (2015), Grosse & Martens (2016).

    Args:
        mc_samples: number of sampled targets per input.
    """

    mc_samples: int = 1
    savefield = "kfac"
    needs_loss = True

    def __post_init__(self):
        if int(self.mc_samples) < 1:
            raise ValueError(f"KFAC: mc_samples must be >= 1, got {self.mc_samples}")


@dataclass(frozen=True)
class KFLR(Extension):
    """Kronecker factors like :class:`KFAC` but from the exact loss Hessian square root, ``kflr``.

    Botev, Ritter & Barber (2017), extended to convolutions as Grosse & Martens (2016).
    """

    savefield = "kflr"
    needs_loss = True


@dataclass(frozen=True)
class KFRA(Extension):
    """Kronecker factors with a batch-averaged output Hessian passed back layer by layer, ``kfra``.

    .. math:: \\bar H_{\\text{top}} = f \\sum_n H_n,\\quad
              \\bar H_{\\text{in}} = \\tfrac1N \\sum_n J_n^\\top \\bar H_{\\text{out}} J_n

    ``G`` of a layer is :math:`\\bar H` at its output (summed over positions
    for convolutions); ``A`` as in :class:`KFAC`.  Botev, Ritter & Barber (2017).
    """

    savefield = "kfra"
    needs_loss = True


@dataclass(frozen=True)
class DiagHessian(Extension):
    """Exact diagonal of the Hessian of the loss, ``diag_h`` (``p.shape``).

    The GGN diagonal plus the residual terms of every smooth elementwise
    activation above the parameter,
    :math:`\\sum_m \\operatorname{diag}(J_m^\\top \\operatorname{diag}(\\phi_m''(a_m) \\odot \\partial\\mathcal L/\\partial \\phi_m) J_m)`.
    Piecewise-linear activations (ReLU, LeakyReLU, max pooling) add nothing.
    """

    savefield = "diag_h"
    needs_loss = True


FIRST_ORDER = (BatchGrad, SumGradSquared, Variance, BatchL2Grad)
SECOND_ORDER = (DiagGGNExact, DiagGGNMC, KFAC, KFLR, KFRA, DiagHessian)
